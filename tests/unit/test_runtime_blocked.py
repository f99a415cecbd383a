"""The consumer runtime under a broker's back-pressure (a memory or disk alarm), in memory.

While the transport says the broker blocks it, no new request starts: a delivery is held
unstarted, a request that has not reached its handler waits; the replies of requests already
past that point wait with the transport. When the alarm clears they are all served, the
deadline check first. The metrics show the block.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pydantic import BaseModel

from contracts.amqp import DEADLINE_HEADER
from contracts.operations import ERROR_REPLY_TYPE, Operation
from tests.support.memory_transport import (
    REPLY_TO,
    MemoryBroker,
    running_runtime,
    sign_delivery,
)
from workers.consumer.runtime import ConsumerRuntime, Handler, RequestContext
from workers.observability.metrics import Metrics


class _Signed(BaseModel):
    signature: str = "sig"


class _Signer:
    """A handler that counts what it signed (and can be made to wait)."""

    def __init__(self) -> None:
        self.signed: list[str | None] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def __call__(self, request: object, context: RequestContext) -> BaseModel:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        self.signed.append(context.request_id)
        return _Signed()


@asynccontextmanager
async def _running(
    broker: MemoryBroker, handler: Handler, metrics: Metrics
) -> AsyncIterator[tuple[ConsumerRuntime, asyncio.Event, asyncio.Task[None]]]:
    async with running_runtime(broker, {Operation.SIGN: handler}, metrics=metrics) as running:
        yield running


def _shape(broker: MemoryBroker) -> list[tuple[str, object]]:
    return [
        (f.kind, f.routing_key if f.kind == "publish" else f.tag) for f in broker.current.frames
    ]


def _sample(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    assert value is not None, f"no sample {name}"
    return value


async def _turns(count: int = 20) -> None:
    """Let the event loop run what is ready (a request would have started by then)."""
    for _ in range(count):
        await asyncio.sleep(0)


async def test_a_delivery_while_blocked_is_held_unstarted_and_served_when_unblocked() -> None:
    broker, signer, metrics = MemoryBroker(), _Signer(), Metrics()
    async with _running(broker, signer, metrics):
        broker.current.block()
        assert _sample(metrics, "zandd_broker_blocked") == 1
        broker.current.deliver(sign_delivery(1))
        await _turns()
        assert signer.signed == [], "started while the broker blocks the connection"
        assert broker.current.frames == []
        broker.current.unblock()
        await broker.until(lambda: broker.current.settled(1) is not None, "request 1 settled")
        assert signer.signed == ["req-1"]
        assert _shape(broker) == [("publish", REPLY_TO), ("ack", 1)]
        assert _sample(metrics, "zandd_broker_blocked") == 0
        assert _sample(metrics, "zandd_broker_blocks_total") == 1
        assert _sample(metrics, "zandd_broker_blocked_seconds_total") > 0


async def test_a_request_not_yet_at_its_handler_waits_while_blocked() -> None:
    broker, signer, metrics = MemoryBroker(), _Signer(), Metrics()
    async with _running(broker, signer, metrics):
        # Delivered, then blocked in the same turn: its task exists but has not run yet.
        broker.current.deliver(sign_delivery(1))
        broker.current.block()
        await _turns()
        assert not signer.entered.is_set(), "the handler ran while blocked"
        broker.current.unblock()
        await broker.until(lambda: broker.current.settled(1) is not None, "request 1 settled")
        assert signer.signed == ["req-1"]


async def test_replies_of_requests_already_running_wait_with_the_transport() -> None:
    broker, signer, metrics = MemoryBroker(), _Signer(), Metrics()
    signer.gate = asyncio.Event()
    async with _running(broker, signer, metrics):
        broker.current.deliver(sign_delivery(1))
        await asyncio.wait_for(signer.entered.wait(), 10)
        broker.current.block()
        signer.gate.set()  # it finishes while blocked: its reply and ack are held, in order
        await broker.until(lambda: broker.current.held == 2, "reply and ack queued")
        assert broker.current.frames == [], "written to a socket the broker does not read"
        broker.current.unblock()
        await broker.until(lambda: broker.current.settled(1) is not None, "request 1 settled")
        assert _shape(broker) == [("publish", REPLY_TO), ("ack", 1)]


async def test_a_held_request_whose_deadline_passed_is_answered_not_signed() -> None:
    broker, signer, metrics = MemoryBroker(), _Signer(), Metrics()
    async with _running(broker, signer, metrics):
        broker.current.block()
        deadline_ms = int(time.time() * 1000) + 5
        broker.current.deliver(sign_delivery(1, headers={DEADLINE_HEADER: deadline_ms}))
        # The alarm outlasts the caller's deadline.
        await asyncio.sleep(max(0.0, (deadline_ms + 1) / 1000 - time.time()) + 0.005)
        assert time.time() * 1000 > deadline_ms
        broker.current.unblock()
        await broker.until(lambda: broker.current.settled(1) is not None, "request 1 settled")
        assert signer.signed == []
        reply = broker.current.frames[0]
        assert reply.properties is not None
        assert reply.properties.type == ERROR_REPLY_TYPE
        assert json.loads(reply.body)["code"] == "deadline_exceeded"


async def test_a_waiting_request_whose_deadline_passes_while_blocked_is_refused() -> None:
    broker, signer, metrics = MemoryBroker(), _Signer(), Metrics()
    async with _running(broker, signer, metrics):
        deadline_ms = int(time.time() * 1000) + 50
        broker.current.deliver(sign_delivery(1, headers={DEADLINE_HEADER: deadline_ms}))
        broker.current.block()
        # The refusal is settled while still blocked: held with the transport, not signed.
        await broker.until(lambda: broker.current.held == 2, "refusal and ack queued")
        assert signer.signed == []
        broker.current.unblock()
        await broker.until(lambda: broker.current.settled(1) is not None, "request 1 settled")
        reply = json.loads(broker.current.frames[0].body)
        assert reply["code"] == "deadline_exceeded"
        assert "blocked" in reply["message"]


async def test_stopping_while_blocked_leaves_held_requests_to_the_queue() -> None:
    broker, signer, metrics = MemoryBroker(), _Signer(), Metrics()
    async with _running(broker, signer, metrics) as (_runtime, stop, task):
        first = broker.current
        first.block()
        first.deliver(sign_delivery(1))
        stop.set()
        await asyncio.wait_for(task, 10)
        assert signer.signed == []
        assert first.frames == [], "neither acked nor rejected: the broker redelivers it"
        assert first.closed
        assert _sample(metrics, "zandd_broker_blocked") == 0


async def test_a_connection_lost_while_blocked_ends_the_block_and_reconnects_unblocked() -> None:
    broker, signer, metrics = MemoryBroker(), _Signer(), Metrics()
    async with _running(broker, signer, metrics) as (runtime, _stop, _task):
        first = broker.current
        first.block()
        first.deliver(sign_delivery(1))
        first.drop("blocked for too long")  # as the lean connection does after its bound
        await broker.until(lambda: len(broker.connections) == 2, "reconnected")
        await asyncio.wait_for(runtime.ready.wait(), 10)
        assert _sample(metrics, "zandd_broker_blocked") == 0
        assert signer.signed == []
        assert first.frames == []
        broker.current.deliver(sign_delivery(1))  # the broker's redelivery
        await broker.until(lambda: broker.current.settled(1) is not None, "request 1 settled")
        assert signer.signed == ["req-1"]
