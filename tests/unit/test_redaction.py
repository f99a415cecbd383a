"""Secrets never show in a repr: of the settings, of a key record, of an opened ring."""

from __future__ import annotations

import asyncio
import base64
import os
from datetime import UTC, datetime

import pytest

from contracts.amqp import connect_plain
from contracts.errors import BrokerUnavailable
from contracts.urls import redact_url
from vault import Kek, KekRing, KeyRecord, KeyState, RecordBinding, seal
from workers.service.config import Settings


def test_settings_show_urls_without_their_passwords() -> None:
    settings = Settings(
        amqp_url="amqp://svc:amqp-hunter2@mq:5672/zandd",
        vault_url="mongodb://svc:mongo-hunter2@db1,db2/zandd?replicaSet=rs0",
    )
    for text in (repr(settings), str(settings), f"{settings!r}"):
        assert "hunter2" not in text
        assert "amqp://svc:***@mq:5672/zandd" in text
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


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://svc:hunter2@mq:5672/zandd", "amqp://svc:***@mq:5672/zandd"),
        # Unescaped delimiters in a password must not make it pass for the host or the path.
        ("amqps://svc:hun#ter2@mq/zandd", "amqps://svc:***@mq/zandd"),
        ("amqps://svc:hun?ter/2@mq/zandd?cafile=/ca.pem", "amqps://svc:***@mq/zandd?cafile=/ca.pem"),
        ("amqp://svc:hun@ter2@mq/", "amqp://svc:***@mq/"),
        ("amqp://mq:5672/", "amqp://mq:5672/"),
        ("amqp://svc@mq/", "amqp://svc@mq/"),
    ],
)  # fmt: skip
def test_a_broker_url_is_shown_like_a_vault_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_the_broker_and_the_vault_url_read_alike_in_one_repr() -> None:
    settings = Settings(
        amqp_url="amqp://svc:pa#ss@mq/zandd", vault_url="mongodb://svc:pa#ss@db/zandd"
    )
    text = repr(settings)
    assert "pa#ss" not in text
    assert "'amqp://svc:***@mq/zandd'" in text
    assert "'mongodb://svc:***@db/zandd'" in text


def test_a_connection_failure_names_the_broker_as_every_other_message_does() -> None:
    url = "amqp://svc:hunter2@127.0.0.1:1/"
    with pytest.raises(BrokerUnavailable) as failure:
        asyncio.run(connect_plain(url, connection_name="zandd-test", timeout_s=3))
    assert "hunter2" not in failure.value.message
    assert f"cannot reach the broker at {redact_url(url)}:" in failure.value.message
