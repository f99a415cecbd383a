"""Per-request key use: open the sealed scalar into our own buffer, sign, verify, wipe.

Python cannot promise that no copy of the scalar survives: ``cryptography`` needs it as an
``int`` (immutable, freed but not zeroed) and OpenSSL keeps its own copy inside the key object
until that is freed. What we control is the buffer the plaintext is decrypted into, which is
zeroed as soon as the key object is built, and the key object's lifetime (one request).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from contracts.crypto import der_to_raw, load_public_key
from contracts.errors import IntegrityError, KeyDisabled
from contracts.models import Encoding
from vault.kek import KekRing
from vault.records import KeyRecord, KeyState
from vault.sealing import open_into

P256_SCALAR_BYTES = 32
_PREHASHED_ECDSA = ec.ECDSA(Prehashed(hashes.SHA256()))


def _wipe(buffer: bytearray) -> None:
    for index in range(len(buffer)):
        buffer[index] = 0


@contextmanager
def opened_key(record: KeyRecord, ring: KekRing) -> Iterator[ec.EllipticCurvePrivateKey]:
    """The record's private key for the duration of a ``with`` block; refuses unusable records."""
    if record.state is not KeyState.ENABLED or record.sealed is None:
        raise KeyDisabled(f"key {record.key_id} v{record.version} is {record.state.value}")
    scalar = bytearray(P256_SCALAR_BYTES)
    try:
        open_into(record.sealed, record.binding, ring, scalar)
        try:
            private_key = ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP256R1())
        except ValueError as exc:
            raise IntegrityError(
                f"key {record.key_id} v{record.version} holds an invalid P-256 scalar"
            ) from exc
    finally:
        _wipe(scalar)
    try:
        yield private_key
    finally:
        del private_key


def sign_digests(
    record: KeyRecord, ring: KekRing, digests: Iterable[bytes], encoding: Encoding
) -> list[bytes]:
    """Sign every SHA-256 digest with the record's key and verify each signature.

    Verification uses the public key stored in the record, not one derived from the opened
    scalar: a fault during signing, or a scalar that does not belong to the record's public
    key, fails here and nothing is returned (``integrity_error``).
    """
    public_key = load_public_key(record.public_key_der)
    signatures: list[bytes] = []
    with opened_key(record, ring) as private_key:
        for digest in digests:
            signature = private_key.sign(digest, _PREHASHED_ECDSA)
            try:
                public_key.verify(signature, digest, _PREHASHED_ECDSA)
            except InvalidSignature:
                raise IntegrityError(
                    f"a signature by key {record.key_id} v{record.version} did not verify "
                    "against its stored public key; nothing was returned"
                ) from None
            signatures.append(der_to_raw(signature) if encoding == "raw" else signature)
    return signatures
