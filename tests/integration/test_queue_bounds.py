"""The work queues are bounded: beyond the bound a producer gets a nack, not a backlog.

On the real broker, in a private vhost per test: the keygen queue (10,000 messages) is filled
with nobody consuming, and a worker starts against queues declared before the bounds existed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aio_pika
import pytest

from contracts.client import SigningClient
from contracts.errors import Refused
from contracts.limits import Limits
from contracts.models import KeyCreateRequest
from contracts.operations import Operation
from contracts.topology import EXCHANGE, KEYGEN_QUEUE, SIGN_QUEUE, declare_topology
from contracts.wire import Properties, Wire
from workers.consumer.runtime import ConsumerRuntime, RequestContext

pytestmark = pytest.mark.rabbitmq

KEYGEN_BOUND = 10_000
#: The work queues' arguments before they were bounded (8fa3105).
UNBOUNDED_ARGUMENTS: dict[str, dict[str, Any]] = {
    name: {
        "x-queue-type": "quorum",
        "x-delivery-limit": 20,
        "x-dead-letter-exchange": "zandd.dead",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        **({"x-single-active-consumer": True} if name == KEYGEN_QUEUE else {}),
    }
    for name in (SIGN_QUEUE, KEYGEN_QUEUE)
}


async def publish(wire: Wire, routing_key: str, count: int) -> list[bool]:
    """Publish ``count`` small requests at once; the broker's verdicts."""
    body = KeyCreateRequest().model_dump_json().encode()
    properties = Properties(content_type="application/json", type=routing_key)
    confirms = [
        wire.publish(body, properties, exchange=EXCHANGE, routing_key=routing_key)
        for _ in range(count)
    ]
    return list(await asyncio.gather(*(c for c in confirms if c is not None)))


async def test_a_full_work_queue_refuses_requests_and_the_client_says_so(
    empty_amqp_url: str,
) -> None:
    connection = await aio_pika.connect(empty_amqp_url)
    async with connection:
        await declare_topology(await connection.channel())
    # Nobody consumes zandd.keygen: it fills up to its bound, then the broker nacks.
    wire = await Wire.connect(empty_amqp_url, connection_name="zandd-test-fill")
    try:
        await wire.confirm_select()
        routing_key = Operation.KEY_CREATE.value
        assert await publish(wire, routing_key, KEYGEN_BOUND) == [True] * KEYGEN_BOUND
        # One at a time: a quorum queue applies its bound to what it has, not to what is
        # still on the way, so a burst overshoots it.
        verdicts = [(await publish(wire, routing_key, 1))[0] for _ in range(20)]
    finally:
        await wire.close()
    assert verdicts.count(False) >= 15, verdicts
    async with await SigningClient.connect(empty_amqp_url) as client:
        client._consumers.clear()  # sent although no keygen worker consumes (NoConsumer else)
        with pytest.raises(Refused, match=r"refused key\.create"):
            await client.create_key(timeout_s=5)


async def serve_briefly(url: str, queue: str) -> None:
    """Start a worker runtime on ``queue``, wait until it consumes, stop it."""

    async def never_called(request: Any, context: RequestContext) -> Any:
        raise AssertionError("no request was sent")

    runtime = ConsumerRuntime(
        amqp_url=url,
        queue=queue,
        handlers={Operation.SIGN: never_called},
        prefetch=1,
        limits=Limits(),
        drain_timeout_s=1.0,
        name="test-bounds",
    )
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop))
    try:
        await asyncio.wait_for(runtime.ready.wait(), 30)
    finally:
        stop.set()
        await task


async def test_a_worker_starts_against_queues_declared_before_the_bounds(
    empty_amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # RabbitMQ refuses to redeclare a queue with other arguments (406): an existing
    # deployment's queues must not stop the new workers.
    connection = await aio_pika.connect(empty_amqp_url)
    async with connection:
        channel = await connection.channel()
        for name, arguments in UNBOUNDED_ARGUMENTS.items():
            await channel.declare_queue(name, durable=True, arguments=arguments)
    with caplog.at_level(logging.WARNING, logger="zandd.topology"):
        await serve_briefly(empty_amqp_url, SIGN_QUEUE)
    assert f"queue {SIGN_QUEUE} was declared without x-max-length" in caplog.text
    # The queue is the one declared before, untouched: a declare with the old arguments
    # still matches it.
    connection = await aio_pika.connect(empty_amqp_url)
    async with connection:
        channel = await connection.channel()
        for name, arguments in UNBOUNDED_ARGUMENTS.items():
            await channel.declare_queue(name, durable=True, arguments=arguments)
