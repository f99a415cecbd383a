"""The signing fleet end to end on real RabbitMQ, a real swtpm and a real SQLite vault."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import subprocess
import uuid
from pathlib import Path

import aio_pika
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from contracts.crypto import load_public_key, raw_to_der, verify_signature
from contracts.errors import KeyNotFound
from contracts.models import ErrorReply
from contracts.topology import EXCHANGE
from tests.support.fleet import RunningFleet
from tests.support.openssl import openssl_verify

pytestmark = [pytest.mark.rabbitmq, pytest.mark.tpm]


async def test_create_sign_and_openssl_verifies_der(fleet: RunningFleet, tmp_path: Path) -> None:
    async with await fleet.client() as client:
        key = await client.create_key(label="invoices")
        reply = await client.sign(key.key_id, b"pay 100 EUR to Alice")
    assert reply.key_id == key.key_id
    assert reply.version == 1
    assert reply.encoding == "der"
    assert (
        openssl_verify(tmp_path, key.public_key_pem, b"pay 100 EUR to Alice", reply.signature)
        == "Verified OK"
    )
    assert (
        openssl_verify(tmp_path, key.public_key_pem, b"pay 900 EUR to Mallory", reply.signature)
        != "Verified OK"
    )


async def test_raw_encoding_is_r_concat_s(fleet: RunningFleet, tmp_path: Path) -> None:
    async with await fleet.client() as client:
        key = await client.create_key()
        reply = await client.sign(key.key_id, b"jws payload", encoding="raw")
    assert len(reply.signature) == 64
    public_key = load_public_key(key.public_key_pem)
    public_key.verify(raw_to_der(reply.signature), b"jws payload", ec.ECDSA(hashes.SHA256()))
    assert (
        openssl_verify(tmp_path, key.public_key_pem, b"jws payload", raw_to_der(reply.signature))
        == "Verified OK"
    )


async def test_digest_input_signs_the_message(fleet: RunningFleet, tmp_path: Path) -> None:
    message = b"a large document, hashed by the producer"
    async with await fleet.client() as client:
        key = await client.create_key()
        reply = await client.sign(key.key_id, digest=hashlib.sha256(message).digest())
        assert await client.verify(key, reply.signature, message=message)
    assert openssl_verify(tmp_path, key.public_key_pem, message, reply.signature) == "Verified OK"


async def test_batch_signatures_come_in_item_order(fleet: RunningFleet) -> None:
    messages = [f"item {i}".encode() for i in range(25)]
    async with await fleet.client() as client:
        key = await client.create_key()
        reply = await client.sign_batch(
            key.key_id, messages, digests=[hashlib.sha256(b"tail").digest()]
        )
    public_key = load_public_key(key.public_key_pem)
    assert len(reply.signatures) == 26
    for message, signature in zip(messages, reply.signatures[:25], strict=True):
        assert verify_signature(public_key, signature, message=message)
    assert not verify_signature(public_key, reply.signatures[0], message=messages[1])
    assert verify_signature(public_key, reply.signatures[25], message=b"tail")


async def test_key_public_gives_matching_pem_and_jwk(fleet: RunningFleet) -> None:
    async with await fleet.client() as client:
        key = await client.create_key()
        public = await client.public_key(key.key_id)
    numbers = load_public_key(public.public_key_pem).public_numbers()
    jwk = public.public_key_jwk
    assert public.public_key_pem == key.public_key_pem
    assert (jwk.kty, jwk.crv, jwk.kid) == ("EC", "P-256", f"{key.key_id}.v1")
    assert base64.urlsafe_b64decode(jwk.x + "=") == numbers.x.to_bytes(32, "big")
    assert base64.urlsafe_b64decode(jwk.y + "=") == numbers.y.to_bytes(32, "big")


async def test_key_create_twice_with_one_message_id_gives_one_key(fleet: RunningFleet) -> None:
    request_id = f"create-{uuid.uuid4().hex}"
    async with await fleet.client() as client:
        first, second = await asyncio.gather(
            client.create_key(label="once", request_id=request_id),
            client.create_key(label="once", request_id=request_id),
        )
        third = await client.create_key(label="once", request_id=request_id)
    assert first.key_id == second.key_id == third.key_id
    assert [r.key_id for r in await fleet.store.list_keys()] == [first.key_id]


async def test_unknown_key_is_a_typed_error(fleet: RunningFleet) -> None:
    async with await fleet.client() as client:
        with pytest.raises(KeyNotFound, match="zk-missing"):
            await client.sign("zk-missing", b"x")


async def test_two_signers_share_the_load(fleet: RunningFleet) -> None:
    async with await fleet.client() as client:
        key = await client.create_key()
        replies = await asyncio.gather(
            *(client.sign(key.key_id, f"m{i}".encode()) for i in range(300))
        )
    assert len(replies) == 300
    assert fleet.served["signer-1"] > 0
    assert fleet.served["signer-2"] > 0
    assert fleet.served["signer-1"] + fleet.served["signer-2"] == 300


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


MALFORMED = [
    # (operation type, body, content type, expected code)
    ("sign", b"{not json", "application/json", "invalid_request"),
    ("sign", b"\xff\xfe\x00", "application/json", "invalid_request"),
    ("sign", b"[]", "application/json", "invalid_request"),
    ("sign", json.dumps({"key_id": "k"}).encode(), "application/json", "invalid_request"),
    (
        "sign",
        json.dumps({"key_id": "k", "message": "***"}).encode(),
        "application/json",
        "invalid_request",
    ),
    (
        "sign",
        json.dumps({"key_id": "k", "message": "aGk"}).encode(),
        "application/json",
        "invalid_request",
    ),
    (
        "sign",
        json.dumps({"key_id": "k", "digest": _b64(b"short")}).encode(),
        "application/json",
        "invalid_request",
    ),
    (
        "sign",
        json.dumps({"key_id": "k", "message": _b64(b"x"), "digest": _b64(bytes(32))}).encode(),
        "application/json",
        "invalid_request",
    ),
    (
        "sign",
        json.dumps({"key_id": "k", "message": _b64(b"x"), "encoding": "pem"}).encode(),
        "application/json",
        "invalid_request",
    ),
    (
        "sign",
        json.dumps({"key_id": "k", "message": _b64(b"x"), "version": "1"}).encode(),
        "application/json",
        "invalid_request",
    ),
    (
        "sign",
        json.dumps({"key_id": "k", "message": _b64(b"x"), "extra": 1}).encode(),
        "application/json",
        "invalid_request",
    ),
    (
        "sign",
        json.dumps({"key_id": "k", "message": _b64(b"x" * (1024 * 1024 + 1))}).encode(),
        "application/json",
        "invalid_request",
    ),
    (
        "sign",
        json.dumps({"key_id": "k", "message": _b64(b"x")}).encode(),
        "text/plain",
        "invalid_request",
    ),
    (
        "sign.batch",
        json.dumps({"key_id": "k", "items": []}).encode(),
        "application/json",
        "invalid_request",
    ),
    (
        "sign.batch",
        json.dumps({"key_id": "k", "items": [{"digest": _b64(bytes(32))}] * 1001}).encode(),
        "application/json",
        "invalid_request",
    ),
    ("key.public", json.dumps({"key_id": ""}).encode(), "application/json", "invalid_request"),
    (
        "key.create",
        json.dumps({"algorithm": "rsa-2048"}).encode(),
        "application/json",
        "invalid_request",
    ),
    ("sign.everything", b"{}", "application/json", "unknown_operation"),
]


async def test_each_malformed_message_gets_invalid_request_and_the_worker_goes_on(
    fleet: RunningFleet,
) -> None:
    connection = await aio_pika.connect(fleet.amqp_url)
    async with connection:
        channel = await connection.channel()
        reply_queue = await channel.declare_queue(exclusive=True)
        exchange = await channel.get_exchange(EXCHANGE, ensure=False)
        for index, (operation, body, content_type, _code) in enumerate(MALFORMED):
            routing_key = "sign" if operation == "sign.everything" else operation
            await exchange.publish(
                aio_pika.Message(
                    body,
                    content_type=content_type,
                    type=operation,
                    message_id=f"bad-{index}",
                    correlation_id=f"bad-{index}",
                    reply_to=reply_queue.name,
                    user_id="guest",
                ),
                routing_key=routing_key,
            )
        replies: dict[str, ErrorReply] = {}
        async with reply_queue.iterator(timeout=30) as incoming:
            async for message in incoming:
                await message.ack()
                assert message.type == "error"
                replies[message.correlation_id or ""] = ErrorReply.model_validate_json(message.body)
                if len(replies) == len(MALFORMED):
                    break
    for index, (_operation, body, _content_type, code) in enumerate(MALFORMED):
        reply = replies[f"bad-{index}"]
        assert reply.code == code, (index, reply)
        assert reply.retryable is False
        assert len(reply.message) < 500
        if len(body) > 20:
            assert body.decode(errors="replace") not in reply.message
    async with await fleet.client() as client:
        key = await client.create_key()
        signed = await client.sign(key.key_id, b"still serving")
        assert await client.verify(key, signed.signature, message=b"still serving")


@pytest.mark.signers(1)
async def test_acks_are_coalesced_and_every_request_is_acked(fleet: RunningFleet) -> None:
    async with await fleet.client() as client:
        key = await client.create_key()
        replies = await asyncio.gather(
            *(client.sign(key.key_id, digest=bytes([n]) * 32) for n in range(200))
        )
    assert len({reply.signature for reply in replies}) == 200
    acks = fleet.runtimes["signer-1"].acks
    assert acks is not None
    acks.flush()
    assert acks.acked == 200
    # Requests released together by the audit's group commit share one ack frame.
    assert acks.frames < acks.acked
    vhost = fleet.amqp_url.rsplit("/", 1)[1]
    # The broker's queue statistics trail its state by up to its collection interval (and
    # longer on a busy machine): read them until they settle, for 30 s at most.
    unacked: dict[str, int] = {}
    for _ in range(30):
        listing = await asyncio.create_subprocess_exec(
            *("rabbitmqctl", "-q", "list_queues", "--no-table-headers", "-p", vhost),
            *("name", "messages_unacknowledged"),
            stdout=subprocess.PIPE,
        )
        stdout, _ = await asyncio.wait_for(listing.communicate(), 60)
        assert listing.returncode == 0
        lines = stdout.decode().splitlines()
        unacked = {name: int(count) for name, count in (line.split() for line in lines)}
        if unacked["zandd.sign"] == 0:
            break
        await asyncio.sleep(1)
    assert unacked["zandd.sign"] == 0
