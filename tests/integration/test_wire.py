"""The runtime's lean AMQP connection against the real broker, with aio-pika on the other end."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from yarl import URL

from contracts.errors import BrokerUnavailable, ConfigurationError
from contracts.wire import Delivery, Properties, Wire
from tests.support.broker import BASE_AMQP_URL

pytestmark = pytest.mark.rabbitmq

QUEUE = "wire.requests"
REPLIES = "wire.replies"


@pytest.fixture
async def peer(empty_amqp_url: str) -> AsyncIterator[AbstractChannel]:
    """An aio-pika channel on the same vhost, with a quorum work queue and a reply queue."""
    connection: AbstractRobustConnection = await aio_pika.connect_robust(empty_amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
        await channel.declare_queue(REPLIES, durable=False)
        yield channel


async def _wire(url: str, deliveries: list[Delivery], prefetch: int = 100) -> Wire:
    wire = await Wire.connect(url, connection_name="test-wire", heartbeat_s=1)
    await wire.qos(prefetch)
    await wire.consume(QUEUE, deliveries.append)
    return wire


async def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - deliveries arrive by callback, not event
            await asyncio.sleep(0.01)


async def test_requests_in_replies_out_acks_settle(
    empty_amqp_url: str, peer: AbstractChannel
) -> None:
    large = bytes(range(256)) * 1200  # above the negotiated frame size: several body frames
    for n in range(10):
        await peer.default_exchange.publish(
            aio_pika.Message(
                large if n == 0 else f"request {n}".encode(),
                message_id=f"m{n}",
                correlation_id=f"c{n}",
                reply_to=REPLIES,
                type="sign",
                content_type="application/json",
                headers={"x-deadline-ms": 1_790_000_000_000, "traceparent": "00-a-b-01"},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=QUEUE,
        )
    deliveries: list[Delivery] = []
    wire = await _wire(empty_amqp_url, deliveries)
    await _until(lambda: len(deliveries) == 10)
    assert deliveries[0].body == large
    assert [d.message_id for d in deliveries] == [f"m{n}" for n in range(10)]
    first = deliveries[1]
    assert (first.correlation_id, first.reply_to, first.type) == ("c1", REPLIES, "sign")
    assert first.headers == {"x-deadline-ms": 1_790_000_000_000, "traceparent": "00-a-b-01"}
    assert first.user_id is None
    assert first.redelivered is False

    for delivery in deliveries:
        reply = Properties(
            content_type="application/json",
            correlation_id=delivery.correlation_id,
            type="sign.reply",
        )
        wire.publish(delivery.body, reply, routing_key=REPLIES)
    wire.ack(deliveries[8].delivery_tag, multiple=True)  # the first nine with one frame
    wire.reject(deliveries[9].delivery_tag, requeue=False)  # no dead-letter queue: dropped
    await wire.close()

    replies = await peer.get_queue(REPLIES)
    received = []
    for _ in range(10):
        message = await replies.get(timeout=5)
        assert message is not None
        received.append(message)
        await message.ack()
    assert received[0].body == large
    assert [m.correlation_id for m in received] == [f"c{n}" for n in range(10)]
    assert {(m.type, m.content_type, m.delivery_mode) for m in received} == {
        ("sign.reply", "application/json", aio_pika.DeliveryMode.NOT_PERSISTENT)
    }
    # Everything was settled: nothing is redelivered to the next consumer.
    assert await _remaining(peer) == []


async def test_unacked_deliveries_return_when_the_connection_closes(
    empty_amqp_url: str, peer: AbstractChannel
) -> None:
    for _ in range(5):
        await peer.default_exchange.publish(aio_pika.Message(b"x"), routing_key=QUEUE)
    deliveries: list[Delivery] = []
    wire = await _wire(empty_amqp_url, deliveries, prefetch=2)
    await _until(lambda: len(deliveries) == 2)
    await asyncio.sleep(0.2)
    assert len(deliveries) == 2  # per-consumer prefetch holds the rest back
    await wire.close()
    # The two unacked are back (redelivered), ahead of the three never delivered.
    assert await _remaining(peer) == [True, True, False, False, False]


async def _remaining(peer: AbstractChannel) -> list[bool]:
    """Drain the work queue: the redelivered flag of each message still in it."""
    queue = await peer.declare_queue(QUEUE, passive=True)
    flags = []
    while (message := await queue.get(fail=False, timeout=5)) is not None:
        flags.append(message.redelivered)
        await message.ack()
    return flags


async def test_the_broker_ending_the_consumer_or_channel_is_reported(
    empty_amqp_url: str, peer: AbstractChannel
) -> None:
    deliveries: list[Delivery] = []
    wire = await _wire(empty_amqp_url, deliveries)
    await peer.queue_delete(QUEUE)
    await asyncio.wait_for(wire.lost.wait(), 10)
    assert "cancelled the consumer" in str(wire.reason)

    await peer.declare_queue(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    wire = await _wire(empty_amqp_url, deliveries)
    wire.ack(424242)  # a tag never delivered: the broker closes the channel
    await asyncio.wait_for(wire.lost.wait(), 10)
    assert "406" in str(wire.reason)
    with pytest.raises(ConnectionError):
        await wire.consume(QUEUE, deliveries.append)


async def test_heartbeats_keep_an_idle_connection_open(empty_amqp_url: str) -> None:
    wire = await Wire.connect(empty_amqp_url, connection_name="test-wire", heartbeat_s=1)
    await asyncio.sleep(3.5)  # more than two heartbeat intervals, with no other traffic
    assert not wire.lost.is_set(), wire.reason
    await wire.close()
    assert wire.lost.is_set()


async def test_wrong_credentials_and_no_broker_are_told_apart(empty_amqp_url: str) -> None:
    wrong = str(URL(empty_amqp_url).with_password("not-the-password"))
    with pytest.raises(ConfigurationError, match="refused our credentials") as refused:
        await Wire.connect(wrong, connection_name="test-wire")
    assert "not-the-password" not in str(refused.value)
    nobody = str(URL(empty_amqp_url).with_port(1))
    with pytest.raises(BrokerUnavailable, match="cannot reach the broker"):
        await Wire.connect(nobody, connection_name="test-wire", timeout_s=2)


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost that is its own CA, and its key (PEM files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "broker.pem", directory / "broker.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@asynccontextmanager
async def _tls_in_front_of_the_broker(cert_file: Path, key_file: Path) -> AsyncIterator[int]:
    """A TLS listener on a free port that relays to the local broker; yields its port.

    Every relayed connection is closed, and every relay task ended, before it returns.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    broker = URL(BASE_AMQP_URL)
    writers: list[asyncio.StreamWriter] = []
    relays: list[asyncio.Task[Any]] = []

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with suppress(ConnectionError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        sink.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        up_reader, up_writer = await asyncio.open_connection(broker.host, broker.port or 5672)
        writers.append(up_writer)
        both = asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        relays.append(both)
        await both

    server = await asyncio.start_server(relay, "127.0.0.1", 0, ssl=context)
    try:
        async with server:
            yield server.sockets[0].getsockname()[1]
    finally:
        for task in relays:
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)
        for writer in writers:
            writer.close()
            with suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()


async def test_amqps_with_the_url_s_tls_options(empty_amqp_url: str, tmp_path: Path) -> None:
    cert_file, key_file = _self_signed(tmp_path)
    async with _tls_in_front_of_the_broker(cert_file, key_file) as port:
        over_tls = URL(empty_amqp_url).with_scheme("amqps").with_host("localhost").with_port(port)
        # Not signed by a CA this machine trusts: refused, as it should be.
        with pytest.raises(BrokerUnavailable, match="SSLCertVerificationError"):
            await Wire.connect(str(over_tls), connection_name="test-wire", timeout_s=5)
        # Trusted through ?cafile= (aiormq's option, so the same URL works with aio-pika).
        trusted = over_tls.with_query({"cafile": str(cert_file)})
        wire = await Wire.connect(str(trusted), connection_name="test-wire", timeout_s=5)
        assert (await wire.declare_queue("wire.tls", exclusive=True)).name == "wire.tls"
        assert (await wire.declare_queue("", exclusive=True)).name.startswith("amq.gen-")
        await wire.confirm_select()
        confirmed = wire.publish(b"over tls", Properties(), routing_key="wire.tls")
        assert confirmed is not None
        assert await confirmed is True
        received: list[Delivery] = []
        await wire.consume("wire.tls", received.append, no_ack=True)
        await _until(lambda: len(received) == 1)
        assert received[0].body == b"over tls"
        await wire.close()
