"""The AMQP topology of wire contract v1, declared by one function shared by all sides.

Declaring is idempotent: every worker declares on start, so the fleet comes up in any order.
The client helper can declare too (``declare=True``) but need not; a producer with write-only
broker rights relies on the workers having declared and on mandatory publishes failing fast.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue
from aio_pika.exceptions import AMQPError, ChannelNotFoundEntity
from aiormq.exceptions import ChannelPreconditionFailed
from pamqp.common import FieldTable

from contracts.errors import BrokerUnavailable
from contracts.operations import KEYGEN_OPERATIONS, SIGN_OPERATIONS, Operation

EXCHANGE = "zandd"
EVENTS_EXCHANGE = "zandd.events"
DEAD_LETTER_EXCHANGE = "zandd.dead"
KEYGEN_QUEUE = "zandd.keygen"
SIGN_QUEUE = "zandd.sign"
DEAD_LETTER_QUEUE = "zandd.dead"
REPLY_QUEUE_PREFIX = "zandd.reply."

#: Deliveries before a message is dead-lettered. RabbitMQ 3.10 has no default. Generous,
#: because a crashing consumer with prefetch > 1 costs every unacked message one delivery.
DELIVERY_LIMIT = 20

#: Work queue bounds (messages, bytes). Beyond them the broker refuses new requests
#: (``reject-publish``: a publisher nack, the client's ``Refused``) instead of queueing them
#: behind a backlog they would expire in. Sign: ~30 s of a two-signer fleet's throughput, the
#: client's default timeout; keygen: far more than its TPM creates keys in 30 s, room for
#: bursts of fast lifecycle requests. The bytes keep the broker's disk and memory clear of
#: its alarms, which would block every publisher. docs/operations.md has the reasoning.
QUEUE_BOUNDS: dict[str, tuple[int, int]] = {
    SIGN_QUEUE: (100_000, 1024 * 1024 * 1024),
    KEYGEN_QUEUE: (10_000, 64 * 1024 * 1024),
}
_BOUND_ARGUMENTS = ("x-max-length", "x-max-length-bytes")
log = logging.getLogger("zandd.topology")

QUEUE_OPERATIONS: dict[str, tuple[Operation, ...]] = {
    KEYGEN_QUEUE: KEYGEN_OPERATIONS,
    SIGN_QUEUE: SIGN_OPERATIONS,
}


def queue_arguments(queue: str, *, bounded: bool = True) -> FieldTable:
    """The ``x-`` arguments a work queue is declared with (they must never change silently:
    RabbitMQ refuses a redeclaration with different arguments).

    ``bounded=False``: without the bounds, as queues were declared before they existed.
    """
    arguments: FieldTable = {
        "x-queue-type": "quorum",
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-dead-letter-strategy": "at-least-once",
        # at-least-once dead-lettering requires reject-publish overflow.
        "x-overflow": "reject-publish",
    }
    if queue == KEYGEN_QUEUE:
        # One writer to the TPM at a time; a second keygen worker is a hot standby.
        arguments["x-single-active-consumer"] = True
    if bounded:
        arguments["x-max-length"], arguments["x-max-length-bytes"] = QUEUE_BOUNDS[queue]
    return arguments


@dataclass(frozen=True, slots=True)
class Topology:
    """Handles to what ``declare_topology`` declared, on the channel it was given."""

    exchange: AbstractExchange
    events: AbstractExchange
    queues: dict[str, AbstractQueue]


async def declare_topology(channel: AbstractChannel) -> Topology:
    """Declare exchanges, queues and bindings of v1 (idempotent)."""
    exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True)
    events = await channel.declare_exchange(
        EVENTS_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
    )
    dead_exchange = await channel.declare_exchange(
        DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
    )
    dead_queue = await channel.declare_queue(
        DEAD_LETTER_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dead_queue.bind(dead_exchange, routing_key="")
    queues: dict[str, AbstractQueue] = {}
    for name, operations in QUEUE_OPERATIONS.items():
        queue = await _declare_work_queue(channel, name)
        for operation in operations:
            await queue.bind(exchange, routing_key=operation.value)
        queues[name] = queue
    return Topology(exchange=exchange, events=events, queues=queues)


async def _declare_work_queue(channel: AbstractChannel, name: str) -> AbstractQueue:
    """Declare a work queue with its bounds; one declared before they existed is kept as is.

    RabbitMQ refuses (406) to redeclare a queue with other arguments and closes the channel;
    if the same declaration without the bounds is accepted, the queue is such an older one:
    it is used, and bounded by the broker policy of ops/rabbitmq/definitions.json (or none).
    Any other difference still fails.
    """
    try:
        return await channel.declare_queue(name, durable=True, arguments=queue_arguments(name))
    except ChannelPreconditionFailed:
        await channel.reopen()
    queue = await channel.declare_queue(
        name, durable=True, arguments=queue_arguments(name, bounded=False)
    )
    log.warning(
        "queue %s was declared without x-max-length (before ZANDD bounded it): kept; it is "
        "bounded only by a max-length policy (docs/operations.md, queue bounds)",
        name,
    )
    return queue


async def bind_topology(channel: AbstractChannel) -> Topology:
    """Handles to a topology declared by someone else: passive declares need no permission."""
    exchange = await channel.get_exchange(EXCHANGE, ensure=True)
    events = await channel.get_exchange(EVENTS_EXCHANGE, ensure=True)
    queues = {name: await channel.get_queue(name, ensure=True) for name in QUEUE_OPERATIONS}
    return Topology(exchange=exchange, events=events, queues=queues)


#: How long one consumer count may take before the broker counts as not answering.
CONSUMER_COUNT_TIMEOUT_S = 10.0


class QueueMissing(BrokerUnavailable):
    """The queue is not declared (yet): no worker serving it has started."""


async def consumer_count(
    connection: AbstractConnection, queue: str, *, timeout_s: float = CONSUMER_COUNT_TIMEOUT_S
) -> int:
    """How many consumers ``queue`` has now (a single-active-consumer queue shows one).

    One passive declare (it needs no broker permission) on a channel of its own, because a
    passive declare of a missing queue closes its channel.

    Raises:
        QueueMissing: ``queue`` does not exist.
        BrokerUnavailable: the broker did not answer within ``timeout_s`` or failed the call.
    """
    channel = await _channel(connection, queue, timeout_s)
    try:
        async with asyncio.timeout(timeout_s):
            declared = await channel.declare_queue(queue, passive=True)
    except ChannelNotFoundEntity:
        raise QueueMissing(f"queue {queue} does not exist: no worker has declared it yet") from None
    except (AMQPError, ConnectionError, TimeoutError) as exc:
        raise BrokerUnavailable(f"the broker did not answer about {queue}: {exc!r}") from exc
    finally:
        if not channel.is_closed:
            await channel.close()
    return declared.declaration_result.consumer_count or 0


async def _channel(connection: AbstractConnection, queue: str, timeout_s: float) -> AbstractChannel:
    try:
        async with asyncio.timeout(timeout_s):
            return await connection.channel()
    except (AMQPError, ConnectionError, TimeoutError) as exc:
        raise BrokerUnavailable(f"the broker did not answer about {queue}: {exc!r}") from exc
