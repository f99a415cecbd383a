"""Non-retryable is non-retryable: an oversized request fails alone, at once, and is sent once.

Two limits stand between a producer and the fleet. The fleet's own (``contracts/limits.py``):
the client checks them before it publishes, so a body a worker would refuse unread never
crosses the broker. And the broker's ``max_message_size``, the backstop for producers that do
not use our client: the broker closes the channel over a larger body, which on the lean
connection ends every call on it. Before, the client called that a retryable
``BrokerUnavailable`` and with ``retry=True`` resent the oversized request until its timeout,
failing (or resending) every other call on the connection each time.

The broker test runs a real fleet on a private RabbitMQ node whose ``max_message_size`` is
64 KiB (``tests/support/rabbit_cluster.py``; the machine's default node is never
reconfigured).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest

from contracts.client import SigningClient
from contracts.errors import BrokerRejected, InvalidRequest
from contracts.limits import Limits
from contracts.topology import SIGN_QUEUE
from tests.support.fleet import RunningFleet
from tests.support.rabbit_cluster import Cluster, available, start_cluster

BROKER_MAX_MESSAGE_BYTES = 65536
#: What RabbitMQ logs (and closes the channel with) for each body over its limit.
BROKER_REFUSAL = "is larger than configured max size"


async def queued(amqp_url: str, queue: str) -> int:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0


@pytest.mark.rabbitmq
async def test_a_body_over_the_fleet_limit_is_refused_before_it_is_sent(
    empty_amqp_url: str,
) -> None:
    async with await SigningClient.connect(empty_amqp_url, declare=True) as client:
        # Each message is within the 1 MiB message limit; together they are over the 2 MiB
        # body limit that a worker checks before it reads a byte.
        with pytest.raises(InvalidRequest) as refused:
            await client.sign_batch("zk-1", [b"\0" * 1024 * 1024] * 3, timeout_s=5)
        assert not refused.value.retryable
        message = refused.value.message
        assert "sign.batch was not sent" in message
        assert "over the limit of 2097152" in message
        assert "digest" in message
        body_bytes = int(message.split("its body is ")[1].split(" bytes")[0])
        assert body_bytes > 3 * 1024 * 1024
        # A single message over the message limit names its fix too.
        with pytest.raises(InvalidRequest, match=r"'message' is larger .*digest="):
            await client.sign("zk-1", b"\0" * (1024 * 1024 + 1), timeout_s=5)
        # The fleet's limits, raised by an operator, are the client's to follow.
    raised = Limits(max_body_bytes=8 * 1024 * 1024)
    async with await SigningClient.connect(empty_amqp_url, limits=raised) as client:
        with pytest.raises(InvalidRequest, match="over the limit of 8388608"):
            await client.sign_batch("zk-1", [b"\0" * 1024 * 1024] * 7, timeout_s=5)
    assert await queued(empty_amqp_url, SIGN_QUEUE) == 0  # nothing reached the broker


# -- the broker's own limit, on a private node ---------------------------------------------


@pytest.fixture(scope="module")
def small_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A private RabbitMQ node that refuses messages over 64 KiB."""
    reason = available()
    if reason is not None:
        pytest.skip(reason)
    cluster = start_cluster(
        1,
        root=tmp_path_factory.mktemp("small-broker"),
        config=[f"max_message_size = {BROKER_MAX_MESSAGE_BYTES}"],
    )
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def amqp_url(small_broker: Cluster) -> str:
    """The fleet fixture's broker: the small node (overrides the default node's vhost)."""
    return small_broker.add_vhost("oversized")


def broker_refusals(node_root: Path) -> int:
    """How many publishes the node refused for their size, from its own log."""
    return sum(
        log.read_text(errors="replace").count(BROKER_REFUSAL)
        for log in (node_root / "log").glob("*.log")
    )


@pytest.mark.cluster
@pytest.mark.tpm
@pytest.mark.signers(1)
async def test_a_body_over_the_brokers_limit_fails_alone_and_is_sent_once(
    fleet: RunningFleet, small_broker: Cluster
) -> None:
    node_root = small_broker.nodes[0].root
    refusals_before = broker_refusals(node_root)
    async with await fleet.client(retry=True) as client:
        key = await client.create_key(label="oversized")
        innocents = [
            asyncio.create_task(client.sign(key.key_id, f"innocent {n}".encode(), timeout_s=20))
            for n in range(60)
        ]
        await asyncio.sleep(0)  # the innocents' publishes go out first, on the same channel
        # Within the fleet's limits (100 items of 1 KiB, ~137 kB as JSON), over the broker's.
        culprit = client.sign_batch(key.key_id, [b"\1" * 1024] * 100, timeout_s=20)
        with pytest.raises(BrokerRejected) as rejected:
            await culprit
        assert not rejected.value.retryable
        assert rejected.value.reply_code == 406
        assert "over the broker's max_message_size of 65536" in rejected.value.message
        assert "digest" in rejected.value.message
        replies = await asyncio.gather(*innocents)
        assert len(replies) == 60
        assert all(reply.key_id == key.key_id for reply in replies)
        # Innocents on the refused channel are resent, each once at most.
        assert client.resent_requests <= 60
        # A second oversized body is refused before it is sent: the client learned the limit.
        with pytest.raises(BrokerRejected, match="was not sent"):
            await client.sign_batch(key.key_id, [b"\2" * 1024] * 100, timeout_s=20)
        assert (await client.sign(key.key_id, b"after")).key_id == key.key_id
    # The broker saw the oversized request once: one refusal in its log, not one per resend.
    for _ in range(50):
        if broker_refusals(node_root) > refusals_before:
            break
        await asyncio.sleep(0.1)
    assert broker_refusals(node_root) - refusals_before == 1
