"""Public-key encodings and local signature verification (no private key ever here).

Producers use these to check a signature without trusting the service: fetch the public key
once (``key.public``), then verify locally.
"""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from contracts.algorithms import (
    AlgorithmSpec,
    PublicKey,
    UnsupportedAlgorithm,
    algorithm_of_key,
    algorithm_spec,
)
from contracts.errors import InvalidRequest, NotBytes
from contracts.models import EcPublicJwk, Encoding, RsaPublicJwk

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


def load_algorithm_public_key(data: bytes | str, algorithm: str) -> PublicKey:
    """A public key of ``algorithm`` (any in ``contracts.algorithms``) from PEM or DER;
    InvalidRequest when it is not one."""
    raw = data.encode("ascii") if isinstance(data, str) else data
    try:
        spec = algorithm_spec(algorithm)
        if raw.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(raw)
        else:
            key = serialization.load_der_public_key(raw)
        return spec.check_public_key(key)
    except UnsupportedAlgorithm as exc:
        raise InvalidRequest(str(exc)) from None


def public_key_pem(key: PublicKey) -> str:
    """SubjectPublicKeyInfo PEM, what ``openssl dgst -verify`` reads."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def public_key_der(key: PublicKey) -> bytes:
    """SubjectPublicKeyInfo DER."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _b64url(value: int, size: int = P256_COORDINATE_BYTES) -> str:
    raw = value.to_bytes(size, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def public_key_jwk(
    key: PublicKey, kid: str, algorithm: str | None = None
) -> EcPublicJwk | RsaPublicJwk:
    """The key as an RFC 7518 JWK with ``kid``: EC (``ES256``/``ES384``) or RSA (``RS256`` /
    ``PS256``, which needs ``algorithm``: the padding is not in the key)."""
    spec = algorithm_of_key(key) if algorithm is None else algorithm_spec(algorithm)
    spec.check_public_key(key)
    if isinstance(key, rsa.RSAPublicKey):
        rsa_numbers = key.public_numbers()
        return RsaPublicJwk(
            n=_b64url(rsa_numbers.n, (rsa_numbers.n.bit_length() + 7) // 8),
            e=_b64url(rsa_numbers.e, (rsa_numbers.e.bit_length() + 7) // 8),
            alg="PS256" if spec.pss else "RS256",
            kid=kid,
        )
    numbers = key.public_numbers()
    size = spec.coordinate_bytes
    if spec.jwk_crv == "P-384":
        return EcPublicJwk(
            crv="P-384",
            alg="ES384",
            x=_b64url(numbers.x, size),
            y=_b64url(numbers.y, size),
            kid=kid,
        )
    return EcPublicJwk(x=_b64url(numbers.x, size), y=_b64url(numbers.y, size), kid=kid)


def verify_signature(
    key: PublicKey,
    signature: bytes,
    *,
    message: bytes | None = None,
    digest: bytes | None = None,
    encoding: Encoding = "der",
    algorithm: str | None = None,
) -> bool:
    """True when ``signature`` signs ``message`` (or its ``digest``) under ``key``.

    ``algorithm`` (a ``contracts.algorithms`` name) defaults to the one an EC key's curve
    implies; an RSA key needs it (the padding is not in the key).
    """
    require_bytes(message=message, digest=digest, signature=signature)
    if (message is None) == (digest is None):
        raise ValueError("pass exactly one of message= or digest=")
    return _verify_with(_spec_for(key, algorithm), key, signature, message, digest, encoding)


def require_bytes(**values: object) -> None:
    """``NotBytes`` unless each of ``values`` that is given is bytes (``message`` must be
    bytes), named as the caller's argument; one check for every signing and verifying call."""
    for name, value in values.items():
        if value is None or isinstance(value, bytes | bytearray):
            continue
        fix = ": encode the text first, e.g. text.encode()" if isinstance(value, str) else ""
        raise NotBytes(f"{name} must be bytes, not {type(value).__name__}{fix}")


def _spec_for(key: PublicKey, algorithm: str | None) -> AlgorithmSpec:
    try:
        spec = algorithm_of_key(key) if algorithm is None else algorithm_spec(algorithm)
        spec.check_public_key(key)
    except UnsupportedAlgorithm as exc:
        raise ValueError(str(exc)) from None
    return spec


def _verify_with(
    spec: AlgorithmSpec,
    key: PublicKey,
    signature: bytes,
    message: bytes | None,
    digest: bytes | None,
    encoding: Encoding,
) -> bool:
    if digest is None:
        assert message is not None
        digest = spec.digest(message)
    elif len(digest) != spec.digest_bytes:
        raise ValueError(f"digest must have {spec.digest_bytes} bytes for {spec.name}")
    try:
        der = spec.from_raw(signature) if encoding == "raw" else signature
    except ValueError:
        return False
    return spec.verify_digest(key, der, digest)
