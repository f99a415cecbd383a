"""The fleet on a 3-node RabbitMQ cluster: crash and hang a node under load, lose nothing.

A private cluster (``tests/support/rabbit_cluster.py``: its own nodes and ports, never the
machine's default node; ``net_ticktime`` 10 s, ``autoheal``) carries a fleet of worker
processes (one keygen worker, two signers) and a client, all given one URL naming the three
nodes. Under 64 calls in flight, a node is killed (SIGKILL, then started again) or hung
(SIGSTOP for longer than the net tick time, then SIGCONT): first the ``zandd.sign`` leader,
then a node the signers are connected to. Every call must be answered, within the client's
default timeout, and every signature must verify. Each case prints one line of figures: the
longest call, the longest stretch without an answer, and what the client resent.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio

from contracts.client import DEFAULT_TIMEOUT_S, SigningClient
from contracts.crypto import load_public_key, verify_signature
from contracts.errors import ZanddError
from contracts.topology import KEYGEN_QUEUE, SIGN_QUEUE
from tests.support.processes import ProcessFleet
from tests.support.rabbit_cluster import Cluster, Node
from vault.kek import KekRing

pytestmark = [
    pytest.mark.rabbitmq,
    pytest.mark.tpm,
    pytest.mark.faults,
    pytest.mark.cluster,
    # One event loop for the module: the worker processes outlive each test.
    pytest.mark.asyncio(loop_scope="module"),
]

VHOST = "zandd-cluster"
IN_FLIGHT = 64
CALLS = 1500
#: Longer than the nodes' net_ticktime (10 s): the others declare the hung node down.
HANG_S = 15.0
#: The name a signer's request connection gives the broker (``build_runtime``).
SIGNER_CONNECTION = "zandd-sign"


@dataclass
class Timeline:
    """When each answer came, and what failed, for one load run."""

    sent: int
    answered: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    answer_times: list[float] = field(default_factory=list)
    longest_call_s: float = 0.0
    signatures: dict[int, bytes] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return self.sent - self.answered - sum(self.errors.values())

    def longest_gap_s(self) -> float:
        times = sorted(self.answer_times)
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


async def sign_load(
    client: SigningClient, key_id: str, count: int, started: asyncio.Event
) -> Timeline:
    """``count`` sign calls, ``IN_FLIGHT`` at a time, each with the client's default timeout."""
    timeline = Timeline(sent=count)
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def one(index: int) -> None:
        async with slots:
            begun = time.monotonic()
            try:
                reply = await client.sign(key_id, f"cluster {index}".encode())
            except ZanddError as exc:
                timeline.errors[exc.code.value] += 1
                return
            now = time.monotonic()
            timeline.longest_call_s = max(timeline.longest_call_s, now - begun)
            timeline.answer_times.append(now)
            timeline.signatures[index] = reply.signature
            timeline.answered += 1
            if timeline.answered >= 200:
                started.set()

    await asyncio.gather(*(one(i) for i in range(count)))
    return timeline


@pytest.fixture(scope="module")
def cluster_url(rabbit_cluster: Cluster) -> str:
    return rabbit_cluster.add_vhost(VHOST)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster_fleet(
    rabbit_cluster: Cluster,
    cluster_url: str,
    swtpm_tcti: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[ProcessFleet]:
    data_dir = tmp_path_factory.mktemp("cluster-fleet")
    KekRing.create(data_dir / "kek-ring.json")
    fleet = ProcessFleet(cluster_url, data_dir, swtpm_tcti)
    try:
        await fleet.start("keygen-1")
        await _until(lambda: _consumers(rabbit_cluster, KEYGEN_QUEUE) >= 1, "keygen consumer")
        await fleet.start("signer-1")
        await fleet.start("signer-2")
        await _until(lambda: _consumers(rabbit_cluster, SIGN_QUEUE) == 2, "two signers")
        yield fleet
    finally:
        await fleet.stop_all()


@pytest_asyncio.fixture(loop_scope="module")
async def healthy(rabbit_cluster: Cluster, cluster_fleet: ProcessFleet) -> ProcessFleet:
    """The fleet with all three nodes up and both signers consuming (after an earlier case)."""
    for node in rabbit_cluster.nodes:
        if node.paused:
            node.resume()
        if node.process is None or node.process.poll() is not None:
            await asyncio.to_thread(node.start)
    await asyncio.to_thread(rabbit_cluster.ctl, "await_online_nodes", "3", "--timeout", "120")
    for node in rabbit_cluster.nodes:
        await asyncio.to_thread(node.wait_started)
    await _until(lambda: _consumers(rabbit_cluster, SIGN_QUEUE) == 2, "two signers")
    assert cluster_fleet.alive() == ["keygen-1", "signer-1", "signer-2"]
    return cluster_fleet


def _consumers(cluster: Cluster, queue: str) -> int:
    listing = cluster.ctl("list_consumers", "-p", VHOST, "queue_name")
    return sum(line.strip() == queue for line in listing.splitlines())


def _signer_nodes(cluster: Cluster) -> Counter[str]:
    """How many signers' request connections each node holds (by the node's AMQP port)."""
    rows = json.loads(
        cluster.ctl(
            "list_connections", "-p", VHOST, "port", "client_properties", "--formatter", "json"
        )
    )
    by_port = {node.port: node.name for node in cluster.nodes}
    return Counter(by_port[row["port"]] for row in rows if _named(row, SIGNER_CONNECTION))


def _named(row: dict[str, Any], name: str) -> bool:
    """Whether a ``list_connections`` row's client gave ``connection_name`` ``name``."""
    properties = row.get("client_properties") or []
    return any(key == "connection_name" and value == name for key, _type, value in properties)


async def _until(check: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
    """Poll ``check`` (the broker offers no event for a consumer count) until true."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:g} s for {what}")
        await asyncio.sleep(0.5)


def _target(cluster: Cluster, which: str) -> Node:
    leader = cluster.leader_of(SIGN_QUEUE, VHOST)
    if which == "leader":
        return leader
    holding = _signer_nodes(cluster)
    assert holding, "no signer connection found"
    # A node the signers use, the leader only if they use nothing else: the two cases differ.
    others = [name for name in holding if name != leader.name]
    return cluster.node_named(max(others or holding, key=holding.__getitem__))


@pytest.mark.parametrize("fault", ["kill", "hang"])
@pytest.mark.parametrize("which", ["leader", "workers"])
async def test_a_node_fails_under_load_and_every_call_is_answered_in_time(
    rabbit_cluster: Cluster,
    healthy: ProcessFleet,
    cluster_url: str,
    which: str,
    fault: str,
    report: Callable[[str], None],
) -> None:
    async with await SigningClient.connect(cluster_url, retry=True) as client:
        key = await client.create_key()
        target = await asyncio.to_thread(_target, rabbit_cluster, which)
        started = asyncio.Event()
        load = asyncio.create_task(sign_load(client, key.key_id, CALLS, started))
        await started.wait()
        failed_at = time.monotonic()
        if fault == "kill":
            await asyncio.to_thread(target.kill)
            await asyncio.sleep(5)
            await asyncio.to_thread(target.start)
        else:
            await asyncio.to_thread(target.pause)
            await asyncio.sleep(HANG_S)
            await asyncio.to_thread(target.resume)
        timeline = await load
        recovered_s = time.monotonic() - failed_at
        resent, duplicates = client.resent_requests, client.unmatched_replies
    report(
        f"cluster: {which}-{fault} node={target.name.partition('@')[0][-2:]} sent={timeline.sent} "
        f"answered={timeline.answered} lost={timeline.lost} errors={dict(timeline.errors)} "
        f"longest_call_s={timeline.longest_call_s:.1f} gap_s={timeline.longest_gap_s():.2f} "
        f"resent={resent} duplicates={duplicates} run_s={recovered_s:.0f}"
    )
    assert (timeline.answered, timeline.lost, dict(timeline.errors)) == (CALLS, 0, {})
    assert timeline.longest_call_s < DEFAULT_TIMEOUT_S
    public = load_public_key(key.public_key_pem)
    assert all(
        verify_signature(public, signature, message=f"cluster {i}".encode())
        for i, signature in timeline.signatures.items()
    )
    assert healthy.alive() == ["keygen-1", "signer-1", "signer-2"]
