"""A broker memory alarm against a real fleet, on a private RabbitMQ node (never the default).

The alarm is raised by setting the node's memory watermark absurdly low and cleared by setting
it back: the broker then blocks every connection that publishes. What must hold: a new call
fails at once with ``BrokerBlocked`` (not at its timeout), ``zandd health`` names the alarm,
signers sign nothing while it lasts, calls made with ``retry=True`` wait and are all answered
once it clears — the first within moments (printed: "blocked: ...").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from contracts.errors import BrokerBlocked
from contracts.models import SignReply
from contracts.transport_aiormq import AiormqTransport
from contracts.wire import Properties, Wire
from tests.support.fleet import RunningFleet
from tests.support.rabbit_cluster import Cluster, Node
from vault.audit import AuditQuery
from workers.operator.health import PROBE_ROUTING_KEY, Unhealthy, check_publishing

pytestmark = [pytest.mark.rabbitmq, pytest.mark.tpm, pytest.mark.cluster]

#: A memory watermark no node is under: the alarm goes off at once.
ALARM_WATERMARK = "0.0000001"
NORMAL_WATERMARK = "0.4"
HELD_CALLS = 20


@pytest.fixture(scope="module")
def amqp_url(rabbit_node: Cluster) -> str:
    """This module's fleet runs on a private node: an alarm there blocks nobody else."""
    return rabbit_node.add_vhost("zandd-blocked")


def _alarms(node: Node) -> str:
    return node.ctl("eval", "rabbit_alarm:get_alarms().")


def _raise_alarm(node: Node) -> None:
    node.ctl("set_vm_memory_high_watermark", ALARM_WATERMARK)
    deadline = time.monotonic() + 30
    while "memory" not in _alarms(node):
        assert time.monotonic() < deadline, "the memory alarm did not go off"
        time.sleep(0.1)


@contextmanager
def _memory_alarm(node: Node) -> Iterator[None]:
    _raise_alarm(node)
    try:
        yield
    finally:
        node.ctl("set_vm_memory_high_watermark", NORMAL_WATERMARK)


class _Watch:
    """A connection that published during the alarm, so the broker tells it when it ends."""

    def __init__(self) -> None:
        self.blocked = asyncio.Event()
        self.unblocked = asyncio.Event()
        self.blocked_at = 0.0
        self.unblocked_at = 0.0

    def __call__(self, reason: str | None) -> None:
        if reason is not None:
            self.blocked_at = time.perf_counter()
            self.blocked.set()
        else:
            self.unblocked_at = time.perf_counter()
            self.unblocked.set()


async def test_a_memory_alarm_fails_new_calls_fast_stops_signing_and_resumes_when_cleared(
    fleet: RunningFleet, rabbit_node: Cluster, report: Callable[[str], None]
) -> None:
    node = rabbit_node.nodes[0]
    client = await fleet.client(timeout_s=30)
    waiting = await fleet.client(timeout_s=60, retry=True)
    watch_wire = await Wire.connect(fleet.amqp_url, connection_name="test-watch")
    try:
        key = await client.create_key(label="blocked")
        before = await client.sign(key.key_id, b"before")
        assert await client.verify(key, before.signature, message=b"before")
        await asyncio.to_thread(_raise_alarm, node)
        try:
            watch = _Watch()
            watch_wire.on_blocked(watch)
            await watch_wire.confirm_select()
            watch_wire.publish(b"", Properties(), routing_key=PROBE_ROUTING_KEY)
            await asyncio.wait_for(watch.blocked.wait(), 30)

            # The first call after the alarm reveals it (RabbitMQ tells a connection once it
            # publishes): sent, not taken, failed at once; the next is not even sent.
            started = time.perf_counter()
            with pytest.raises(BrokerBlocked, match="may still deliver it") as first:
                await client.sign(key.key_id, b"during-1")
            first_s = time.perf_counter() - started
            assert "memory or disk alarm" in first.value.message
            assert first.value.retryable
            started = time.perf_counter()
            with pytest.raises(BrokerBlocked, match="sign was not sent"):
                await client.sign(key.key_id, b"during-2")
            second_s = time.perf_counter() - started

            with pytest.raises(Unhealthy, match="refusing new messages"):
                await check_publishing(fleet.amqp_url)

            signed_before = sum(fleet.served.values())
            (head,) = await fleet.store.read_audit(AuditQuery(latest=True, limit=1))
            calls = [
                asyncio.create_task(waiting.sign(key.key_id, f"held-{n}".encode()))
                for n in range(HELD_CALLS // 2)
            ]
            await asyncio.sleep(1.0)  # the second half is made once the client knows
            calls += [
                asyncio.create_task(waiting.sign(key.key_id, f"held-{n}".encode()))
                for n in range(HELD_CALLS // 2, HELD_CALLS)
            ]
            await asyncio.sleep(2.0)
            assert not any(call.done() for call in calls), "a call finished during the alarm"
            assert sum(fleet.served.values()) == signed_before, "a signer signed while blocked"
            (still,) = await fleet.store.read_audit(AuditQuery(latest=True, limit=1))
            assert still.seq == head.seq, "audit entries written while blocked"

            answered_at: list[float] = []
            for call in calls:
                call.add_done_callback(lambda _done: answered_at.append(time.perf_counter()))
            clear_started = time.perf_counter()
            await asyncio.to_thread(node.ctl, "set_vm_memory_high_watermark", NORMAL_WATERMARK)
            replies: list[SignReply] = await asyncio.wait_for(asyncio.gather(*calls), 60)
        finally:
            node.ctl("set_vm_memory_high_watermark", NORMAL_WATERMARK)
        await asyncio.wait_for(watch.unblocked.wait(), 30)
        for n, reply in enumerate(replies):
            assert await client.verify(key, reply.signature, message=f"held-{n}".encode())
        # After the alarm the fail-fast client works again.
        await client.sign(key.key_id, b"after")
        first_answer_s = min(answered_at) - watch.unblocked_at
        report(
            f"blocked: first call failed in {first_s * 1000:.0f} ms and the next in "
            f"{second_s * 1000:.0f} ms with BrokerBlocked (timeout 30 s); 0 signed in "
            f"{watch.unblocked_at - watch.blocked_at:.1f} s blocked; first answer {first_answer_s * 1000:.0f} ms after the broker unblocked "
            f"({(min(answered_at) - clear_started) * 1000:.0f} ms after the clear command "
            f"began); {len(replies)}/{HELD_CALLS} held calls answered"
        )
    finally:
        watch_wire.drop("test done")
        await waiting.close()
        await client.close()


async def test_the_aiormq_transport_says_when_the_broker_blocks_it(
    rabbit_node: Cluster, amqp_url: str
) -> None:
    transport = await AiormqTransport.connect(amqp_url, connection_name="test-aiormq")
    heard: list[str | None] = []
    changed = asyncio.Event()

    def watcher(reason: str | None) -> None:
        heard.append(reason)
        changed.set()

    transport.on_blocked(watcher)
    try:
        await transport.confirm_select()
        with _memory_alarm(rabbit_node.nodes[0]):
            transport.publish(b"", Properties(), routing_key=PROBE_ROUTING_KEY)
            await asyncio.wait_for(changed.wait(), 30)
            assert transport.blocked
            changed.clear()
        await asyncio.wait_for(changed.wait(), 30)
        assert not transport.blocked
        assert heard[0] is not None
        assert "memory" in heard[0]
        assert heard[1:] == [None]
    finally:
        await transport.close()
