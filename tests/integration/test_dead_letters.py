"""``zandd.dead``: poison, expired and unanswerable requests land there, and can be replayed."""

from __future__ import annotations

import asyncio
import contextlib
import json

import aio_pika
import pytest

from contracts.models import ErrorReply
from contracts.topology import (
    DEAD_LETTER_QUEUE,
    DELIVERY_LIMIT,
    EXCHANGE,
    SIGN_QUEUE,
    declare_topology,
)
from tests.support import cli
from tests.support.cli import environment
from tests.support.fleet import RunningFleet
from tests.support.poison import POISON_HEADERS, publish_poison
from workers.operator.dead import DeadLetterQueue

pytestmark = pytest.mark.rabbitmq


async def zandd(amqp_url: str, *args: str) -> tuple[int, str, str]:
    return await cli.zandd(*args, env=environment(ZANDD_AMQP_URL=amqp_url))


async def wait_for_dead(channel: aio_pika.abc.AbstractChannel, count: int) -> None:
    async with asyncio.timeout(30):
        while True:
            queue = await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
            if queue.declaration_result.message_count == count:
                return
            await asyncio.sleep(0.05)


async def test_poison_message_is_dead_lettered_after_the_delivery_limit(
    empty_amqp_url: str,
) -> None:
    connection = await aio_pika.connect(empty_amqp_url)
    async with connection:
        channel = await connection.channel()
        topology = await declare_topology(channel)
        await topology.exchange.publish(
            aio_pika.Message(
                b'{"key_id": "zk-1", "message": "AA=="}', type="sign", message_id="poison-1"
            ),
            routing_key="sign",
        )
        deliveries = 0
        # A worker that crashes on this message every time: each delivery ends unsettled.
        with contextlib.suppress(TimeoutError):
            async with topology.queues[SIGN_QUEUE].iterator(timeout=2) as incoming:
                async for message in incoming:
                    deliveries += 1
                    await message.reject(requeue=True)
        await wait_for_dead(channel, 1)
    letters = await DeadLetterQueue(empty_amqp_url).list()
    assert [(d.message_id, d.operation, d.reason, d.queue) for d in letters] == [
        ("poison-1", "sign", "delivery_limit", SIGN_QUEUE)
    ]
    # The first delivery plus DELIVERY_LIMIT redeliveries, then the broker gives up on it.
    assert deliveries == DELIVERY_LIMIT + 1


async def test_expired_and_unanswerable_requests_are_listed_and_replayable(
    empty_amqp_url: str,
) -> None:
    connection = await aio_pika.connect(empty_amqp_url)
    async with connection:
        channel = await connection.channel()
        topology = await declare_topology(channel)
        replies = await channel.declare_queue(exclusive=True)
        # Nobody consumes zandd.sign yet: this request expires in the queue.
        await topology.exchange.publish(
            aio_pika.Message(
                json.dumps({"key_id": "zk-gone", "message": "aGk="}).encode(),
                content_type="application/json",
                type="sign",
                message_id="expired-1",
                correlation_id="expired-1",
                reply_to=replies.name,
                user_id="guest",
                expiration=0.05,
            ),
            routing_key="sign",
        )
        await wait_for_dead(channel, 1)

        code, out, err = await zandd(empty_amqp_url, "dead", "list")
        assert code == 0, err
        assert "expired-1" in out
        assert "expired" in out
        assert "1 dead letters" in out

        # A worker answers the replayed copy (here with key_not_found: the key never existed).
        signer = asyncio.create_task(answer_one(empty_amqp_url))
        code, out, err = await zandd(empty_amqp_url, "dead", "replay", "--id", "expired-1")
        assert code == 0, err
        assert "replayed 1 to zandd; 0 left in zandd.dead" in out
        await signer
        async with replies.iterator(timeout=30) as incoming:
            async for message in incoming:
                assert message.correlation_id == "expired-1"
                assert ErrorReply.model_validate_json(message.body).code == "key_not_found"
                break
        code, out, _ = await zandd(empty_amqp_url, "dead", "list")
        assert out.strip() == "zandd.dead is empty"
        code, _, err = await zandd(empty_amqp_url, "dead", "replay")
        assert code == 1
        assert "--id" in err


async def answer_one(amqp_url: str) -> None:
    """A stand-in consumer with no vault: answers one sign request with key_not_found."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(SIGN_QUEUE, passive=True)
        async with queue.iterator(timeout=30) as incoming:
            async for message in incoming:
                assert message.headers.get("x-death") is None  # a clean copy, not the corpse
                reply = ErrorReply(code="key_not_found", message="no such key", retryable=False)
                assert message.reply_to is not None
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        reply.model_dump_json().encode(),
                        type="error",
                        correlation_id=message.correlation_id,
                    ),
                    routing_key=message.reply_to,
                )
                await message.ack()
                return


@pytest.mark.tpm
async def test_a_malformed_request_without_reply_to_is_dead_lettered(fleet: RunningFleet) -> None:
    connection = await aio_pika.connect(fleet.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(EXCHANGE, ensure=False)
        before = (
            await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
        ).declaration_result.message_count
        await exchange.publish(
            aio_pika.Message(
                b"{not json", type="sign", message_id="nobody-to-tell", user_id="guest"
            ),
            routing_key="sign",
        )
        await wait_for_dead(channel, (before or 0) + 1)
    letters = await DeadLetterQueue(fleet.amqp_url).list()
    assert ("nobody-to-tell", "rejected") in [(d.message_id, d.reason) for d in letters]


# The lean connection's guarantee (its total decoder): pinned to it when the suite runs with
# ZANDD_TRANSPORT=aiormq, whose reader ends the connection instead (docs/design.md).
@pytest.mark.tpm
@pytest.mark.fleet_settings(transport="lean")
async def test_unreadable_messages_are_refused_dead_lettered_once_and_listed_escaped(
    fleet: RunningFleet,
) -> None:
    sessions = {name: runtime._session for name, runtime in fleet.runtimes.items()}
    connection = await aio_pika.connect(fleet.amqp_url)
    async with connection:
        channel = await connection.channel()
        before = (
            await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
        ).declaration_result.message_count or 0
        replies = await publish_poison(fleet.amqp_url, answerable=(True, False))
        await wait_for_dead(channel, before + 6)
    errors = {r.correlation_id: ErrorReply.model_validate_json(r.body) for r in replies}
    assert sorted(errors) == sorted(f"{kind}-True" for kind in POISON_HEADERS)
    assert {
        (e.code, e.message.startswith("the message cannot be read")) for e in errors.values()
    } == {("invalid_request", True)}
    letters = {
        d.message_id: d
        for d in await DeadLetterQueue(fleet.amqp_url).list()
        if (d.message_id or "").startswith("poison-")
    }
    assert len(letters) == 6
    # Dead-lettered on the first delivery (one death), by a worker's reject, with the reason.
    assert {(d.reason, d.count, d.queue) for d in letters.values()} == {("rejected", 1, SIGN_QUEUE)}
    assert all(d.defect and d.defect.startswith("header ") for d in letters.values())
    # No worker lost its connection over them.
    assert {name: runtime._session for name, runtime in fleet.runtimes.items()} == sessions
    assert not any(s is None or s.lost.is_set() for s in sessions.values())

    code, out, err = await zandd(fleet.amqp_url, "dead", "list")
    assert code == 0, err
    assert "\x1b" not in out  # every producer-chosen text is escaped
    for kind in POISON_HEADERS:
        assert f"poison-{kind}-True\\x1b[2J" in out
    assert out.count("  unreadable: header ") == 6
    # Never replayed (it would only be refused again), and the queue stays readable.
    code, out, err = await zandd(fleet.amqp_url, "dead", "replay", "--id", "poison-key-True\x1b[2J")
    assert code == 0, err
    assert "replayed 0 to zandd" in out
    assert "\x1b" not in err


# The lean connection's guarantee (its total decoder): pinned to it when the suite runs with
# ZANDD_TRANSPORT=aiormq, whose reader ends the connection instead (docs/design.md).
@pytest.mark.tpm
@pytest.mark.fleet_settings(max_body_bytes=64 * 1024, transport="lean")
async def test_a_body_over_the_limit_is_refused_from_its_header_and_dead_lettered(
    fleet: RunningFleet,
) -> None:
    connection = await aio_pika.connect(fleet.amqp_url)
    async with connection:
        channel = await connection.channel()
        before = (
            await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
        ).declaration_result.message_count or 0
        replies = await channel.declare_queue(exclusive=True)
        exchange = await channel.get_exchange(EXCHANGE, ensure=False)
        body = b"[" + b"{}," * 400_000 + b"{}]"
        await exchange.publish(
            aio_pika.Message(
                body,
                type="sign.batch",
                message_id="too-big",
                reply_to=replies.name,
                user_id="guest",
            ),
            routing_key="sign.batch",
        )
        async with replies.iterator(timeout=30) as incoming:
            async for message in incoming:
                error = ErrorReply.model_validate_json(message.body)
                break
        await wait_for_dead(channel, before + 1)
    assert error.code == "invalid_request"
    assert error.message == (
        f"the message cannot be read: a body of {len(body)} bytes is over the limit of 65536"
    )
