"""The lean AMQP connection's codec, checked against pamqp (aiormq's codec) as the reference.

Frames go in through ``data_received`` and come out of a recording transport, so what is
checked is the bytes: deliveries encoded by pamqp are read back field for field, however the
socket splits them, and what the connection writes is decoded by pamqp.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from pamqp import commands, frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from contracts.errors import BrokerUnavailable, ConfigurationError
from contracts.wire import (
    Delivery,
    Endpoint,
    Properties,
    Wire,
    WireClosed,
    WireProtocolError,
    WireRefused,
)

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


async def _wire(*, frame_max: int = FRAME_MAX) -> tuple[Wire, _Transport, list[Delivery]]:
    wire = Wire(Endpoint.of("amqp://u:p@localhost/v"), connection_name="test", heartbeat_s=0)
    transport = _Transport()
    wire.connection_made(transport)  # type: ignore[arg-type]
    # As after the handshake: nothing awaits connection.start; tune settled the frame size.
    wire._started.cancel()
    wire._waiter = None
    wire._frame_max = frame_max
    transport.written.clear()
    deliveries: list[Delivery] = []
    wire._on_delivery = deliveries.append
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
    wire, _transport, _ = await _wire()
    wire._confirms = {}  # as after confirm.select
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
    wire, transport, _ = await _wire()
    wire._heartbeat_s = 1
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
