"""Where ``SigningClient`` gets its connection: the seam between the client and a transport.

The client speaks to one ``ClientWire`` at a time — the lean ``contracts.wire.Wire`` has
exactly this surface — and asks its ``WireSource`` for a new one at start and after every
loss. Three sources exist:

- ``UrlSource``: the client's own lean connection to a broker URL (the default, and the
  fastest path);
- ``contracts.transport_aiopika.AioPikaSource``: a channel on a connection the caller already
  holds (aio-pika, or FastStream's, which is aio-pika's); the caller owns that connection;
- ``contracts.testing.FakeFleet``: no broker at all, for producers' own unit tests.

A source names the principal its requests carry as ``user_id`` (RabbitMQ checks it against the
connection's user) and can declare the fleet's topology on request (``declare=True``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol

from aio_pika.abc import AbstractChannel, AbstractConnection
from aio_pika.exceptions import AMQPError

from contracts.amqp import connect_plain
from contracts.brokers import BrokerURLs, principal_of
from contracts.errors import BrokerUnavailable
from contracts.topology import declare_topology
from contracts.transport_aiopika import AioPikaSource
from contracts.wire import DeclaredQueue, Delivery, DeliveryCallback, Properties, Wire, WireClosed

__all__ = ["ClientTarget", "ClientWire", "UrlSource", "WireSource", "wire_source"]


class ClientWire(Protocol):
    """One connection with one channel, as ``SigningClient`` uses it (``Wire``'s surface).

    A failure that ends it sets ``lost`` with ``reason``; a publish it ends fails with a
    ``WireClosed`` (``WireChannelClosed`` when the broker closed the channel over it, with the
    broker's reply code and text).
    """

    lost: asyncio.Event
    reason: WireClosed | None
    #: Called with (reply code, text, message) for each mandatory message the broker returns.
    on_return: Callable[[int, str, Delivery], None] | None

    async def confirm_select(self) -> None:
        """Publisher confirms from now on."""

    async def declare_queue(
        self,
        queue: str,
        *,
        exclusive: bool = False,
        auto_delete: bool = False,
        passive: bool = False,
    ) -> DeclaredQueue:
        """Declare a queue (``""``: the broker names it)."""

    async def consume(
        self, queue: str, on_delivery: DeliveryCallback, *, no_ack: bool = False
    ) -> str:
        """Consume ``queue``; the consumer tag."""

    def publish(
        self,
        body: bytes,
        properties: Properties,
        *,
        routing_key: str,
        exchange: str = "",
        mandatory: bool = False,
    ) -> asyncio.Future[bool] | None:
        """Queue a message; with confirms on, the broker's verdict."""

    def on_blocked(self, callback: Callable[[str | None], None]) -> None:
        """``callback(reason)`` when the broker blocks the connection, ``callback(None)`` after."""

    def drop(self, reason: str) -> None:
        """End it now."""

    async def close(self) -> None:
        """Close it politely."""


class WireSource(Protocol):
    """Opens the client's ``ClientWire``: once at start, again after each loss."""

    @property
    def principal(self) -> str:
        """The AMQP user the requests carry as ``user_id``."""

    async def open(self, *, connection_name: str, timeout_s: float) -> ClientWire:
        """A fresh ``ClientWire``, or ``BrokerUnavailable`` saying why not."""

    async def declare_topology(self, *, timeout_s: float) -> None:
        """Declare the fleet's exchanges and queues (needs configure rights)."""


#: What ``SigningClient.connect`` takes: broker URL(s), a caller's aio-pika connection or
#: channel, or any other ``WireSource``.
ClientTarget = BrokerURLs | AbstractConnection | AbstractChannel | WireSource


def wire_source(target: ClientTarget) -> WireSource:
    """The ``WireSource`` behind what a caller passed to ``SigningClient.connect``."""
    if isinstance(target, AbstractConnection | AbstractChannel):
        return AioPikaSource(target)
    if isinstance(target, str | Sequence):
        return UrlSource(target)
    return target


class UrlSource:
    """The client's own lean connection (``contracts.wire.Wire``) to the broker(s) at ``url``."""

    def __init__(self, url: BrokerURLs) -> None:
        self._url = url
        self._principal = principal_of(url)

    @property
    def principal(self) -> str:
        """The URL's user (RabbitMQ's default, guest, when it names none)."""
        return self._principal

    async def open(self, *, connection_name: str, timeout_s: float) -> ClientWire:
        """Connect to one of the URL's brokers that answers (shuffled order)."""
        return await Wire.connect(self._url, connection_name=connection_name, timeout_s=timeout_s)

    async def declare_topology(self, *, timeout_s: float) -> None:
        """Declare through aio-pika, on a short connection of its own."""
        connection = await connect_plain(
            self._url, connection_name="zandd-client", timeout_s=timeout_s
        )
        async with connection:
            try:
                await declare_topology(await connection.channel())
            except AMQPError as exc:
                raise BrokerUnavailable(f"cannot declare the topology: {exc}") from exc
