"""The dead-letter queue ``zandd.dead``: what is in it, and putting messages back.

Messages land there when they cannot be served: a request that kept killing workers (the
quorum queue's delivery limit), one that expired before a worker took it, and a malformed one
with no ``reply_to`` to send the refusal to. Listing reads every message and returns it
untouched; replaying republishes a copy to ``zandd`` and only then removes the original.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import (
    AMQPError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    PublishError,
)
from aiormq.exceptions import ChannelAccessRefused

from contracts.amqp import DEADLINE_HEADER, connect_plain
from contracts.errors import BrokerUnavailable, ConfigurationError, ZanddError
from contracts.topology import DEAD_LETTER_QUEUE, EXCHANGE

log = logging.getLogger("zandd.dead")

_READ_TIMEOUT_S = 5.0
_DEATH_HEADERS = (
    "x-death",
    "x-first-death-reason",
    "x-first-death-queue",
    "x-first-death-exchange",
)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message in ``zandd.dead``, described without its body."""

    message_id: str | None
    operation: str
    routing_key: str
    reason: str
    count: int
    first_seen: datetime | None
    queue: str
    principal: str | None


def describe(message: AbstractIncomingMessage) -> DeadLetter:
    """What an operator needs to decide about a dead letter (never its payload)."""
    deaths = _deaths(message)
    first = deaths[-1] if deaths else {}
    routing_keys = first.get("routing-keys") or [message.routing_key or ""]
    time = first.get("time")
    return DeadLetter(
        message_id=message.message_id,
        operation=message.type or str(routing_keys[0]),
        routing_key=str(routing_keys[0]),
        reason=str(first.get("reason") or _header(message, "x-first-death-reason") or "unknown"),
        count=sum(int(death.get("count", 1)) for death in deaths) or 1,
        first_seen=time if isinstance(time, datetime) else None,
        queue=str(first.get("queue") or _header(message, "x-first-death-queue") or "?"),
        principal=message.user_id,
    )


def _deaths(message: AbstractIncomingMessage) -> list[dict[str, Any]]:
    value = (message.headers or {}).get("x-death")
    if not isinstance(value, list):
        return []
    return [death for death in value if isinstance(death, dict)]


def _header(message: AbstractIncomingMessage, name: str) -> object:
    return (message.headers or {}).get(name)


class DeadLetterQueue:
    """Reads and replays ``zandd.dead`` over one connection."""

    def __init__(self, amqp_url: str) -> None:
        self._amqp_url = amqp_url

    async def list(self) -> list[DeadLetter]:
        """Every dead letter, oldest first; the queue is left as it was."""
        connection = await connect_plain(self._amqp_url, connection_name="zandd-dead")
        with _broker_errors("reading zandd.dead"):
            async with connection:
                channel = await connection.channel()
                queue = await self._queue(channel)
                # Unacked messages go back to the queue when the channel closes.
                return [describe(message) for message in await _read_all(queue)]

    async def replay(
        self,
        select: Callable[[DeadLetter], bool],
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[int, int]:
        """Republish the selected dead letters to ``zandd``; returns (replayed, kept)."""
        connection = await connect_plain(self._amqp_url, connection_name="zandd-dead")
        with _broker_errors("replaying zandd.dead"):
            async with connection:
                reader = await connection.channel()
                publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
                exchange = await publisher.get_exchange(EXCHANGE, ensure=False)
                messages = await _read_all(await self._queue(reader))
                chosen = [m for m in messages if select(describe(m))]
                for done, message in enumerate(chosen, start=1):
                    await _republish(exchange, message)
                    await message.ack()
                    if progress is not None:
                        progress(done, len(chosen))
                return len(chosen), len(messages) - len(chosen)

    async def _queue(self, channel: AbstractChannel) -> AbstractQueue:
        # Passive: it needs no configure rights, and tells how many messages are there now.
        return await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)


@contextmanager
def _broker_errors(doing: str) -> Iterator[None]:
    try:
        yield
    except ChannelNotFoundEntity as exc:
        raise ConfigurationError(
            "zandd.dead does not exist on this vhost: no worker has declared the topology"
        ) from exc
    except ChannelAccessRefused as exc:
        raise ConfigurationError(f"the broker refused {doing} to this user") from exc
    except AMQPError as exc:
        raise BrokerUnavailable(f"lost the broker while {doing}") from exc


async def _read_all(queue: AbstractQueue) -> list[AbstractIncomingMessage]:
    expected = queue.declaration_result.message_count or 0
    messages: list[AbstractIncomingMessage] = []
    if expected == 0:
        return messages
    async with queue.iterator() as incoming:
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                async for message in incoming:
                    messages.append(message)
                    if len(messages) >= expected:
                        break
        except TimeoutError:
            log.warning(
                "read %d of %d dead letters (others are held elsewhere)", len(messages), expected
            )
    return messages


async def _republish(
    exchange: aio_pika.abc.AbstractExchange, message: AbstractIncomingMessage
) -> None:
    letter = describe(message)
    headers = {
        key: value
        for key, value in (message.headers or {}).items()
        if key not in _DEATH_HEADERS and key != DEADLINE_HEADER
    }
    # The original caller's deadline and expiration are long gone: a replay is the operator's
    # decision to have the request served now.
    copy = aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        type=message.type,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        user_id=message.user_id,
    )
    try:
        await exchange.publish(copy, routing_key=letter.routing_key, mandatory=True)
    except ChannelPreconditionFailed as exc:
        raise ZanddError(
            f"message {letter.message_id} carries user_id {letter.principal!r}: replay it as that "
            "user, or as a user with RabbitMQ's impersonator tag"
        ) from exc
    except PublishError as exc:
        raise ZanddError(f"no queue takes routing key {letter.routing_key!r}") from exc
    except AMQPError as exc:
        raise BrokerUnavailable(f"lost the broker while replaying {letter.message_id}") from exc
