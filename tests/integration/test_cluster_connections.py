"""The fleet and the client on a private 3-node RabbitMQ cluster, reached through one URL.

The workers and the client are given the cluster's multi-host URL
(``amqp://guest:…@127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3/vhost``) and each connects to one
node that answers. A producer on any node is answered by direct reply-to, and a client whose
node hangs reconnects to another one and gets its answer within its timeout.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator

import aio_pika
import pytest

from contracts.amqp import connect_plain
from contracts.client import SigningClient
from contracts.operations import Operation
from contracts.replyto import DIRECT_REPLY_TO, direct_reply_node
from contracts.topology import EXCHANGE
from contracts.wire import Wire
from tests.support.fleet import RunningFleet
from tests.support.rabbit_cluster import Cluster, Node

pytestmark = [pytest.mark.cluster, pytest.mark.rabbitmq, pytest.mark.tpm]

#: Longest a node is kept hung (SIGSTOP): below the cluster's partition detection budget.
MAX_PAUSE_S = 18.0


@pytest.fixture(scope="module")
def amqp_url(rabbit_cluster: Cluster) -> Iterator[str]:
    """The module's vhost on the private cluster, as one URL naming all three nodes
    (the ``fleet`` fixture's workers run on it)."""
    vhost = f"zandd-cluster-{uuid.uuid4().hex[:8]}"
    yield rabbit_cluster.add_vhost(vhost)
    rabbit_cluster.ctl("delete_vhost", vhost)


def _vhost_of(url: str) -> str:
    return url.rpartition("/")[2] or "/"


async def _ask_by_direct_reply_to(node_url: str, key_id: str) -> tuple[str, str]:
    """``key.public`` from a producer connected to one node, answered by direct reply-to:
    (the node segment its broker minted, the reply's type)."""
    connection = await aio_pika.connect(node_url)
    async with connection:
        channel = await connection.channel()
        replies: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        reply_queue = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        await reply_queue.consume(replies.put, no_ack=True)
        correlation_id = uuid.uuid4().hex
        exchange = await channel.get_exchange(EXCHANGE, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                json.dumps({"key_id": key_id}).encode(),
                content_type="application/json",
                reply_to=DIRECT_REPLY_TO,
                correlation_id=correlation_id,
                message_id=correlation_id,
                type=Operation.KEY_PUBLIC.value,
                user_id="guest",
            ),
            routing_key=Operation.KEY_PUBLIC.value,
        )
        reply = await asyncio.wait_for(replies.get(), 30)
        assert reply.correlation_id == correlation_id
        # The name this node minted for the producer, as the worker saw it: learn it the way
        # the worker does, from a message of our own returned with it.
        minted = await _minted_reply_to(channel)
        return minted, reply.type or ""


async def _minted_reply_to(channel: aio_pika.abc.AbstractChannel) -> str:
    returned: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def on_return(_channel: object, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        if not returned.done():
            returned.set_result(direct_reply_node(message.reply_to or "") or "")

    channel.return_callbacks.add(on_return)
    await channel.default_exchange.publish(
        aio_pika.Message(b"", reply_to=DIRECT_REPLY_TO),
        routing_key=f"zandd.no-such-queue.{uuid.uuid4().hex}",
        mandatory=True,
    )
    return await asyncio.wait_for(returned, 10)


async def test_a_producer_on_any_node_is_answered_by_direct_reply_to(
    fleet: RunningFleet, rabbit_cluster: Cluster
) -> None:
    async with await fleet.client() as client:
        key = await client.create_key(label="cluster")
    vhost = _vhost_of(fleet.amqp_url)
    minted: dict[str, str] = {}
    for node in rabbit_cluster.nodes:
        segment, reply_type = await _ask_by_direct_reply_to(node.url(vhost), key.key_id)
        assert reply_type == f"{Operation.KEY_PUBLIC.value}.reply", node.name
        minted[node.name] = segment
    # Three nodes, three segments: at least two producers sat on another node than a given
    # signer, and every signer accepts all three.
    assert len(set(minted.values())) == 3
    for name, runtime in fleet.runtimes.items():
        assert set(minted.values()) <= runtime._reply_nodes, name


def _node_of(client: SigningClient, cluster: Cluster) -> Node:
    wire = client._wire
    assert isinstance(wire, Wire)  # a URL client's connection is the lean one
    port = wire._endpoint.port
    return next(node for node in cluster.nodes if node.port == port)


@pytest.mark.signers(2)
async def test_a_client_whose_node_hangs_reconnects_to_another_and_is_answered_in_time(
    fleet: RunningFleet, rabbit_cluster: Cluster
) -> None:
    timeout_s = 30.0
    async with await fleet.client(retry=True, timeout_s=timeout_s) as client:
        key = await client.create_key(label="hang")
        await client.sign(key.key_id, b"before")
        hung = _node_of(client, rabbit_cluster)
        loop = asyncio.get_running_loop()
        hung.pause()
        resume = loop.call_later(MAX_PAUSE_S, hung.resume)
        started = time.monotonic()
        try:
            reply = await client.sign(key.key_id, b"while a node hangs")
            took_s = time.monotonic() - started
            assert await client.verify(key, reply.signature, message=b"while a node hangs")
            now_on = _node_of(client, rabbit_cluster)
        finally:
            resume.cancel()
            hung.resume()
        assert now_on is not hung
        print(
            f"\nnode hang: {hung.name} paused; the call was answered after {took_s:.1f} s "
            f"(timeout {timeout_s:g} s) through {now_on.name}, "
            f"{client.resent_requests} resent, {client.unmatched_replies} late replies dropped"
        )


async def test_a_url_naming_a_dead_host_besides_the_nodes_connects_to_a_node(
    rabbit_cluster: Cluster,
) -> None:
    url = rabbit_cluster.url().replace("@", "@127.0.0.1:1,", 1)  # port 1: nobody listens
    for _ in range(4):  # shuffled: the dead host comes first in some of these
        connection = await connect_plain(url, connection_name="zandd-test", timeout_s=10)
        await connection.close()
