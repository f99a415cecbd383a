"""The sharded sign path beside the unsharded one (``ZANDD_SIGN_SHARDS``), on one broker node.

Runs only where the broker has the consistent-hash exchange plugin; elsewhere (this machine's
default node) the report says ``skipped: …``. Two pairs, each measured in alternating slices
(:func:`workers.bench.measure.interleaved`) with the route moved between slices, so one run
compares 1 queue with ``SHARDS`` at the same moment of the machine:

- ``route``: the broker alone. Messages published with confirms to a direct exchange and
  consumed (acked) in this process, through one quorum queue, or through a consistent-hash
  exchange over ``SHARDS`` quorum queues (what ``zandd.sign.hash`` does). One queue's figure
  is the per-queue bound as far as this client can drive it;
- ``sign``: sign requests through the fleet (signers run with ``ZANDD_SIGN_SHARDS=SHARDS`` and
  consume ``zandd.sign`` and the shards); between slices the bench moves the sign route with
  ``declare_topology`` (1 or ``SHARDS``), which never drops nor doubles a request.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aiormq.exceptions import ConnectionCommandInvalid

from contracts.amqp import connect
from contracts.client import SigningClient
from contracts.topology import (
    SIGN_HASH_EXCHANGE_TYPE,
    SIGN_HASH_PROPERTY,
    declare_topology,
    queue_arguments,
)
from workers.bench.measure import Run, Timing, interleaved
from workers.bench.progress import Progress

#: Shards of the sharded side (the issue's N=3).
SHARDS = 3
#: Messages in flight in the ``route`` pair: enough to keep the broker, not the client, busy.
ROUTE_CONCURRENCY = 256
ROUTE_PREFETCH = 500
SLICES = 6
_PREFIX = "zandd-bench.route"


@dataclass(frozen=True, slots=True)
class ShardResults:
    """``route`` and ``sign`` through 1 queue and through ``shards`` (``sign`` None: not run)."""

    shards: int
    route_one: Run
    route_sharded: Run
    sign_one: Run | None
    sign_sharded: Run | None


async def plugin_missing(amqp_url: str) -> str | None:
    """None when the broker has the consistent-hash exchange type, else why not (a sentence)."""
    connection = await connect(amqp_url, connection_name="zandd-bench")
    try:
        channel = await connection.channel()
        name = f"{_PREFIX}.probe.{uuid.uuid4().hex[:8]}"
        await channel.declare_exchange(name, SIGN_HASH_EXCHANGE_TYPE, auto_delete=True)
        await channel.exchange_delete(name)
    except ConnectionCommandInvalid:
        return (
            "the broker has no rabbitmq_consistent_hash_exchange plugin (this machine's default "
            "node; docs/performance.md measures it on a private node)"
        )
    finally:
        if not connection.is_closed:
            await connection.close()
    return None


async def measure_route(amqp_url: str, timing: Timing, progress: Progress) -> tuple[Run, Run]:
    """The ``route`` pair: (1 queue, ``SHARDS`` queues)."""
    async with _route_topology(amqp_url) as (channel, route):
        exchange = await channel.get_exchange(f"{_PREFIX}.x")
        waiting: dict[str, asyncio.Future[None]] = {}
        consumers: list[tuple[AbstractQueue, str]] = []

        async def on_message(message: AbstractIncomingMessage) -> None:
            future = waiting.pop(message.message_id or "", None)
            if future is not None and not future.done():
                future.set_result(None)
            await message.ack()

        for name in (f"{_PREFIX}.q", *(f"{_PREFIX}.q.{i}" for i in range(SHARDS))):
            queue = await channel.get_queue(name)
            consumers.append((queue, await queue.consume(on_message)))

        async def one() -> object:
            message_id = uuid.uuid4().hex
            arrived = asyncio.get_running_loop().create_future()
            waiting[message_id] = arrived
            await exchange.publish(aio_pika.Message(b"x" * 64, message_id=message_id), "r")
            await arrived
            return None

        load = timing.load(ROUTE_CONCURRENCY)
        warmup = timing.warmup(ROUTE_CONCURRENCY)
        one_run, sharded_run = await interleaved(
            [("route [1 queue]", one), (f"route [{SHARDS} queues]", one)],
            load,
            warmup,
            progress,
            slices=SLICES,
            before={
                "route [1 queue]": lambda: route(1),
                f"route [{SHARDS} queues]": lambda: route(SHARDS),
            },
        )
        for queue, tag in consumers:
            await queue.cancel(tag)
    progress.end(f"{one_run.per_s:,.0f} vs {sharded_run.per_s:,.0f} msg/s")
    return one_run, sharded_run


@asynccontextmanager
async def _route_topology(
    amqp_url: str,
) -> AsyncIterator[tuple[AbstractChannel, Callable[[int], Awaitable[None]]]]:
    """The bench's own exchange, queue and shards; a function that moves its route."""
    connection = await connect(amqp_url, connection_name="zandd-bench")
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=ROUTE_PREFETCH)
        exchange = await channel.declare_exchange(f"{_PREFIX}.x", auto_delete=True)
        hashing = await channel.declare_exchange(
            f"{_PREFIX}.hash",
            SIGN_HASH_EXCHANGE_TYPE,
            auto_delete=True,
            arguments={"hash-property": SIGN_HASH_PROPERTY},
        )
        arguments = dict(queue_arguments("zandd.sign"))
        del arguments["x-dead-letter-exchange"], arguments["x-dead-letter-strategy"]
        single = await channel.declare_queue(f"{_PREFIX}.q", durable=True, arguments=arguments)
        shards = [
            await channel.declare_queue(f"{_PREFIX}.q.{i}", durable=True, arguments=arguments)
            for i in range(SHARDS)
        ]
        for shard in shards:
            await shard.bind(hashing, routing_key="1")

        async def route(count: int) -> None:
            if count == 1:
                await single.bind(exchange, routing_key="r")
                await hashing.unbind(exchange, routing_key="r")
            else:
                await hashing.bind(exchange, routing_key="r")
                await single.unbind(exchange, routing_key="r")

        try:
            yield channel, route
        finally:
            for queue in (single, *shards):
                await queue.delete(if_unused=False, if_empty=False)


async def measure_sign_shards(
    amqp_url: str, signers: int, timing: Timing, progress: Progress, concurrency: int
) -> tuple[Run, Run]:
    """The ``sign`` pair through a fleet that consumes the shards: (1 queue, ``SHARDS``)."""
    digest = os.urandom(32)
    at = f"[{signers} signer{'s' if signers > 1 else ''}"
    connection = await connect(amqp_url, connection_name="zandd-bench")
    async with connection, await SigningClient.connect(amqp_url) as client:
        channel = await connection.channel()

        async def route(count: int) -> None:
            await declare_topology(channel, sign_shards=count)

        key = await client.create_key(label="zandd-bench")

        async def sign() -> object:
            return await client.sign(key.key_id, digest=digest)

        one_name, sharded_name = f"sign {at}, 1 queue]", f"sign {at}, {SHARDS} shards]"
        runs = await interleaved(
            [(one_name, sign), (sharded_name, sign)],
            timing.load(concurrency),
            timing.warmup(concurrency),
            progress,
            slices=SLICES,
            before={one_name: lambda: route(1), sharded_name: lambda: route(SHARDS)},
        )
        await route(1)
    progress.end(f"{runs[0].per_s:,.0f} vs {runs[1].per_s:,.0f} req/s")
    return runs[0], runs[1]
