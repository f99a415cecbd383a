"""What the consumer runtime needs from a broker connection, whichever stack provides it.

A ``Transport`` is one connection with one channel: consume a queue, publish replies on the
channel that delivered the requests, ack or reject them there. ``contracts/wire.py``'s lean
``Wire`` is the one ZANDD runs (a request's frames cost a fraction of what they cost through
aiormq); tests run the runtime on an in-memory one. ``Delivery`` and ``Properties`` are the
neutral message types every transport speaks; a transport that is gone raises
``TransportClosed`` (``contracts/errors.py``: retryable, like any lost broker).

``TRANSPORT_FAILURES`` is the one list of "the broker went away" errors: a lost transport,
and aio-pika's (the topology is still declared through it) and the socket's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from aio_pika.exceptions import AMQPError, ChannelInvalidStateError

from contracts.errors import TransportClosed
from contracts.wire import Delivery, DeliveryCallback, Properties

__all__ = [
    "TRANSPORT_FAILURES",
    "Connect",
    "Delivery",
    "DeliveryCallback",
    "Properties",
    "Transport",
    "TransportClosed",
]

#: Whatever says the broker connection is gone (not that a request is wrong): retry elsewhere.
TRANSPORT_FAILURES: tuple[type[BaseException], ...] = (
    TransportClosed,
    AMQPError,
    ChannelInvalidStateError,
    ConnectionError,
)


class Transport(Protocol):
    """One broker connection with one channel, as the consumer runtime uses it.

    Writes (``publish``, ``ack``, ``reject``) are queued and go out in order with this turn
    of the event loop: a reply queued before an ack reaches the broker before it. Each raises
    ``TransportClosed`` once the connection is gone.
    """

    @property
    def lost(self) -> asyncio.Event:
        """Set when the connection is gone, whatever ended it."""

    @property
    def reason(self) -> TransportClosed | None:
        """Why it is gone (None while it is open)."""

    @property
    def blocked(self) -> bool:
        """Whether the broker blocks this connection now (a memory or disk alarm).

        A blocked connection's writes are held (a blocked socket is not read by the broker)
        until it is unblocked or dropped. RabbitMQ tells a connection only once it publishes
        during an alarm: a consumer that has sent nothing yet is not told.
        """

    def on_blocked(self, callback: Callable[[str | None], None]) -> None:
        """Call ``callback(reason)`` when the broker blocks this connection and
        ``callback(None)`` when it unblocks it (its held writes are then on their way)."""

    async def qos(self, prefetch_count: int) -> None:
        """Per-consumer prefetch."""

    async def consume(self, queue: str, on_delivery: DeliveryCallback) -> str:
        """Start consuming ``queue``; every delivery goes to ``on_delivery``. The consumer tag."""

    async def cancel(self, consumer_tag: str) -> None:
        """Stop consuming; deliveries already sent still arrive."""

    def publish(
        self,
        body: bytes,
        properties: Properties,
        *,
        routing_key: str,
        exchange: str = "",
        mandatory: bool = False,
    ) -> asyncio.Future[bool] | None:
        """Queue a message; with confirms on, the broker's verdict, else None."""

    def ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        """Queue a ``basic.ack``."""

    def reject(self, delivery_tag: int, *, requeue: bool) -> None:
        """Queue a ``basic.reject`` (``requeue=False`` dead-letters)."""

    def before_flush(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, just before this turn's frames are written."""

    def drop(self, reason: str) -> None:
        """End the connection now; unacked deliveries are redelivered."""

    async def close(self) -> None:
        """Write what is queued and close the connection."""


#: Opens a transport (the runtime calls it once per session, again after a loss).
Connect = Callable[[], Awaitable[Transport]]
