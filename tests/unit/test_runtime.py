"""The consumer runtime's rules, on an in-memory transport: no broker, the frames in order.

Reply before ack; dead-lettering what nobody can be told about; abandoning in-flight requests
with their connection; waiting for a dependency, up to the caller's deadline; draining on
stop; the audit hook before any reply; the reply_to rule.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pydantic import BaseModel

from contracts.errors import InternalError, VaultUnavailable, ZanddError
from contracts.operations import Operation
from contracts.transport import Delivery
from tests.support.memory_transport import (
    REPLY_TO,
    MemoryBroker,
    running_runtime,
    sign_delivery,
)
from vault.audit import serving_alone
from workers.consumer.runtime import AuditHook, ConsumerRuntime, Handler, Probe, RequestContext


class _Signed(BaseModel):
    signature: str = "sig"


async def _signed(request: object, context: RequestContext) -> BaseModel:
    return _Signed()


@asynccontextmanager
async def _running(
    broker: MemoryBroker,
    handler: Handler = _signed,
    *,
    probe: Probe | None = None,
    audit: AuditHook | None = None,
) -> AsyncIterator[tuple[ConsumerRuntime, asyncio.Event, asyncio.Task[None]]]:
    async with running_runtime(
        broker, {Operation.SIGN: handler}, probe=probe, audit=audit
    ) as running:
        yield running


def _shape(broker: MemoryBroker, index: int = -1) -> list[tuple[str, object]]:
    """The frames the broker read on a connection: (kind, routing key or tag)."""
    return [
        (f.kind, f.routing_key if f.kind == "publish" else f.tag)
        for f in broker.connections[index].frames
    ]


async def test_the_reply_goes_out_before_the_ack() -> None:
    broker = MemoryBroker()
    async with _running(broker):
        broker.current.deliver(sign_delivery(1))
        await broker.until(lambda: broker.current.settled(1) is not None, "request 1 settled")
        assert _shape(broker) == [("publish", REPLY_TO), ("ack", 1)]
        reply = broker.current.frames[0]
        assert reply.properties is not None
        assert reply.properties.correlation_id == "req-1"


async def test_a_malformed_request_without_reply_to_is_dead_lettered() -> None:
    broker = MemoryBroker()
    async with _running(broker):
        broker.current.deliver(sign_delivery(1, b"{}", reply_to=None))
        await broker.until(lambda: broker.current.settled(1) is not None, "request 1 settled")
        assert _shape(broker) == [("reject", 1)]
        assert broker.current.frames[0].flag is False, "not requeued: dead-lettered"


async def test_a_lost_connection_abandons_in_flight_requests_unacked_and_reconnects() -> None:
    broker = MemoryBroker()
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def stuck(request: object, context: RequestContext) -> BaseModel:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        raise AssertionError("never reached")

    async with _running(broker, stuck) as (runtime, _stop, _task):
        first = broker.current
        first.deliver(sign_delivery(1))
        await asyncio.wait_for(started.wait(), 10)
        first.drop("the broker went away")
        await asyncio.wait_for(cancelled.wait(), 10)
        await broker.until(lambda: len(broker.connections) == 2, "reconnected")
        await asyncio.wait_for(runtime.ready.wait(), 10)
        assert first.frames == [], "neither acked nor rejected: the broker redelivers it"
        assert broker.current.consuming is not None


async def test_a_request_waits_for_its_dependency_and_is_then_served() -> None:
    broker = MemoryBroker()
    outage = {"handler": 1, "probe": 2}

    async def flaky(request: object, context: RequestContext) -> BaseModel:
        if outage["handler"]:
            outage["handler"] -= 1
            raise VaultUnavailable("SQLite vault failed: SQLITE_BUSY")
        return _Signed()

    async def probe() -> None:
        if outage["probe"]:
            outage["probe"] -= 1
            raise VaultUnavailable("still down")

    async with _running(broker, flaky, probe=probe):
        broker.current.deliver(sign_delivery(1))
        await broker.until(lambda: broker.current.settled(1) is not None, "request 1 settled")
        assert _shape(broker) == [("publish", REPLY_TO), ("ack", 1)]
        assert broker.current.frames[0].properties is not None
        assert broker.current.frames[0].properties.type != "error", "served, not refused"
        assert outage == {"handler": 0, "probe": 0}
        await broker.until(lambda: broker.current.consuming is not None, "consuming again")


async def test_a_request_waits_for_its_dependency_only_until_its_deadline() -> None:
    broker = MemoryBroker()

    async def down(request: object, context: RequestContext) -> BaseModel:
        raise VaultUnavailable("SQLite vault failed: SQLITE_BUSY")

    async def probe() -> None:
        raise VaultUnavailable("still down")

    async with _running(broker, down, probe=probe):
        deadline_ms = int((time.time() + 0.3) * 1000)
        broker.current.deliver(sign_delivery(1, headers={"x-deadline-ms": deadline_ms}))
        await broker.until(lambda: broker.current.settled(1) is not None, "request 1 settled")
        assert _shape(broker) == [("publish", REPLY_TO), ("ack", 1)]
        error = json.loads(broker.current.frames[0].body)
        assert error["code"] == "deadline_exceeded"
        assert "waiting for the vault" in error["message"]
        assert broker.current.consuming is None, "paused while the vault is down"


async def test_stopping_drains_in_flight_requests_then_closes() -> None:
    broker = MemoryBroker()
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(request: object, context: RequestContext) -> BaseModel:
        started.set()
        await release.wait()
        return _Signed()

    async with _running(broker, slow) as (_runtime, stop, task):
        broker.current.deliver(sign_delivery(1))
        await asyncio.wait_for(started.wait(), 10)
        stop.set()
        await broker.until(lambda: broker.current.consuming is None, "no new requests")
        await asyncio.sleep(0.05)
        assert not task.done(), "waits for the request in flight"
        assert broker.current.frames == []
        release.set()
        await asyncio.wait_for(task, 10)
        assert _shape(broker) == [("publish", REPLY_TO), ("ack", 1)]
        assert broker.current.closed


class _Audit:
    """Records what the runtime had written when each entry was audited; may refuse some."""

    def __init__(self, broker: MemoryBroker, fail_refusals: bool = False) -> None:
        self.broker = broker
        self.fail_refusals = fail_refusals
        self.written_before: list[list[str]] = []

    async def __call__(
        self, message: Delivery, request: BaseModel | None, result: BaseModel | ZanddError
    ) -> None:
        self.written_before.append(list(self.broker.current.calls))
        if self.fail_refusals and isinstance(result, ZanddError):
            raise InternalError("the audit entry could not be stored")


async def test_the_audit_entry_is_written_before_the_reply() -> None:
    broker = MemoryBroker()
    audit = _Audit(broker)
    async with _running(broker, audit=audit):
        broker.current.deliver(sign_delivery(1))
        await broker.until(lambda: broker.current.settled(1) is not None, "request 1 settled")
        assert audit.written_before == [[]]
        assert broker.current.calls == ["publish", "ack"]


async def test_the_audit_is_told_when_its_request_is_the_only_one_served() -> None:
    """issue 19: a lone request's entry may skip the thread handoff, a busy worker's never."""
    broker = MemoryBroker()
    alone: list[tuple[str | None, bool]] = []
    both_in = asyncio.Event()
    started: list[object] = []

    async def audit(
        message: Delivery, request: BaseModel | None, result: BaseModel | ZanddError
    ) -> None:
        alone.append((message.message_id, serving_alone.get()))

    async def handler(request: object, context: RequestContext) -> BaseModel:
        started.append(request)
        if context.request_id != "req-1":
            if len(started) == 3:
                both_in.set()
            await both_in.wait()
        return _Signed()

    async with _running(broker, handler, audit=audit):
        broker.current.deliver(sign_delivery(1))
        await broker.until(lambda: broker.current.settled(1) is not None, "request 1 settled")
        broker.current.deliver(sign_delivery(2))
        broker.current.deliver(sign_delivery(3))
        await broker.until(lambda: broker.current.settled(3) is not None, "request 3 settled")
        broker.current.deliver(sign_delivery(4, b"{}"))  # a refusal, alone again
        await broker.until(lambda: broker.current.settled(4) is not None, "request 4 settled")
    assert alone[0] == ("req-1", True)
    assert sorted(alone[1:3]) == [("req-2", False), ("req-3", False)]
    assert alone[3] == ("req-4", True)
    assert serving_alone.get() is False, "set only while the audit runs"


async def test_a_refusal_whose_audit_fails_is_dead_lettered_unanswered() -> None:
    broker = MemoryBroker()
    audit = _Audit(broker, fail_refusals=True)
    async with _running(broker, audit=audit):
        broker.current.deliver(sign_delivery(1, b"{}"))
        await broker.until(lambda: broker.current.settled(1) is not None, "request 1 settled")
        assert audit.written_before == [[]]
        assert _shape(broker) == [("reject", 1)], "never answered unaudited"


async def test_a_reply_to_the_producer_cannot_read_is_rejected_unanswered() -> None:
    broker = MemoryBroker()
    called: list[object] = []

    async def handler(request: object, context: RequestContext) -> BaseModel:
        called.append(request)
        return _Signed()

    async with _running(broker, handler):
        broker.current.deliver(sign_delivery(1, reply_to="zandd.reply.svc-b.r1"))
        await broker.until(lambda: broker.current.settled(1) is not None, "request 1 settled")
        assert _shape(broker) == [("reject", 1)]
        assert called == []
