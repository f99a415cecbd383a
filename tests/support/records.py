"""Key records built in the test, sealed and MACed under a given ring."""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric import ec

from contracts.crypto import public_key_der
from vault.kek import KekRing
from vault.record_mac import authenticated
from vault.records import KeyRecord, KeyState
from vault.sealing import RecordBinding, SealedKey, seal

T0 = datetime(2026, 11, 28, 10, 0, 0, 123456, tzinfo=UTC)
"""The records' clock: creation times count from here."""


def sealed_record(
    ring: KekRing,
    key_id: str,
    version: int = 1,
    *,
    state: KeyState = KeyState.ENABLED,
    scalar_of: ec.EllipticCurvePrivateKey | None = None,
) -> KeyRecord:
    """A record sealing a fresh P-256 key (or, with ``scalar_of``, another key's scalar)."""
    private_key = ec.generate_private_key(ec.SECP256R1())
    sealed_key = scalar_of or private_key
    scalar = sealed_key.private_numbers().private_value.to_bytes(32, "big")
    binding = RecordBinding(key_id=key_id, version=version, algorithm="ecdsa-p256-sha256")
    destroyed = state is KeyState.DESTROYED
    destroy_after = T0 + timedelta(days=30) if state is KeyState.PENDING_DESTRUCTION else None
    unsigned = KeyRecord(
        key_id=key_id,
        version=version,
        algorithm="ecdsa-p256-sha256",
        public_key_der=public_key_der(private_key.public_key()),
        sealed=None if destroyed else seal(scalar, binding, ring.active),
        state=state,
        label=f"{key_id} v{version}",
        allowed_signers=("svc-a",),
        created_at=T0 + timedelta(seconds=version),
        created_by="keygen-user",
        request_id=f"req-{key_id}-{version}",
        destroy_after=T0 if destroyed else destroy_after,
    )
    return authenticated(unsigned, ring, generation=1)


def record_under(kek_id: str) -> KeyRecord:
    """A record naming ``kek_id``, with random bytes for its public key and sealed scalar.

    Nothing opens it: it is for tests that count which KEKs a vault needs, not for signing.
    """
    return KeyRecord(
        key_id=f"zk-{uuid.uuid4().hex}",
        version=1,
        algorithm="ecdsa-p256-sha256",
        public_key_der=os.urandom(91),
        sealed=SealedKey(kek_id, os.urandom(12), os.urandom(48)),
        state=KeyState.ENABLED,
        label=None,
        allowed_signers=(),
        created_at=datetime.now(UTC),
        created_by="test",
        request_id=None,
    )
