"""Sealing private keys at rest: AES-256-GCM under a KEK, bound to the record they belong to.

The associated data binds the ciphertext to its key id, version, algorithm and KEK id, so a
sealed blob copied onto another record (or relabelled with another algorithm) fails
authentication instead of being used.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag

from contracts.errors import IntegrityError
from vault.kek import Kek, KekRing

NONCE_SIZE_BYTES = 12
TAG_SIZE_BYTES = 16
_DOMAIN_TAG = b"zandd-seal/1"


@dataclass(frozen=True, slots=True)
class RecordBinding:
    """What a sealed key is bound to: the record's identity and algorithm."""

    key_id: str
    version: int
    algorithm: str


@dataclass(frozen=True, slots=True, repr=False)
class SealedKey:
    """A private key encrypted under a KEK: ``ciphertext`` is the GCM ciphertext plus its tag."""

    kek_id: str
    nonce: bytes
    ciphertext: bytes

    def __repr__(self) -> str:
        return (
            f"SealedKey(kek_id={self.kek_id!r}, nonce=<{len(self.nonce)} bytes>, "
            f"ciphertext=<{len(self.ciphertext)} bytes>)"
        )


def _field(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def associated_data(binding: RecordBinding, kek_id: str) -> bytes:
    """The canonical AAD: domain tag, key id, version, algorithm and KEK id, length-prefixed."""
    if not 0 <= binding.version < 2**63:
        raise ValueError("version out of range")
    return b"".join(
        (
            _field(_DOMAIN_TAG),
            _field(binding.key_id.encode("utf-8")),
            _field(struct.pack(">Q", binding.version)),
            _field(binding.algorithm.encode("utf-8")),
            _field(kek_id.encode("utf-8")),
        )
    )


def seal(secret: bytes | bytearray | memoryview, binding: RecordBinding, kek: Kek) -> SealedKey:
    """Encrypt ``secret`` under ``kek`` with a fresh random nonce, bound to ``binding``."""
    nonce = os.urandom(NONCE_SIZE_BYTES)
    ciphertext = kek.aead.encrypt(nonce, secret, associated_data(binding, kek.kek_id))
    return SealedKey(kek_id=kek.kek_id, nonce=nonce, ciphertext=ciphertext)


def plaintext_size(sealed: SealedKey) -> int:
    """How many bytes ``open_into`` writes for ``sealed`` (negative for a truncated blob)."""
    return len(sealed.ciphertext) - TAG_SIZE_BYTES


def wipe(buffer: bytearray) -> None:
    """Zero ``buffer`` in place (a slice assignment writes into the same memory)."""
    buffer[:] = bytes(len(buffer))


def open_into(sealed: SealedKey, binding: RecordBinding, ring: KekRing, out: bytearray) -> None:
    """Decrypt ``sealed`` straight into ``out``, which must be exactly the plaintext's length.

    The plaintext is written only into the caller's buffer, so the caller can wipe it. If
    authentication fails ``out`` is zeroed (GCM writes unauthenticated plaintext before the
    tag check) and IntegrityError is raised.
    """
    failed = IntegrityError(
        f"sealed key for {binding.key_id} v{binding.version} failed authentication"
    )
    size = plaintext_size(sealed)
    if size < 0 or len(sealed.nonce) != NONCE_SIZE_BYTES:
        raise failed
    if len(out) != size:
        raise ValueError(f"output buffer must be {size} bytes, got {len(out)}")
    kek = ring.get(sealed.kek_id)
    aad = associated_data(binding, sealed.kek_id)
    try:
        kek.aead.decrypt_into(sealed.nonce, sealed.ciphertext, aad, out)
    except InvalidTag as exc:
        wipe(out)
        raise failed from exc
