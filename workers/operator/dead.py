"""The dead-letter queue ``zandd.dead``: what is in it, and putting messages back.

Messages land there when they cannot be served: a request that kept killing workers (the
quorum queue's delivery limit), one that expired before a worker took it, a malformed one with
no ``reply_to`` to send the refusal to, and one whose AMQP properties or body could not be read
at all (a poison header, a body over the size limit). Listing reads every message and returns
it untouched; replaying republishes a copy to ``zandd`` and only then removes the original.

Both read through the lean connection (``contracts/wire.py``), whose decoder is total: a
message no AMQP library can read is still listed, with what was wrong with it, instead of
ending the connection and hiding the rest of the queue. Such a message is never replayed (it
would only be refused again); it stays for the operator to inspect and purge.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from contracts.amqp import DEADLINE_HEADER
from contracts.errors import BrokerUnavailable, ConfigurationError, ZanddError
from contracts.text import printable
from contracts.topology import DEAD_LETTER_QUEUE, EXCHANGE
from contracts.wire import Delivery, Properties, Wire, WireClosed, WireRefused

log = logging.getLogger("zandd.dead")

#: How long to wait for the next message before concluding the rest are held elsewhere.
_READ_TIMEOUT_S = 5.0
_NOT_FOUND = 404
_PRECONDITION_FAILED = 406
_DEATH_HEADERS = (
    "x-death",
    "x-first-death-reason",
    "x-first-death-queue",
    "x-first-death-exchange",
)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message in ``zandd.dead``, described without its body.

    Every text here is the producer's or the broker's, as received: escape it (``printable``)
    before it reaches a terminal or a log.
    """

    message_id: str | None
    operation: str
    routing_key: str
    reason: str
    count: int
    first_seen: datetime | None
    queue: str
    principal: str | None
    #: What could not be read in the message (None: it reads fine), escaped.
    defect: str | None = None


def describe(message: Delivery) -> DeadLetter:
    """What an operator needs to decide about a dead letter (never its payload)."""
    deaths = _deaths(message)
    first = deaths[-1] if deaths else {}
    routing_keys = first.get("routing-keys")
    if not isinstance(routing_keys, list) or not routing_keys:
        routing_keys = [message.routing_key or ""]
    time = first.get("time")
    return DeadLetter(
        message_id=message.message_id,
        operation=message.type or str(routing_keys[0]),
        routing_key=str(routing_keys[0]),
        reason=str(first.get("reason") or message.headers.get("x-first-death-reason") or "unknown"),
        count=sum(_count(death) for death in deaths) or 1,
        first_seen=time if isinstance(time, datetime) else None,
        queue=str(first.get("queue") or message.headers.get("x-first-death-queue") or "?"),
        principal=message.user_id,
        defect=message.defect,
    )


def _deaths(message: Delivery) -> list[dict[str, Any]]:
    value = message.headers.get("x-death")
    if not isinstance(value, list):
        return []
    return [death for death in value if isinstance(death, dict)]


def _count(death: dict[str, Any]) -> int:
    count = death.get("count", 1)
    return count if isinstance(count, int) and not isinstance(count, bool) else 1


class DeadLetterQueue:
    """Reads and replays ``zandd.dead`` over one connection."""

    def __init__(self, amqp_url: str) -> None:
        self._amqp_url = amqp_url

    async def list(self) -> list[DeadLetter]:
        """Every dead letter, oldest first; the queue is left as it was."""
        wire = await Wire.connect(self._amqp_url, connection_name="zandd-dead")
        try:
            with _broker_errors("reading zandd.dead"):
                return [describe(message) for message in await _read_all(wire)]
        finally:
            # Unacked messages go back to the queue when the connection closes.
            await wire.close()

    async def replay(
        self,
        select: Callable[[DeadLetter], bool],
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[int, int]:
        """Republish the selected dead letters to ``zandd``; returns (replayed, kept).

        A message that could not be read is never replayed: it is kept, and said so.
        """
        wire = await Wire.connect(self._amqp_url, connection_name="zandd-dead")
        try:
            with _broker_errors("replaying zandd.dead"):
                await wire.confirm_select()
                returned: list[Delivery] = []
                wire.on_return = lambda _code, _text, message: returned.append(message)
                messages = await _read_all(wire)
                chosen = [
                    (m, letter) for m in messages if _replayable(letter := describe(m), select)
                ]
                for done, (message, letter) in enumerate(chosen, start=1):
                    await _republish(wire, message, letter, returned)
                    wire.ack(message.delivery_tag)
                    if progress is not None:
                        progress(done, len(chosen))
                return len(chosen), len(messages) - len(chosen)
        finally:
            await wire.close()  # after the acks: close writes what is queued first


def _replayable(letter: DeadLetter, select: Callable[[DeadLetter], bool]) -> bool:
    if not select(letter):
        return False
    if letter.defect is not None:
        log.warning(
            "dead letter %s cannot be read (%s): not replayed",
            printable(letter.message_id),
            letter.defect,
        )
        return False
    return True


@contextmanager
def _broker_errors(doing: str) -> Iterator[None]:
    try:
        yield
    except WireRefused as exc:
        raise ConfigurationError(f"the broker refused {doing} to this user") from exc
    except WireClosed as exc:
        if exc.reply_code == _NOT_FOUND:
            raise ConfigurationError(
                "zandd.dead does not exist on this vhost: no worker has declared the topology"
            ) from exc
        raise BrokerUnavailable(f"lost the broker while {doing}") from exc


async def _read_all(wire: Wire) -> list[Delivery]:
    """Every message in ``zandd.dead`` (delivered, never acked here), oldest first."""
    # Passive: it needs no configure rights, and tells how many messages are there now.
    expected = (await wire.declare_queue(DEAD_LETTER_QUEUE, passive=True)).message_count
    messages: list[Delivery] = []
    if expected == 0:
        return messages
    arrived = asyncio.Event()

    def on_delivery(message: Delivery) -> None:
        messages.append(message)
        arrived.set()

    await wire.consume(DEAD_LETTER_QUEUE, on_delivery)
    while len(messages) < expected:
        arrived.clear()
        waits = [asyncio.ensure_future(arrived.wait()), asyncio.ensure_future(wire.lost.wait())]
        done, pending = await asyncio.wait(
            waits, timeout=_READ_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        for wait in pending:
            wait.cancel()
        if wire.lost.is_set():
            raise wire.reason or WireClosed("the connection is gone")
        if not done:
            log.warning(
                "read %d of %d dead letters (others are held elsewhere)", len(messages), expected
            )
            break
    return messages


async def _republish(
    wire: Wire, message: Delivery, letter: DeadLetter, returned: list[Delivery]
) -> None:
    headers = {
        key: value
        for key, value in message.headers.items()
        if key not in _DEATH_HEADERS and key != DEADLINE_HEADER
    }
    # The original caller's deadline and expiration are long gone: a replay is the operator's
    # decision to have the request served now.
    copy = Properties(
        content_type=message.content_type,
        headers=headers,
        persistent=True,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        type=message.type,
        user_id=message.user_id,
    )
    shown = printable(letter.message_id)
    returned.clear()
    try:
        confirmed = wire.publish(
            message.body, copy, routing_key=letter.routing_key, exchange=EXCHANGE, mandatory=True
        )
        assert confirmed is not None  # confirms are on
        accepted = await confirmed
    except (TypeError, ValueError) as exc:
        raise ZanddError(f"message {shown} cannot be copied as it is ({exc})") from exc
    except WireClosed as exc:
        if exc.reply_code == _PRECONDITION_FAILED:
            raise ZanddError(
                f"message {shown} carries user_id {printable(letter.principal)!r}: replay it as "
                "that user, or as a user with RabbitMQ's impersonator tag"
            ) from exc
        raise
    if returned:
        raise ZanddError(f"no queue takes routing key {printable(letter.routing_key)!r}")
    if not accepted:
        raise BrokerUnavailable(f"the broker did not take the copy of {shown}")
