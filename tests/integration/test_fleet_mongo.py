"""The main flow end to end with the vault on MongoDB: keygen → sign → verify.

Real RabbitMQ, a real swtpm, and a fresh database on the test MongoDB (``ZANDD_TEST_MONGO_URL``
or a testcontainers server); skipped, with the reason in the summary, when there is none.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest

from contracts.amqp import principal_of
from contracts.crypto import load_public_key, verify_signature
from tests.support.fleet import RunningFleet
from tests.support.openssl import openssl_verify
from vault.audit import AuditQuery, verify_log
from vault.audit_chain import ChainKeys
from vault.mongo import MongoStore
from vault.store import open_store

pytestmark = [
    pytest.mark.rabbitmq,
    pytest.mark.tpm,
    pytest.mark.mongo,
    pytest.mark.vault("mongodb"),
]


async def test_the_fleet_runs_on_the_mongodb_vault(fleet: RunningFleet) -> None:
    assert isinstance(fleet.store, MongoStore)
    assert fleet.settings.resolved_vault_url.startswith("mongodb://")


async def test_create_sign_and_openssl_verifies(fleet: RunningFleet, tmp_path: Path) -> None:
    async with await fleet.client() as client:
        key = await client.create_key(label="invoices on mongo")
        reply = await client.sign(key.key_id, b"pay 100 EUR to Alice")
        raw = await client.sign(key.key_id, b"pay 100 EUR to Alice", encoding="raw")
        assert await client.verify(
            key, raw.signature, message=b"pay 100 EUR to Alice", encoding="raw"
        )
    assert (reply.key_id, reply.version) == (key.key_id, 1)
    assert (
        openssl_verify(tmp_path, key.public_key_pem, b"pay 100 EUR to Alice", reply.signature)
        == "Verified OK"
    )
    stored = await fleet.store.get_key(key.key_id)
    assert stored.label == "invoices on mongo"
    assert load_public_key(stored.public_key_der) == load_public_key(key.public_key_pem)


async def test_batch_and_public_key(fleet: RunningFleet) -> None:
    messages = [f"item {i}".encode() for i in range(10)]
    async with await fleet.client() as client:
        key = await client.create_key()
        batch = await client.sign_batch(
            key.key_id, messages, digests=[hashlib.sha256(b"tail").digest()]
        )
        public = await client.public_key(key.key_id)
    public_key = load_public_key(public.public_key_pem)
    for message, signature in zip(messages, batch.signatures[:10], strict=True):
        assert verify_signature(public_key, signature, message=message)
    assert verify_signature(public_key, batch.signatures[10], message=b"tail")
    assert public.public_key_jwk.kid == f"{key.key_id}.v1"


async def test_key_create_is_idempotent_across_the_shared_vault(fleet: RunningFleet) -> None:
    request_id = f"create-{uuid.uuid4().hex}"
    async with await fleet.client() as client:
        first = await client.create_key(request_id=request_id)
        again = await client.create_key(request_id=request_id)
    assert again.key_id == first.key_id
    found = await fleet.store.find_by_request_id(request_id, owner=principal_of(fleet.amqp_url))
    assert found is not None
    assert found.key_id == first.key_id


async def test_a_second_host_sees_the_keys_and_the_audit_chain(fleet: RunningFleet) -> None:
    async with await fleet.client() as client:
        key = await client.create_key()
        await client.sign(key.key_id, b"audited")
    # Another process opening the same URL, as a signer host of the fleet would.
    other = await open_store(fleet.settings.resolved_vault_url)
    try:
        assert await other.get_key(key.key_id) == await fleet.store.get_key(key.key_id)
        entries = await other.read_audit(AuditQuery(key_id=key.key_id))
        assert [(e.event.operation, e.event.outcome) for e in entries] == [
            ("key.create", "ok"),
            ("sign", "ok"),
        ]
        head = await verify_log(other, ChainKeys(fleet.ring))
        assert head.seq >= 2
    finally:
        await other.close()
