"""Sign shards (``ZANDD_SIGN_SHARDS``): routing over N quorum queues, and changing N live.

On private RabbitMQ nodes with the consistent-hash exchange plugin (marker ``cluster``); the
machine's default node, which lacks the plugin, shows the configuration error.
"""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import AsyncExitStack

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

from contracts.errors import ConfigurationError
from contracts.operations import SIGN_OPERATIONS
from contracts.topology import (
    EXCHANGE,
    SIGN_QUEUE,
    declare_topology,
    existing_shards,
    sign_shard,
)
from tests.support.fleet import RunningFleet
from tests.support.rabbit_cluster import Cluster
from workers.bench.measure import Timing
from workers.bench.progress import Progress
from workers.bench.shards import measure_route, plugin_missing


async def test_without_the_plugin_more_than_one_shard_says_which_plugin(
    empty_amqp_url: str,
) -> None:
    """The machine's default node has no consistent-hash exchange: say what to enable."""
    connection = await aio_pika.connect(empty_amqp_url)
    async with connection:
        with pytest.raises(ConfigurationError) as caught:
            await declare_topology(await connection.channel(), sign_shards=3)
    assert "rabbitmq-plugins enable rabbitmq_consistent_hash_exchange" in caught.value.message


async def test_without_the_plugin_one_shard_is_todays_topology(empty_amqp_url: str) -> None:
    connection = await aio_pika.connect(empty_amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare_topology(channel, sign_shards=1)
        assert topology.sign_queues == (SIGN_QUEUE,)
        await channel.default_exchange.publish(aio_pika.Message(b"{}"), routing_key="x")
        exchange = await channel.get_exchange(EXCHANGE)
        await exchange.publish(aio_pika.Message(b"{}", message_id="m"), "sign", mandatory=True)
        declared = await channel.declare_queue(SIGN_QUEUE, passive=True)
        assert declared.declaration_result.message_count == 1


# -- on private nodes --------------------------------------------------------------------------


@pytest.fixture
def node_vhost(rabbit_node: Cluster) -> Iterator[str]:
    """A fresh vhost on the private node; its URL."""
    vhost = f"shards-{uuid.uuid4().hex[:8]}"
    rabbit_node.add_vhost(vhost)
    try:
        yield rabbit_node.nodes[0].url(vhost)
    finally:
        rabbit_node.ctl("delete_vhost", vhost)


async def _declare(url: str, sign_shards: int | None) -> tuple[str, ...]:
    connection = await aio_pika.connect(url)
    async with connection:
        topology = await declare_topology(await connection.channel(), sign_shards=sign_shards)
        return topology.sign_queues


async def _drain_all(channel: AbstractChannel) -> Counter[str]:
    """Every message now in a sign queue: message id -> how many copies, by queue too."""
    seen: Counter[str] = Counter()
    for name in (SIGN_QUEUE, *await existing_shards(channel)):
        queue = await channel.declare_queue(name, passive=True)
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            assert message.message_id is not None
            seen[message.message_id] += 1
    return seen


async def _queue_counts(channel: AbstractChannel) -> dict[str, int]:
    counts = {}
    for name in (SIGN_QUEUE, *await existing_shards(channel)):
        declared = await channel.declare_queue(name, passive=True)
        counts[name] = declared.declaration_result.message_count or 0
    return counts


@pytest.mark.cluster
async def test_three_shards_each_get_a_share_and_one_is_todays_route(node_vhost: str) -> None:
    assert await _declare(node_vhost, 3) == (SIGN_QUEUE, *(sign_shard(i) for i in range(3)))
    connection = await aio_pika.connect(node_vhost)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(EXCHANGE)
        for n in range(600):
            key = SIGN_OPERATIONS[n % len(SIGN_OPERATIONS)].value
            await exchange.publish(aio_pika.Message(b"{}", message_id=f"m{n}"), key, mandatory=True)
        counts = await _queue_counts(channel)
        assert counts[SIGN_QUEUE] == 0
        assert sum(counts.values()) == 600
        # Hashing 600 ids over three equal weights: each far from empty (expected 200).
        assert all(counts[sign_shard(i)] > 100 for i in range(3)), counts
        assert sorted(await _drain_all(channel)) == sorted(f"m{n}" for n in range(600))

        # Back to 1: today's route again; the (empty) shards stay, consumed while they exist.
        assert await _declare(node_vhost, 1) == (SIGN_QUEUE, *(sign_shard(i) for i in range(3)))
        await exchange.publish(aio_pika.Message(b"{}", message_id="after"), "sign", mandatory=True)
        assert (await _queue_counts(channel))[SIGN_QUEUE] == 1


@pytest.mark.cluster
async def test_changing_shards_under_load_loses_and_duplicates_nothing(node_vhost: str) -> None:
    """Publish with confirms while declarers move the route 1 -> 3 -> 1 -> 2 -> 3, two of them
    at once each time (a rolling change): every confirmed request sits in one queue, once."""
    await _declare(node_vhost, 1)
    published: list[str] = []
    returned: list[str] = []
    done = asyncio.Event()

    async def publish() -> None:
        connection = await aio_pika.connect(node_vhost)
        async with connection:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=False)
            channel.return_callbacks.add(
                lambda _ch, message: returned.append(str(message.message_id))
            )
            exchange = await channel.get_exchange(EXCHANGE)
            n = 0
            while not done.is_set() or n < 500:
                batch = [f"r{n + i}" for i in range(20)]
                await asyncio.gather(
                    *(
                        exchange.publish(
                            aio_pika.Message(b"{}", message_id=mid),
                            SIGN_OPERATIONS[i % len(SIGN_OPERATIONS)].value,
                            mandatory=True,
                        )
                        for i, mid in enumerate(batch)
                    )
                )
                published.extend(batch)
                n += len(batch)

    publisher = asyncio.create_task(publish())
    for shards, rival in ((3, 1), (1, 3), (2, 1), (3, 2), (1, None)):
        await asyncio.sleep(0.05)
        await asyncio.gather(_declare(node_vhost, shards), _declare(node_vhost, rival))
    done.set()
    await publisher
    connection = await aio_pika.connect(node_vhost)
    async with connection:
        seen = await _drain_all(await connection.channel())
    assert returned == []
    assert [mid for mid, copies in seen.items() if copies > 1] == []
    assert sorted(seen) == sorted(published)
    assert len(published) >= 500


@pytest.mark.cluster
async def test_the_bench_route_pair_runs_where_the_plugin_is_and_cleans_up(
    node_vhost: str, rabbit_node: Cluster
) -> None:
    assert await plugin_missing(node_vhost) is None
    timing = Timing(duration_s=0.5, warmup_s=0.1)
    one, sharded = await measure_route(node_vhost, timing, Progress(io.StringIO()))
    assert one.operations > 0
    assert sharded.operations > 0
    vhost = node_vhost.rsplit("/", 1)[1]
    queues = rabbit_node.ctl("list_queues", "-p", vhost, "name", "--no-table-headers").split()
    assert [name for name in queues if name.startswith("zandd-bench")] == []


# -- a sharded fleet on a 3-node cluster --------------------------------------------------------


@pytest.fixture(scope="module")
def amqp_url(rabbit_cluster: Cluster) -> Iterator[str]:
    """The fleet fixture's broker: a vhost of the private cluster, reached through its first
    node, with three sign shards declared one per node (as ``zandd topology`` does with a URL
    naming every node)."""
    vhost = f"fleet-{uuid.uuid4().hex[:8]}"
    rabbit_cluster.add_vhost(vhost)
    urls = [node.url(vhost) for node in rabbit_cluster.nodes]
    asyncio.run(_declare_placed(urls, 3))
    try:
        yield urls[0]
    finally:
        rabbit_cluster.ctl("delete_vhost", vhost)


async def _declare_placed(urls: list[str], sign_shards: int) -> None:
    async with AsyncExitStack() as stack:

        async def place(index: int) -> AbstractChannel:
            node = await stack.enter_async_context(await aio_pika.connect(urls[index % len(urls)]))
            return await node.channel()

        connection = await stack.enter_async_context(await aio_pika.connect(urls[0]))
        await declare_topology(await connection.channel(), sign_shards=sign_shards, place=place)


def _commit_index(cluster: Cluster, queue: str, vhost: str) -> int:
    rows = json.loads(
        cluster.nodes[0].queues_tool("quorum_status", queue, "-p", vhost, "--formatter", "json")
    )
    return max(int(row["Commit Index"]) for row in rows if row["Raft State"] == "leader")


@pytest.mark.cluster
@pytest.mark.signers(2)
@pytest.mark.fleet_settings(sign_shards=3)
async def test_a_fleet_on_three_shards_answers_every_request(
    fleet: RunningFleet, rabbit_cluster: Cluster, amqp_url: str
) -> None:
    vhost = amqp_url.rsplit("/", 1)[1]
    shards = [sign_shard(i) for i in range(3)]
    leaders = {shard: rabbit_cluster.leader_of(shard, vhost).name for shard in shards}
    assert len(set(leaders.values())) == 3, leaders
    before = {shard: _commit_index(rabbit_cluster, shard, vhost) for shard in shards}

    requests = 300
    # retry: on a cluster a new consumer can reach the queue leader a moment after the fleet
    # is up, and a client that sees none yet fails fast (NoConsumer) without it.
    async with await fleet.client(retry=True) as client:
        key = await client.create_key(label="shards")
        messages = [f"shard message {n}".encode() for n in range(requests)]
        replies = await asyncio.gather(*(client.sign(key.key_id, m) for m in messages))
        for message, reply in zip(messages, replies, strict=True):
            assert await client.verify(key, reply.signature, message=message)

    # Each request is an enqueue and a settle in its shard's Raft log: each shard's log grew
    # by far more than its consumers' registrations alone would add.
    grown = {s: _commit_index(rabbit_cluster, s, vhost) - before[s] for s in shards}
    assert all(g > requests // 6 for g in grown.values()), grown
    served = sum(count for name, count in fleet.served.items() if name.startswith("signer"))
    assert served == requests
