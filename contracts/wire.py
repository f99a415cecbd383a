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
reconnects. A ``channel.close`` is a ``WireChannelClosed`` carrying the broker's text, so the
owner can tell which publish the broker refused (``contracts/client.py``). Rare frames (the handshake, closes, ``connection.blocked``) go through pamqp, as
in aiormq.

What it does not do, on purpose: declare exchanges and bindings (aio-pika does that, on a
connection of its own), transactions, several channels.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import socket
import ssl
import struct
from base64 import b64decode
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, cast
from urllib.parse import unquote

from pamqp import commands, frame
from pamqp.base import Frame as MethodFrame
from pamqp.encode import field_table as encode_table
from yarl import URL

from contracts.brokers import BrokerURLs, connect_any, suspect
from contracts.errors import (
    BrokerUnavailable,
    ConfigurationError,
    InvalidRequest,
    TransportClosed,
)
from contracts.text import printable
from contracts.urls import redact_url

log = logging.getLogger("zandd.wire")

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
_METHOD, _HEADER, _BODY, _HEARTBEAT = 1, 2, 3, 8
_DROPPED_BODY = -_BODY  # a state of ours, never a frame type
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
#: Seconds between heartbeats we ask for (the URL's ``heartbeat=`` overrides it). A broker
#: that says nothing for ``_MISSED_HEARTBEATS`` x this (10 s; at most 12.5 s with the
#: check's half-interval tick) counts as gone, and the broker counts a silent peer gone as
#: fast: a hung node or path is noticed well inside the client's 30 s default call timeout,
#: and the requests a hung signer held are redelivered by then. Not lower: RabbitMQ's
#: documentation warns that below 5 s false positives become likely (a busy event loop or a
#: GC pause reads as silence), and every one costs a reconnect and redeliveries.
DEFAULT_HEARTBEAT_S = 5
#: TCP keepalive on the lean connection's socket: idle seconds before the first probe, seconds
#: between probes, unanswered probes before the kernel drops it. Matters when heartbeats are
#: off (``heartbeat=0``): a dead peer is then found in 5 + 3 x 2 = 11 s instead of hours.
KEEPALIVE_IDLE_S = 5
KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_PROBES = 3
#: TCP_USER_TIMEOUT when heartbeats are off: written data unacknowledged this long drops the
#: connection (with heartbeats it is the heartbeats' detection time, see ``tcp_user_timeout_s``).
_USER_TIMEOUT_WITHOUT_HEARTBEATS_S = 20
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
#: How long a connection may stay blocked by the broker before it is dropped (``WireBlocked``).
BLOCKED_TIMEOUT_S = 30.0
#: The SASL mechanisms the URL's ``auth`` option may name (aiormq's two).
_MECHANISMS = ("PLAIN", "EXTERNAL")


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
    #: Why this message cannot be served, when its properties or body could not be read
    #: (printable, bounded: never the offending bytes raw); None for a sound message. The
    #: properties that could be read are set, an undecodable header entry is left out, and
    #: the body is empty when it was over the connection's ``max_body_bytes``.
    defect: str | None = None


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


class WireClosed(TransportClosed, ConnectionError):
    """The lean connection (or its one channel) is gone; ``str()`` says why, without secrets.

    A ``TransportClosed`` (retryable, inside the error tree), and still a ``ConnectionError``
    for code that catches the socket's own errors with it. ``reply_code`` is the broker's
    close code when the broker closed it, else None.
    """


class WireBlocked(WireClosed):
    """The broker blocked this connection (a memory or disk alarm) for too long: it is dropped.

    While blocked, every write is held in order — replies, acks, publishes — since a blocked
    connection's socket is not read by the broker; after ``blocked_timeout_s`` the connection
    is dropped with this error: a publish waiting for its confirm fails with it (retryable),
    and the requests a worker had not acked return to the queue.
    """


class WireChannelClosed(WireClosed):
    """The broker closed the channel over something sent on it (a publish it refuses: a body
    over its ``max_message_size``, an exchange that does not exist…); the connection ends with
    it. ``str()`` holds the broker's reply text, which names the reason."""


class WireRefused(WireClosed):
    """The broker refused this connection: wrong credentials or no access to the vhost."""


class WireProtocolError(WireClosed):
    """The broker sent something this connection cannot read: it is closed."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and as whom to connect, parsed from an AMQP URL (the password is never shown).

    The URL's query takes aiormq's TLS options, so a URL that worked with aio-pika works
    here: ``cafile``, ``capath``, ``cadata`` (base64 DER), ``certfile`` and ``keyfile`` (a
    client certificate), ``no_verify_ssl=1``, ``auth=external`` (log in as the client
    certificate's subject, not as a user and password); and ``heartbeat`` (seconds) overrides
    the caller's default. An option it does not know is refused, never ignored.
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
    cadata: bytes | None = None
    verify: bool = True
    heartbeat_s: int | None = None
    #: The SASL mechanism: ``PLAIN`` (user and password) or ``EXTERNAL`` (the TLS certificate).
    mechanism: str = "PLAIN"

    @classmethod
    def of(cls, url: str) -> Endpoint:
        """Parse ``amqp[s]://user:password@host:port/vhost?options`` like aiormq does."""
        try:
            parsed = URL(url)
            _ = parsed.port  # yarl checks the port only when asked
        except ValueError:
            raise ConfigurationError(f"not a valid AMQP URL: {redact_url(url)}") from None
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
        mechanism = query.get("auth", "plain").upper()
        if mechanism not in _MECHANISMS:
            raise ConfigurationError(f"auth must be plain or external in {redact_url(url)}")
        try:
            cadata = b64decode(query["cadata"], validate=True) if "cadata" in query else None
        except binascii.Error:
            raise ConfigurationError(f"cadata must be base64 in {redact_url(url)}") from None
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
            cadata=cadata,
            verify=query.get("no_verify_ssl", "0") == "0",
            heartbeat_s=heartbeat_s,
            mechanism=mechanism,
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for ``amqps://`` (None for plain ``amqp://``)."""
        if not self.tls:
            return None
        context = ssl.create_default_context(
            cafile=self.cafile, capath=self.capath, cadata=self.cadata
        )
        if self.certfile:
            context.load_cert_chain(self.certfile, self.keyfile)
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def __repr__(self) -> str:
        return f"Endpoint({self.where!r})"


def tcp_user_timeout_s(heartbeat_s: int) -> int:
    """TCP_USER_TIMEOUT for a connection with this (negotiated) heartbeat.

    As long as the heartbeats' own detection (``_MISSED_HEARTBEATS`` intervals): data we wrote
    — a reply, an ack, a heartbeat — that the peer's kernel has not acknowledged by then
    means a dead path or host, and the kernel drops the connection even while a full send
    buffer keeps our heartbeats from going out. Never shorter than it, so a slow but live path
    is left to the heartbeats to judge.
    """
    return heartbeat_s * _MISSED_HEARTBEATS if heartbeat_s else _USER_TIMEOUT_WITHOUT_HEARTBEATS_S


def tune_socket(sock: Any, heartbeat_s: int) -> None:
    """TCP keepalive and TCP_USER_TIMEOUT on a connection's socket, where the OS has them.

    ``sock`` is the transport's ``socket`` (asyncio's or uvloop's); None (no socket, a test's
    transport) is left alone, and an option the OS lacks is skipped.
    """
    if sock is None:
        return
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_S),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
        ("TCP_KEEPCNT", KEEPALIVE_PROBES),
        ("TCP_USER_TIMEOUT", tcp_user_timeout_s(heartbeat_s) * 1000),
    ):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    for level, option, value in options:
        try:
            sock.setsockopt(level, option, value)
        except OSError as exc:  # an OS or socket that refuses one: the heartbeats remain
            log.debug("cannot set socket option %s: %s", option, exc)


@dataclass(frozen=True, slots=True)
class DeclaredQueue:
    """The broker's answer to ``queue.declare``: the queue's name, its ready messages and
    its consumers."""

    name: str
    message_count: int
    consumer_count: int = 0


DeliveryCallback = Callable[[Delivery], None]


class Wire(asyncio.Protocol):
    """One AMQP connection with one channel; make it with :meth:`connect`."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        connection_name: str,
        heartbeat_s: int,
        max_body_bytes: int | None = None,
        blocked_timeout_s: float = BLOCKED_TIMEOUT_S,
    ) -> None:
        self._endpoint = endpoint
        self._blocked_timeout_s = blocked_timeout_s
        self._blocked_timer: asyncio.TimerHandle | None = None
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
        self._defect: str | None = None
        self._body_size = 0
        self._body: list[bytes] = []
        self._received = 0
        #: Which content frame may come next: _HEADER, _BODY, _DROPPED_BODY (one over the
        #: limit: counted, not kept), or 0 (a method).
        self._content = 0
        #: A body announced as larger than this is counted and dropped, never buffered.
        self._max_body_bytes = max_body_bytes
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
        #: Whether the connection was ever open (a loss after that makes its broker suspect).
        self._handshake_done = False
        #: Set when the connection is gone, for whatever reason; ``reason`` says which.
        self.lost = asyncio.Event()
        self.reason: WireClosed | None = None
        #: Whether the broker has blocked publishing (a resource alarm).
        self.blocked = False
        self._blocked_watchers: list[Callable[[str | None], None]] = []

    # -- connecting -----------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        url: BrokerURLs,
        *,
        connection_name: str,
        heartbeat_s: int = DEFAULT_HEARTBEAT_S,
        timeout_s: float = 10.0,
        max_body_bytes: int | None = None,
        blocked_timeout_s: float = BLOCKED_TIMEOUT_S,
    ) -> Wire:
        """Connect, authenticate and open channel 1, or raise why not (typed).

        ``url`` may name several brokers (``contracts.brokers``): they are tried in shuffled
        order within ``timeout_s``, and the first that answers is the connection's.
        A delivery whose content header announces a body over ``max_body_bytes`` is delivered
        with an empty body and a ``defect``; its body frames are never buffered.
        """

        async def attempt(one: str, attempt_timeout_s: float) -> Wire:
            return await cls._connect_one(
                one,
                connection_name=connection_name,
                heartbeat_s=heartbeat_s,
                timeout_s=attempt_timeout_s,
                max_body_bytes=max_body_bytes,
                blocked_timeout_s=blocked_timeout_s,
            )

        return await connect_any(url, attempt, timeout_s=timeout_s)

    @classmethod
    async def _connect_one(
        cls,
        url: str,
        *,
        connection_name: str,
        heartbeat_s: int,
        timeout_s: float,
        max_body_bytes: int | None,
        blocked_timeout_s: float,
    ) -> Wire:
        """``connect`` to one broker (a single-host URL)."""
        endpoint = Endpoint.of(url)
        loop = asyncio.get_running_loop()
        if endpoint.heartbeat_s is not None:
            heartbeat_s = endpoint.heartbeat_s
        wire = cls(
            endpoint,
            connection_name=connection_name,
            heartbeat_s=heartbeat_s,
            max_body_bytes=max_body_bytes,
            blocked_timeout_s=blocked_timeout_s,
        )
        try:
            context = endpoint.ssl_context()
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(
                f"cannot set up TLS for {endpoint.where}: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            async with asyncio.timeout(timeout_s):
                transport, _ = await loop.create_connection(
                    lambda: wire,
                    endpoint.host,
                    endpoint.port,
                    ssl=context,
                    server_hostname=endpoint.host if context else None,
                )
                await wire._handshake()
                tune_socket(transport.get_extra_info("socket"), wire._heartbeat_s)
        except (OSError, TimeoutError, WireClosed) as exc:
            wire._abort(WireClosed(f"handshake failed ({type(exc).__name__})"))
            if isinstance(exc, WireRefused):
                what = "our credentials" if exc.reply_code == _ACCESS_REFUSED else "access"
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

    @classmethod
    def for_testing(
        cls,
        transport: asyncio.BaseTransport,
        *,
        frame_max: int = _FRAME_MAX,
        heartbeat_s: int = 0,
        max_body_bytes: int | None = None,
        on_delivery: DeliveryCallback | None = None,
        confirms: bool = False,
        blocked_timeout_s: float = BLOCKED_TIMEOUT_S,
    ) -> Wire:
        """A connection as after the handshake, over a test's ``transport``: no socket, no broker.

        ``frame_max`` and ``heartbeat_s`` count as negotiated (no heartbeat timer runs),
        deliveries go to ``on_delivery``, and with ``confirms`` publishing awaits the broker's
        verdict as after :meth:`confirm_select`. The protocol header is written to
        ``transport``; nothing waits for an answer. Tests only: :meth:`connect` is the way in.
        """
        wire = cls(
            Endpoint.of("amqp://localhost/"),
            connection_name="test",
            heartbeat_s=heartbeat_s,
            max_body_bytes=max_body_bytes,
            blocked_timeout_s=blocked_timeout_s,
        )
        wire.connection_made(transport)
        # No broker answers the header: the handshake's first wait is abandoned, not awaited.
        wire._started.cancel()
        wire._waiter = None
        wire._frame_max = frame_max
        wire._on_delivery = on_delivery
        if confirms:
            wire._confirms = {}
        return wire

    async def _handshake(self) -> None:
        start = await self._started
        assert isinstance(start, commands.Connection.Start)
        mechanism = self._endpoint.mechanism
        if mechanism.encode() not in (start.mechanisms or "").encode().split():
            raise WireRefused(f"offers no {mechanism} authentication")
        # EXTERNAL: the broker takes the name from the client certificate; nothing to send.
        response = (
            f"\0{self._endpoint.user}\0{self._endpoint.password}" if mechanism == "PLAIN" else ""
        )
        self._send_method(
            0,
            commands.Connection.StartOk(
                client_properties=self._client_properties(),
                mechanism=mechanism,
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
        self._handshake_done = True
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
        self,
        queue: str,
        *,
        exclusive: bool = False,
        auto_delete: bool = False,
        passive: bool = False,
    ) -> DeclaredQueue:
        """Declare a (transient) queue, such as a client's exclusive reply queue, or with
        ``passive`` check that it exists (a missing one closes the connection: code 404).

        With ``queue=""`` the broker names it (``amq.gen-...``): the answer has the name.
        """
        ok = await self._call(
            _CHANNEL,
            commands.Queue.Declare(
                queue=queue, exclusive=exclusive, auto_delete=auto_delete, passive=passive
            ),
        )
        assert isinstance(ok, commands.Queue.DeclareOk)
        return DeclaredQueue(str(ok.queue), ok.message_count or 0, ok.consumer_count or 0)

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

    def on_blocked(self, callback: Callable[[str | None], None]) -> None:
        """Call ``callback(reason)`` each time the broker blocks this connection (a resource
        alarm; RabbitMQ says so once the connection publishes during one) and
        ``callback(None)`` when it unblocks it — after the writes it held are scheduled."""
        self._blocked_watchers.append(callback)

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
        if self.blocked:
            # Held, in order (a reply stays ahead of its ack): written when unblocked.
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
        except WireClosed as exc:
            self._abort(exc)
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
            self._on_body(data, start, end)
        elif kind == _METHOD:
            if end - start < 4:
                raise WireProtocolError("a method frame too short to name its method")
            method = _CLASS_METHOD.unpack_from(data, start)
            if method == _DELIVER:
                self._on_deliver(data, start + 4, end)
            elif method in _CONFIRMS:
                if end - start < 13:
                    raise WireProtocolError("a confirm frame too short for its fields")
                (tag,) = _LONGLONG.unpack_from(data, start + 4)
                self._on_confirm(tag, bool(data[start + 12] & 1), method == _ACK_METHOD)
            else:
                self._on_method(channel, data[start - 7 : end + 1])
        elif kind == _HEADER:
            self._on_header(data, start, end)
        elif kind != _HEARTBEAT:
            raise WireProtocolError(f"frame type {kind}")

    # -- deliveries -----------------------------------------------------------------------

    def _on_deliver(self, data: bytes, offset: int, end: int) -> None:
        if self._content:
            raise WireProtocolError("a delivery began before the last one's content ended")
        try:
            _tag, offset = _read_shortstr(data, offset, end)  # consumer tag: one consumer here
            if offset + 9 > end:
                raise _Undecodable("basic.deliver too short for its fields")
            (delivery_tag,) = _LONGLONG.unpack_from(data, offset)
            redelivered = bool(data[offset + 8] & 1)
            exchange, offset = _read_shortstr(data, offset + 9, end)
            routing_key, offset = _read_shortstr(data, offset, end)
        except _Undecodable as exc:
            # The broker's own frame, not the producer's: without a delivery tag there is
            # nothing to settle, so the connection cannot go on.
            raise WireProtocolError(f"an unreadable basic.deliver: {exc}") from None
        self._deliver = (delivery_tag, redelivered, exchange, routing_key)
        self._content = _HEADER

    def _on_header(self, data: bytes, offset: int, end: int) -> None:
        if self._content != _HEADER:
            raise WireProtocolError("a content header without its basic.deliver")
        if end - offset < _CONTENT_HEAD.size:
            raise WireProtocolError("a content header too short to give its body size")
        _class, _weight, body_size, flags = _CONTENT_HEAD.unpack_from(data, offset)
        # The header frame has its own length: whatever its properties hold, the next frame
        # is found, so an unreadable property spoils this one message and not the connection.
        self._properties, self._defect = _read_properties(data, offset + 14, end, flags)
        self._content = _BODY
        limit = self._max_body_bytes
        if limit is not None and body_size > limit:
            self._defect = f"a body of {body_size} bytes is over the limit of {limit}"
            self._content = _DROPPED_BODY
        self._body_size = body_size
        self._body = []
        self._received = 0
        if body_size == 0:
            self._delivered()

    def _on_body(self, data: bytes, start: int, end: int) -> None:
        content = self._content
        if content == _BODY:
            self._body.append(data[start:end])
        elif content != _DROPPED_BODY:
            raise WireProtocolError("a body frame without its content header")
        self._received += end - start
        if self._received >= self._body_size:
            if self._received > self._body_size:
                raise WireProtocolError("a body longer than its content header announced")
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
        self._content = 0
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
        get = properties.get
        # Positional, in field order: a frozen dataclass's keyword call costs more per delivery.
        return Delivery(
            body,
            delivery_tag,
            exchange,
            routing_key,
            redelivered,
            get("headers") or {},
            get("message_id"),
            get("correlation_id"),
            get("type"),
            get("reply_to"),
            get("user_id"),
            get("content_type"),
            self._defect,
        )

    # -- every other method ---------------------------------------------------------------

    def _on_method(self, channel: int, raw: bytes) -> None:
        method = _unmarshal(raw)
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
            self._block(printable(method.reason or "no reason given"))
        elif isinstance(method, commands.Connection.Unblocked):
            self._unblock()
        elif isinstance(method, commands.Basic.Return):
            if self._content:
                raise WireProtocolError("a returned message began before the last one ended")
            self._returning = (method.reply_code or 0, method.reply_text or "")
            self._content = _HEADER
        elif isinstance(method, commands.Channel.Flow):
            self._send_method(channel, commands.Channel.FlowOk(active=method.active))
        else:
            log.debug("ignored %s on channel %d", method.name, channel)

    def _block(self, reason: str) -> None:
        """A resource alarm: hold every write (see ``WireBlocked``) until unblocked or too long."""
        log.warning("the broker blocks publishing: %s", reason)
        if self.blocked:
            return
        self.blocked = True
        self._blocked_timer = self._loop.call_later(
            self._blocked_timeout_s,
            self._abort,
            WireBlocked(
                f"the broker blocked publishing for over {self._blocked_timeout_s:g} s "
                f"(a resource alarm: {reason})"
            ),
        )
        self._tell_blocked(reason)

    def _unblock(self) -> None:
        log.info("the broker unblocked publishing")
        was_blocked, self.blocked = self.blocked, False
        if self._blocked_timer is not None:
            self._blocked_timer.cancel()
            self._blocked_timer = None
        self._schedule_flush()
        if was_blocked:
            self._tell_blocked(None)

    def _tell_blocked(self, reason: str | None) -> None:
        for watcher in list(self._blocked_watchers):
            try:
                watcher(reason)
            except Exception:  # a watcher's bug must not end the connection it watches
                log.exception("a connection.blocked watcher failed")

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
        if self._blocked_timer is not None:
            self._blocked_timer.cancel()
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
            if self._handshake_done:
                # Lost, not closed by us: reconnect to the cluster's other nodes first.
                suspect(self._endpoint.where)


def _unmarshal(raw: bytes) -> MethodFrame:
    """A rare method frame, read by pamqp; anything pamqp cannot read ends the connection."""
    try:
        _consumed, _channel, method = frame.unmarshal(raw)
    except Exception as exc:  # pamqp's errors are many and untyped: each is an unreadable frame
        raise WireProtocolError(f"an unreadable method frame ({type(exc).__name__})") from None
    if not isinstance(method, MethodFrame):
        raise WireProtocolError("a method frame that holds no method")
    return method


def _closed_by_broker(
    what: str, close: commands.Connection.Close | commands.Channel.Close
) -> WireClosed:
    code, text = close.reply_code or 0, close.reply_text or ""
    if code in (_ACCESS_REFUSED, _NOT_ALLOWED):
        return WireRefused(f"{code} {text}", code)
    if isinstance(close, commands.Channel.Close):
        return WireChannelClosed(f"the broker closed the {what}: {code} {text}", code)
    return WireClosed(f"the broker closed the {what}: {code} {text}", code)


def _again(reason: WireClosed | None, otherwise: str) -> WireClosed:
    """A fresh exception saying why the connection is gone (one instance is never re-raised)."""
    if reason is None:
        return WireClosed(otherwise)
    return type(reason)(str(reason), reason.reply_code)


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
        # The caller's value (a request id, a routing key): its mistake, typed, never echoed.
        raise InvalidRequest(
            f"an AMQP short string holds at most 255 bytes, this one {len(encoded)}"
        )
    return bytes((len(encoded),)) + encoded


#: Deepest nesting of tables and arrays in a message's headers (ours use one level, the
#: broker's ``x-death`` two): deeper is a defect, never a recursion into the interpreter's limit.
MAX_TABLE_DEPTH = 16
#: Most values one message's headers may hold, at every level together.
MAX_TABLE_VALUES = 1024
_RAW_SHOWN_BYTES = 16


class _Undecodable(Exception):
    """Part of a frame that cannot be read; ``str()`` is printable and says what."""


def _read_shortstr(data: bytes, offset: int, end: int) -> tuple[str, int]:
    if offset >= end:
        raise _Undecodable("a short string runs past its frame")
    stop = offset + 1 + data[offset]
    if stop > end:
        raise _Undecodable("a short string runs past its frame")
    return data[offset + 1 : stop].decode("utf-8", errors="replace"), stop


def _read_octet(data: bytes, offset: int, end: int) -> tuple[int, int]:
    if offset >= end:
        raise _Undecodable("an octet runs past its frame")
    return data[offset], offset + 1


def _read_longlong(data: bytes, offset: int, end: int) -> tuple[int, int]:
    if offset + 8 > end:
        raise _Undecodable("a timestamp runs past its frame")
    return _LONGLONG.unpack_from(data, offset)[0], offset + 8


_LONG = struct.Struct(">I")
#: Field values of a fixed size, by type octet (RabbitMQ's table of types, read as pamqp
#: reads them, so a header decodes to what aio-pika would have shown).
_FIXED_VALUES: dict[int, struct.Struct] = {
    ord("b"): struct.Struct(">b"),
    ord("B"): struct.Struct(">B"),
    ord("s"): struct.Struct(">h"),
    ord("u"): struct.Struct(">H"),
    ord("I"): struct.Struct(">i"),
    ord("i"): struct.Struct(">I"),
    ord("l"): struct.Struct(">q"),
    ord("L"): struct.Struct(">q"),
    ord("f"): struct.Struct(">f"),
    ord("d"): struct.Struct(">d"),
}
_BOOLEAN, _TIMESTAMP, _DECIMAL = ord("t"), ord("T"), ord("D")
_LONGSTR, _BYTES, _TABLE, _ARRAY = ord("S"), ord("x"), ord("F"), ord("A")
_VOIDS = (ord("V"), 0)
#: Seconds: a timestamp above is taken as milliseconds (pamqp's rule, "after the year 2106").
_SECONDS_MAX = 0xFFFFFFFF


class _TableReader:
    """Reads one message's field tables within bounds: depth, value count, the frame."""

    __slots__ = ("data", "values_left")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.values_left = MAX_TABLE_VALUES

    def table(self, offset: int, end: int, depth: int) -> tuple[dict[str, Any], int]:
        """The table at ``offset`` (its length first), and where it ends."""
        stop = self._extent(offset, end, "table")
        if depth > MAX_TABLE_DEPTH:
            raise _Undecodable(f"tables nested deeper than {MAX_TABLE_DEPTH}")
        table: dict[str, Any] = {}
        offset += 4
        while offset < stop:
            key, offset = self.key(offset, stop)
            table[key], offset = self.value(offset, stop, depth)
        return table, stop

    def key(self, offset: int, stop: int) -> tuple[str, int]:
        """A table key (a short string), which must be UTF-8."""
        data = self.data
        key_end = offset + 1 + data[offset]
        if key_end > stop:
            raise _Undecodable("a table key runs past its table")
        try:
            return data[offset + 1 : key_end].decode(), key_end
        except UnicodeDecodeError:
            raise _Undecodable("a table key that is not UTF-8") from None

    def value(self, offset: int, end: int, depth: int) -> tuple[Any, int]:
        """One field value: its type octet, then the value; and where it ends."""
        if offset >= end:
            raise _Undecodable("a table value runs past its table")
        self.values_left -= 1
        if self.values_left < 0:
            raise _Undecodable(f"more than {MAX_TABLE_VALUES} values in the headers")
        data = self.data
        kind = data[offset]
        offset += 1
        if kind == _LONGSTR:
            stop = self._extent(offset, end, "long string")
            raw = data[offset + 4 : stop]
            try:
                return raw.decode(), stop
            except UnicodeDecodeError:
                return raw, stop  # as pamqp: a long string need not be text
        fixed = _FIXED_VALUES.get(kind)
        if fixed is not None:
            if offset + fixed.size > end:
                raise _Undecodable("a number runs past its table")
            return fixed.unpack_from(data, offset)[0], offset + fixed.size
        if kind == _TABLE:
            return self.table(offset, end, depth + 1)
        if kind == _ARRAY:
            return self.array(offset, end, depth + 1)
        return self.rare(kind, offset, end)

    def array(self, offset: int, end: int, depth: int) -> tuple[list[Any], int]:
        """A field array (its length first), and where it ends."""
        stop = self._extent(offset, end, "array")
        if depth > MAX_TABLE_DEPTH:
            raise _Undecodable(f"tables nested deeper than {MAX_TABLE_DEPTH}")
        values: list[Any] = []
        offset += 4
        while offset < stop:
            value, offset = self.value(offset, stop, depth)
            values.append(value)
        return values, stop

    def rare(self, kind: int, offset: int, end: int) -> tuple[Any, int]:
        """Values no ZANDD header uses, but a producer (or the broker's x-death) may."""
        data = self.data
        if kind in _VOIDS:
            return None, offset
        if kind == _BYTES:
            stop = self._extent(offset, end, "byte array")
            return bytearray(data[offset + 4 : stop]), stop  # as pamqp: it re-encodes as "x"
        if kind == _BOOLEAN:
            if offset >= end:
                raise _Undecodable("a boolean runs past its table")
            return bool(data[offset]), offset + 1
        if kind == _TIMESTAMP:
            stamp, stop = _read_longlong(data, offset, end)
            return _timestamp(stamp), stop
        if kind == _DECIMAL:
            if offset + 5 > end:
                raise _Undecodable("a decimal runs past its table")
            places = data[offset]
            (raw,) = _SIGNED_LONG.unpack_from(data, offset + 1)
            return Decimal(raw) * Decimal(10) ** -places, offset + 5
        raise _Undecodable(f"a field value of unknown type {printable(bytes((kind,)))}")

    def skip(self, offset: int, end: int) -> int | None:
        """Where the value at ``offset`` ends, without reading it; None when unknowable."""
        data = self.data
        if offset >= end:
            return None
        kind = data[offset]
        offset += 1
        if kind in (_LONGSTR, _BYTES, _TABLE, _ARRAY):
            try:
                return self._extent(offset, end, "value")
            except _Undecodable:
                return None
        size = _RARE_SIZES.get(kind)
        if size is None:
            fixed = _FIXED_VALUES.get(kind)
            if fixed is None:
                return None
            size = fixed.size
        return offset + size if offset + size <= end else None

    def _extent(self, offset: int, end: int, what: str) -> int:
        """Where a length-prefixed value at ``offset`` ends, checked against ``end``."""
        if offset + 4 > end:
            raise _Undecodable(f"a {what} runs past its frame")
        stop: int = offset + 4 + _LONG.unpack_from(self.data, offset)[0]
        if stop > end:
            raise _Undecodable(f"a {what} runs past its frame")
        return stop


_SIGNED_LONG = struct.Struct(">i")
_RARE_SIZES = {ord("V"): 0, 0: 0, _BOOLEAN: 1, _TIMESTAMP: 8, _DECIMAL: 5}


def _timestamp(stamp: int) -> datetime:
    seconds = stamp / 1000.0 if stamp > _SECONDS_MAX else stamp
    try:
        return datetime.fromtimestamp(seconds, tz=UTC)
    except (OverflowError, OSError, ValueError):
        raise _Undecodable(f"a timestamp out of range ({stamp})") from None


def _read_headers(data: bytes, offset: int, end: int) -> tuple[dict[str, Any], str | None, int]:
    """The headers table, what was wrong in it (None: nothing), and where it ends.

    An entry that cannot be read is left out and the others are kept (the broker's ``x-death``
    next to a producer's bad entry still says why the message died); a table whose length
    runs past the frame is the end of what can be read.
    """
    reader = _TableReader(data)
    stop = reader._extent(offset, end, "headers table")
    headers: dict[str, Any] = {}
    defect: str | None = None
    offset += 4
    while offset < stop:
        key_start = offset
        try:
            key, offset = reader.key(offset, stop)
            headers[key], offset = reader.value(offset, stop, 1)
        except _Undecodable as exc:
            after_key = min(key_start + 1 + data[key_start], stop)
            skipped = reader.skip(after_key, stop)
            if defect is None:
                defect = _entry_defect(data, key_start, after_key, skipped or stop, exc)
            if skipped is None:
                break
            offset = skipped
    return headers, defect, stop


def _entry_defect(data: bytes, start: int, value_start: int, end: int, exc: Exception) -> str:
    """What is wrong with one header entry: its key and the first bytes of its value, escaped."""
    key = printable(data[start + 1 : value_start], 40)
    cut = min(end, value_start + _RAW_SHOWN_BYTES)
    raw = printable(data[value_start:cut], 4 * _RAW_SHOWN_BYTES) + ("…" if cut < end else "")
    return f"header '{key}' ({raw}): {exc}"


_Reader = Callable[[bytes, int, int], tuple[Any, int]]
#: The basic class's properties in wire order (the headers table sits between these two
#: groups and is read by ``_read_headers``): flag, name, how to read it.
_BEFORE_HEADERS: tuple[tuple[int, str, _Reader], ...] = (
    (_P_CONTENT_TYPE, "content_type", _read_shortstr),
    (_P_CONTENT_ENCODING, "content_encoding", _read_shortstr),
)
_AFTER_HEADERS: tuple[tuple[int, str, _Reader], ...] = (
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


def _read_properties(
    data: bytes, offset: int, end: int, flags: int
) -> tuple[dict[str, Any], str | None]:
    """The basic properties of a content header by their flags, in wire order, and what could
    not be read (None: nothing). What precedes an unreadable property is kept."""
    properties: dict[str, Any] = {}
    if flags & _P_MORE_FLAGS:
        return properties, "more property flags than AMQP 0-9-1 defines"
    defect: str | None = None
    try:
        for flag, name, read in _BEFORE_HEADERS:
            if flags & flag:
                properties[name], offset = read(data, offset, end)
        if flags & _P_HEADERS:
            properties["headers"], defect, offset = _read_headers(data, offset, end)
        for flag, name, read in _AFTER_HEADERS:
            if flags & flag:
                properties[name], offset = read(data, offset, end)
    except _Undecodable as exc:
        return properties, f"unreadable properties: {exc}"
    return properties, defect
