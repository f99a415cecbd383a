"""The AMQP 0-9-1 connection of the hot paths: one channel, lean — the runtime's and the client's.

Why not aio-pika's transport here: a sign request is three frames in and three out on each
side, and aiormq spends more Python per frame than the signer spends on the signature (stream
reader tasks, a queue and a lock per channel, a future per frame, pamqp objects for every
method and property). Profiled under load, aiormq and pamqp were 29 % of a signer's event loop
and over half of the client's (docs/performance.md, "Session 3"). This connection does the
few things the two need, straight from the socket: an ``asyncio.Protocol`` that decodes
``basic.deliver``, its content and the broker's confirms with ``struct``, hands each delivery
to a callback, and encodes publishes and acks into a buffer that goes out in one write per
turn of the event loop.

What it does: the handshake (PLAIN; TLS for ``amqps://`` with aiormq's URL options),
heartbeats both ways, one channel with per-consumer QoS, ``basic.consume``/``cancel``
(with or without acks), ``basic.publish`` (mandatory or not), publisher confirms,
``basic.return``, ``basic.ack`` (single or ``multiple``), ``basic.reject``, ``queue.declare``,
and a clean close. Anything the broker ends — ``connection.close``, ``channel.close``, a
consumer cancelled because its queue went away, missed heartbeats, a dropped socket — ends the
whole connection: ``lost`` is set with the reason, waiting confirms fail, and the owner
reconnects. Rare frames (the handshake, closes, ``connection.blocked``) go through pamqp, as
in aiormq.

What it does not do, on purpose: declare exchanges and bindings (aio-pika does that, on a
connection of its own), transactions, several channels.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote

from pamqp import commands, frame
from pamqp.base import Frame as MethodFrame
from pamqp.decode import field_table
from pamqp.encode import field_table as encode_table
from pamqp.exceptions import PAMQPException
from yarl import URL

from contracts.amqp import redact_url
from contracts.errors import BrokerUnavailable, ConfigurationError

log = logging.getLogger("zandd.wire")

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
_METHOD, _HEADER, _BODY, _HEARTBEAT = 1, 2, 3, 8
_FRAME_END = 0xCE
_FRAME_END_BYTE = b"\xce"
_CHANNEL = 1
_FRAME_HEAD = struct.Struct(">BHI")
_CLASS_METHOD = struct.Struct(">HH")
_CONTENT_HEAD = struct.Struct(">HHQH")
_LONGLONG = struct.Struct(">Q")
_DELIVER = (60, 60)
_HEARTBEAT_FRAME = b"\x08\x00\x00\x00\x00\x00\x00\xce"
#: Frame size we ask for; the broker may lower it. Bodies above it are split (and joined).
_FRAME_MAX = 131072
#: Heartbeats missed in a row before the broker counts as gone.
_MISSED_HEARTBEATS = 2
_CLOSE_TIMEOUT_S = 2.0
_REPLY_SUCCESS = 200
_ACCESS_REFUSED = 403
_NOT_ALLOWED = 530

# basic.publish/ack/reject, encoded by hand: the fixed parts.
_PUBLISH_HEAD = struct.pack(">HHH", 60, 40, 0)
_ACK_FRAME = struct.Struct(">BHIHHQBB")
_ACK_SIZE = 4 + 8 + 1
_ACK_METHOD = (60, 80)
_REJECT_METHOD = (60, 90)
_NACK_METHOD = (60, 120)
_CONFIRMS = (_ACK_METHOD, _NACK_METHOD)
_BITS = (b"\x00", b"\x01")

# Content header property flags, in wire order (AMQP 0-9-1, basic class).
_P_CONTENT_TYPE = 0x8000
_P_CONTENT_ENCODING = 0x4000
_P_HEADERS = 0x2000
_P_DELIVERY_MODE = 0x1000
_P_PRIORITY = 0x0800
_P_CORRELATION_ID = 0x0400
_P_REPLY_TO = 0x0200
_P_EXPIRATION = 0x0100
_P_MESSAGE_ID = 0x0080
_P_TIMESTAMP = 0x0040
_P_TYPE = 0x0020
_P_USER_ID = 0x0010
_P_APP_ID = 0x0008
_P_CLUSTER_ID = 0x0004
_P_MORE_FLAGS = 0x0001


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message as delivered: its body, its AMQP properties, where it came from.

    Decoded straight from the frames: no message object with a dozen properties copied one
    by one, no task of its own.
    """

    body: bytes
    delivery_tag: int
    exchange: str
    routing_key: str
    redelivered: bool
    headers: dict[str, Any]
    message_id: str | None
    correlation_id: str | None
    type: str | None
    reply_to: str | None
    user_id: str | None
    content_type: str | None


@dataclass(frozen=True, slots=True)
class Properties:
    """The properties of a message to publish (those ZANDD uses), encoded in wire order."""

    content_type: str | None = None
    headers: dict[str, Any] | None = None
    persistent: bool = False
    correlation_id: str | None = None
    reply_to: str | None = None
    #: Milliseconds, as a string (AMQP's own odd choice).
    expiration: str | None = None
    message_id: str | None = None
    type: str | None = None
    #: Checked by RabbitMQ against the connection's user.
    user_id: str | None = None

    def encode(self) -> tuple[int, bytes]:
        """The property flags and the encoded properties of a content header."""
        flags = 0
        parts: list[bytes] = []
        if self.content_type is not None:
            flags |= _P_CONTENT_TYPE
            parts.append(_shortstr(self.content_type))
        if self.headers:
            flags |= _P_HEADERS
            parts.append(encode_table(self.headers))
        if self.persistent:
            flags |= _P_DELIVERY_MODE
            parts.append(b"\x02")
        for flag, value in (
            (_P_CORRELATION_ID, self.correlation_id),
            (_P_REPLY_TO, self.reply_to),
            (_P_EXPIRATION, self.expiration),
            (_P_MESSAGE_ID, self.message_id),
            (_P_TYPE, self.type),
            (_P_USER_ID, self.user_id),
        ):
            if value is not None:
                flags |= flag
                parts.append(_shortstr(value))
        return flags, b"".join(parts)


class WireClosed(ConnectionError):
    """The connection (or its one channel) is gone; ``str()`` says why, without secrets.

    ``code`` is the broker's reply code when the broker closed it (404: a missing exchange
    or queue, 403: access refused…), else None.
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class WireRefused(WireClosed):
    """The broker refused this connection: wrong credentials or no access to the vhost."""


class WireProtocolError(WireClosed):
    """The broker sent something this connection cannot read: it is closed."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and as whom to connect, parsed from an AMQP URL (the password is never shown).

    The URL's query takes aiormq's TLS options, so a URL that worked with aio-pika works
    here: ``cafile``, ``capath``, ``certfile`` and ``keyfile`` (a client certificate),
    ``no_verify_ssl=1``; and ``heartbeat`` (seconds) overrides the caller's default.
    """

    host: str
    port: int
    vhost: str
    user: str
    password: str
    tls: bool
    where: str
    cafile: str | None = None
    capath: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    verify: bool = True
    heartbeat_s: int | None = None

    @classmethod
    def of(cls, url: str) -> Endpoint:
        """Parse ``amqp[s]://user:password@host:port/vhost?options`` like aiormq does."""
        parsed = URL(url)
        if parsed.scheme not in ("amqp", "amqps"):
            raise ConfigurationError(f"not an AMQP URL: {redact_url(url)}")
        tls = parsed.scheme == "amqps"
        path = parsed.raw_path
        query = parsed.query
        try:
            heartbeat_s = int(query["heartbeat"]) if "heartbeat" in query else None
        except ValueError:
            raise ConfigurationError(
                f"heartbeat must be whole seconds in {redact_url(url)}"
            ) from None
        return cls(
            host=parsed.host or "localhost",
            port=parsed.port or (5671 if tls else 5672),
            vhost="/" if path in ("", "/") else unquote(path[1:]),
            user=unquote(parsed.raw_user or "guest"),
            password=unquote(parsed.raw_password or "guest"),
            tls=tls,
            where=redact_url(url),
            cafile=query.get("cafile"),
            capath=query.get("capath"),
            certfile=query.get("certfile"),
            keyfile=query.get("keyfile"),
            verify=query.get("no_verify_ssl", "0") == "0",
            heartbeat_s=heartbeat_s,
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for ``amqps://`` (None for plain ``amqp://``)."""
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.cafile, capath=self.capath)
        if self.certfile:
            context.load_cert_chain(self.certfile, self.keyfile)
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def __repr__(self) -> str:
        return f"Endpoint({self.where!r})"


DeliveryCallback = Callable[[Delivery], None]


class Wire(asyncio.Protocol):
    """One AMQP connection with one channel; make it with :meth:`connect`."""

    def __init__(self, endpoint: Endpoint, *, connection_name: str, heartbeat_s: int) -> None:
        self._endpoint = endpoint
        self._connection_name = connection_name
        self._heartbeat_s = heartbeat_s
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._pending = bytearray()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._before_flush: list[Callable[[], None]] = []
        self._waiter: asyncio.Future[MethodFrame] | None = None
        self._expected: tuple[str, ...] = ()
        self._rpc_lock = asyncio.Lock()
        self._on_delivery: DeliveryCallback | None = None
        # The delivery being assembled: its basic.deliver fields, then its properties.
        self._deliver: tuple[int, bool, str, str] | None = None
        self._properties: dict[str, Any] = {}
        self._body_size = 0
        self._body: list[bytes] = []
        self._received = 0
        #: The basic.return whose content is being assembled (reply code, text).
        self._returning: tuple[int, str] | None = None
        #: Publisher confirms, once ``confirm_select`` ran: sequence number -> its future.
        self._confirms: dict[int, asyncio.Future[bool]] | None = None
        self._published = 0
        #: Called with (reply code, text, message) for each mandatory message the broker returns.
        self.on_return: Callable[[int, str, Delivery], None] | None = None
        self._frame_max = _FRAME_MAX
        self._last_read_s = self._loop.time()
        self._last_write_s = self._loop.time()
        self._heartbeat_timer: asyncio.TimerHandle | None = None
        self._started: asyncio.Future[MethodFrame] = self._loop.create_future()
        self._closing = False
        #: Set when the connection is gone, for whatever reason; ``reason`` says which.
        self.lost = asyncio.Event()
        self.reason: WireClosed | None = None
        #: Whether the broker has blocked publishing (a resource alarm).
        self.blocked = False

    # -- connecting -----------------------------------------------------------------------

    @classmethod
    async def connect(
        cls, url: str, *, connection_name: str, heartbeat_s: int = 15, timeout_s: float = 10.0
    ) -> Wire:
        """Connect, authenticate and open channel 1, or raise why not (typed)."""
        endpoint = Endpoint.of(url)
        loop = asyncio.get_running_loop()
        if endpoint.heartbeat_s is not None:
            heartbeat_s = endpoint.heartbeat_s
        wire = cls(endpoint, connection_name=connection_name, heartbeat_s=heartbeat_s)
        try:
            context = endpoint.ssl_context()
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(
                f"cannot set up TLS for {endpoint.where}: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            async with asyncio.timeout(timeout_s):
                await loop.create_connection(
                    lambda: wire,
                    endpoint.host,
                    endpoint.port,
                    ssl=context,
                    server_hostname=endpoint.host if context else None,
                )
                await wire._handshake()
        except (OSError, TimeoutError, WireClosed) as exc:
            wire._abort(WireClosed(f"handshake failed ({type(exc).__name__})"))
            if isinstance(exc, WireRefused):
                what = "our credentials" if exc.code == _ACCESS_REFUSED else "access"
                raise ConfigurationError(
                    f"the broker at {endpoint.where} refused {what} ({exc})"
                ) from exc
            raise BrokerUnavailable(
                f"cannot reach the broker at {endpoint.where}: {type(exc).__name__}"
            ) from exc
        except BaseException:  # cancelled (Ctrl-C, a caller's timeout): leave no socket behind
            wire._abort(WireClosed("connecting was interrupted"))
            raise
        return wire

    async def _handshake(self) -> None:
        start = await self._started
        assert isinstance(start, commands.Connection.Start)
        if b"PLAIN" not in (start.mechanisms or "").encode().split():
            raise WireRefused("offers no PLAIN authentication")
        response = f"\0{self._endpoint.user}\0{self._endpoint.password}"
        self._send_method(
            0,
            commands.Connection.StartOk(
                client_properties=self._client_properties(),
                mechanism="PLAIN",
                response=response,
                locale="en_US",
            ),
        )
        tune = await self._expect("Connection.Tune")
        assert isinstance(tune, commands.Connection.Tune)
        heartbeat_s = _negotiated(tune.heartbeat, self._heartbeat_s)
        self._frame_max = _negotiated(tune.frame_max, _FRAME_MAX)
        channel_max = _negotiated(tune.channel_max, 1)
        self._send_method(
            0,
            commands.Connection.TuneOk(
                channel_max=channel_max, frame_max=self._frame_max, heartbeat=heartbeat_s
            ),
        )
        self._heartbeat_s = heartbeat_s
        await self._call(0, commands.Connection.Open(virtual_host=self._endpoint.vhost))
        await self._call(_CHANNEL, commands.Channel.Open())
        if heartbeat_s:
            self._heartbeat_timer = self._loop.call_later(heartbeat_s / 2, self._beat)

    def _client_properties(self) -> dict[str, Any]:
        return {
            "product": "zandd",
            "connection_name": self._connection_name,
            "capabilities": {
                "authentication_failure_close": True,
                "connection.blocked": True,
                "consumer_cancel_notify": True,
            },
        }

    # -- what the runtime calls -----------------------------------------------------------

    async def qos(self, prefetch_count: int) -> None:
        """Per-consumer prefetch (global QoS would close a connection to a quorum queue)."""
        await self._call(_CHANNEL, commands.Basic.Qos(prefetch_count=prefetch_count))

    async def consume(
        self, queue: str, on_delivery: DeliveryCallback, *, no_ack: bool = False
    ) -> str:
        """Start consuming ``queue``; every delivery goes to ``on_delivery``. The consumer tag."""
        self._on_delivery = on_delivery
        ok = await self._call(_CHANNEL, commands.Basic.Consume(queue=queue, no_ack=no_ack))
        assert isinstance(ok, commands.Basic.ConsumeOk)
        return str(ok.consumer_tag)

    async def confirm_select(self) -> None:
        """Turn on publisher confirms: from now on ``publish`` returns the broker's verdict."""
        await self._call(_CHANNEL, commands.Confirm.Select())
        self._confirms = {}
        self._published = 0

    async def declare_queue(
        self, queue: str, *, exclusive: bool = False, auto_delete: bool = False
    ) -> str:
        """Declare a (transient) queue, such as a client's exclusive reply queue; its name.

        With ``queue=""`` the broker names it (``amq.gen-...``) and the name is its answer.
        """
        ok = await self._call(
            _CHANNEL,
            commands.Queue.Declare(queue=queue, exclusive=exclusive, auto_delete=auto_delete),
        )
        assert isinstance(ok, commands.Queue.DeclareOk)
        return str(ok.queue)

    async def cancel(self, consumer_tag: str) -> None:
        """Stop consuming; deliveries already sent still arrive and are still served."""
        await self._call(_CHANNEL, commands.Basic.Cancel(consumer_tag=consumer_tag))

    def publish(
        self,
        body: bytes,
        properties: Properties,
        *,
        routing_key: str,
        exchange: str = "",
        mandatory: bool = False,
    ) -> asyncio.Future[bool] | None:
        """Queue a message; it goes out with this turn's write.

        With confirms on, the future says whether the broker took responsibility for it
        (False: a nack); a ``mandatory`` message it could not route comes back to
        ``on_return`` first. Without confirms there is nothing to wait for: None.
        """
        self._check_open()
        method = b"".join(
            (_PUBLISH_HEAD, _shortstr(exchange), _shortstr(routing_key), _BITS[mandatory])
        )
        flags, encoded = properties.encode()
        out = self._out
        out.append(_frame(_METHOD, method))
        out.append(_frame(_HEADER, _CONTENT_HEAD.pack(60, 0, len(body), flags) + encoded))
        limit = self._frame_max - 8
        for start in range(0, len(body), limit):
            out.append(_frame(_BODY, body[start : start + limit]))
        self._schedule_flush()
        if self._confirms is None:
            return None
        self._published += 1
        confirmed: asyncio.Future[bool] = self._loop.create_future()
        self._confirms[self._published] = confirmed
        return confirmed

    def ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        """Queue a ``basic.ack``; with ``multiple`` it acks every delivery up to the tag."""
        self._check_open()
        self._out.append(_ack_frame(_ACK_METHOD, delivery_tag, multiple))
        self._schedule_flush()

    def reject(self, delivery_tag: int, *, requeue: bool) -> None:
        """Queue a ``basic.reject`` (``requeue=False`` dead-letters on a queue that has one)."""
        self._check_open()
        self._out.append(_ack_frame(_REJECT_METHOD, delivery_tag, requeue))
        self._schedule_flush()

    def before_flush(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, just before this turn's frames are written (acks go last)."""
        self._before_flush.append(callback)
        self._schedule_flush()

    def drop(self, reason: str) -> None:
        """End the connection now (the runtime reconnects); unacked deliveries are redelivered."""
        self._abort(WireClosed(reason))

    async def close(self) -> None:
        """Write what is queued, close the connection politely, and wait (briefly) for it."""
        if self.lost.is_set():
            return
        self._flush()
        self._closing = True
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                await self._call(
                    0,
                    commands.Connection.Close(
                        reply_code=_REPLY_SUCCESS, reply_text="bye", class_id=0, method_id=0
                    ),
                )
        except (TimeoutError, WireClosed):
            pass
        self._abort(WireClosed("closed by this worker"))

    # -- writing --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.lost.is_set() or self._closing:
            raise _again(self.reason, "the connection is closing")

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._before_flush:
            callbacks, self._before_flush = self._before_flush, []
            for callback in callbacks:
                callback()
        if not self._out or self._transport is None or self.lost.is_set():
            self._out.clear()
            return
        data = b"".join(self._out)
        self._out.clear()
        self._transport.write(data)
        self._last_write_s = self._loop.time()

    def _send_method(self, channel: int, method: MethodFrame) -> None:
        self._out.append(frame.marshal(method, channel))
        self._flush()

    async def _call(self, channel: int, method: MethodFrame) -> MethodFrame:
        """Send a synchronous method and wait for its ``-Ok`` (one call at a time)."""
        async with self._rpc_lock:
            self._check_open_for(method)
            waiter = self._expect(*method.valid_responses)
            self._send_method(channel, method)
            return await waiter

    def _check_open_for(self, method: MethodFrame) -> None:
        if self.lost.is_set():
            raise _again(self.reason, "the connection is gone")
        if self._closing and not isinstance(method, commands.Connection.Close):
            raise WireClosed("the connection is closing")

    def _expect(self, *names: str) -> asyncio.Future[MethodFrame]:
        """The next method frame with one of these names (``Basic.ConsumeOk``…)."""
        self._waiter = self._loop.create_future()
        self._expected = names
        return self._waiter

    # -- heartbeats -----------------------------------------------------------------------

    def _beat(self) -> None:
        if self.lost.is_set():
            return
        now = self._loop.time()
        if now - self._last_read_s > self._heartbeat_s * _MISSED_HEARTBEATS:
            self._abort(WireClosed(f"missed {_MISSED_HEARTBEATS} heartbeats from the broker"))
            return
        if now - self._last_write_s >= self._heartbeat_s / 2 and self._transport is not None:
            self._transport.write(_HEARTBEAT_FRAME)
            self._last_write_s = now
        self._heartbeat_timer = self._loop.call_later(self._heartbeat_s / 2, self._beat)

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        # Expected before the header goes out: the broker's answer may arrive at once.
        self._started = self._expect("Connection.Start")
        self._transport.write(PROTOCOL_HEADER)

    def connection_lost(self, exc: Exception | None) -> None:
        detail = f" ({type(exc).__name__})" if exc is not None else ""
        self._abort(WireClosed(f"the broker connection closed{detail}"))

    def data_received(self, data: bytes) -> None:
        self._last_read_s = self._loop.time()
        if self._pending:
            self._pending += data
            data = bytes(self._pending)
            self._pending.clear()
        try:
            consumed = self._frames(data)
        except (WireClosed, PAMQPException, ValueError, struct.error, UnicodeDecodeError) as exc:
            problem = exc if isinstance(exc, WireClosed) else None
            self._abort(problem or WireProtocolError(f"unreadable frame ({type(exc).__name__})"))
            return
        if consumed < len(data):
            self._pending += data[consumed:]

    def _frames(self, data: bytes) -> int:
        """Handle every whole frame in ``data``; the number of bytes they took."""
        offset = 0
        size = len(data)
        while size - offset >= 8:
            kind, channel, length = _FRAME_HEAD.unpack_from(data, offset)
            if length > self._frame_max:
                raise WireProtocolError(
                    f"a frame of {length} bytes (the limit is {self._frame_max})"
                )
            end = offset + 7 + length
            if end >= size:
                break
            if data[end] != _FRAME_END:
                raise WireProtocolError("a frame without its end marker")
            self._on_frame(kind, channel, data, offset + 7, end)
            offset = end + 1
        if offset == 0 and data[:4] == b"AMQP":
            # The broker answers a protocol header it does not speak with its own.
            raise WireProtocolError("the broker does not speak AMQP 0-9-1")
        return offset

    def _on_frame(self, kind: int, channel: int, data: bytes, start: int, end: int) -> None:
        """One frame: its payload is ``data[start:end]``."""
        if kind == _BODY:
            self._on_body(data[start:end])
        elif kind == _METHOD:
            method = _CLASS_METHOD.unpack_from(data, start)
            if method == _DELIVER:
                self._on_deliver(data, start + 4)
            elif method in _CONFIRMS:
                (tag,) = _LONGLONG.unpack_from(data, start + 4)
                self._on_confirm(tag, bool(data[start + 12] & 1), method == _ACK_METHOD)
            else:
                self._on_method(channel, data[start - 7 : end + 1])
        elif kind == _HEADER:
            self._on_header(data, start)
        elif kind != _HEARTBEAT:
            raise WireProtocolError(f"frame type {kind}")

    # -- deliveries -----------------------------------------------------------------------

    def _on_deliver(self, data: bytes, offset: int) -> None:
        _tag, offset = _read_shortstr(data, offset)  # consumer tag: one consumer here
        (delivery_tag,) = _LONGLONG.unpack_from(data, offset)
        redelivered = bool(data[offset + 8] & 1)
        exchange, offset = _read_shortstr(data, offset + 9)
        routing_key, offset = _read_shortstr(data, offset)
        self._deliver = (delivery_tag, redelivered, exchange, routing_key)

    def _on_header(self, data: bytes, offset: int) -> None:
        _class, _weight, body_size, flags = _CONTENT_HEAD.unpack_from(data, offset)
        if flags & _P_MORE_FLAGS:
            raise WireProtocolError("more property flags than AMQP 0-9-1 defines")
        self._properties = _read_properties(data, offset + 14, flags)
        self._body_size = body_size
        self._body = []
        self._received = 0
        if body_size == 0:
            self._delivered()

    def _on_body(self, chunk: bytes) -> None:
        self._body.append(chunk)
        self._received += len(chunk)
        if self._received >= self._body_size:
            self._delivered()

    def _on_confirm(self, tag: int, multiple: bool, ok: bool) -> None:
        """The broker's verdict on published messages: up to ``tag`` when ``multiple``."""
        confirms = self._confirms
        if not confirms:
            return
        if multiple:
            settled = [seq for seq in confirms if seq <= tag]  # in publish order
        else:
            settled = [tag] if tag in confirms else []
        for seq in settled:
            confirmed = confirms.pop(seq)
            if not confirmed.done():
                confirmed.set_result(ok)

    def _delivered(self) -> None:
        deliver, self._deliver = self._deliver, None
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._body = []
        returning, self._returning = self._returning, None
        if returning is not None:
            if self.on_return is not None:
                self.on_return(*returning, self._message(body, (0, False, "", "")))
            return
        if deliver is None or self._on_delivery is None:
            return
        self._on_delivery(self._message(body, deliver))

    def _message(self, body: bytes, deliver: tuple[int, bool, str, str]) -> Delivery:
        properties = self._properties
        delivery_tag, redelivered, exchange, routing_key = deliver
        return Delivery(
            body=body,
            delivery_tag=delivery_tag,
            exchange=exchange,
            routing_key=routing_key,
            redelivered=redelivered,
            headers=properties.get("headers") or {},
            message_id=properties.get("message_id"),
            correlation_id=properties.get("correlation_id"),
            type=properties.get("type"),
            reply_to=properties.get("reply_to"),
            user_id=properties.get("user_id"),
            content_type=properties.get("content_type"),
        )

    # -- every other method ---------------------------------------------------------------

    def _on_method(self, channel: int, raw: bytes) -> None:
        _consumed, _channel, method = frame.unmarshal(raw)
        if not isinstance(method, MethodFrame):
            raise WireProtocolError("a method frame that holds no method")
        waiter = self._waiter
        if waiter is not None and not waiter.done() and method.name in self._expected:
            self._waiter = None
            waiter.set_result(method)
            return
        if isinstance(method, commands.Connection.Close):
            self._transport_write(frame.marshal(commands.Connection.CloseOk(), 0))
            self._abort(_closed_by_broker("connection", method))
        elif isinstance(method, commands.Channel.Close):
            self._transport_write(frame.marshal(commands.Channel.CloseOk(), channel))
            self._abort(_closed_by_broker("channel", method))
        elif isinstance(method, commands.Basic.Cancel):
            self._abort(WireClosed("the broker cancelled the consumer (was its queue deleted?)"))
        elif isinstance(method, commands.Connection.Blocked):
            self.blocked = True
            log.warning("the broker blocks publishing: %s", method.reason)
        elif isinstance(method, commands.Connection.Unblocked):
            self.blocked = False
            log.info("the broker unblocked publishing")
        elif isinstance(method, commands.Basic.Return):
            self._returning = (method.reply_code or 0, method.reply_text or "")
        elif isinstance(method, commands.Channel.Flow):
            self._send_method(channel, commands.Channel.FlowOk(active=method.active))
        else:
            log.debug("ignored %s on channel %d", method.name, channel)

    def _transport_write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _abort(self, reason: WireClosed) -> None:
        """The connection is over: record why, wake every waiter, drop the socket."""
        if self.lost.is_set():
            return
        self.reason = reason
        self.lost.set()
        self._out.clear()
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(reason)
        confirms, self._confirms = self._confirms or {}, None
        for confirmed in confirms.values():
            if not confirmed.done():
                confirmed.set_exception(_again(reason, ""))
        if self._transport is not None:
            # close(), not abort(): a CloseOk just written still goes out.
            self._transport.close()
        if not self._closing:
            log.debug("AMQP connection to %s lost: %s", self._endpoint.where, reason)


def _closed_by_broker(
    what: str, close: commands.Connection.Close | commands.Channel.Close
) -> WireClosed:
    code, text = close.reply_code or 0, close.reply_text or ""
    if code in (_ACCESS_REFUSED, _NOT_ALLOWED):
        return WireRefused(f"{code} {text}", code)
    return WireClosed(f"the broker closed the {what}: {code} {text}", code)


def _again(reason: WireClosed | None, otherwise: str) -> WireClosed:
    """A fresh exception saying why the connection is gone (one instance is never re-raised)."""
    if reason is None:
        return WireClosed(otherwise)
    return type(reason)(str(reason), reason.code)


def _negotiated(server: int, client: int) -> int:
    """AMQP's rule for tuned limits: the smaller, where 0 means "no limit"."""
    if not server or not client:
        return server or client
    return min(server, client)


def _frame(kind: int, payload: bytes) -> bytes:
    return b"".join((_FRAME_HEAD.pack(kind, _CHANNEL, len(payload)), payload, _FRAME_END_BYTE))


def _ack_frame(method: tuple[int, int], delivery_tag: int, flag: bool) -> bytes:
    return _ACK_FRAME.pack(
        _METHOD, _CHANNEL, _ACK_SIZE, method[0], method[1], delivery_tag, int(flag), _FRAME_END
    )


def _shortstr(value: str) -> bytes:
    encoded = value.encode()
    if len(encoded) > 255:
        raise ValueError("an AMQP short string holds at most 255 bytes")
    return bytes((len(encoded),)) + encoded


def _read_shortstr(data: bytes, offset: int) -> tuple[str, int]:
    end = offset + 1 + data[offset]
    if end > len(data):
        raise WireProtocolError("a short string runs past its frame")
    return data[offset + 1 : end].decode("utf-8", errors="replace"), end


def _read_table(data: bytes, offset: int) -> tuple[dict[str, Any], int]:
    (length,) = struct.unpack_from(">I", data, offset)
    consumed, table = field_table(data[offset : offset + 4 + length])
    return table, offset + consumed


def _read_octet(data: bytes, offset: int) -> tuple[int, int]:
    return data[offset], offset + 1


def _read_longlong(data: bytes, offset: int) -> tuple[int, int]:
    return _LONGLONG.unpack_from(data, offset)[0], offset + 8


_Reader = Callable[[bytes, int], tuple[Any, int]]
#: The basic class's properties in wire order: flag, name, how to read it.
_PROPERTIES: tuple[tuple[int, str, _Reader], ...] = (
    (_P_CONTENT_TYPE, "content_type", _read_shortstr),
    (_P_CONTENT_ENCODING, "content_encoding", _read_shortstr),
    (_P_HEADERS, "headers", _read_table),
    (_P_DELIVERY_MODE, "delivery_mode", _read_octet),
    (_P_PRIORITY, "priority", _read_octet),
    (_P_CORRELATION_ID, "correlation_id", _read_shortstr),
    (_P_REPLY_TO, "reply_to", _read_shortstr),
    (_P_EXPIRATION, "expiration", _read_shortstr),
    (_P_MESSAGE_ID, "message_id", _read_shortstr),
    (_P_TIMESTAMP, "timestamp", _read_longlong),
    (_P_TYPE, "type", _read_shortstr),
    (_P_USER_ID, "user_id", _read_shortstr),
    (_P_APP_ID, "app_id", _read_shortstr),
    (_P_CLUSTER_ID, "cluster_id", _read_shortstr),
)


def _read_properties(data: bytes, offset: int, flags: int) -> dict[str, Any]:
    """The basic properties of a content header, by their flags, in wire order."""
    properties: dict[str, Any] = {}
    for flag, name, read in _PROPERTIES:
        if flags & flag:
            properties[name], offset = read(data, offset)
    return properties
