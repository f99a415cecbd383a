"""Per-request key use: open the sealed scalar into our own buffer, check, sign, verify, wipe.

Python cannot promise that no copy of the scalar survives: ``cryptography`` needs it as an
``int`` (immutable, freed but not zeroed) and OpenSSL keeps its own copy inside the key object
until that is freed. What we control is the buffer the plaintext is decrypted into, which is
zeroed as soon as the key object is built, and the key object's lifetime (one request).

Integrity before use: a sealed blob that does not open (tampered, copied from another
record, unknown KEK), a scalar that is not a valid P-256 key, or one whose public key is not
the record's stored public key, is refused with ``integrity_error`` and never signs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from contracts.crypto import der_to_raw, load_public_key
from contracts.errors import IntegrityError, InvalidRequest, KeyDisabled
from contracts.models import Encoding
from vault.kek import KekRing
from vault.records import KeyRecord, KeyState
from vault.sealing import open_into, wipe

P256_SCALAR_BYTES = 32
_PREHASHED_ECDSA = ec.ECDSA(Prehashed(hashes.SHA256()))


def stored_public_key(record: KeyRecord) -> ec.EllipticCurvePublicKey:
    """The record's public key; a stored key that does not parse is an integrity failure."""
    try:
        return load_public_key(record.public_key_der)
    except (InvalidRequest, ValueError) as exc:
        raise IntegrityError(
            f"key {record.key_id} v{record.version} has a stored public key that does not parse"
        ) from exc


@contextmanager
def opened_key(
    record: KeyRecord, ring: KekRing, public_key: ec.EllipticCurvePublicKey
) -> Iterator[ec.EllipticCurvePrivateKey]:
    """The record's private key for a ``with`` block; refuses unusable or mismatched records."""
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
    except ValueError as exc:  # a sealed blob of the wrong length for a P-256 scalar
        raise IntegrityError(
            f"key {record.key_id} v{record.version} has sealed material of the wrong size"
        ) from exc
    finally:
        wipe(scalar)
    try:
        if private_key.public_key().public_numbers() != public_key.public_numbers():
            raise IntegrityError(
                f"key {record.key_id} v{record.version}: the sealed private key does not "
                "belong to the stored public key; refused"
            )
        yield private_key
    finally:
        del private_key


def sign_digests(
    record: KeyRecord, ring: KekRing, digests: Iterable[bytes], encoding: Encoding
) -> list[bytes]:
    """Sign every SHA-256 digest with the record's key and verify each signature.

    Verification uses the public key stored in the record, not one derived from the opened
    scalar: a fault during signing fails here and nothing is returned (``integrity_error``).
    """
    public_key = stored_public_key(record)
    signatures: list[bytes] = []
    with opened_key(record, ring, public_key) as private_key:
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
