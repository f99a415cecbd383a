"""The lean AMQP connection's codec, checked against pamqp (aiormq's codec) as the reference.

Frames go in through ``data_received`` and come out of a recording transport, so what is
checked is the bytes: deliveries encoded by pamqp are read back field for field, however the
socket splits them, and what the connection writes is decoded by pamqp.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands, frame
from pamqp.body import ContentBody
from pamqp.decode import field_table
from pamqp.encode import field_table as encode_table
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from contracts.errors import (
    BrokerUnavailable,
    ConfigurationError,
    InvalidRequest,
    TransportClosed,
)
from contracts.wire import (
    Delivery,
    Endpoint,
    Properties,
    Wire,
    WireBlocked,
    WireClosed,
    WireProtocolError,
    WireRefused,
)
from tests.support.poison import POISON_HEADERS

#: A throwaway self-signed CA certificate (its key was never kept): for ``cadata``.
_A_CA_PEM = """\
-----BEGIN CERTIFICATE-----
MIIBhjCCAS2gAwIBAgIUFQ6Dct3z1rfJucwLQESsV/uzId0wCgYIKoZIzj0EAwIw
GDEWMBQGA1UEAwwNemFuZGQtdGVzdC1jYTAgFw0yNjExMjkyMTI3NDNaGA8yMTI2
MTEwNTIxMjc0M1owGDEWMBQGA1UEAwwNemFuZGQtdGVzdC1jYTBZMBMGByqGSM49
AgEGCCqGSM49AwEHA0IABDv0pild2uTkRKUomd9ifUIHST0vofyWnZUa+DLoaMuv
qAkCb9+Ls7FJugI3rT8y5TNnpF/1mn52nXgFnA5vcH2jUzBRMB0GA1UdDgQWBBT0
TPDf3W8cGmHZA4gRI1NbyeoQmzAfBgNVHSMEGDAWgBT0TPDf3W8cGmHZA4gRI1Nb
yeoQmzAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0cAMEQCIDeJye+w4Tt/
D+SlfCSTBs3f88ZAHYsp09MC67Q06KfgAiAB96KekAdzRVzzi8mkx65sV0MUzhch
vdSkLUGbN9K2LA==
-----END CERTIFICATE-----
"""

FRAME_MAX = 4096


class _Transport:
    """Records what the connection writes; closing it is recorded too."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def frames(self) -> list[tuple[int, Any]]:
        """Every frame written so far (after the protocol header), decoded by pamqp."""
        data = bytes(self.written)
        if data.startswith(b"AMQP"):
            data = data[8:]
        decoded = []
        while data:
            consumed, channel, value = frame.unmarshal(data)
            decoded.append((channel, value))
            data = data[consumed:]
        return decoded


async def _wire(
    *,
    frame_max: int = FRAME_MAX,
    heartbeat_s: int = 0,
    max_body_bytes: int | None = None,
    confirms: bool = False,
    blocked_timeout_s: float = 30.0,
) -> tuple[Wire, _Transport, list[Delivery]]:
    """A connection as after the handshake over a recording transport, its deliveries listed."""
    transport = _Transport()
    deliveries: list[Delivery] = []
    wire = Wire.for_testing(
        transport,  # type: ignore[arg-type]
        frame_max=frame_max,
        heartbeat_s=heartbeat_s,
        max_body_bytes=max_body_bytes,
        on_delivery=deliveries.append,
        confirms=confirms,
        blocked_timeout_s=blocked_timeout_s,
    )
    transport.written.clear()
    return wire, transport, deliveries


def _delivery_bytes(body: bytes, properties: commands.Basic.Properties, tag: int = 7) -> bytes:
    deliver = commands.Basic.Deliver(
        consumer_tag="ctag",
        delivery_tag=tag,
        redelivered=True,
        exchange="zandd",
        routing_key="sign",
    )
    parts = [
        frame.marshal(deliver, 1),
        frame.marshal(ContentHeader(body_size=len(body), properties=properties), 1),
    ]
    for start in range(0, len(body), FRAME_MAX - 8):
        parts.append(frame.marshal(ContentBody(body[start : start + FRAME_MAX - 8]), 1))
    return b"".join(parts)


FULL_PROPERTIES = commands.Basic.Properties(
    content_type="application/json",
    content_encoding="identity",
    headers={"x-deadline-ms": 1_790_000_000_000, "traceparent": "00-ab-cd-01", "n": {"x": True}},
    delivery_mode=2,
    priority=3,
    correlation_id="corr-1",
    reply_to="zandd.reply.abc",
    expiration="30000",
    message_id="req-1",
    timestamp=datetime(2026, 11, 28, tzinfo=UTC),
    message_type="sign",
    user_id="app",
    app_id="billing",
)


async def test_a_delivery_is_read_field_for_field_however_the_socket_splits_it() -> None:
    body = bytes(range(256)) * 40  # three body frames at this frame size
    data = _delivery_bytes(body, FULL_PROPERTIES)
    for chunk in (len(data), 1, 5, 13, 1000):
        wire, _transport, deliveries = await _wire()
        for start in range(0, len(data), chunk):
            wire.data_received(data[start : start + chunk])
        assert deliveries == [
            Delivery(
                body=body,
                delivery_tag=7,
                exchange="zandd",
                routing_key="sign",
                redelivered=True,
                headers={
                    "x-deadline-ms": 1_790_000_000_000,
                    "traceparent": "00-ab-cd-01",
                    "n": {"x": True},
                },
                message_id="req-1",
                correlation_id="corr-1",
                type="sign",
                reply_to="zandd.reply.abc",
                user_id="app",
                content_type="application/json",
            )
        ], f"split every {chunk} bytes"
        assert not wire.lost.is_set()


async def test_deliveries_back_to_back_and_an_empty_body_and_heartbeats() -> None:
    wire, _transport, deliveries = await _wire()
    sparse = commands.Basic.Properties(message_id="only")
    data = (
        _delivery_bytes(b"", sparse, tag=1)
        + Heartbeat().marshal()
        + _delivery_bytes(b"{}", commands.Basic.Properties(), tag=2)
    )
    wire.data_received(data)
    assert [(d.delivery_tag, d.body, d.message_id, d.headers) for d in deliveries] == [
        (1, b"", "only", {}),
        (2, b"{}", None, {}),
    ]


async def test_a_reply_is_written_as_pamqp_reads_it_split_at_the_frame_size() -> None:
    wire, transport, _ = await _wire()
    body = b"x" * 10_000
    reply = Properties(content_type="application/json", correlation_id="corr-1", type="sign.reply")
    assert wire.publish(body, reply, routing_key="zandd.reply.abc") is None  # no confirms
    await asyncio.sleep(0)  # the turn's write
    frames = transport.frames()
    method, header, *bodies = (value for _channel, value in frames)
    assert {channel for channel, _ in frames} == {1}
    assert isinstance(method, commands.Basic.Publish)
    assert (method.exchange, method.routing_key, method.mandatory) == ("", "zandd.reply.abc", False)
    assert isinstance(header, ContentHeader)
    assert header.body_size == len(body)
    assert header.properties.content_type == "application/json"
    assert header.properties.correlation_id == "corr-1"
    assert header.properties.message_type == "sign.reply"
    assert header.properties.delivery_mode is None  # transient
    assert all(len(part.value) <= FRAME_MAX - 8 for part in bodies)
    assert b"".join(part.value for part in bodies) == body


async def test_a_request_carries_every_property_as_pamqp_reads_it() -> None:
    wire, transport, _ = await _wire()
    request = Properties(
        content_type="application/json",
        headers={"x-deadline-ms": 1_790_000_000_000, "traceparent": "00-ab-cd-01"},
        persistent=True,
        correlation_id="corr-1",
        reply_to="zandd.reply.abc",
        expiration="30000",
        message_id="req-1",
        type="sign",
        user_id="app",
    )
    wire.publish(b"{}", request, routing_key="sign", exchange="zandd", mandatory=True)
    await asyncio.sleep(0)
    (_, method), (_, header), _body = transport.frames()
    assert (method.exchange, method.routing_key, method.mandatory) == ("zandd", "sign", True)
    expected = commands.Basic.Properties(
        content_type="application/json",
        headers={"x-deadline-ms": 1_790_000_000_000, "traceparent": "00-ab-cd-01"},
        delivery_mode=2,
        correlation_id="corr-1",
        reply_to="zandd.reply.abc",
        expiration="30000",
        message_id="req-1",
        message_type="sign",
        user_id="app",
    )
    assert header.properties == expected


async def test_confirms_settle_in_order_single_or_multiple_and_a_nack_says_no() -> None:
    wire, _transport, _ = await _wire(confirms=True)
    confirms = [wire.publish(b"{}", Properties(), routing_key="r") for _ in range(5)]
    assert all(confirm is not None and not confirm.done() for confirm in confirms)
    wire.data_received(frame.marshal(commands.Basic.Ack(delivery_tag=3, multiple=True), 1))
    wire.data_received(frame.marshal(commands.Basic.Nack(delivery_tag=5), 1))
    assert [c.result() if c and c.done() else None for c in confirms] == [
        True,
        True,
        True,
        None,
        False,
    ]
    wire.drop("gone")  # the one still unconfirmed learns that the connection is gone
    assert confirms[3] is not None
    with pytest.raises(WireClosed, match="gone"):
        confirms[3].result()


async def test_a_returned_message_reaches_on_return_with_its_properties() -> None:
    wire, _transport, deliveries = await _wire()
    returned: list[tuple[int, str, Delivery]] = []
    wire.on_return = lambda code, text, message: returned.append((code, text, message))
    back = commands.Basic.Return(
        reply_code=312, reply_text="NO_ROUTE", exchange="zandd", routing_key="sign"
    )
    properties = commands.Basic.Properties(correlation_id="corr-9")
    wire.data_received(
        frame.marshal(back, 1)
        + frame.marshal(ContentHeader(body_size=2, properties=properties), 1)
        + frame.marshal(ContentBody(b"{}"), 1)
    )
    assert [(code, text, m.correlation_id, m.body) for code, text, m in returned] == [
        (312, "NO_ROUTE", "corr-9", b"{}")
    ]
    assert deliveries == []  # a return is not a delivery


async def test_acks_and_rejects_follow_the_replies_in_one_write() -> None:
    wire, transport, _ = await _wire()
    wire.publish(b"{}", Properties(), routing_key="r")
    wire.ack(9, multiple=True)
    wire.reject(10, requeue=False)
    wire.ack(11)
    assert transport.written == b""  # nothing is written before the turn ends
    await asyncio.sleep(0)
    kinds = [value for _channel, value in transport.frames()]
    assert [type(value).__name__ for value in kinds] == [
        "Publish",
        "ContentHeader",
        "ContentBody",
        "Ack",
        "Reject",
        "Ack",
    ]
    ack, reject, last = kinds[3], kinds[4], kinds[5]
    assert (ack.delivery_tag, ack.multiple) == (9, True)
    assert (reject.delivery_tag, reject.requeue) == (10, False)
    assert (last.delivery_tag, last.multiple) == (11, False)


async def test_a_callback_registered_before_the_write_runs_first() -> None:
    wire, transport, _ = await _wire()
    wire.publish(b"{}", Properties(), routing_key="r")
    wire.before_flush(lambda: wire.ack(1))
    await asyncio.sleep(0)
    assert [type(v).__name__ for _c, v in transport.frames()][-1] == "Ack"


async def test_the_broker_closing_the_channel_ends_the_connection_with_its_reason() -> None:
    wire, transport, _ = await _wire()
    close = commands.Channel.Close(
        reply_code=406,
        reply_text="PRECONDITION_FAILED - unknown delivery tag 99",
        class_id=60,
        method_id=80,
    )
    wire.data_received(frame.marshal(close, 1))
    assert wire.lost.is_set()
    assert "406" in str(wire.reason)
    assert isinstance(transport.frames()[-1][1], commands.Channel.CloseOk)
    assert transport.closed
    with pytest.raises(ConnectionError):
        wire.publish(b"{}", Properties(), routing_key="r")


async def test_refused_credentials_are_a_refusal_not_an_outage() -> None:
    wire, _transport, _ = await _wire()
    close = commands.Connection.Close(
        reply_code=403, reply_text="ACCESS_REFUSED - Login was refused", class_id=0, method_id=0
    )
    wire.data_received(frame.marshal(close, 0))
    assert isinstance(wire.reason, WireRefused)


async def test_a_cancelled_consumer_ends_the_connection() -> None:
    wire, _transport, _ = await _wire()
    wire.data_received(frame.marshal(commands.Basic.Cancel(consumer_tag="ctag", nowait=True), 1))
    assert wire.lost.is_set()
    assert "cancelled the consumer" in str(wire.reason)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x01\x00\x01\x00\x00\x00\x04\x00\x3c\x00\x3c\x00",  # no frame-end marker
        b"\x07\x00\x01\x00\x00\x00\x00\xce",  # no such frame type
        b"\x01\x00\x01\x7f\xff\xff\xff",  # a frame far above the negotiated size
        b"AMQP\x00\x00\x09\x01",  # the broker's protocol header: it speaks another version
    ],
)
async def test_an_unreadable_frame_ends_the_connection(garbage: bytes) -> None:
    wire, transport, deliveries = await _wire()
    wire.data_received(garbage + b"\x00" * 8)
    assert isinstance(wire.reason, WireProtocolError)
    assert transport.closed
    assert deliveries == []


async def test_silence_from_the_broker_for_two_heartbeats_ends_the_connection() -> None:
    wire, transport, _ = await _wire(heartbeat_s=1)
    wire._beat()  # just heard from, just wrote: nothing to do
    assert transport.written == b""
    wire._last_write_s -= 0.5
    wire._beat()  # quiet for half an interval: a heartbeat of its own
    assert transport.written.endswith(Heartbeat().marshal())
    assert not wire.lost.is_set()
    wire._last_read_s -= 2.5
    wire._beat()
    assert wire.lost.is_set()
    assert "heartbeats" in str(wire.reason)


def test_the_endpoint_never_shows_the_password() -> None:
    endpoint = Endpoint.of("amqps://app:s3cr%40t@mq.example:5999/prod%2Feu")
    assert (endpoint.host, endpoint.port, endpoint.vhost) == ("mq.example", 5999, "prod/eu")
    assert (endpoint.user, endpoint.password, endpoint.tls) == ("app", "s3cr@t", True)
    assert "s3cr" not in repr(endpoint)
    assert Endpoint.of("amqp://localhost").vhost == "/"
    assert Endpoint.of("amqp://localhost/").port == 5672
    with pytest.raises(ConfigurationError, match="not an AMQP URL"):
        Endpoint.of("http://localhost/")


def test_the_url_s_tls_and_heartbeat_options_are_aiormq_s() -> None:
    plain = Endpoint.of("amqp://localhost/?heartbeat=5")
    assert plain.ssl_context() is None
    assert plain.heartbeat_s == 5
    unverified = Endpoint.of("amqps://localhost/?no_verify_ssl=1")
    context = unverified.ssl_context()
    assert context is not None
    assert context.verify_mode == ssl.CERT_NONE
    assert context.check_hostname is False
    verified = Endpoint.of("amqps://localhost/").ssl_context()
    assert verified is not None
    assert verified.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ConfigurationError, match="heartbeat must be whole seconds"):
        Endpoint.of("amqp://u:secret@localhost/?heartbeat=soon")


@dataclass
class _Silent:
    """A TCP server that accepts and never speaks."""

    port: int
    accepted: asyncio.Event = field(default_factory=asyncio.Event)
    hung_up: asyncio.Event = field(default_factory=asyncio.Event)


@asynccontextmanager
async def _silent_server() -> AsyncIterator[_Silent]:
    """A server that accepts and never speaks; ``hung_up`` is set when the client closes."""
    silent = _Silent(port=0)

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.accepted.set()
        await reader.read()  # until the client closes its end
        silent.hung_up.set()
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    async with server:
        silent.port = server.sockets[0].getsockname()[1]
        yield silent


async def test_a_broker_that_never_answers_is_a_timeout_and_the_socket_is_closed() -> None:
    async with _silent_server() as silent:
        url = f"amqp://u:p@127.0.0.1:{silent.port}/"
        with pytest.raises(BrokerUnavailable, match="TimeoutError"):
            await Wire.connect(url, connection_name="test", timeout_s=0.3)
        await asyncio.wait_for(silent.hung_up.wait(), 5)


async def test_a_cancelled_connect_leaves_no_socket_open() -> None:
    async with _silent_server() as silent:
        url = f"amqp://u:p@127.0.0.1:{silent.port}/"
        attempt = asyncio.create_task(Wire.connect(url, connection_name="test"))
        await asyncio.wait_for(silent.accepted.wait(), 5)  # connected, awaiting connection.start
        attempt.cancel()
        with pytest.raises(asyncio.CancelledError):
            await attempt
        await asyncio.wait_for(silent.hung_up.wait(), 5)


# -- hostile content: one bad message is one bad message ---------------------------------------


def _raw_delivery(table: bytes, body: bytes, *, tag: int, message_id: bytes) -> bytes:
    """A delivery whose headers table is given as raw bytes (pamqp cannot encode a poison one)."""
    deliver = commands.Basic.Deliver(
        consumer_tag="ctag", delivery_tag=tag, exchange="zandd", routing_key="sign"
    )
    flags = 0x2000 | 0x0200 | 0x0080  # headers, reply_to, message_id: in wire order below
    properties = table + bytes((7,)) + b"replies" + bytes((len(message_id),)) + message_id
    header = struct.pack(">HHQH", 60, 0, len(body), flags) + properties
    return (
        frame.marshal(deliver, 1)
        + struct.pack(">BHI", 2, 1, len(header))
        + header
        + b"\xce"
        + frame.marshal(ContentBody(body), 1)
    )


@pytest.mark.parametrize("kind", POISON_HEADERS)
@pytest.mark.parametrize("chunk", [1_000_000, 1, 7])
async def test_an_undecodable_header_is_one_defective_delivery_and_the_next_is_intact(
    kind: str, chunk: int
) -> None:
    wire, _transport, deliveries = await _wire(frame_max=131072)
    data = _raw_delivery(
        POISON_HEADERS[kind], b"{}", tag=1, message_id=b"poison"
    ) + _delivery_bytes(b"{}", FULL_PROPERTIES, tag=2)
    for start in range(0, len(data), chunk):
        wire.data_received(data[start : start + chunk])
    assert not wire.lost.is_set(), wire.reason
    poison, innocent = deliveries
    assert poison.defect is not None
    assert poison.defect.isprintable()  # the escape sequence in the key is shown escaped
    # The headers table has its own length: what follows it, and its good entries, still read.
    assert (poison.delivery_tag, poison.message_id, poison.reply_to) == (1, "poison", "replies")
    assert poison.headers == {"traceparent": "00-ab-cd-01"}
    assert innocent.defect is None
    assert (innocent.delivery_tag, innocent.message_id, innocent.body) == (2, "req-1", b"{}")


async def test_a_body_over_the_limit_is_counted_not_buffered_and_delivered_with_a_defect() -> None:
    wire, _transport, deliveries = await _wire(max_body_bytes=1000)
    big = _delivery_bytes(b"x" * 10_000, commands.Basic.Properties(message_id="big"), tag=1)
    frames = []
    rest = big
    while rest:
        size = struct.unpack_from(">I", rest, 3)[0] + 8
        frames.append(rest[:size])
        rest = rest[size:]
    deliver, header, *bodies = frames
    assert len(bodies) == 3
    wire.data_received(deliver + header)
    for body in bodies[:-1]:
        wire.data_received(body)
        assert wire._body == []  # nothing of the oversized body is held
    wire.data_received(bodies[-1] + _delivery_bytes(b"{}", FULL_PROPERTIES, tag=2))
    over, innocent = deliveries
    assert (over.message_id, over.body) == ("big", b"")
    assert over.defect == "a body of 10000 bytes is over the limit of 1000"
    assert (innocent.delivery_tag, innocent.body, innocent.defect) == (2, b"{}", None)
    assert not wire.lost.is_set()


@pytest.mark.parametrize(
    "frames",
    [
        [ContentBody(b"{}")],  # a body with no header
        [ContentHeader(body_size=2, properties=commands.Basic.Properties())],  # no deliver
    ],
    ids=["body-first", "header-first"],
)
async def test_content_out_of_order_is_a_protocol_error(frames: list[Any]) -> None:
    wire, _transport, deliveries = await _wire()
    wire.data_received(b"".join(frame.marshal(f, 1) for f in frames))
    assert isinstance(wire.reason, WireProtocolError)
    assert deliveries == []


async def test_a_method_frame_pamqp_cannot_read_is_a_protocol_error() -> None:
    wire, _transport, _ = await _wire()
    # connection.close whose reply text runs past its frame.
    payload = struct.pack(">HHH", 10, 50, 200) + b"\xff"
    wire.data_received(struct.pack(">BHI", 1, 0, len(payload)) + payload + b"\xce")
    assert isinstance(wire.reason, WireProtocolError)


HEADER_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(width=32, allow_nan=False)  # pamqp writes every float as a single
    | st.text(max_size=20)
    | st.binary(max_size=10).map(bytearray)
    | st.datetimes(
        min_value=datetime(1970, 1, 2), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ).map(lambda d: d.replace(microsecond=0)),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=12), HEADER_VALUES, max_size=6))
async def test_headers_decode_as_pamqp_decodes_them(headers: dict[str, Any]) -> None:
    wire, _transport, deliveries = await _wire(frame_max=131072)
    properties = commands.Basic.Properties(headers=headers, message_id="m")
    wire.data_received(_delivery_bytes(b"{}", properties))
    (delivery,) = deliveries
    assert delivery.defect is None
    assert delivery.headers == field_table(encode_table(headers))[1]


def _mutated(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """``data`` with each (position, bytes removed, bytes inserted) edit applied."""
    for position, removed, inserted in edits:
        at = position % (len(data) + 1)
        data = data[:at] + inserted + data[at + removed :]
    return data


FRAME_STREAMS = st.one_of(
    st.binary(max_size=600),
    st.builds(
        _mutated,
        st.sampled_from(
            [
                _delivery_bytes(b"{}", FULL_PROPERTIES, tag=3)
                + _delivery_bytes(b"x" * 5000, commands.Basic.Properties(), tag=4),
                *(_raw_delivery(t, b"{}", tag=5, message_id=b"p") for t in POISON_HEADERS.values()),
                frame.marshal(commands.Basic.Ack(delivery_tag=1, multiple=True), 1)
                + frame.marshal(commands.Connection.Blocked(reason="low on memory"), 0),
            ]
        ),
        st.lists(
            st.tuples(
                st.integers(min_value=0, max_value=20_000),
                st.integers(min_value=0, max_value=4),
                st.binary(max_size=4),
            ),
            min_size=1,
            max_size=4,
        ),
    ),
)


@settings(max_examples=1500, deadline=None)
@given(FRAME_STREAMS, st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=8))
async def test_any_bytes_end_in_deliveries_defects_or_a_protocol_error(
    data: bytes, splits: list[int]
) -> None:
    wire, _transport, deliveries = await _wire(frame_max=131072, max_body_bytes=4000, confirms=True)
    offset = 0
    for size in splits * (len(data) // sum(splits) + 1):
        if offset >= len(data):
            break
        wire.data_received(data[offset : offset + size])  # never raises
        offset += size
    for delivery in deliveries:
        assert delivery.defect is None or delivery.defect.isprintable()
        assert isinstance(delivery.body, bytes)
    if wire.lost.is_set():
        # A protocol error, or a verdict of the broker's that the mutation happened to spell
        # (connection.close, channel.close, basic.cancel): never anything else.
        assert isinstance(wire.reason, WireProtocolError | WireRefused | WireClosed)
        if type(wire.reason) is WireClosed:
            assert str(wire.reason).startswith("the broker"), repr(wire.reason)


def test_a_short_string_over_255_bytes_is_an_invalid_request_not_a_bare_value_error() -> None:
    # SigningClient.create_key puts the caller's request_id in message_id/correlation_id.
    properties = Properties(message_id="r" * 256)
    with pytest.raises(InvalidRequest, match="at most 255 bytes"):
        properties.encode()


def test_a_lost_connection_is_a_retryable_zandd_error() -> None:
    closed = WireClosed("the broker closed the channel: 404 NOT_FOUND", 404)
    assert isinstance(closed, TransportClosed)
    assert isinstance(closed, BrokerUnavailable)
    assert isinstance(closed, ConnectionError)
    assert closed.retryable
    assert closed.reply_code == 404
    assert str(closed) == "the broker closed the channel: 404 NOT_FOUND"


def test_the_url_s_auth_and_cadata_options_are_aiormq_s_not_ignored() -> None:
    # Before: auth=external was ignored and the connection logged in as guest/guest.
    der = ssl.PEM_cert_to_DER_cert(_A_CA_PEM)
    url = "amqps://localhost/?auth=external&cadata=" + base64.b64encode(der).decode()
    endpoint = Endpoint.of(url.replace("+", "%2B"))
    assert endpoint.mechanism == "EXTERNAL"
    assert endpoint.cadata == der
    context = endpoint.ssl_context()
    assert context is not None
    assert context.cert_store_stats()["x509_ca"] == 1
    assert Endpoint.of("amqp://localhost/").mechanism == "PLAIN"
    with pytest.raises(ConfigurationError, match="auth must be plain or external"):
        Endpoint.of("amqp://localhost/?auth=kerberos")
    with pytest.raises(ConfigurationError, match="cadata must be base64"):
        Endpoint.of("amqps://localhost/?cadata=%21%21")


async def test_auth_external_logs_in_by_certificate_not_as_guest() -> None:
    start_oks: list[commands.Connection.StartOk] = []

    async def broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(8)  # the protocol header
        start = commands.Connection.Start(mechanisms="PLAIN EXTERNAL", locales="en_US")
        writer.write(frame.marshal(start, 0))
        raw = await reader.readuntil(b"\xce")
        _consumed, _channel, start_ok = frame.unmarshal(raw)
        assert isinstance(start_ok, commands.Connection.StartOk)
        start_oks.append(start_ok)
        writer.close()

    server = await asyncio.start_server(broker, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(BrokerUnavailable):
            await Wire.connect(
                f"amqp://127.0.0.1:{port}/?auth=external", connection_name="test", timeout_s=2
            )
    assert [(ok.mechanism, ok.response) for ok in start_oks] == [("EXTERNAL", "")]


async def test_a_blocked_connection_holds_its_writes_in_order_until_unblocked() -> None:
    wire, transport, _deliveries = await _wire()
    wire.data_received(frame.marshal(commands.Connection.Blocked(reason="low on memory"), 0))
    wire.publish(b"{}", Properties(correlation_id="r-1"), routing_key="amq.gen-caller")
    wire.ack(7)
    await asyncio.sleep(0.01)
    assert wire.blocked
    assert transport.written == b"", "nothing written while the broker blocks the connection"
    wire.data_received(frame.marshal(commands.Connection.Unblocked(), 0))
    await asyncio.sleep(0.01)
    kinds = [type(value).__name__ for _channel, value in transport.frames()]
    assert kinds == ["Publish", "ContentHeader", "ContentBody", "Ack"]
    assert not wire.lost.is_set()


async def test_watchers_hear_of_a_block_and_of_its_end_after_the_held_writes_are_due() -> None:
    wire, transport, _deliveries = await _wire()
    heard: list[tuple[str | None, bool]] = []
    wire.on_blocked(lambda reason: heard.append((reason, wire.blocked)))
    wire.data_received(frame.marshal(commands.Connection.Blocked(reason="low on memory"), 0))
    wire.data_received(frame.marshal(commands.Connection.Blocked(reason="low on memory"), 0))
    wire.publish(b"{}", Properties(correlation_id="r-1"), routing_key="amq.gen-caller")
    await asyncio.sleep(0.01)
    assert heard == [("low on memory", True)], "told once per block"
    wire.data_received(frame.marshal(commands.Connection.Unblocked(), 0))
    assert heard == [("low on memory", True), (None, False)]
    await asyncio.sleep(0.01)
    assert next(type(value).__name__ for _channel, value in transport.frames()) == "Publish"
    wire.data_received(frame.marshal(commands.Connection.Unblocked(), 0))
    assert len(heard) == 2, "an unblock without a block is not news"


async def test_a_connection_blocked_too_long_is_dropped_with_a_typed_retryable_error() -> None:
    wire, _transport, _deliveries = await _wire(blocked_timeout_s=0.05)
    wire._confirms = {}  # as after confirm.select
    confirmed = wire.publish(b"{}", Properties(), routing_key="sign", exchange="zandd")
    assert confirmed is not None
    wire.data_received(frame.marshal(commands.Connection.Blocked(reason="disk alarm"), 0))
    with pytest.raises(WireBlocked, match=r"blocked publishing for over 0\.05 s") as raised:
        await asyncio.wait_for(confirmed, 5)
    assert isinstance(raised.value, TransportClosed)
    assert raised.value.retryable
    assert wire.lost.is_set()
    assert isinstance(wire.reason, WireBlocked)
