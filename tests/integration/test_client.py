"""The RPC client helper against a real broker with no fleet behind it: failures come fast,
typed, and a lost connection comes back."""

from __future__ import annotations

import asyncio
import time

import aio_pika
import pytest
from yarl import URL

from contracts.client import SigningClient
from contracts.errors import (
    BrokerUnavailable,
    ConfigurationError,
    NoConsumer,
    NotDelivered,
    RequestTimeout,
)
from contracts.topology import SIGN_QUEUE
from tests.support.broker import close_connections_in

pytestmark = pytest.mark.rabbitmq


async def test_unroutable_request_fails_at_once(empty_amqp_url: str) -> None:
    async with await SigningClient.connect(empty_amqp_url) as client:
        started = time.monotonic()
        with pytest.raises(NotDelivered, match="is the ZANDD fleet running"):
            await client.sign("zk-1", b"m", timeout_s=30)
        assert time.monotonic() - started < 10  # the 30 s timeout was never waited for


async def test_no_worker_means_no_consumer_or_a_timeout_and_the_request_expires(
    empty_amqp_url: str,
) -> None:
    async with await SigningClient.connect(empty_amqp_url, declare=True) as client:
        # Seen without a signer at connect: not sent (issue 17).
        with pytest.raises(
            NoConsumer, match=r"no signer is consuming zandd\.sign, so sign was not"
        ):
            await client.sign("zk-1", b"m", timeout_s=0.5)
        # Sent before the client knew (as when the fleet stops after connect): it times out
        # before the 1 s watch, its timeout says why, and the queue drops it by itself.
        client._consumers.clear()
        with pytest.raises(
            RequestTimeout, match=r"no reply to sign within 0\.5 s.*no signer is consuming"
        ):
            await client.sign("zk-1", b"m", timeout_s=0.5)
    # The request carried the timeout as its expiration: the queue drops it by itself.
    connection = await aio_pika.connect(empty_amqp_url)
    async with connection:
        channel = await connection.channel()
        for _ in range(100):
            queue = await channel.declare_queue(SIGN_QUEUE, passive=True)
            if queue.declaration_result.message_count == 0:
                break
            await asyncio.sleep(0.1)
        assert queue.declaration_result.message_count == 0


async def test_unreachable_broker_is_one_clear_error() -> None:
    with pytest.raises(
        BrokerUnavailable, match=r"cannot reach the broker at amqp://guest:\*\*\*@127.0.0.1:1/"
    ):
        await SigningClient.connect("amqp://guest:hunter2@127.0.0.1:1/", connect_timeout_s=3)


async def test_wrong_credentials_are_a_configuration_error(empty_amqp_url: str) -> None:
    url = empty_amqp_url.replace("guest:guest@", "guest:wrong-password@")
    with pytest.raises(ConfigurationError, match="refused our credentials") as info:
        await SigningClient.connect(url, connect_timeout_s=5)
    assert "wrong-password" not in str(info.value)


async def test_closing_the_client_fails_waiting_calls(empty_amqp_url: str) -> None:
    client = await SigningClient.connect(empty_amqp_url, declare=True)
    client._consumers.clear()  # sent although no signer consumes: it waits for its reply
    call = asyncio.create_task(client.sign("zk-1", b"m", timeout_s=30))
    await asyncio.sleep(0.2)
    await client.close()
    with pytest.raises(BrokerUnavailable):
        await call


async def test_a_lost_connection_fails_calls_in_flight_and_comes_back(
    empty_amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Closing the connection (rabbitmqctl) may take longer than the no-consumer watch.
    monkeypatch.setattr("contracts.client._CONSUMER_WATCH_AFTER_S", 60.0)
    vhost = URL(empty_amqp_url).path.lstrip("/")
    async with await SigningClient.connect(empty_amqp_url, declare=True) as client:
        # The reply queue is server-named (a reply_to the fleet serves); a reconnect gets a new
        # one from the broker, which is harmless: the calls in flight on the old one fail.
        first_reply_queue = client._reply_queue
        assert first_reply_queue.startswith("amq.gen-")
        client._consumers.clear()  # sent although no signer consumes (see above): it waits
        call = asyncio.create_task(client.sign("zk-1", b"m", timeout_s=30))
        await asyncio.sleep(0.2)
        assert await close_connections_in(vhost) == 1
        with pytest.raises(BrokerUnavailable, match="connection closed"):
            await call
        # Reconnected in the background: a call is confirmed by the broker again, and with no
        # worker behind the queue it runs into its timeout instead of failing to send.
        async with asyncio.timeout(15):
            while True:
                client._consumers.clear()
                try:
                    await client.sign("zk-1", b"m", timeout_s=0.3)
                except RequestTimeout:
                    break
                except BrokerUnavailable:
                    await asyncio.sleep(0.1)
        assert client._reply_queue.startswith("amq.gen-")
        assert client._reply_queue != first_reply_queue
