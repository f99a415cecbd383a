"""Secrets never show in a repr: of the settings, of a key record, of an opened ring."""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime

from vault import Kek, KekRing, KeyRecord, KeyState, RecordBinding, seal
from workers.config import Settings


def test_settings_show_urls_without_their_passwords() -> None:
    settings = Settings(
        amqp_url="amqp://svc:amqp-hunter2@mq:5672/zandd",
        vault_url="mongodb://svc:mongo-hunter2@db1,db2/zandd?replicaSet=rs0",
    )
    for text in (repr(settings), str(settings), f"{settings!r}"):
        assert "hunter2" not in text
        assert "amqp://svc@mq:5672/zandd" in text
    assert settings.amqp_url.endswith("amqp-hunter2@mq:5672/zandd")  # the value itself is intact


def test_a_key_record_shows_sizes_never_bytes() -> None:
    scalar = os.urandom(32)
    kek = Kek.generate()
    binding = RecordBinding("zk-1", 1, "ecdsa-p256-sha256")
    record = KeyRecord(
        key_id="zk-1",
        version=1,
        algorithm="ecdsa-p256-sha256",
        public_key_der=b"public",
        sealed=seal(scalar, binding, kek),
        state=KeyState.ENABLED,
        label=None,
        allowed_signers=("svc",),
        created_at=datetime.now(UTC),
        created_by="svc",
        request_id=None,
    )
    ring = KekRing(kek)
    assert record.sealed is not None
    texts = [repr(record), str(record), repr(ring), repr(kek)]
    secrets = [scalar, kek.key, record.sealed.ciphertext, record.sealed.nonce]
    for text in texts:
        for secret in secrets:
            for form in (secret.hex(), base64.b64encode(secret).decode(), repr(secret)):
                assert form not in text
    assert "ciphertext=<48 bytes>" in repr(record)
