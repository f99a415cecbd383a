"""Public-key encodings and local signature verification (no private key ever here).

Producers use these to check a signature without trusting the service: fetch the public key
once (``key.public``), then verify locally.
"""

from __future__ import annotations

import base64

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)

from contracts.errors import InvalidRequest
from contracts.models import DIGEST_SIZE_BYTES, EcPublicJwk, Encoding

P256_COORDINATE_BYTES = 32
RAW_SIGNATURE_BYTES = 2 * P256_COORDINATE_BYTES


def der_to_raw(signature_der: bytes) -> bytes:
    """ASN.1 ``ECDSA-Sig-Value`` → ``r‖s`` (JWS / IEEE P1363), 64 bytes."""
    r, s = decode_dss_signature(signature_der)
    return r.to_bytes(P256_COORDINATE_BYTES, "big") + s.to_bytes(P256_COORDINATE_BYTES, "big")


def raw_to_der(signature_raw: bytes) -> bytes:
    """``r‖s`` (64 bytes) → ASN.1 ``ECDSA-Sig-Value``."""
    if len(signature_raw) != RAW_SIGNATURE_BYTES:
        raise InvalidRequest(f"a raw P-256 signature has {RAW_SIGNATURE_BYTES} bytes")
    r = int.from_bytes(signature_raw[:P256_COORDINATE_BYTES], "big")
    s = int.from_bytes(signature_raw[P256_COORDINATE_BYTES:], "big")
    return encode_dss_signature(r, s)


def load_public_key(data: bytes | str) -> ec.EllipticCurvePublicKey:
    """A P-256 public key from PEM (str or bytes) or SubjectPublicKeyInfo DER."""
    raw = data.encode("ascii") if isinstance(data, str) else data
    if raw.lstrip().startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(raw)
    else:
        key = serialization.load_der_public_key(raw)
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise InvalidRequest("not an ECDSA P-256 public key")
    return key


def public_key_pem(key: ec.EllipticCurvePublicKey) -> str:
    """SubjectPublicKeyInfo PEM, what ``openssl dgst -verify`` reads."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def public_key_der(key: ec.EllipticCurvePublicKey) -> bytes:
    """SubjectPublicKeyInfo DER."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _b64url(value: int) -> str:
    raw = value.to_bytes(P256_COORDINATE_BYTES, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def public_key_jwk(key: ec.EllipticCurvePublicKey, kid: str) -> EcPublicJwk:
    """The key as an RFC 7518 EC JWK with ``kid``."""
    numbers = key.public_numbers()
    return EcPublicJwk(x=_b64url(numbers.x), y=_b64url(numbers.y), kid=kid)


def verify_signature(
    key: ec.EllipticCurvePublicKey,
    signature: bytes,
    *,
    message: bytes | None = None,
    digest: bytes | None = None,
    encoding: Encoding = "der",
) -> bool:
    """True when ``signature`` signs ``message`` (or its SHA-256 ``digest``) under ``key``."""
    if (message is None) == (digest is None):
        raise ValueError("pass exactly one of message= or digest=")
    if digest is not None and len(digest) != DIGEST_SIZE_BYTES:
        raise ValueError(f"digest must have {DIGEST_SIZE_BYTES} bytes")
    try:
        der = raw_to_der(signature) if encoding == "raw" else signature
        if digest is not None:
            key.verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        else:
            assert message is not None
            key.verify(der, message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, InvalidRequest, ValueError):
        return False
    return True
