"""``SigningClient`` over an aio-pika connection or channel the caller holds, against a real
fleet: it signs, fails typed, survives the connection's reconnect, and leaves the caller's
connection and channel open when it closes."""

from __future__ import annotations

import asyncio
import time

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from yarl import URL

from contracts.client import SigningClient
from contracts.errors import KeyNotFound, NotDelivered
from contracts.transport_aiopika import AioPikaSource
from contracts.wire import WireChannelClosed
from tests.support.broker import close_connections_in
from tests.support.fleet import RunningFleet
from tests.support.principals import ALICE

pytestmark = pytest.mark.rabbitmq


async def _ignore(message: AbstractIncomingMessage) -> None:
    del message


def _verifies(public_key_pem: str, signature: bytes, message: bytes) -> bool:
    public = load_pem_public_key(public_key_pem.encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    return True


@pytest.mark.tpm
async def test_a_client_over_the_callers_connection_signs_and_leaves_it_open(
    fleet: RunningFleet,
) -> None:
    connection = await aio_pika.connect_robust(fleet.amqp_url)
    async with connection:
        client = await SigningClient.connect(connection)
        assert client.principal == (URL(fleet.amqp_url).user or "guest")
        key = await client.create_key(label="own-connection")
        replies = await asyncio.gather(
            *(client.sign(key.key_id, f"m{n}".encode()) for n in range(20))
        )
        for n, reply in enumerate(replies):
            assert _verifies(key.public_key_pem, reply.signature, f"m{n}".encode())
        with pytest.raises(KeyNotFound):
            await client.sign("zk-does-not-exist", b"m")
        await client.close()
        # The caller's connection is still theirs, open and usable.
        assert not connection.is_closed
        channel = await connection.channel()
        await channel.declare_queue("", exclusive=True)
        await channel.close()


@pytest.mark.tpm
async def test_a_client_over_the_callers_channel_leaves_it_open(fleet: RunningFleet) -> None:
    connection = await aio_pika.connect_robust(fleet.amqp_url)
    async with connection:
        channel = await connection.channel()
        async with await SigningClient.connect(channel) as client:
            key = await client.create_key()
            reply = await client.sign(key.key_id, b"over your channel")
            assert _verifies(key.public_key_pem, reply.signature, b"over your channel")
        assert not channel.is_closed
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        await queue.delete()


@pytest.mark.tpm
async def test_the_client_comes_back_after_the_callers_connection_reconnects(
    fleet: RunningFleet, users: dict[str, str]
) -> None:
    # A producer with a producer's rights only: its own user, so only its connection is cut.
    connection = await aio_pika.connect_robust(users[ALICE], reconnect_interval=0.5)
    async with connection:
        client = await SigningClient.connect(connection, retry=True)
        assert client.principal == ALICE
        async with client:
            key = await client.create_key()
            vhost = URL(fleet.amqp_url).path.removeprefix("/")
            assert await close_connections_in(vhost, user=ALICE) == 1
            reply = await client.sign(key.key_id, b"after the reconnect", timeout_s=60)
            assert _verifies(key.public_key_pem, reply.signature, b"after the reconnect")


@pytest.mark.parametrize("on_return_raises", [False, True])
async def test_unroutable_over_the_callers_channel_fails_at_once(
    empty_amqp_url: str, on_return_raises: bool
) -> None:
    connection = await aio_pika.connect(empty_amqp_url)
    async with connection:
        channel = await connection.channel(on_return_raises=on_return_raises)
        # The exchange exists (declared here) but no queue is bound: the broker returns it.
        async with await SigningClient.connect(channel, declare=False) as client:
            await channel.declare_exchange("zandd", aio_pika.ExchangeType.DIRECT, durable=True)
            started = time.monotonic()
            with pytest.raises(NotDelivered, match="is the ZANDD fleet running"):
                await client.sign("zk-1", b"m", timeout_s=30)
            assert time.monotonic() - started < 10


async def test_a_passive_look_never_closes_the_callers_channel(empty_amqp_url: str) -> None:
    connection = await aio_pika.connect(empty_amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("", exclusive=True)
        await queue.consume(_ignore, no_ack=True)
        wire = await AioPikaSource(channel).open(connection_name="test", timeout_s=5)
        looked = await wire.declare_queue(queue.name, passive=True)
        assert (looked.name, looked.consumer_count) == (queue.name, 1)
        # A missing queue: the broker closes the channel it was asked on — not the caller's.
        with pytest.raises(WireChannelClosed) as closed:
            await wire.declare_queue("zandd.sign", passive=True)
        assert closed.value.reply_code == 404
        assert wire.lost.is_set()
        assert not channel.is_closed
        await channel.declare_queue("", exclusive=True)


async def test_the_principal_is_the_user_of_the_callers_connection(
    users: dict[str, str],
) -> None:
    # RabbitMQ closes the channel of a publish whose user_id is not the connection's user:
    # the client must name the right one, for a connection and for a channel alike.
    connection = await aio_pika.connect(users[ALICE])
    async with connection:
        channel = await connection.channel()
        assert AioPikaSource(connection).principal == ALICE
        assert AioPikaSource(channel).principal == ALICE
        assert AioPikaSource(channel, principal="other").principal == "other"
