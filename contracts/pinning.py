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

from cryptography.hazmat.primitives.asymmetric import ec

from contracts.crypto import (
    P256_COORDINATE_BYTES,
    load_public_key,
    public_key_pem,
    verify_signature,
)
from contracts.errors import InvalidRequest
from contracts.models import EcPublicJwk, Encoding, KeyCreateReply, KeyPublicReply, KeyRotateReply

#: A pinned key file is a PEM or a JWK, a few hundred bytes; anything far larger is not one.
MAX_PUBLIC_KEY_FILE_BYTES = 64 * 1024
_DER_SEQUENCE = b"\x30"


@dataclass(frozen=True, slots=True)
class PinnedKey:
    """An ECDSA P-256 public key the caller trusts, with the key id and version it belongs to
    when known (from a reply, or a JWK's ``kid`` ``<key_id>.v<version>``)."""

    public_key: ec.EllipticCurvePublicKey
    key_id: str | None = None
    version: int | None = None

    @classmethod
    def of(cls, source: PublicKeySource) -> PinnedKey:
        """A pinned key from any of: a ``PinnedKey``; a ``cryptography`` P-256 public key; the
        ``key.create`` or ``key.rotate`` (or a saved ``key.public``) reply; a JWK (``EcPublicJwk``, a dict, or its
        JSON text); PEM or DER bytes; PEM text. A key id is not a public key: pinning needs the
        key itself."""
        if isinstance(source, PinnedKey):
            return source
        if isinstance(source, ec.EllipticCurvePublicKey):
            return cls(_p256(source))
        if isinstance(source, KeyCreateReply | KeyPublicReply | KeyRotateReply):
            return cls(load_public_key(source.public_key_pem), source.key_id, source.version)
        if isinstance(source, EcPublicJwk | Mapping):
            return cls.from_jwk(source)
        if isinstance(source, bytes | bytearray | memoryview):
            return cls._from_bytes(bytes(source))
        if isinstance(source, str):
            return cls._from_bytes(source.encode("utf-8"))
        raise TypeError(f"cannot pin a public key from a {type(source).__name__}")

    @classmethod
    def from_jwk(cls, jwk: EcPublicJwk | Mapping[str, Any]) -> PinnedKey:
        """A pinned key from an RFC 7518 EC P-256 JWK; a private JWK (with ``d``) is refused."""
        fields = jwk.model_dump() if isinstance(jwk, EcPublicJwk) else dict(jwk)
        if "d" in fields:
            raise InvalidRequest("this JWK holds a private key; pin the public half only")
        if fields.get("kty") != "EC" or fields.get("crv") != "P-256":
            raise InvalidRequest("not an EC P-256 JWK (kty EC, crv P-256)")
        x, y = _coordinate(fields.get("x")), _coordinate(fields.get("y"))
        try:
            key = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
        except ValueError:
            raise InvalidRequest("the JWK's x and y are not a point on P-256") from None
        key_id, version = _parse_kid(fields.get("kid"))
        return cls(key, key_id, version)

    @classmethod
    def from_file(cls, path: Path | str) -> PinnedKey:
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
        return cls._from_bytes(data)

    @classmethod
    def _from_bytes(cls, data: bytes) -> PinnedKey:
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
            try:
                return cls(load_public_key(stripped if stripped.startswith(b"-") else data))
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
        """True when ``signature`` signs ``message`` (or its SHA-256 ``digest``) under this key."""
        return verify_signature(
            self.public_key, signature, message=message, digest=digest, encoding=encoding
        )


#: What ``SigningClient.verify`` and ``PinnedKey.of`` take as a pinned public key.
PublicKeySource: TypeAlias = (
    PinnedKey
    | ec.EllipticCurvePublicKey
    | KeyCreateReply
    | KeyPublicReply
    | KeyRotateReply
    | EcPublicJwk
    | Mapping[str, Any]
    | bytes
    | str
)


def _p256(key: ec.EllipticCurvePublicKey) -> ec.EllipticCurvePublicKey:
    if not isinstance(key.curve, ec.SECP256R1):
        raise InvalidRequest("not an ECDSA P-256 public key")
    return key


def _coordinate(value: object) -> int:
    """A JWK coordinate: base64url without padding, exactly 32 bytes."""
    if not isinstance(value, str) or len(value) > 2 * P256_COORDINATE_BYTES:
        raise InvalidRequest("a P-256 JWK needs x and y as base64url strings")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise InvalidRequest("the JWK's x or y is not base64url") from None
    if len(raw) != P256_COORDINATE_BYTES:
        raise InvalidRequest(f"a P-256 JWK coordinate has {P256_COORDINATE_BYTES} bytes")
    return int.from_bytes(raw, "big")


def _parse_kid(kid: object) -> tuple[str | None, int | None]:
    """``<key_id>.v<version>`` (what ``key.public`` writes) → its parts; anything else → none."""
    if not isinstance(kid, str):
        return None, None
    key_id, separator, version = kid.rpartition(".v")
    if not separator or not key_id or not version.isdigit():
        return None, None
    return key_id, int(version)
