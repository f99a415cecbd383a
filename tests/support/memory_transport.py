"""An in-memory ``contracts.transport.Transport``: the consumer runtime without a broker.

It keeps what a test needs to see: the frames the runtime wrote, in the order the broker
would read them (queued writes go out together at the end of the event loop's turn, the
before-flush callbacks' frames — the coalesced acks — first queued after the turn's replies,
as on the lean connection), and whether the runtime consumes. ``block``/``unblock`` play a
broker's resource alarm: writes are held, in order, until it clears (as on the lean connection).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from contracts.errors import TransportClosed
from contracts.limits import Limits
from contracts.operations import Operation
from contracts.transport import Delivery, DeliveryCallback, Properties, Transport
from workers.consumer.runtime import ConsumerRuntime, Handler, WorkQueue


@dataclass(frozen=True, slots=True)
class Frame:
    """One write: ``publish`` (to ``routing_key``), ``ack`` or ``reject`` (of ``tag``)."""

    kind: str
    tag: int = 0
    flag: bool = False
    routing_key: str = ""
    body: bytes = b""
    properties: Properties | None = None


class MemoryTransport:
    """One connection of a ``MemoryBroker``."""

    def __init__(self, changed: asyncio.Event) -> None:
        #: Set on every write the broker reads and every change of consumer or connection.
        self.changed = changed
        self._lost = asyncio.Event()
        self._reason: TransportClosed | None = None
        self.frames: list[Frame] = []
        #: Every write as the runtime made it (``frames`` has them as the broker reads them).
        self.calls: list[str] = []
        self.prefetch: int | None = None
        self.consuming: str | None = None
        self.closed = False
        self._on_delivery: DeliveryCallback | None = None
        self._out: list[Frame] = []
        self._before_flush: list[Callable[[], None]] = []
        self._flush_scheduled = False
        self._tags = itertools.count(1)
        self._blocked = False
        self._blocked_watchers: list[Callable[[str | None], None]] = []

    @property
    def lost(self) -> asyncio.Event:
        """Set when the connection is gone."""
        return self._lost

    @property
    def reason(self) -> TransportClosed | None:
        """Why it is gone."""
        return self._reason

    @property
    def blocked(self) -> bool:
        """Whether the test has blocked this connection (``block``)."""
        return self._blocked

    def on_blocked(self, callback: Callable[[str | None], None]) -> None:
        self._blocked_watchers.append(callback)

    # -- what the test does -----------------------------------------------------------------

    def deliver(self, delivery: Delivery) -> None:
        """The broker hands the consumer a message."""
        assert self._on_delivery is not None, "nobody consumes"
        assert self.consuming, "the consumer was cancelled"
        self._on_delivery(delivery)

    def block(self, reason: str = "low on memory") -> None:
        """The broker blocks this connection: writes are held until ``unblock``."""
        self._blocked = True
        for watcher in list(self._blocked_watchers):
            watcher(reason)
        self.changed.set()

    def unblock(self) -> None:
        """The alarm clears: the held writes go out (in order), then the watchers hear of it."""
        self._blocked = False
        self._schedule_flush()
        for watcher in list(self._blocked_watchers):
            watcher(None)
        self.changed.set()

    @property
    def held(self) -> int:
        """Writes queued but not yet read by the broker (held while blocked)."""
        return len(self._out)

    def settled(self, tag: int) -> Frame | None:
        """The ack (possibly ``multiple``) or reject that settled ``tag``, if any."""
        for written in self.frames:
            if written.kind == "reject" and written.tag == tag:
                return written
            if written.kind == "ack" and (
                written.tag == tag or (written.flag and written.tag > tag)
            ):
                return written
        return None

    # -- the Transport ------------------------------------------------------------------

    async def qos(self, prefetch_count: int) -> None:
        self._check_open()
        self.prefetch = prefetch_count

    async def consume(self, queue: str, on_delivery: DeliveryCallback) -> str:
        self._check_open()
        self._on_delivery = on_delivery
        self.consuming = f"ctag-{next(self._tags)}"
        self.changed.set()
        return self.consuming

    async def cancel(self, consumer_tag: str) -> None:
        self._check_open()
        assert consumer_tag == self.consuming
        self.consuming = None
        self.changed.set()

    def publish(
        self,
        body: bytes,
        properties: Properties,
        *,
        routing_key: str,
        exchange: str = "",
        mandatory: bool = False,
    ) -> asyncio.Future[bool] | None:
        self._queue(Frame("publish", routing_key=routing_key, body=body, properties=properties))
        return None

    def ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        self._queue(Frame("ack", delivery_tag, multiple))

    def reject(self, delivery_tag: int, *, requeue: bool) -> None:
        self._queue(Frame("reject", delivery_tag, requeue))

    def before_flush(self, callback: Callable[[], None]) -> None:
        self._before_flush.append(callback)
        self._schedule_flush()

    def drop(self, reason: str) -> None:
        if self._lost.is_set():
            return
        self._reason = TransportClosed(reason)
        self._out.clear()
        self.consuming = None
        self._lost.set()
        self.changed.set()

    async def close(self) -> None:
        if not self._lost.is_set():
            self._flush()
        self.closed = True
        self.drop("closed by the worker")

    # -- internals --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._lost.is_set():
            raise TransportClosed("the connection is gone")

    def _queue(self, written: Frame) -> None:
        self._check_open()
        self.calls.append(written.kind)
        self._out.append(written)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._before_flush:
            self._before_flush.pop(0)()
        if self._blocked and not self._lost.is_set():
            self.changed.set()
            return  # held, in order, until unblocked
        if not self._lost.is_set():
            self.frames.extend(self._out)
        self._out.clear()
        self.changed.set()


@dataclass
class MemoryBroker:
    """Hands out ``MemoryTransport``s: the runtime's ``connect``; ``queue`` its resolution."""

    queue: str = "zandd.sign"
    connections: list[MemoryTransport] = field(default_factory=list)
    #: Set whenever any of its connections changes (or a new one is made).
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def connect(self) -> Transport:
        transport = MemoryTransport(self.changed)
        self.connections.append(transport)
        self.changed.set()
        return transport

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        """Wait until ``condition()`` holds (re-checked on every change), at most 10 s."""
        # A generous bound: it only keeps a broken runtime from hanging the test.
        async with asyncio.timeout(10):
            while not condition():
                self.changed.clear()
                await self.changed.wait()
        assert condition(), what

    async def resolve_queue(self) -> WorkQueue:
        return WorkQueue(self.queue, direct_reply_nodes=frozenset())

    @property
    def current(self) -> MemoryTransport:
        """The latest connection."""
        return self.connections[-1]


@asynccontextmanager
async def running_runtime(
    broker: MemoryBroker, handlers: Mapping[Operation, Handler], **options: Any
) -> AsyncIterator[tuple[ConsumerRuntime, asyncio.Event, asyncio.Task[None]]]:
    """A ``ConsumerRuntime`` on ``broker`` serving ``handlers``, running until the block ends.

    Yields the runtime, the event that stops it and its task; ``options`` go to the runtime
    (``probe``, ``audit``, ``metrics``…) over test defaults (prefetch 8, fast backoff).
    """
    settings: dict[str, Any] = {
        "prefetch": 8,
        "limits": Limits(),
        "drain_timeout_s": 5.0,
        "name": "test",
        "max_backoff_s": 0.01,
        **options,
    }
    runtime = ConsumerRuntime(
        queue=broker.queue,
        handlers=handlers,
        connect=broker.connect,
        resolve_queue=broker.resolve_queue,
        **settings,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop))
    await asyncio.wait_for(runtime.ready.wait(), 10)
    try:
        yield runtime, stop, task
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


#: A producer's reply queue the reply_to rule accepts (principal ``svc-a``).
REPLY_TO = "zandd.reply.svc-a.r1"
#: A valid ``sign`` body (a digest of 32 bytes).
SIGN_BODY = b'{"key_id":"k","digest":"' + b"A" * 43 + b'="}'


def sign_delivery(
    tag: int,
    body: bytes = SIGN_BODY,
    *,
    reply_to: str | None = REPLY_TO,
    headers: dict[str, Any] | None = None,
) -> Delivery:
    """A ``sign`` request from ``svc-a`` as the broker would deliver it (message id ``req-N``)."""
    return Delivery(
        body=body,
        delivery_tag=tag,
        exchange="zandd",
        routing_key="sign",
        redelivered=False,
        headers=headers or {},
        message_id=f"req-{tag}",
        correlation_id=f"req-{tag}",
        type="sign",
        reply_to=reply_to,
        user_id="svc-a",
        content_type="application/json",
    )
