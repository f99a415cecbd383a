"""The AMQP topology of wire contract v1, declared by one function shared by all sides.

Declaring is idempotent: every worker declares on start, so the fleet comes up in any order.
The client helper can declare too (``declare=True``) but need not; a producer with write-only
broker rights relies on the workers having declared and on mandatory publishes failing fast.

**Sign shards** (``ZANDD_SIGN_SHARDS`` = N > 1). One quorum queue has one leader, so one node
carries every sign request. With N shards the sign routing keys of ``zandd`` are bound to the
consistent-hash exchange ``zandd.sign.hash`` (an exchange-to-exchange binding; plugin
``rabbitmq_consistent_hash_exchange``), which hashes each request's ``message_id`` onto one
of the quorum queues ``zandd.sign.0`` … ``zandd.sign.N-1`` (weight 1 each). Producers see no
change: same exchange, same routing keys. A request without ``message_id`` still goes to
exactly one shard. N = 1 is the unsharded topology exactly (``zandd`` → ``zandd.sign``).

Changing N on a live vhost never delivers a request twice nor leaves it unroutable. The
sign route is moved by ``_reshard`` in an order where every intermediate state routes each
request to exactly one queue: a message reaching one queue by two paths is enqueued once
(RabbitMQ deduplicates a publish's destination queues), and a consistent-hash exchange
delivers to exactly one of its bindings. So ``zandd.sign`` itself is first bound into the
hash ring; then ``zandd`` → hash exchange is bound (both paths end in ``zandd.sign``: one
copy), the direct binding removed, the shards added to the ring and ``zandd.sign`` taken out
of it (and the reverse to go back to 1). Never do both "direct binding" and "hash ring with
other queues" at once: that would deliver twice. Declarers serialise on an exclusive queue
(``zandd.topology.lock``: the broker releases it with its connection), so two declarers with
different N (a rolling change) take turns instead of interleaving their steps. Queues that
leave the route stay and are consumed (signers consume ``zandd.sign`` and every shard that
exists) until an operator deletes them empty. Shards are numbered from 0 without gaps: they
are found by looking up ``zandd.sign.0``, ``.1`` … until one is missing.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue
from aio_pika.exceptions import AMQPError, ChannelNotFoundEntity
from aiormq.exceptions import (
    ChannelLockedResource,
    ChannelPreconditionFailed,
    ConnectionCommandInvalid,
)
from pamqp.common import FieldTable

from contracts.errors import BrokerUnavailable, ConfigurationError
from contracts.operations import KEYGEN_OPERATIONS, SIGN_OPERATIONS, Operation

EXCHANGE = "zandd"
EVENTS_EXCHANGE = "zandd.events"
DEAD_LETTER_EXCHANGE = "zandd.dead"
KEYGEN_QUEUE = "zandd.keygen"
SIGN_QUEUE = "zandd.sign"
DEAD_LETTER_QUEUE = "zandd.dead"
REPLY_QUEUE_PREFIX = "zandd.reply."
#: The consistent-hash exchange in front of the sign shards (``ZANDD_SIGN_SHARDS`` > 1).
SIGN_HASH_EXCHANGE = "zandd.sign.hash"
SIGN_HASH_EXCHANGE_TYPE = "x-consistent-hash"
#: What the hash exchange hashes: a property every request of ``SigningClient`` carries (it
#: falls back to the correlation id); a request without it is still routed to one shard.
SIGN_HASH_PROPERTY = "message_id"
#: The most sign shards a fleet may have (each is a quorum queue with its own leader).
MAX_SIGN_SHARDS = 32
#: The exclusive queue topology declarers take turns on (see the module docstring).
TOPOLOGY_LOCK_QUEUE = "zandd.topology.lock"
#: How long a declarer waits for the topology lock before giving up (retried by the caller).
TOPOLOGY_LOCK_TIMEOUT_S = 30.0
PLUGIN_MISSING = (
    "the broker has no x-consistent-hash exchange type, which ZANDD_SIGN_SHARDS > 1 needs: "
    "enable rabbitmq_consistent_hash_exchange on every node "
    "(rabbitmq-plugins enable rabbitmq_consistent_hash_exchange), or run with "
    "ZANDD_SIGN_SHARDS=1"
)


def sign_shard(index: int) -> str:
    """The name of sign shard ``index`` (``zandd.sign.<index>``)."""
    return f"{SIGN_QUEUE}.{index}"


def is_sign_queue(name: str) -> bool:
    """``zandd.sign`` or one of its shards."""
    if name == SIGN_QUEUE:
        return True
    prefix, _, index = name.rpartition(".")
    return prefix == SIGN_QUEUE and index.isdigit() and int(index) < MAX_SIGN_SHARDS


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
#: ``zandd.dead``'s bounds (issue 17): a week of dead letters, at most 10,000 of them, the
#: oldest dropped first (``drop-head``): enough to inspect what went wrong recently, never an
#: unbounded queue that fills the broker's disk. docs/operations.md has the reasoning.
DEAD_LETTER_MAX_LENGTH = 10_000
DEAD_LETTER_TTL_MS = 7 * 24 * 3600 * 1000
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
        # A shard is bounded as zandd.sign is: each carries 1/N of a fleet N times as large.
        bounds = QUEUE_BOUNDS[SIGN_QUEUE if is_sign_queue(queue) else queue]
        arguments["x-max-length"], arguments["x-max-length-bytes"] = bounds
    return arguments


def dead_letter_arguments(*, bounded: bool = True) -> FieldTable:
    """The ``x-`` arguments of ``zandd.dead``; ``bounded=False``: as it was declared before
    it was bounded (such a queue is kept and bounded by the ``zandd-dead-bounds`` policy)."""
    arguments: FieldTable = {"x-queue-type": "quorum"}
    if bounded:
        arguments["x-max-length"] = DEAD_LETTER_MAX_LENGTH
        arguments["x-overflow"] = "drop-head"
        arguments["x-message-ttl"] = DEAD_LETTER_TTL_MS
    return arguments


@dataclass(frozen=True, slots=True)
class Topology:
    """Handles to what ``declare_topology`` declared, on the channel it was given."""

    exchange: AbstractExchange
    events: AbstractExchange
    queues: dict[str, AbstractQueue]
    #: Every queue sign requests may wait in: ``zandd.sign`` and each shard that exists
    #: (in the route or draining after it left it). Signers consume them all.
    sign_queues: tuple[str, ...] = (SIGN_QUEUE,)


#: A channel on which shard ``index`` is first declared: a quorum queue's leader is placed on
#: the node of the declaring connection (``client-local``, RabbitMQ's default), so a channel
#: per node spreads the shards' leaders over the nodes.
PlaceShard = Callable[[int], Awaitable[AbstractChannel]]


async def declare_topology(
    channel: AbstractChannel,
    *,
    sign_shards: int | None = None,
    place: PlaceShard | None = None,
) -> Topology:
    """Declare exchanges, queues and bindings of v1 (idempotent).

    ``sign_shards``: route sign requests to ``zandd.sign`` (1) or over that many shards (see
    the module docstring), moving the route from whatever it is now; None (producers, the
    event subscriber) keeps the route a worker chose, and binds ``zandd.sign`` only when no
    route exists. ``place`` chooses where a shard that does not exist yet is declared.

    Raises:
        ConfigurationError: ``sign_shards`` is out of range, or the broker lacks the
            consistent-hash exchange plugin.
    """
    if sign_shards is not None and not 1 <= sign_shards <= MAX_SIGN_SHARDS:
        raise ConfigurationError(f"sign shards must be 1 to {MAX_SIGN_SHARDS}, not {sign_shards}")
    exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True)
    events = await channel.declare_exchange(
        EVENTS_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
    )
    dead_exchange = await channel.declare_exchange(
        DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
    )
    dead_queue = await _declare_dead_letter_queue(channel)
    await dead_queue.bind(dead_exchange, routing_key="")
    queues: dict[str, AbstractQueue] = {}
    for name, operations in QUEUE_OPERATIONS.items():
        queue = await _declare_work_queue(channel, name)
        if name != SIGN_QUEUE:  # the sign route is _reshard's
            for operation in operations:
                await queue.bind(exchange, routing_key=operation.value)
        queues[name] = queue
    async with _topology_lock(channel):
        shards = await _reshard(channel, sign_shards, place)
    return Topology(exchange, events, queues, (SIGN_QUEUE, *shards))


async def _reshard(
    channel: AbstractChannel, sign_shards: int | None, place: PlaceShard | None
) -> tuple[str, ...]:
    """Move the sign route to ``sign_shards`` (under the topology lock); the shards that exist.

    Every step leaves each sign request routed to exactly one queue (module docstring). The
    states in between are the ones a declarer that died half-way leaves; each recipe starts
    correctly from any of them.
    """
    hashing = await _exchange_exists(channel, SIGN_HASH_EXCHANGE)
    if sign_shards is None:
        if not hashing:  # no hash exchange, so no route through one: direct is safe
            await _bind_sign(channel, SIGN_QUEUE, EXCHANGE)
    elif sign_shards == 1:
        await _unshard(channel, hashing=hashing)
    else:
        await _shard(channel, sign_shards, place, hashing=hashing)
    return await existing_shards(channel)


async def _unshard(channel: AbstractChannel, *, hashing: bool) -> None:
    """Route sign requests to ``zandd.sign`` directly (``ZANDD_SIGN_SHARDS=1``)."""
    if hashing:
        # zandd.sign into the ring, the shards out: every path now ends in zandd.sign, so the
        # direct binding adds no second copy; then the hash exchange (and its bindings) goes.
        await _bind_sign_ring(channel, SIGN_QUEUE)
        for shard in await existing_shards(channel):
            await _unbind_sign_ring(channel, shard)
    await _bind_sign(channel, SIGN_QUEUE, EXCHANGE)
    if hashing:
        await channel.exchange_delete(SIGN_HASH_EXCHANGE)
        log.warning("sign requests go to %s again; its shards drain", SIGN_QUEUE)


async def _shard(
    channel: AbstractChannel, sign_shards: int, place: PlaceShard | None, *, hashing: bool
) -> None:
    """Route sign requests over ``sign_shards`` shards through the hash exchange."""
    if not hashing:
        await _declare_hash_exchange(channel)
    wanted = [sign_shard(index) for index in range(sign_shards)]
    for index, shard in enumerate(wanted):
        if not await _queue_exists(channel, shard):
            target = channel if place is None else await place(index)
            await target.declare_queue(shard, durable=True, arguments=queue_arguments(shard))
    # zandd.sign into the ring, then zandd -> ring (both paths end in zandd.sign: one copy),
    # then the direct binding out; the shards into the ring and zandd.sign out of it.
    await _bind_sign_ring(channel, SIGN_QUEUE)
    await _bind_sign(channel, SIGN_HASH_EXCHANGE, EXCHANGE, exchange_to_exchange=True)
    await _unbind_sign(channel, SIGN_QUEUE, EXCHANGE)
    for shard in wanted:
        await _bind_sign_ring(channel, shard)
    await _unbind_sign_ring(channel, SIGN_QUEUE)
    extra = (await existing_shards(channel))[sign_shards:]
    for shard in extra:  # fewer shards than before: the rest leave the ring and drain
        await _unbind_sign_ring(channel, shard)
    if not hashing or extra:
        log.warning("sign requests spread over %d shards of %s", sign_shards, SIGN_QUEUE)


async def existing_shards(channel: AbstractChannel) -> tuple[str, ...]:
    """The sign shards that exist: ``zandd.sign.0``, ``.1`` … up to the first missing one."""
    found: list[str] = []
    for index in range(MAX_SIGN_SHARDS):
        if not await _queue_exists(channel, sign_shard(index)):
            break
        found.append(sign_shard(index))
    return tuple(found)


async def _declare_hash_exchange(channel: AbstractChannel) -> None:
    try:
        await channel.declare_exchange(
            SIGN_HASH_EXCHANGE,
            SIGN_HASH_EXCHANGE_TYPE,
            durable=True,
            arguments={"hash-property": SIGN_HASH_PROPERTY},
        )
    except ConnectionCommandInvalid as exc:
        if SIGN_HASH_EXCHANGE_TYPE in str(exc):
            raise ConfigurationError(PLUGIN_MISSING) from None
        raise


async def _bind_sign(
    channel: AbstractChannel, destination: str, source: str, *, exchange_to_exchange: bool = False
) -> None:
    """Bind ``destination`` (a queue, or an exchange) to ``source`` for every sign operation."""
    underlay = await channel.get_underlay_channel()
    for operation in SIGN_OPERATIONS:
        if exchange_to_exchange:
            await underlay.exchange_bind(destination, source, routing_key=operation.value)
        else:
            await underlay.queue_bind(destination, source, routing_key=operation.value)


async def _unbind_sign(channel: AbstractChannel, queue: str, source: str) -> None:
    underlay = await channel.get_underlay_channel()
    for operation in SIGN_OPERATIONS:
        await underlay.queue_unbind(queue, source, routing_key=operation.value)


#: A shard's binding key in the hash ring: its weight (every shard weighs the same).
_RING_WEIGHT = "1"


async def _bind_sign_ring(channel: AbstractChannel, queue: str) -> None:
    underlay = await channel.get_underlay_channel()
    await underlay.queue_bind(queue, SIGN_HASH_EXCHANGE, routing_key=_RING_WEIGHT)


async def _unbind_sign_ring(channel: AbstractChannel, queue: str) -> None:
    underlay = await channel.get_underlay_channel()
    await underlay.queue_unbind(queue, SIGN_HASH_EXCHANGE, routing_key=_RING_WEIGHT)


async def _queue_exists(channel: AbstractChannel, name: str) -> bool:
    """A passive declare; a missing queue closes the channel, which is reopened."""
    try:
        await channel.declare_queue(name, passive=True)
    except ChannelNotFoundEntity:
        await channel.reopen()
        return False
    return True


async def _exchange_exists(channel: AbstractChannel, name: str) -> bool:
    try:
        await channel.get_exchange(name, ensure=True)
    except ChannelNotFoundEntity:
        await channel.reopen()
        return False
    return True


#: Releasing the lock failed because the connection is gone (which released it); aiormq
#: raises RuntimeError when asked for a channel on a closed connection (a connection error,
#: e.g. 503 for an unknown exchange type, closes the whole connection).
_LOCK_RELEASE_FAILURES: tuple[type[BaseException], ...] = (AMQPError, ConnectionError, RuntimeError)


@asynccontextmanager
async def _topology_lock(channel: AbstractChannel) -> AsyncIterator[None]:
    """Hold the exclusive ``zandd.topology.lock`` queue: one declarer at a time moves routes.

    The broker frees it when the holder's connection ends, so a declarer that dies holding
    it blocks nobody for longer than its connection takes to be noticed.
    """
    deadline = asyncio.get_running_loop().time() + TOPOLOGY_LOCK_TIMEOUT_S
    delay_s = 0.05
    while True:
        try:
            await channel.declare_queue(TOPOLOGY_LOCK_QUEUE, exclusive=True, auto_delete=True)
            break
        except ChannelLockedResource:
            await channel.reopen()
            if asyncio.get_running_loop().time() > deadline:
                raise BrokerUnavailable(
                    f"another declarer held {TOPOLOGY_LOCK_QUEUE} for "
                    f"{TOPOLOGY_LOCK_TIMEOUT_S:.0f} s"
                ) from None
            await asyncio.sleep(delay_s * random.uniform(0.5, 1.5))  # noqa: S311 - jitter
            delay_s = min(delay_s * 2, 1.0)
    try:
        yield
    finally:
        # Released whatever happened in between: the queue is the connection's, and a
        # long-lived connection (an event subscriber's) that kept it would hold every other
        # declarer off until it closed. A connection already gone has released it.
        with suppress(*_LOCK_RELEASE_FAILURES):
            if channel.is_closed:
                await channel.reopen()
            await channel.queue_delete(TOPOLOGY_LOCK_QUEUE)


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


async def _declare_dead_letter_queue(channel: AbstractChannel) -> AbstractQueue:
    """Declare ``zandd.dead`` bounded; one declared before it was bounded is kept as it is.

    RabbitMQ refuses (406) a redeclaration with other arguments, so an existing unbounded
    ``zandd.dead`` is used as is (no migration that could lose its letters): the broker policy
    ``zandd-dead-bounds`` of ops/rabbitmq/definitions.json bounds it the same way.
    """
    try:
        return await channel.declare_queue(
            DEAD_LETTER_QUEUE, durable=True, arguments=dead_letter_arguments()
        )
    except ChannelPreconditionFailed:
        await channel.reopen()
    queue = await channel.declare_queue(
        DEAD_LETTER_QUEUE, durable=True, arguments=dead_letter_arguments(bounded=False)
    )
    log.warning(
        "queue %s was declared before ZANDD bounded it: kept; it is bounded only by a policy "
        "(zandd-dead-bounds, docs/operations.md, dead letters)",
        DEAD_LETTER_QUEUE,
    )
    return queue


async def bind_topology(channel: AbstractChannel, *, sign_shards: int | None = None) -> Topology:
    """Handles to a topology declared by someone else: passive declares need no permission.

    Raises:
        ConfigurationError: ``sign_shards`` > 1 but the broker has fewer shards or no hash
            exchange (an administrator declares them: ``zandd topology --sign-shards N``).
    """
    exchange = await channel.get_exchange(EXCHANGE, ensure=True)
    events = await channel.get_exchange(EVENTS_EXCHANGE, ensure=True)
    queues = {name: await channel.get_queue(name, ensure=True) for name in QUEUE_OPERATIONS}
    shards = await existing_shards(channel)
    if sign_shards is not None and sign_shards > 1:
        hashing = await _exchange_exists(channel, SIGN_HASH_EXCHANGE)
        if len(shards) < sign_shards or not hashing:
            raise ConfigurationError(
                f"ZANDD_SIGN_SHARDS={sign_shards}, but the broker has {len(shards)} sign "
                f"shards{'' if hashing else ' and no ' + SIGN_HASH_EXCHANGE}: with "
                "ZANDD_DECLARE_TOPOLOGY=false an administrator declares them "
                f"(zandd topology --sign-shards {sign_shards}, with a URL that may configure)"
            )
    return Topology(exchange, events, queues, (SIGN_QUEUE, *shards))


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
