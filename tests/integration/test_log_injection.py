"""A producer's strings in a worker's log: one record stays one line, nothing reaches a terminal.

Real RabbitMQ and workers; the request carries a forged ``message_id`` and ``type``.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import uuid
from collections.abc import Iterator

import aio_pika
import pytest

from contracts.topology import EXCHANGE
from tests.support.fleet import RunningFleet
from workers.observability.logs import RequestContextFilter, TextFormatter

pytestmark = [pytest.mark.rabbitmq, pytest.mark.tpm]

FORGED = "\n2026-01-01 00:00:00,000 INFO zandd.signer[1] forged\x1b[31m"


@pytest.fixture
def worker_log() -> Iterator[io.StringIO]:
    """What the in-process workers log at WARNING and above, as the text format writes it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    handler.addFilter(RequestContextFilter())
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield stream
    finally:
        root.removeHandler(handler)


async def test_a_forged_message_id_and_type_stay_on_one_escaped_line(
    fleet: RunningFleet, worker_log: io.StringIO
) -> None:
    request_id = f"r-{uuid.uuid4().hex}{FORGED}"
    connection = await aio_pika.connect(fleet.amqp_url)
    async with connection:
        channel = await connection.channel()
        replies = await channel.declare_queue(
            f"zandd.reply.{uuid.uuid4().hex}", exclusive=True, auto_delete=True
        )
        exchange = await channel.get_exchange(EXCHANGE, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                b"{}",
                content_type="application/json",
                type="sign" + FORGED,  # routed by its routing key, refused by its type
                message_id=request_id,
                correlation_id="c-1",
                reply_to=replies.name,
                user_id="guest",
            ),
            routing_key="sign",
        )
        reply = await asyncio.wait_for(_first(replies), 30)
    assert reply.type == "error"
    assert json.loads(reply.body)["code"] == "unknown_operation"
    output = worker_log.getvalue()
    lines = [line for line in output.splitlines() if "forged" in line]
    assert lines, output
    assert "\x1b" not in output
    for line in lines:
        assert not line.startswith("2026-01-01"), "a forged record"
        assert r"\n2026-01-01 00:00:00,000 INFO zandd.signer[1] forged\x1b[31m" in line


async def _first(queue: aio_pika.abc.AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage:
    async with queue.iterator(no_ack=True) as messages:
        async for message in messages:
            return message
    raise AssertionError("the reply queue closed")
