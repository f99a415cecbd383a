"""Opening a sealed P-256 scalar into a key object, through a buffer that is wiped at once."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from cryptography.hazmat.primitives.asymmetric import ec

from contracts.errors import IntegrityError
from vault.kek import KekRing
from vault.records import KeyRecord
from vault.sealing import open_into, wipe

P256_SCALAR_BYTES = 32


@contextmanager
def private_key_of(record: KeyRecord, ring: KekRing) -> Iterator[ec.EllipticCurvePrivateKey]:
    """The record's private key for a ``with`` block.

    The plaintext lands only in a 32-byte ``bytearray`` of ours, zeroed as soon as the key
    object is built (``cryptography`` needs the scalar as an ``int``, which Python cannot wipe;
    OpenSSL frees its copy with the key object, dropped at the end of the block). A blob that
    does not open, has the wrong size, or is not a valid P-256 scalar is ``integrity_error``.
    """
    if record.sealed is None:
        raise IntegrityError(f"key {record.key_id} v{record.version} has no sealed material")
    scalar = bytearray(P256_SCALAR_BYTES)
    try:
        open_into(record.sealed, record.binding, ring, scalar)
        private_key = ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP256R1())
    except ValueError as exc:  # the wrong size for a P-256 scalar, or not a valid one
        raise IntegrityError(
            f"key {record.key_id} v{record.version} holds sealed material that is not a "
            "valid P-256 scalar"
        ) from exc
    finally:
        wipe(scalar)
    try:
        yield private_key
    finally:
        del private_key
