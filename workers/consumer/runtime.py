"""The one consumer runtime both workers run: connect, declare, consume, dispatch, reply, ack.

Where is a request acked? In ``ConsumerRuntime._settle`` and nowhere else: after its reply
(a result or a typed error) has been published on the channel that delivered the request. A
channel's frames are processed by the broker in order, so when the broker has the ack it has
already routed the reply; the acks of requests that finish together go out as one
``multiple`` ack (``workers/consumer/acks.py``), in the same write as their replies.

Two connections per session: aio-pika declares (or looks up) the topology on a short-lived
one, and the requests travel on a lean connection of our own (``contracts/wire.py``), where a
request's frames cost a fraction of what they cost through aiormq. Both are arguments: the
runtime is given a ``Connect`` (any ``contracts.transport.Transport``) and a ``ResolveQueue``
(the queue's name and the broker's direct reply-to node); ``lean_connect`` and
``topology_queue`` are the ones a worker runs (``workers/service/serve.py``'s ``build_runtime``), and
a test can run the runtime without a broker on an in-memory transport.

A malformed request is answered with ``invalid_request`` and acked — or, with nobody to
answer, dead-lettered — and never requeued; the worker keeps running. A message whose AMQP
properties or body the connection could not read (``Delivery.defect``: a poison header, a body
over the size limit) is refused before any handler runs: answered ``invalid_request`` when it
names a ``reply_to``, and dead-lettered on its first delivery either way, so an operator sees
it in ``zandd.dead`` (an unreadable message is evidence, not noise).

A ``throttled`` refusal is the one exception to reply-then-ack: it is acked at once (its
prefetch slot goes to the next request) and its reply is held ``THROTTLE_HOLD_S`` (1 s), with
the retry-after hint shortened by that. A producer that resends on every reply, ignoring the
hint, then sends at most its requests in flight per second, instead of as fast as refusals
can be made: each refusal still crosses the broker and the worker, and a flood of them ahead
in the queue is what the other principals would wait behind. Not the retry-after itself: for
a principal with many requests in flight it is short (one token's worth), so holding only
that long let 64 key.create in flight run ~500 refusals/s. A held reply is lost with its
connection: nothing was done for the request, and the caller's timeout covers it.

Why no publisher confirm on the reply: it would add no guarantee the frame order does not
already give. A reply is transient and goes to the caller's transient queue; the broker
confirms even a reply it could not route (the caller went away), and a connection lost before
the broker read the reply loses the ack behind it too, so the request is redelivered. The
confirm cost a frame each way and a wait before every ack.

What the runtime does when things break:
- the broker goes away: in-flight requests are abandoned unacked (the broker redelivers them
  to whoever is connected), and the runtime reconnects with jittered exponential backoff and
  declares the topology again;
- a dependency (vault, TPM) is unavailable: the runtime stops consuming, probes the dependency
  with jittered backoff, and resumes when the probe passes; the requests that hit the outage
  wait for it in the worker and are then served — no delivery is spent on them;
- SIGTERM: stop consuming, let in-flight requests finish within the drain bound, then close;
  whatever is unacked returns to the queue;
- the broker blocks the connection (a memory or disk alarm; see "Back-pressure" below).

Back-pressure. A broker in a resource alarm stops reading the socket of every connection that
publishes, and RabbitMQ tells a connection so (``connection.blocked``) once it publishes — for
a worker, its first reply during the alarm. From then until ``connection.unblocked`` the
transport holds every write, in order, and the runtime starts no new request: a delivery that
arrives meanwhile is kept unstarted (unsigned, unacked) and a request that has not reached its
handler yet waits (``zandd_broker_blocked`` is 1). Requests already past that point finish and
their replies wait with the transport. When the alarm clears, the held writes go out and the
held requests start at once, the usual deadline check first: one whose caller gave up is
answered ``deadline_exceeded``, not signed. A connection blocked for longer than the
transport's bound (``contracts.wire.BLOCKED_TIMEOUT_S``) is dropped, and the broker redelivers
what it held. Nothing is cancelled or rejected while blocked: those frames would wait behind
the held ones in the socket the broker does not read, a requeued request would come back to
the same prefetch slot, and the alarm blocks every other worker's replies too (an alarm is
cluster-wide), so the requests are best kept where they are, at most the prefetch per worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Protocol

from aio_pika.abc import AbstractChannel
from pydantic import BaseModel

from contracts.amqp import DEADLINE_HEADER, JSON_CONTENT_TYPE, connect_plain
from contracts.brokers import BrokerURLs
from contracts.errors import (
    BrokerUnavailable,
    ConfigurationError,
    DeadlineExceeded,
    ErrorCode,
    InternalError,
    InvalidRequest,
    Throttled,
    TpmUnavailable,
    TransportClosed,
    UnknownOperation,
    VaultUnavailable,
    ZanddError,
)
from contracts.limits import Limits
from contracts.models import MAX_RETRY_AFTER_MS, ErrorReply, parse_request
from contracts.operations import ERROR_REPLY_TYPE, IDEMPOTENT_OPERATIONS, Operation
from contracts.replyto import ReplyToRefused, check_reply_to, learn_direct_reply_nodes
from contracts.text import printable
from contracts.topology import bind_topology, declare_topology, is_sign_queue
from contracts.tracing import mark_failed
from contracts.transport import TRANSPORT_FAILURES, Connect, Delivery, Properties, Transport
from contracts.transport_aiormq import AiormqTransport
from contracts.wire import Wire
from vault.audit import AuditEntry, serving_alone
from workers.audit.auditing import with_receipt
from workers.consumer.acks import AckBatcher
from workers.consumer.backoff import retry_until_stopped, serve_reconnecting
from workers.observability.logs import bound_request
from workers.observability.metrics import OUTCOME_OK, Metrics, operation_label
from workers.observability.telemetry import consumer_span

log = logging.getLogger("zandd.runtime")

_MAX_ECHOED_NAME_CHARS = 40
#: Errors that say a dependency is down, not that the request is wrong: the request waits.
DEPENDENCY_ERRORS: tuple[type[ZanddError], ...] = (VaultUnavailable, TpmUnavailable)
#: How long declaring a new sign shard waits for the node meant to lead it.
_PLACE_TIMEOUT_S = 3.0
#: How long a throttled refusal's reply is held (see the module docstring).
THROTTLE_HOLD_S = 1.0
#: Beyond this many held replies (a producer that does not wait for them), reply at once.
MAX_HELD_REPLIES = 10_000


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What a handler knows about a request besides its validated body."""

    operation: Operation
    request_id: str | None
    principal: str | None


Handler = Callable[[Any, RequestContext], Awaitable[BaseModel]]
#: Awaited with (delivery, parsed request or None, reply or error) before any reply is sent.
#: A successful request whose audit fails is not answered with its result: a dependency error
#: (vault down) waits like the handler's own would, and the request is served again. A refusal
#: waits for the vault too; one whose entry cannot be written at all is dead-lettered unanswered.
#: It returns the entry written (or None): a reply that carries a receipt gets it.
AuditHook = Callable[
    [Delivery, BaseModel | None, BaseModel | ZanddError], Awaitable[AuditEntry | None]
]
#: Raises a ``ZanddError`` while a dependency is down; returns when it answers again.
Probe = Callable[[], Awaitable[None]]


class Admission(Protocol):
    """Who may be served now (per-principal quotas, ``workers/service/quotas.py``).

    ``admit`` runs before the body is parsed, ``charge`` after; either refuses by raising.
    """

    def admit(self, message: Delivery, operation: Operation) -> None:
        """Refuse (raise ``Throttled``) before any parsing, or return."""

    def charge(self, message: Delivery, request: BaseModel) -> None:
        """Account for what the parsed request asks for; may refuse it too."""


@dataclass(frozen=True, slots=True)
class _Outcome:
    body: bytes
    type: str
    error: ZanddError | None = None
    #: Nobody can be told about this failure (no ``reply_to``): dead-letter it, don't drop it.
    dead_letter_if_unanswered: bool = False
    #: Its audit entry could not be written: it is dead-lettered, never answered unaudited.
    unaudited: bool = False
    #: Dead-letter it even when answered: the message itself could not be read.
    dead_letter: bool = False
    #: Ack now, reply this much later (a throttled refusal).
    hold_s: float = 0.0

    @property
    def label(self) -> str:
        """``ok`` or the error code, for metrics."""
        return OUTCOME_OK if self.error is None else self.error.code.value


class _Abandoned(Exception):
    """A request this worker leaves unsettled, so the broker gives it to another."""


@dataclass(frozen=True, slots=True)
class WorkQueue:
    """The queue to consume, as the broker names it, and how its direct reply-to names start."""

    name: str
    #: The node segments the brokers minted in direct reply-to names (one per cluster node
    #: that answered); empty: none minted one, and no direct reply-to is served yet.
    direct_reply_nodes: frozenset[str]
    #: More queues consumed beside ``name`` on the same channel: the sign shards.
    more: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """Every queue this session consumes."""
        return (self.name, *self.more)


#: Declares (or looks up) the work queue for a new session; a ``TRANSPORT_FAILURES`` is retried.
ResolveQueue = Callable[[], Awaitable[WorkQueue]]


def lean_connect(amqp_url: BrokerURLs, *, name: str, max_body_bytes: int) -> Connect:
    """The lean connection (``contracts/wire.py``) to ``amqp_url``, as a runtime's transport."""

    async def connect() -> Transport:
        return await Wire.connect(amqp_url, connection_name=name, max_body_bytes=max_body_bytes)

    return connect


def transport_connect(
    kind: str, amqp_url: BrokerURLs, *, name: str, max_body_bytes: int
) -> Connect:
    """``lean_connect`` (``kind`` ``lean``), or the aiormq transport (``aiormq``)."""
    if kind == "lean":
        return lean_connect(amqp_url, name=name, max_body_bytes=max_body_bytes)
    if kind != "aiormq":
        raise ConfigurationError(f"unknown transport {kind!r}: lean or aiormq")

    async def connect() -> Transport:
        return await AiormqTransport.connect(
            amqp_url, connection_name=name, max_body_bytes=max_body_bytes
        )

    return connect


def topology_queue(
    amqp_url: BrokerURLs,
    queue: str,
    *,
    name: str,
    declare: bool,
    sign_shards: int | None = None,
    node_urls: Sequence[str] = (),
) -> ResolveQueue:
    """``queue`` (a ``contracts.topology`` key), its topology declared on a connection of its own.

    Least-privilege deployments declare the topology once (ops/rabbitmq/definitions.json)
    and give workers no configure rights: with ``declare=False`` they only look it up.
    ``sign_shards`` (signers): the sign route to declare (or expect); the sign queues that
    exist are all consumed. ``node_urls``: one URL per broker node; a shard not declared yet
    is declared through node ``index % len``, where its leader then lives.
    """

    async def resolve() -> WorkQueue:
        connection = await connect_plain(amqp_url, connection_name=f"{name}/topology")
        async with connection, AsyncExitStack() as placing:

            async def place(index: int) -> AbstractChannel:
                url = node_urls[index % len(node_urls)]
                try:
                    node = await connect_plain(
                        url, connection_name=f"{name}/topology", timeout_s=_PLACE_TIMEOUT_S
                    )
                except BrokerUnavailable as exc:
                    # A node down now: the shard's leader goes where this connection is.
                    log.warning("declaring shard %d on another node: %s", index, exc.message)
                    return channel
                await placing.enter_async_context(node)
                return await node.channel()

            channel = await connection.channel()
            if declare:
                topology = await declare_topology(
                    channel, sign_shards=sign_shards, place=place if node_urls else None
                )
            else:
                topology = await bind_topology(channel, sign_shards=sign_shards)
            nodes = await learn_direct_reply_nodes(
                amqp_url, connection, connection_name=f"{name}/topology"
            )
            first = topology.queues[queue].name
            if not is_sign_queue(first):
                return WorkQueue(first, nodes)
            return WorkQueue(first, nodes, tuple(q for q in topology.sign_queues if q != first))

    return resolve


class _Session:
    """One connection's worth of state; a reconnect makes a new one."""

    def __init__(self, wire: Transport, queues: tuple[str, ...]) -> None:
        self.wire = wire
        self.acks = AckBatcher(wire)
        #: Consumed on the one channel (a signer's: ``zandd.sign`` and its shards).
        self.queues = queues
        self.consumer_tags: list[str] = []
        #: Set when the connection is gone, whatever ended it.
        self.lost = wire.lost
        #: Clear while the broker blocks the connection: nothing new starts.
        self.unblocked = asyncio.Event()
        self.unblocked.set()
        #: When the current block began (``time.monotonic()``), None while unblocked.
        self.blocked_since: float | None = None
        #: Deliveries that arrived while blocked, unstarted, in arrival order.
        self.held: list[Delivery] = []


class ConsumerRuntime:
    """Consumes one work queue and dispatches each request by operation to a handler."""

    def __init__(
        self,
        *,
        queue: str,
        handlers: Mapping[Operation, Handler],
        prefetch: int,
        limits: Limits,
        drain_timeout_s: float,
        name: str,
        probe: Probe | None = None,
        max_backoff_s: float = 30.0,
        audit: AuditHook | None = None,
        metrics: Metrics | None = None,
        declare: bool = True,
        admission: Admission | None = None,
        amqp_url: BrokerURLs | None = None,
        connect: Connect | None = None,
        resolve_queue: ResolveQueue | None = None,
        waits_for: tuple[type[ZanddError], ...] = DEPENDENCY_ERRORS,
    ) -> None:
        """``connect`` and ``resolve_queue`` default to ``lean_connect`` and ``topology_queue``
        on ``amqp_url`` (give either the URL or both). ``waits_for``: the dependency errors
        a request waits out (consuming paused, the probe run until it passes); any other
        error is answered at once (the keygen worker answers ``tpm_unavailable`` so)."""
        if connect is None or resolve_queue is None:
            if amqp_url is None:
                raise TypeError("ConsumerRuntime needs amqp_url, or connect and resolve_queue")
            connect = connect or lean_connect(
                amqp_url, name=name, max_body_bytes=limits.max_body_bytes
            )
            resolve_queue = resolve_queue or topology_queue(
                amqp_url, queue, name=name, declare=declare
            )
        self._connect = connect
        self._resolve_queue = resolve_queue
        self._queue = queue
        self._handlers = dict(handlers)
        self._prefetch = prefetch
        self._limits = limits
        self._drain_timeout_s = drain_timeout_s
        self._name = name
        self._probe = probe
        self._max_backoff_s = max_backoff_s
        self._audit = audit
        self._metrics = metrics if metrics is not None else Metrics()
        self._admission = admission
        self._waits_for = waits_for
        self._in_flight: set[asyncio.Task[None]] = set()
        #: How this broker's direct reply-to names start: learned from it, never from a request.
        self._reply_nodes: frozenset[str] = frozenset()
        #: Held throttled replies: their timers and what sends each now.
        self._held: dict[asyncio.TimerHandle, Callable[[], None]] = {}
        self._session: _Session | None = None
        self._stop = asyncio.Event()
        self._healthy = asyncio.Event()
        self._healthy.set()
        self._recovery: asyncio.Task[None] | None = None
        #: Set while the worker consumes; tests and ``zandd up`` wait on it.
        self.ready = asyncio.Event()

    @property
    def acks(self) -> AckBatcher | None:
        """The current session's ack batcher (its counters show how acks were coalesced)."""
        return None if self._session is None else self._session.acks

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then drain in-flight requests within the bound.

        The first connection must succeed (a worker that cannot reach its broker at start says
        so and exits); later losses are retried until ``stop``.
        """
        self._stop = stop
        await serve_reconnecting(
            self._open_session,
            self._serve_session,
            stop=stop,
            what=f"{self._name}: reconnecting to the broker",
            retry_on=(BrokerUnavailable, *TRANSPORT_FAILURES),
            max_delay_s=self._max_backoff_s,
        )

    async def _open_session(self) -> _Session:
        """Declare (or look up) the topology, then connect the transport and set QoS."""
        queue = await self._resolve_queue()
        if not queue.direct_reply_nodes:
            log.warning("%s: the broker minted no direct reply-to name: none is served", self._name)
        # Replaced, never added to: on RabbitMQ 3.10 a reply to a name minted by a node that is
        # down closes this connection (541 INTERNAL_ERROR); after that reconnect the dead node,
        # which no longer answers the probe, is no longer accepted.
        self._reply_nodes = frozenset(queue.direct_reply_nodes)
        wire = await self._connect()
        try:
            # Per-consumer QoS: global QoS on a quorum queue closes the connection. With
            # several queues (sign shards) each consumer has its own ``prefetch``: a signer
            # holds up to that many of each queue's requests (a drained queue holds none).
            await wire.qos(self._prefetch)
        except BaseException:
            await wire.close()
            raise
        session = _Session(wire, queue.names)
        wire.on_blocked(lambda reason: self._blocked_changed(session, reason))
        return session

    async def _serve_session(self, session: _Session) -> None:
        try:
            self._session = session
            await self._consume(session)
            self.ready.set()
            log.info(
                "%s consuming %s (prefetch %d)",
                self._name,
                ", ".join(session.queues),
                self._prefetch,
            )
            await _first_of(self._stop.wait(), session.lost.wait())
            if session.lost.is_set() and not self._stop.is_set():
                log.warning("%s lost the broker: %s", self._name, session.wire.reason)
                self._abandon_in_flight()
                return
            log.info("%s stopping: no new requests, draining %d", self._name, len(self._in_flight))
            if session.blocked_since is None:
                await self._cancel_consumer(session)
            # else: a cancel would wait behind the held writes; nothing new starts while
            # blocked, and what is held returns to the queue when the connection closes.
            await self._drain()
            self._release_held()
            session.acks.flush()
        except TRANSPORT_FAILURES as exc:
            log.warning("%s lost the broker (%s)", self._name, exc)
            self._abandon_in_flight()
        finally:
            self.ready.clear()
            self._session = None
            self._end_block(session)
            # Closing the connection returns prefetched, unacked messages to the queue.
            await session.wire.close()

    async def _consume(self, session: _Session) -> None:
        # One consumer per queue on the one channel; the prefetch is per consumer.
        for queue in session.queues:
            session.consumer_tags.append(
                await session.wire.consume(
                    queue, lambda delivery: self._on_delivery(session, delivery)
                )
            )

    async def _cancel_consumer(self, session: _Session) -> None:
        while session.consumer_tags and not session.lost.is_set():
            await session.wire.cancel(session.consumer_tags.pop())

    def _abandon_in_flight(self) -> None:
        if self._in_flight:
            log.warning(
                "%s: broker connection lost with %d requests in flight; the broker redelivers them",
                self._name,
                len(self._in_flight),
            )
        for task in self._in_flight:
            task.cancel()

    async def _drain(self) -> None:
        if not self._in_flight:
            return
        _done, pending = await asyncio.wait(set(self._in_flight), timeout=self._drain_timeout_s)
        if pending:
            log.warning(
                "%s: %d requests still running after %.1f s; they return to the queue",
                self._name,
                len(pending),
                self._drain_timeout_s,
            )
            for task in pending:
                task.cancel()
            await asyncio.wait(pending)

    # -- the broker's back-pressure ---------------------------------------------------------

    def _blocked_changed(self, session: _Session, reason: str | None) -> None:
        """The transport says the broker blocked (``reason``) or unblocked (None) the session."""
        if reason is not None:
            if session.blocked_since is not None or session.lost.is_set():
                return
            session.blocked_since = time.monotonic()
            session.unblocked.clear()
            self._metrics.broker_blocked()
            log.warning(
                "%s: the broker blocks this worker's connection (%s: a memory or disk alarm on "
                "the broker); no new request starts until it clears (%d in flight finish, "
                "their replies wait)",
                self._name,
                reason,
                len(self._in_flight),
            )
            return
        blocked_s = self._end_block(session)
        if blocked_s is None:
            return
        held, session.held = session.held, []
        if self._stop.is_set() or session.lost.is_set():
            log.info("%s: the broker unblocked the connection after %.1f s", self._name, blocked_s)
            return  # stopping: the held requests return to the queue with the connection
        log.info(
            "%s: the broker unblocked the connection after %.1f s; starting %d held requests",
            self._name,
            blocked_s,
            len(held),
        )
        for message in held:
            self._start(session, message)

    def _end_block(self, session: _Session) -> float | None:
        """Close the session's block, if any: how long it lasted (the metrics count it)."""
        since, session.blocked_since = session.blocked_since, None
        session.unblocked.set()
        if since is None:
            return None
        blocked_s = time.monotonic() - since
        self._metrics.broker_unblocked(blocked_s)
        return blocked_s

    async def _wait_unblocked(
        self, session: _Session, deadline: float | None, context: RequestContext
    ) -> None:
        """Hold a request that has not reached its handler while the broker blocks the session."""
        remaining_s = None if deadline is None else max(0.0, deadline - time.time())
        try:
            async with asyncio.timeout(remaining_s):
                await _first_of(session.unblocked.wait(), self._stop.wait())
        except TimeoutError:
            raise DeadlineExceeded(
                f"{context.operation.value} {context.request_id}: the caller's deadline passed "
                "while the broker blocked this worker (a memory or disk alarm)"
            ) from None
        if not session.unblocked.is_set():
            raise _Abandoned  # stopping mid-alarm: the request returns to the queue

    # -- one delivery ----------------------------------------------------------------------

    def _on_delivery(self, session: _Session, message: Delivery) -> None:
        """A request arrived: register its tag (acks rely on the order) and serve it in a task,
        or hold it unstarted while the broker blocks the connection."""
        session.acks.delivered(message.delivery_tag)
        if session.blocked_since is not None:
            session.held.append(message)
            return
        self._start(session, message)

    def _start(self, session: _Session, message: Delivery) -> None:
        task = asyncio.get_running_loop().create_task(self._on_message(session, message))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _on_message(self, session: _Session, message: Delivery) -> None:
        # Delivery tags belong to the connection that delivered: settle there or not at all.
        started_s = time.perf_counter()
        try:
            with (
                self._metrics.in_flight(),
                bound_request(message.message_id),
                consumer_span(message, queue=self._queue) as span,
            ):
                outcome = await self._serve(message, session)
                if outcome.error is not None:
                    mark_failed(span, outcome.error)
                await self._settle(session, message, outcome)
            self._metrics.observe_request(
                operation_label(message.type or message.routing_key),
                outcome.label,
                time.perf_counter() - started_s,
                redelivered=message.redelivered,
            )
        except TRANSPORT_FAILURES as exc:
            # A reply not handed to the broker is not acked: the broker redelivers the request.
            log.warning("request %s not settled (%s): left for redelivery", message.message_id, exc)
        except _Abandoned:
            log.info("request %s left unsettled for another worker: stopping", message.message_id)

    async def _settle(self, session: _Session, message: Delivery, outcome: _Outcome) -> None:
        """Reply, then ack — or dead-letter what nobody can be told about."""
        if session.lost.is_set():
            raise TransportClosed("the connection that delivered this request is gone")
        # A reply_to the producer could not read itself gets nothing (see contracts/replyto.py),
        # and nothing is answered before its audit entry is written.
        refused = isinstance(outcome.error, ReplyToRefused)
        reply_to = None if refused or outcome.unaudited else message.reply_to
        if reply_to and outcome.hold_s > 0:
            self._hold_reply(session, reply_to, message, outcome)
        elif reply_to:
            self._reply(session, reply_to, message, outcome)
        dead_letter = outcome.dead_letter or outcome.unaudited
        if dead_letter or (outcome.dead_letter_if_unanswered and not reply_to):
            session.wire.reject(message.delivery_tag, requeue=False)
            session.acks.rejected(message.delivery_tag)
            self._metrics.dead_lettered(self._queue, "rejected")
        else:
            session.acks.ack(message.delivery_tag)

    async def _serve(self, message: Delivery, session: _Session | None = None) -> _Outcome:
        """Serve one request: its outcome (a reply or a typed error), nothing sent yet.

        With ``session``, a request waits before its handler while the broker blocks it."""
        request: BaseModel | None = None
        try:
            # First: whatever follows (an error reply included) may go to reply_to.
            if message.reply_to:
                check_reply_to(
                    message.reply_to, message.user_id, direct_reply_nodes=self._reply_nodes
                )
            if message.defect is not None:
                return await self._refuse_unreadable(message, message.defect)
            operation, handler = self._route(message)
            if self._admission is not None:
                self._admission.admit(message, operation)
            request = parse_request(operation, message.body, self._limits)
            if self._admission is not None:
                self._admission.charge(message, request)
            context = RequestContext(operation, message.message_id, message.user_id)
            handler = self._audited(handler, message)
            reply = await self._call(handler, request, context, _deadline_of(message), session)
        except (InvalidRequest, UnknownOperation) as exc:
            log.warning(
                "request %s refused: %s %s", message.message_id, exc.code.value, exc.message
            )
            audited = await self._audit_refusal(message, request, exc)
            return _error_outcome(exc, dead_letter_if_unanswered=True, audited=audited)
        except Throttled as exc:
            # Not logged per request: a flood would flood the log too (the quotas log once a
            # minute per principal, and count every refusal).
            return self._throttled_outcome(exc, await self._audit_refusal(message, request, exc))
        except ZanddError as exc:
            log.warning(
                "request %s refused: %s %s", message.message_id, exc.code.value, exc.message
            )
            return _error_outcome(exc, audited=await self._audit_refusal(message, request, exc))
        except _Abandoned:
            raise
        except Exception:
            log.exception("request %s failed inside the worker", message.message_id)
            error = InternalError("internal error; the worker log has the details")
            return _error_outcome(error, audited=await self._audit_refusal(message, request, error))
        return _Outcome(reply.model_dump_json().encode(), operation.reply_type)

    async def _refuse_unreadable(self, message: Delivery, defect: str) -> _Outcome:
        """A message the connection could not read: no handler sees it; refused, dead-lettered."""
        error = InvalidRequest(f"the message cannot be read: {defect}")
        log.warning("request %s refused: %s", printable(message.message_id), error.message)
        outcome = _error_outcome(error, audited=await self._audit_refusal(message, None, error))
        return dataclasses.replace(outcome, dead_letter=True)

    def _throttled_outcome(self, error: Throttled, audited: bool) -> _Outcome:
        """The refusal, to be held ``THROTTLE_HOLD_S``, the hint shortened by that."""
        retry_after_s = error.retry_after_s or 0.0
        hold_s = THROTTLE_HOLD_S if len(self._held) < MAX_HELD_REPLIES else 0.0
        shortened = Throttled(error.message, retry_after_s=max(0.001, retry_after_s - hold_s))
        outcome = _error_outcome(shortened, audited=audited)
        return dataclasses.replace(outcome, error=error, hold_s=hold_s)

    def _hold_reply(
        self, session: _Session, reply_to: str, message: Delivery, outcome: _Outcome
    ) -> None:
        def release() -> None:
            self._held.pop(handle, None)
            if not session.lost.is_set():
                try:
                    self._reply(session, reply_to, message, outcome)
                except TransportClosed:
                    return  # the caller's timeout covers a refusal lost with its connection

        handle = asyncio.get_running_loop().call_later(outcome.hold_s, release)
        self._held[handle] = release

    def _release_held(self) -> None:
        """Send every held reply now (stopping: the connection is about to close)."""
        for handle, release in list(self._held.items()):
            handle.cancel()
            release()

    def _audited(self, handler: Handler, message: Delivery) -> Handler:
        """``handler`` followed by the audit of its result, so both are retried together."""
        audit = self._audit
        if audit is None:
            return handler

        async def audited(request: Any, context: RequestContext) -> BaseModel:
            reply = await handler(request, context)
            return with_receipt(reply, await self._audit_entry(audit, message, request, reply))

        return audited

    async def _audit_entry(
        self,
        audit: AuditHook,
        message: Delivery,
        request: BaseModel | None,
        result: BaseModel | ZanddError,
    ) -> AuditEntry | None:
        """``audit``, told whether this is the only request being served (``serving_alone``:
        its entry may then be written without a thread handoff)."""
        token = serving_alone.set(len(self._in_flight) == 1)
        try:
            return await audit(message, request, result)
        finally:
            serving_alone.reset(token)

    async def _audit_refusal(
        self, message: Delivery, request: BaseModel | None, error: ZanddError
    ) -> bool:
        """Audit a refusal; False if it cannot be, and then it must not be answered.

        No request is answered without its entry: while the vault is down the refusal waits
        for it like any request (stopping meanwhile leaves it to another worker).
        """
        if self._audit is None:
            return True
        while True:
            try:
                await self._audit_entry(self._audit, message, request, error)
                return True
            except self._waits_for as exc:
                if self._probe is None:
                    return self._unaudited(message)
                await self._wait_for_dependency(exc, None, f"request {message.message_id}")
                if self._stop.is_set():
                    raise _Abandoned from exc
            except Exception:
                return self._unaudited(message)

    def _unaudited(self, message: Delivery) -> bool:
        self._metrics.audit_write_failed()
        log.exception("request %s: its refusal could not be audited", message.message_id)
        return False

    def _route(self, message: Delivery) -> tuple[Operation, Handler]:
        name = message.type or message.routing_key or ""
        try:
            operation = Operation(name)
            handler = self._handlers[operation]
        except (ValueError, KeyError):
            shown = name[:_MAX_ECHOED_NAME_CHARS]
            raise UnknownOperation(f"unknown operation {shown!r} on {self._queue}") from None
        if message.content_type not in (None, "", JSON_CONTENT_TYPE):
            raise InvalidRequest(f"content_type must be {JSON_CONTENT_TYPE}")
        if operation in IDEMPOTENT_OPERATIONS and not message.message_id:
            raise InvalidRequest(f"{operation.value} needs a message_id: it is the idempotency key")
        return operation, handler

    async def _call(
        self,
        handler: Handler,
        request: Any,
        context: RequestContext,
        deadline: float | None,
        session: _Session | None = None,
    ) -> BaseModel:
        """Run the handler; while a dependency is down, or the broker blocks the session, wait
        for it (up to the deadline)."""
        while True:
            _check_deadline(deadline, context)
            if session is not None and session.blocked_since is not None:
                await self._wait_unblocked(session, deadline, context)
                continue  # the deadline again: the wait may have outlasted it
            try:
                return await handler(request, context)
            except self._waits_for as exc:
                if self._probe is None:
                    raise
                await self._wait_for_dependency(
                    exc, deadline, f"{context.operation.value} {context.request_id}"
                )
                if self._stop.is_set():
                    # Shutting down mid-outage: leave the request to a worker that can serve it.
                    raise _Abandoned from exc

    async def _wait_for_dependency(
        self, error: ZanddError, deadline: float | None, what: str
    ) -> None:
        self._healthy.clear()
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.create_task(self._recover(error))
        remaining_s = None if deadline is None else max(0.0, deadline - time.time())
        try:
            await asyncio.wait_for(self._healthy.wait(), timeout=remaining_s)
        except TimeoutError:
            raise DeadlineExceeded(
                f"{what}: deadline passed while "
                f"waiting for the {error.code.value.removesuffix('_unavailable')}"
            ) from None

    async def _recover(self, error: ZanddError) -> None:
        """Stop consuming, probe the dependency with backoff, resume consuming.

        Whatever happens here, waiting requests are released at the end: a recovery that
        failed unexpectedly must not leave them waiting forever (the next dependency error
        starts a new one).
        """
        try:
            await self._probe_until_healthy(error)
        except Exception:
            log.exception("%s: recovering from an unavailable dependency failed", self._name)
        finally:
            self._healthy.set()

    async def _probe_until_healthy(self, error: ZanddError) -> None:
        assert self._probe is not None
        session = self._session
        log.warning("%s pauses consuming: %s", self._name, error.message)
        if session is not None:
            try:
                await self._cancel_consumer(session)
            except TRANSPORT_FAILURES:
                session.wire.drop("cancelling the consumer failed")
        await retry_until_stopped(
            self._probe,
            stop=self._stop,
            what=f"{self._name}: waiting for {error.code.value.removesuffix('_unavailable')}",
            max_delay_s=self._max_backoff_s,
        )
        if self._stop.is_set() or session is None or session.lost.is_set():
            return
        try:
            await self._consume(session)
        except TRANSPORT_FAILURES:
            session.wire.drop("consuming again failed")
            return
        log.info("%s resumes consuming %s", self._name, self._queue)

    def _reply(
        self, session: _Session, reply_to: str, message: Delivery, outcome: _Outcome
    ) -> None:
        # Queued on the delivering channel ahead of the ack (see the module docstring): the
        # frame order is the guarantee, not the socket drain. Not mandatory: a caller that
        # went away must not bounce the reply back to us, and direct reply-to on 3.10 returns
        # mandatory replies spuriously.
        properties = Properties(
            content_type=JSON_CONTENT_TYPE,
            correlation_id=message.correlation_id or message.message_id,
            type=outcome.type,
        )
        session.wire.publish(outcome.body, properties, routing_key=reply_to)


async def _first_of(*waits: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


#: 9999-12-31T23:59:59.999Z: a later deadline is no deadline, and certainly a mistake.
MAX_DEADLINE_MS = 253_402_300_799_999


def _deadline_of(message: Delivery) -> float | None:
    """The request's absolute deadline (Unix seconds) from its header, if it has one."""
    value = message.headers.get(DEADLINE_HEADER) if message.headers else None
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= MAX_DEADLINE_MS:
            raise InvalidRequest(f"{DEADLINE_HEADER} must be Unix milliseconds, 0 to 9999-12-31")
        return value / 1000.0
    return None


def _check_deadline(deadline: float | None, context: RequestContext) -> None:
    if deadline is not None and time.time() > deadline:
        raise DeadlineExceeded(
            f"{context.operation.value} {context.request_id}: the caller's deadline has passed"
        )


#: What callers are told for failures that are ours, not theirs: the details (paths, URLs,
#: TPM codes) are for the worker's log, which has them.
_PUBLIC_MESSAGES = {
    ErrorCode.VAULT_UNAVAILABLE: "the key vault is unavailable; try again later",
    ErrorCode.TPM_UNAVAILABLE: "the keygen worker cannot reach its TPM; try again later",
    ErrorCode.INTERNAL: "internal error; the worker log has the details",
}


def _error_outcome(
    error: ZanddError, *, dead_letter_if_unanswered: bool = False, audited: bool = True
) -> _Outcome:
    message = _PUBLIC_MESSAGES.get(error.code, error.message)
    retry_after_s = error.retry_after_s if isinstance(error, Throttled) else None
    reply = ErrorReply(
        code=ErrorCode(error.code),
        message=message,
        retryable=error.retryable,
        retry_after_ms=None
        if retry_after_s is None
        else min(MAX_RETRY_AFTER_MS, round(retry_after_s * 1000)),
    )
    return _Outcome(
        reply.model_dump_json(exclude_none=True).encode(),
        ERROR_REPLY_TYPE,
        error,
        dead_letter_if_unanswered,
        unaudited=not audited,
    )
