"""A ``Transport`` on aiormq (aio-pika's connection): the other stack, for comparison and for
URL options only aiormq knows.

Writes keep their order — a reply stays ahead of the ack behind it — because one task performs
them, one after another, in the order they were queued (aiormq's own calls are coroutines,
and two of them started as separate tasks could interleave). With ``confirm_select`` the
channel has publisher confirms and each publish waits for its confirm before the next write:
slower than the lean connection, which pipelines them, and only clients use confirms.

aiormq keeps ``connection.blocked`` to itself (a private event its writer waits on at start):
``blocked`` and ``on_blocked`` wrap its two private handlers on the connection object
(aiormq 7; with another layout they say never blocked, and the log says why).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, cast

import aiormq
from aiormq.abc import AbstractConnection, DeliveredMessage
from pamqp import commands
from pamqp.common import FieldTable

from contracts.amqp import DEFAULT_HEARTBEAT_S, refused_at_open, with_heartbeat
from contracts.brokers import BrokerURLs, connect_any
from contracts.errors import BrokerUnavailable, TransportClosed
from contracts.text import printable
from contracts.transport import TRANSPORT_FAILURES
from contracts.urls import redact_url
from contracts.wire import DeclaredQueue, Delivery, DeliveryCallback, Properties

log = logging.getLogger("zandd.transport")

_Write = Callable[[], Awaitable[Any]]
#: aiormq 7's handlers of connection.blocked / unblocked (name-mangled private methods).
_BLOCKED_HANDLER = "_Connection__handle_connection_blocked"
_UNBLOCKED_HANDLER = "_Connection__handle_connection_unblocked"


class AiormqTransport:
    """One aiormq connection with one channel, as a ``contracts.transport.Transport``."""

    def __init__(
        self, connection: AbstractConnection, channel: aiormq.Channel, max_body_bytes: int | None
    ) -> None:
        self._connection = connection
        self._channel = channel
        self._max_body_bytes = max_body_bytes
        self._lost = asyncio.Event()
        self._reason: TransportClosed | None = None
        self._writes: asyncio.Queue[tuple[_Write, asyncio.Future[Any] | None]] = asyncio.Queue()
        self._writer = asyncio.create_task(self._write_in_order())
        self._confirms = False
        self._blocked = False
        self._blocked_watchers: list[Callable[[str | None], None]] = []
        #: Called with (reply code, text, message) for each mandatory message the broker returns.
        self.on_return: Callable[[int, str, Delivery], None] | None = None
        channel.on_return_callbacks.add(self._returned)
        self._watch_blocked(connection)
        connection.closing.add_done_callback(self._closed)
        channel.closing.add_done_callback(partial(self._channel_closed, channel))

    @classmethod
    async def connect(
        cls,
        url: BrokerURLs,
        *,
        connection_name: str,
        timeout_s: float = 10.0,
        max_body_bytes: int | None = None,
    ) -> AiormqTransport:
        """Connect and open one channel, or raise ``BrokerUnavailable`` saying why.

        ``url`` may name several brokers: tried in shuffled order, the first that answers.
        """

        async def attempt(one: str, attempt_timeout_s: float) -> AiormqTransport:
            return await cls._connect_one(one, connection_name, attempt_timeout_s, max_body_bytes)

        return await connect_any(url, attempt, timeout_s=timeout_s)

    @classmethod
    async def _connect_one(
        cls, url: str, connection_name: str, timeout_s: float, max_body_bytes: int | None
    ) -> AiormqTransport:
        properties: FieldTable = {"connection_name": connection_name, "product": "zandd"}
        try:
            async with asyncio.timeout(timeout_s):
                connection = await aiormq.connect(
                    with_heartbeat(url, DEFAULT_HEARTBEAT_S), client_properties=properties
                )
                channel = await connection.channel(publisher_confirms=False)
        except TRANSPORT_FAILURES as exc:
            if (refused := await refused_at_open(url, exc)) is not None:
                raise refused from exc
            raise BrokerUnavailable(
                f"cannot connect to the broker at {redact_url(url)} ({type(exc).__name__})"
            ) from exc
        except (OSError, TimeoutError) as exc:
            raise BrokerUnavailable(
                f"cannot connect to the broker at {redact_url(url)} ({type(exc).__name__})"
            ) from exc
        return cls(connection, cast(aiormq.Channel, channel), max_body_bytes)

    @property
    def lost(self) -> asyncio.Event:
        """Set when the connection is gone."""
        return self._lost

    @property
    def reason(self) -> TransportClosed | None:
        """Why it is gone (None while it is open)."""
        return self._reason

    @property
    def blocked(self) -> bool:
        """Whether the broker blocks this connection now (aiormq holds its writes meanwhile)."""
        return self._blocked

    def on_blocked(self, callback: Callable[[str | None], None]) -> None:
        """``callback(reason)`` when the broker blocks this connection, ``callback(None)`` after."""
        self._blocked_watchers.append(callback)

    # -- synchronous methods -----------------------------------------------------------------

    async def qos(self, prefetch_count: int) -> None:
        """Per-consumer prefetch."""
        await self._rpc(self._channel.basic_qos(prefetch_count=prefetch_count))

    async def consume(self, queue: str, on_delivery: DeliveryCallback) -> str:
        """Start consuming ``queue``; every delivery goes to ``on_delivery``. The consumer tag."""

        async def delivered(message: DeliveredMessage) -> None:
            on_delivery(self._delivery(message))

        ok = await self._rpc(self._channel.basic_consume(queue, delivered))
        return str(ok.consumer_tag)

    async def cancel(self, consumer_tag: str) -> None:
        """Stop consuming; deliveries already sent still arrive."""
        await self._rpc(self._channel.basic_cancel(consumer_tag))

    async def confirm_select(self) -> None:
        """Publisher confirms from now on (a fresh channel: aiormq sets them when opening)."""
        old = self._channel
        self._channel = cast(
            aiormq.Channel,
            await self._rpc(
                self._connection.channel(publisher_confirms=True, on_return_raises=False)
            ),
        )
        self._channel.on_return_callbacks.add(self._returned)
        self._channel.closing.add_done_callback(partial(self._channel_closed, self._channel))
        await self._rpc(old.close())
        self._confirms = True

    async def declare_queue(
        self,
        queue: str,
        *,
        exclusive: bool = False,
        auto_delete: bool = False,
        passive: bool = False,
    ) -> DeclaredQueue:
        """Declare a (transient) queue, or with ``passive`` check that it exists."""
        ok = await self._rpc(
            self._channel.queue_declare(
                queue, exclusive=exclusive, auto_delete=auto_delete, passive=passive
            )
        )
        assert isinstance(ok, commands.Queue.DeclareOk)
        return DeclaredQueue(str(ok.queue), ok.message_count or 0, ok.consumer_count or 0)

    # -- queued writes -------------------------------------------------------------------------

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
        properties.encode()  # the same bounds as the lean connection (InvalidRequest)
        channel = self._channel
        amqp_properties = _amqp_properties(properties)

        async def write() -> bool:
            confirmation = await channel.basic_publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=amqp_properties,
                mandatory=mandatory,
                wait=False,
            )
            return not isinstance(confirmation, commands.Basic.Nack)

        confirmed: asyncio.Future[bool] | None = None
        if self._confirms:
            confirmed = asyncio.get_running_loop().create_future()
        self._queue(write, confirmed)
        return confirmed

    def ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        """Queue a ``basic.ack``."""
        channel = self._channel
        self._queue(lambda: channel.basic_ack(delivery_tag, multiple=multiple, wait=False), None)

    def reject(self, delivery_tag: int, *, requeue: bool) -> None:
        """Queue a ``basic.reject``."""
        channel = self._channel
        self._queue(lambda: channel.basic_reject(delivery_tag, requeue=requeue, wait=False), None)

    def before_flush(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, later in this turn: after every write queued before it."""
        asyncio.get_running_loop().call_soon(callback)

    def drop(self, reason: str) -> None:
        """End the connection now; unacked deliveries are redelivered."""
        self._lose(TransportClosed(reason))
        asyncio.get_running_loop().create_task(self._connection.close())

    async def close(self) -> None:
        """Write what is queued, then close the connection."""
        if not self._lost.is_set():
            done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._writes.put_nowait((_nothing, done))
            await asyncio.wait({done}, timeout=5.0)
        self._lose(TransportClosed("closed by this worker"))
        await self._connection.close()

    # -- internals -----------------------------------------------------------------------------

    def _watch_blocked(self, connection: AbstractConnection) -> None:
        blocked_handler = getattr(connection, _BLOCKED_HANDLER, None)
        unblocked_handler = getattr(connection, _UNBLOCKED_HANDLER, None)
        if blocked_handler is None or unblocked_handler is None:
            log.debug("this aiormq does not have the handlers of connection.blocked: not watched")
            return

        async def blocked(frame: commands.Connection.Blocked) -> None:
            await blocked_handler(frame)
            self._set_blocked(printable(frame.reason or "no reason given"))

        async def unblocked(frame: commands.Connection.Unblocked) -> None:
            await unblocked_handler(frame)
            self._set_blocked(None)

        setattr(connection, _BLOCKED_HANDLER, blocked)
        setattr(connection, _UNBLOCKED_HANDLER, unblocked)

    def _set_blocked(self, reason: str | None) -> None:
        if self._blocked == (reason is not None):
            return
        self._blocked = reason is not None
        for watcher in list(self._blocked_watchers):
            try:
                watcher(reason)
            except Exception:  # a watcher's bug must not end the connection it watches
                log.exception("a connection.blocked watcher failed")

    def _queue(self, write: _Write, result: asyncio.Future[Any] | None) -> None:
        if self._lost.is_set():
            raise self._again()
        self._writes.put_nowait((write, result))

    async def _write_in_order(self) -> None:
        while True:
            write, result = await self._writes.get()
            try:
                value = await write()
            except TRANSPORT_FAILURES as exc:
                self._lose(TransportClosed(f"the broker connection failed ({type(exc).__name__})"))
                if result is not None and not result.done():
                    result.set_exception(self._again())
                continue
            if result is not None and not result.done():
                result.set_result(value)

    async def _rpc(self, call: Awaitable[Any]) -> Any:
        if self._lost.is_set():
            raise self._again()
        try:
            return await call
        except TRANSPORT_FAILURES as exc:
            code = getattr(getattr(exc, "frame", None), "reply_code", None)
            raise TransportClosed(f"the broker refused it ({type(exc).__name__})", code) from exc

    def _again(self) -> TransportClosed:
        reason = self._reason
        if reason is None:
            return TransportClosed("the connection is gone")
        return TransportClosed(str(reason), reason.reply_code)

    def _closed(self, closing: asyncio.Future[Any]) -> None:
        exc = None if closing.cancelled() else closing.exception()
        detail = f" ({type(exc).__name__})" if exc is not None else ""
        self._lose(TransportClosed(f"the broker connection closed{detail}"))

    def _channel_closed(self, channel: aiormq.Channel, closing: asyncio.Future[Any]) -> None:
        # The channel replaced by confirm_select closes on purpose.
        if channel is self._channel:
            self._closed(closing)

    def _lose(self, reason: TransportClosed) -> None:
        if self._lost.is_set():
            return
        self._reason = reason
        self._lost.set()
        while not self._writes.empty():
            _write, result = self._writes.get_nowait()
            if result is not None and not result.done():
                result.set_exception(self._again())
        self._writer.cancel()

    def _delivery(self, message: DeliveredMessage) -> Delivery:
        deliver = message.delivery
        assert isinstance(deliver, commands.Basic.Deliver | commands.Basic.Return)
        properties = message.header.properties
        body, defect = message.body, None
        if self._max_body_bytes is not None and len(body) > self._max_body_bytes:
            body, defect = b"", f"a body over {self._max_body_bytes} bytes"
        return Delivery(
            body=body,
            delivery_tag=int(getattr(deliver, "delivery_tag", 0) or 0),
            exchange=str(deliver.exchange or ""),
            routing_key=str(deliver.routing_key or ""),
            redelivered=bool(getattr(deliver, "redelivered", False)),
            headers=dict(properties.headers or {}),
            message_id=properties.message_id,
            correlation_id=properties.correlation_id,
            type=properties.message_type,
            reply_to=properties.reply_to,
            user_id=properties.user_id,
            content_type=properties.content_type,
            defect=defect,
        )

    def _returned(self, message: DeliveredMessage) -> None:
        callback = self.on_return
        deliver = message.delivery
        if callback is not None and isinstance(deliver, commands.Basic.Return):
            callback(deliver.reply_code or 0, deliver.reply_text or "", self._delivery(message))


async def _nothing() -> None:
    return None


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
