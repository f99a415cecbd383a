"""Pinned public keys: verify a signature against a key the caller holds, not one the fleet serves.

``key.public`` answers with the public key *as the vault says*: a vault writer who swaps a key's
stored public key for its own makes every later ``key.public`` reply name the attacker's key, and
a signature forged with it then verifies. A ``PinnedKey`` is the public key the caller took
from the ``key.create`` reply (which the keygen worker derives from the key the TPM made, before
anything reached the vault), obtained out of band, or saved to a PEM/JWK file — and checking
against it needs no broker and no vault.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from contracts.algorithms import (
    ALGORITHMS,
    PublicKey,
    UnsupportedAlgorithm,
    algorithm_of_key,
    algorithm_spec,
)
from contracts.crypto import (
    P256_COORDINATE_BYTES,
    load_algorithm_public_key,
    public_key_pem,
    verify_signature,
)
from contracts.errors import InvalidRequest
from contracts.models import (
    EcPublicJwk,
    Encoding,
    KeyCreateReply,
    KeyPublicReply,
    KeyRotateReply,
    RsaPublicJwk,
)

#: A pinned key file is a PEM or a JWK, a few hundred bytes; anything far larger is not one.
MAX_PUBLIC_KEY_FILE_BYTES = 64 * 1024
_DER_SEQUENCE = b"\x30"


@dataclass(frozen=True, slots=True)
class PinnedKey:
    """A public key the caller trusts, with the key id and version it belongs to when known
    (from a reply, or a JWK's ``kid`` ``<key_id>.v<version>``), and its algorithm
    (``contracts.algorithms``): an EC key's curve implies it, an RSA key needs it named (by
    the reply, the JWK's ``alg``, or ``algorithm=``)."""

    public_key: PublicKey
    key_id: str | None = None
    version: int | None = None
    algorithm: str | None = None

    def __post_init__(self) -> None:
        try:
            if self.algorithm is not None:
                algorithm_spec(self.algorithm).check_public_key(self.public_key)
            elif isinstance(self.public_key, ec.EllipticCurvePublicKey):
                algorithm_of_key(self.public_key)
        except UnsupportedAlgorithm as exc:
            raise InvalidRequest(str(exc)) from None

    @classmethod
    def of(cls, source: PublicKeySource, *, algorithm: str | None = None) -> PinnedKey:
        """A pinned key from any of: a ``PinnedKey``; a ``cryptography`` EC (P-256, P-384) or
        RSA public key; the ``key.create`` or ``key.rotate`` (or a saved ``key.public``) reply; a JWK
        (``EcPublicJwk``, ``RsaPublicJwk``, a dict, or its JSON text); PEM or DER bytes; PEM
        text. A key id is not a public key: pinning needs the key itself. ``algorithm`` names
        the algorithm of an RSA key given without one (PEM, DER, a key object)."""
        if isinstance(source, PinnedKey):
            return source
        if isinstance(source, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            return cls(source, algorithm=algorithm)
        if isinstance(source, KeyCreateReply | KeyPublicReply | KeyRotateReply):
            key = load_algorithm_public_key(source.public_key_pem, source.algorithm)
            return cls(key, source.key_id, source.version, source.algorithm)
        if isinstance(source, EcPublicJwk | RsaPublicJwk | Mapping):
            return cls.from_jwk(source)
        if isinstance(source, bytes | bytearray | memoryview):
            return cls._from_bytes(bytes(source), algorithm)
        if isinstance(source, str):
            return cls._from_bytes(source.encode("utf-8"), algorithm)
        raise TypeError(f"cannot pin a public key from a {type(source).__name__}")

    @classmethod
    def from_jwk(cls, jwk: EcPublicJwk | RsaPublicJwk | Mapping[str, Any]) -> PinnedKey:
        """A pinned key from an RFC 7518 JWK (EC P-256/P-384, or RSA with ``alg`` RS256/PS256);
        a private JWK (with ``d``) is refused."""
        fields = jwk.model_dump() if isinstance(jwk, EcPublicJwk | RsaPublicJwk) else dict(jwk)
        if "d" in fields:
            raise InvalidRequest("this JWK holds a private key; pin the public half only")
        key_id, version = _parse_kid(fields.get("kid"))
        if fields.get("kty") == "RSA":
            key, algorithm = _rsa_jwk(fields)
            return cls(key, key_id, version, algorithm)
        crv = fields.get("crv")
        if fields.get("kty") != "EC" or crv not in ("P-256", "P-384"):
            raise InvalidRequest("not an EC P-256/P-384 or RSA JWK (kty EC, crv P-256; kty RSA)")
        size = 48 if crv == "P-384" else P256_COORDINATE_BYTES
        curve: ec.EllipticCurve = ec.SECP384R1() if crv == "P-384" else ec.SECP256R1()
        x, y = _coordinate(fields.get("x"), size, crv), _coordinate(fields.get("y"), size, crv)
        try:
            ec_key = ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
        except ValueError:
            raise InvalidRequest(f"the JWK's x and y are not a point on {crv}") from None
        return cls(ec_key, key_id, version)

    @classmethod
    def from_file(cls, path: Path | str, *, algorithm: str | None = None) -> PinnedKey:
        """A pinned key from a file holding PEM, DER or a JWK (``zandd keys public --jwk``)."""
        try:
            with Path(path).open("rb") as file:
                data = file.read(MAX_PUBLIC_KEY_FILE_BYTES + 1)
        except OSError as exc:
            raise InvalidRequest(
                f"cannot read the public key file {path}: {exc.strerror}"
            ) from None
        if len(data) > MAX_PUBLIC_KEY_FILE_BYTES:
            raise InvalidRequest(f"{path} is larger than any public key file")
        return cls._from_bytes(data, algorithm)

    @classmethod
    def _from_bytes(cls, data: bytes, algorithm: str | None = None) -> PinnedKey:
        stripped = data.strip()
        if stripped.startswith((b"{", b"[")):
            try:
                parsed = json.loads(stripped)
            except ValueError:
                raise InvalidRequest("the public key is neither PEM nor a JWK") from None
            if not isinstance(parsed, dict):
                raise InvalidRequest("a JWK is a JSON object")
            return cls.from_jwk(parsed)
        if stripped.startswith(b"-----BEGIN") or data.startswith(_DER_SEQUENCE):
            encoded = stripped if stripped.startswith(b"-") else data
            try:
                if algorithm is not None:
                    return cls(load_algorithm_public_key(encoded, algorithm), algorithm=algorithm)
                return cls(_load_any_public_key(encoded))
            except ValueError:
                raise InvalidRequest("the public key is neither PEM nor a JWK") from None
        # Most likely a key id passed where ``verify`` used to take one: say what changed.
        raise InvalidRequest(
            "a pinned public key is PEM, DER or a JWK (a key id is not one): pass the "
            "key.create reply, or use verify_trusting_fleet to take the fleet's word for it"
        )

    @property
    def pem(self) -> str:
        """SubjectPublicKeyInfo PEM, to save the pin (``openssl dgst -verify`` reads it too)."""
        return public_key_pem(self.public_key)

    def verify(
        self,
        signature: bytes,
        *,
        message: bytes | None = None,
        digest: bytes | None = None,
        encoding: Encoding = "der",
    ) -> bool:
        """True when ``signature`` signs ``message`` (or its ``digest``, of the algorithm's
        hash) under this key. An RSA key pinned without its algorithm cannot say its padding:
        InvalidRequest."""
        if self.algorithm is None and isinstance(self.public_key, rsa.RSAPublicKey):
            raise InvalidRequest(
                "an RSA key pinned from PEM/DER needs its algorithm (rsa-pkcs1-… or rsa-pss-…): "
                "pin the key.create reply or the JWK, or pass algorithm="
            )
        return verify_signature(
            self.public_key,
            signature,
            message=message,
            digest=digest,
            encoding=encoding,
            algorithm=self.algorithm,
        )


#: What ``SigningClient.verify`` and ``PinnedKey.of`` take as a pinned public key.
PublicKeySource: TypeAlias = (
    PinnedKey
    | ec.EllipticCurvePublicKey
    | rsa.RSAPublicKey
    | KeyCreateReply
    | KeyPublicReply
    | KeyRotateReply
    | EcPublicJwk
    | RsaPublicJwk
    | Mapping[str, Any]
    | bytes
    | str
)


def _load_any_public_key(encoded: bytes) -> PublicKey:
    """An EC (P-256, P-384) or RSA public key from PEM/DER; InvalidRequest for anything else."""
    for name in ALGORITHMS:
        try:
            return load_algorithm_public_key(encoded, name)
        except InvalidRequest:
            continue
    raise InvalidRequest("not a public key of any algorithm of the contract")


#: RSA 3072's modulus is 384 bytes, 512 base64url characters; nothing longer is one of ours.
_MAX_RSA_MODULUS_CHARS = 512
_RSA_ALGORITHM_OF_JWK = {"RS256": "rsa-pkcs1", "PS256": "rsa-pss"}


def _rsa_jwk(fields: Mapping[str, Any]) -> tuple[rsa.RSAPublicKey, str]:
    """An RSA JWK's key and algorithm (``alg`` names the padding, the modulus the size)."""
    prefix = _RSA_ALGORITHM_OF_JWK.get(str(fields.get("alg")))
    if prefix is None:
        raise InvalidRequest("an RSA JWK needs alg RS256 or PS256 (the padding)")
    n = _b64url_int(fields.get("n"), _MAX_RSA_MODULUS_CHARS, "n")
    e = _b64url_int(fields.get("e"), 8, "e")
    algorithm = f"{prefix}-{n.bit_length()}-sha256"
    if algorithm not in ALGORITHMS:
        raise InvalidRequest("an RSA JWK of ours has a 2048- or 3072-bit modulus")
    try:
        key = rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError:
        raise InvalidRequest("the JWK's n and e are not an RSA public key") from None
    return key, algorithm


def _b64url_int(value: object, max_chars: int, what: str) -> int:
    if not isinstance(value, str) or not value or len(value) > max_chars:
        raise InvalidRequest(f"an RSA JWK needs {what} as a base64url string")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"the JWK's {what} is not base64url") from None
    return int.from_bytes(raw, "big")


def _coordinate(value: object, size: int = P256_COORDINATE_BYTES, crv: str = "P-256") -> int:
    """A JWK coordinate: base64url without padding, exactly ``size`` bytes."""
    if not isinstance(value, str) or len(value) > 2 * size:
        raise InvalidRequest("an EC JWK needs x and y as base64url strings")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise InvalidRequest("the JWK's x or y is not base64url") from None
    if len(raw) != size:
        raise InvalidRequest(f"a {crv} JWK coordinate has {size} bytes")
    return int.from_bytes(raw, "big")


def _parse_kid(kid: object) -> tuple[str | None, int | None]:
    """``<key_id>.v<version>`` (what ``key.public`` writes) → its parts; anything else → none."""
    if not isinstance(kid, str):
        return None, None
    key_id, separator, version = kid.rpartition(".v")
    if not separator or not key_id or not version.isdigit():
        return None, None
    return key_id, int(version)
