"""``SigningClient`` over a connection the caller already holds (aio-pika, or FastStream's).

    connection = await aio_pika.connect_robust("amqp://app:secret@mq/")
    client = await SigningClient.connect(connection)      # or a channel of it
    ...
    await client.close()                                  # the connection stays open

The requests carry the connection's user as ``user_id`` (RabbitMQ checks it);
``SigningClient.connect(AioPikaSource(channel, principal="…"))`` names it where aio-pika does
not say. The caller owns the connection: closing the client cancels its reply consumer (its exclusive,
auto-delete reply queue goes with it) and closes the channel the client opened, never the
connection or a channel the caller passed.

What it uses is aiormq, under aio-pika's public API (``transport.connection`` and
``get_underlay_channel``): given a connection, the client opens a channel of its own on it,
with publisher confirms, which aio-pika does not track (so a robust connection's restore never
redeclares the client's server-named reply queue); given a channel, it declares its reply queue
and publishes on that channel. Each loss of that channel — the connection dropped, or the
broker closed the channel over a publish — ends this ``ClientWire``; the client then asks for
a new one as after any loss, which succeeds once the caller's connection (a robust one
reconnects by itself) or its robust channel is back, with a new reply queue.

Differences from the client's own connection, by design of what the caller gave:
a passive ``queue.declare`` goes on a short channel of its own (a missing queue closes the
channel it is asked on); a channel opened without publisher confirms takes each publish as
accepted once written
(a nack cannot be seen); a channel with ``on_return_raises`` still fails an unroutable call
with ``NotDelivered``; the broker's ``connection.blocked`` is not watched (aiormq holds the
writes meanwhile), so a call made during a resource alarm waits for its timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import AMQPError, ChannelClosed, ChannelInvalidStateError, PublishError
from pamqp import commands

from contracts.errors import BrokerUnavailable
from contracts.topology import declare_topology
from contracts.wire import (
    DeclaredQueue,
    Delivery,
    DeliveryCallback,
    Properties,
    WireChannelClosed,
    WireClosed,
)

__all__ = ["AioPikaSource", "AioPikaWire"]

#: aiormq's channel-close exception classes by the broker's reply code (403, 404, 405, 406).
_CODE_OF = {cls: code for code, cls in aiormq.channel.EXCEPTION_MAPPING.items()}
#: What says the caller's connection or channel is not usable now (it may come back).
_NOT_OPEN = (AMQPError, ChannelInvalidStateError, ConnectionError, RuntimeError, TimeoutError)


class AioPikaSource:
    """A ``contracts.client_wire.WireSource`` over a caller's aio-pika connection or channel."""

    def __init__(
        self, target: AbstractConnection | AbstractChannel, *, principal: str | None = None
    ) -> None:
        self._target = target
        self._principal = principal

    @property
    def principal(self) -> str:
        """The connection's user (``principal=`` overrides it), as RabbitMQ checks ``user_id``."""
        if self._principal is not None:
            return self._principal
        if isinstance(self._target, AbstractConnection):
            return _user(self._target.transport.connection if self._target.transport else None)
        underlay = getattr(self._target, "_channel", None)  # aio-pika's UnderlayChannel
        channel = getattr(underlay, "channel", None)
        return _user(getattr(channel, "connection", None))

    async def open(self, *, connection_name: str, timeout_s: float) -> AioPikaWire:
        """A channel of the client's own on the connection, or the caller's channel."""
        del connection_name  # the caller named its connection
        try:
            async with asyncio.timeout(timeout_s):
                if isinstance(self._target, AbstractConnection):
                    transport = self._target.transport
                    if transport is None:
                        raise ChannelInvalidStateError("the connection is not open")
                    channel = await transport.connection.channel(
                        publisher_confirms=True, on_return_raises=False
                    )
                    return AioPikaWire(channel, owned=True)
                return AioPikaWire(await self._target.get_underlay_channel(), owned=False)
        except _NOT_OPEN as exc:
            raise BrokerUnavailable(
                f"the given aio-pika connection is not usable now ({type(exc).__name__})"
            ) from exc

    async def declare_topology(self, *, timeout_s: float) -> None:
        """Declare the fleet's topology on a short channel of the caller's connection."""
        try:
            async with asyncio.timeout(timeout_s):
                if isinstance(self._target, AbstractConnection):
                    async with self._target.channel() as channel:
                        await declare_topology(channel)
                else:
                    await declare_topology(self._target)
        except _NOT_OPEN as exc:
            raise BrokerUnavailable(f"cannot declare the topology: {type(exc).__name__}") from exc


class AioPikaWire:
    """One aiormq channel as a ``contracts.client_wire.ClientWire``; ``owned``: close it too."""

    def __init__(self, channel: aiormq.abc.AbstractChannel, *, owned: bool) -> None:
        self._channel = channel
        self._owned = owned
        self._consumer_tag: str | None = None
        self._blocked_watchers: list[Callable[[str | None], None]] = []
        self._publishes: set[asyncio.Task[None]] = set()
        self.lost = asyncio.Event()
        self.reason: WireClosed | None = None
        self.on_return: Callable[[int, str, Delivery], None] | None = None
        channel.on_return_callbacks.add(self._returned)
        channel.closing.add_done_callback(self._channel_closed)

    async def confirm_select(self) -> None:
        """Nothing to do: aiormq turns confirms on when it opens a channel (or never)."""

    async def declare_queue(
        self,
        queue: str,
        *,
        exclusive: bool = False,
        auto_delete: bool = False,
        passive: bool = False,
    ) -> DeclaredQueue:
        """Declare a queue on the channel (``""``: the broker names it).

        ``passive`` (does it exist, how many consumers?) asks on a short channel of its own: a
        missing queue makes the broker close the channel it was asked on, which must not be
        the caller's. That ends this ``ClientWire`` all the same, as on the lean connection.
        """
        if passive:
            return await self._look(queue)
        ok = await self._rpc(
            self._channel.queue_declare(queue, exclusive=exclusive, auto_delete=auto_delete)
        )
        assert isinstance(ok, commands.Queue.DeclareOk)
        return DeclaredQueue(str(ok.queue), ok.message_count or 0, ok.consumer_count or 0)

    async def _look(self, queue: str) -> DeclaredQueue:
        channel = await self._rpc(self._channel.connection.channel(publisher_confirms=False))
        try:
            ok = await self._rpc(channel.queue_declare(queue, passive=True))
        except WireChannelClosed:
            self.drop(f"queue {queue!r} does not exist")
            raise
        finally:
            if not channel.is_closed:
                await channel.close()
        assert isinstance(ok, commands.Queue.DeclareOk)
        return DeclaredQueue(str(ok.queue), ok.message_count or 0, ok.consumer_count or 0)

    async def consume(
        self, queue: str, on_delivery: DeliveryCallback, *, no_ack: bool = False
    ) -> str:
        """Consume ``queue`` (the client's reply queue); the consumer tag."""

        async def delivered(message: DeliveredMessage) -> None:
            on_delivery(_delivery(message))

        ok = await self._rpc(self._channel.basic_consume(queue, delivered, no_ack=no_ack))
        self._consumer_tag = str(ok.consumer_tag)
        return self._consumer_tag

    def publish(
        self,
        body: bytes,
        properties: Properties,
        *,
        routing_key: str,
        exchange: str = "",
        mandatory: bool = False,
    ) -> asyncio.Future[bool] | None:
        """Send a message; the future: whether the broker took it (True once written on a
        channel without confirms)."""
        if self.lost.is_set():
            raise self._again()
        properties.encode()  # the same bounds as the lean connection (InvalidRequest)
        confirmed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        task = asyncio.get_running_loop().create_task(
            self._publish(body, properties, routing_key, exchange, mandatory, confirmed)
        )
        self._publishes.add(task)
        task.add_done_callback(self._publishes.discard)
        return confirmed

    def on_blocked(self, callback: Callable[[str | None], None]) -> None:
        """Kept, never called: the caller's connection's alarms are not watched here."""
        self._blocked_watchers.append(callback)

    def drop(self, reason: str) -> None:
        """Give up this channel now (the connection stays the caller's)."""
        self._lose(WireClosed(reason))
        asyncio.get_running_loop().create_task(self._release())

    async def close(self) -> None:
        """Cancel the reply consumer (its queue goes with it); close the channel if ours."""
        if self.lost.is_set():
            return
        self._lose(WireClosed("closed by this client"))
        await self._release()

    # -- internals -----------------------------------------------------------------------------

    async def _publish(
        self,
        body: bytes,
        properties: Properties,
        routing_key: str,
        exchange: str,
        mandatory: bool,
        confirmed: asyncio.Future[bool],
    ) -> None:
        try:
            confirmation = await self._channel.basic_publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=_amqp_properties(properties),
                mandatory=mandatory,
            )
        except PublishError as exc:  # a returned message on an on_return_raises channel
            if exc.message is not None:
                self._returned(exc.message)
            outcome: bool | BaseException = True
        except ChannelClosed as exc:
            outcome = _channel_closed(exc)
        except (AMQPError, ChannelInvalidStateError, ConnectionError) as exc:
            outcome = WireClosed(f"lost the channel ({type(exc).__name__})")
        else:
            outcome = not isinstance(confirmation, commands.Basic.Nack)
        if confirmed.done():
            return
        if isinstance(outcome, BaseException):
            confirmed.set_exception(outcome)
        else:
            confirmed.set_result(outcome)

    async def _rpc(self, call: Any) -> Any:
        if self.lost.is_set():
            raise self._again()
        try:
            return await call
        except ChannelClosed as exc:
            raise _channel_closed(exc) from exc
        except (AMQPError, ChannelInvalidStateError, ConnectionError) as exc:
            raise WireClosed(f"the channel failed ({type(exc).__name__})") from exc

    async def _release(self) -> None:
        channel = self._channel
        if channel.is_closed:
            return
        try:
            if self._owned:
                await channel.close()
            elif self._consumer_tag is not None:
                await channel.basic_cancel(self._consumer_tag)
        except (AMQPError, ChannelInvalidStateError, ConnectionError):
            pass  # already gone: nothing of ours is left on it

    def _again(self) -> WireClosed:
        reason = self.reason
        if reason is None:
            return WireClosed("the channel is gone")
        return type(reason)(str(reason), reason.reply_code)

    def _channel_closed(self, closing: asyncio.Future[Any]) -> None:
        exc = None if closing.cancelled() else closing.exception()
        if isinstance(exc, ChannelClosed):
            self._lose(_channel_closed(exc))
            return
        detail = f" ({type(exc).__name__})" if exc is not None else ""
        self._lose(WireClosed(f"the channel closed{detail}"))

    def _lose(self, reason: WireClosed) -> None:
        if self.lost.is_set():
            return
        self.reason = reason
        self.lost.set()

    def _returned(self, message: DeliveredMessage) -> None:
        callback = self.on_return
        deliver = message.delivery
        if callback is not None and isinstance(deliver, commands.Basic.Return):
            callback(deliver.reply_code or 0, deliver.reply_text or "", _delivery(message))


def _user(connection: object) -> str:
    url = getattr(connection, "url", None)
    return str(getattr(url, "user", None) or "guest")


def _channel_closed(exc: ChannelClosed) -> WireChannelClosed:
    """The broker's channel.close as the lean connection reports it (code and text)."""
    code = _CODE_OF.get(type(exc))
    if code is None and exc.args and isinstance(exc.args[0], int):
        code = exc.args[0]
    return WireChannelClosed(f"the broker closed the channel: {exc}", code)


def _delivery(message: DeliveredMessage) -> Delivery:
    deliver = message.delivery
    properties = message.header.properties
    return Delivery(
        body=message.body,
        delivery_tag=int(getattr(deliver, "delivery_tag", 0) or 0),
        exchange=str(getattr(deliver, "exchange", "") or ""),
        routing_key=str(getattr(deliver, "routing_key", "") or ""),
        redelivered=bool(getattr(deliver, "redelivered", False)),
        headers=dict(properties.headers or {}),
        message_id=properties.message_id,
        correlation_id=properties.correlation_id,
        type=properties.message_type,
        reply_to=properties.reply_to,
        user_id=properties.user_id,
        content_type=properties.content_type,
    )


def _amqp_properties(properties: Properties) -> commands.Basic.Properties:
    return commands.Basic.Properties(
        content_type=properties.content_type,
        headers=properties.headers,
        delivery_mode=2 if properties.persistent else None,
        correlation_id=properties.correlation_id,
        reply_to=properties.reply_to,
        expiration=properties.expiration,
        message_id=properties.message_id,
        message_type=properties.type,
        user_id=properties.user_id,
    )
