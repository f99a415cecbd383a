"""Key lifecycle events on the fanout exchange ``zandd.events``: publisher and subscriber.

Wire format (contract v1): one message per key version whose state changed, published by the
keygen worker once the change is committed to the vault — AMQP ``type`` ``key.state_changed``,
``content_type`` ``application/json``, a unique ``message_id``, and the body
:class:`contracts.models.KeyStateChangedEvent`::

    {"key_id": "zk-…", "version": 1, "state": "disabled", "destroy_after": null,
     "changed_at": "2026-11-28T10:00:00Z"}

Workers also publish their newest audit head there (``type`` ``audit.head``, body
:class:`contracts.models.AuditHeadEvent`) every N entries or T seconds; signers ignore it.

Events are transient: each subscriber has an exclusive, auto-delete queue that lives as long
as its connection. A subscriber that lost its connection may have missed events, so it calls
``on_gap`` after reconnecting; whoever keeps state derived from events drops it there. Events
only ever make a signer refuse sooner — the vault's record stays the authority on what it may
sign with — so a forged or replayed event can deny service but never grant it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Callable

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
)
from pydantic import ValidationError

from contracts.amqp import JSON_CONTENT_TYPE, connect_plain
from contracts.errors import BrokerUnavailable
from contracts.models import (
    AuditCheckpointEvent,
    AuditHeadEvent,
    KeyAliasChangedEvent,
    KeyStateChangedEvent,
)
from contracts.operations import (
    AUDIT_CHECKPOINT_EVENT,
    AUDIT_HEAD_EVENT,
    KEY_ALIAS_CHANGED_EVENT,
    KEY_STATE_CHANGED_EVENT,
)
from contracts.topology import EVENTS_EXCHANGE, Topology, bind_topology, declare_topology
from contracts.transport import TRANSPORT_FAILURES
from workers.consumer.backoff import serve_reconnecting

log = logging.getLogger("zandd.events")


EventCallback = Callable[[KeyStateChangedEvent], None]
#: issue 15, aliases: takes ``key.alias_changed`` events.
AliasEventCallback = Callable[[KeyAliasChangedEvent], None]


class EventPublisher:
    """Publishes state changes with publisher confirms; (re)connects on demand."""

    def __init__(
        self, amqp_url: str, *, declare: bool = True, name: str = "zandd-events-publisher"
    ) -> None:
        self._amqp_url = amqp_url
        self._declare = declare
        self._name = name
        self._connection: AbstractConnection | None = None
        self._exchange: AbstractExchange | None = None
        self._connecting = asyncio.Lock()

    async def publish(
        self,
        event: KeyStateChangedEvent | AuditHeadEvent | AuditCheckpointEvent | KeyAliasChangedEvent,
    ) -> None:
        """Publish ``event``; returns once the broker confirmed it, else BrokerUnavailable."""
        if isinstance(event, AuditHeadEvent):
            kind, at, what = AUDIT_HEAD_EVENT, event.published_at, f"audit head #{event.seq}"
        elif isinstance(event, AuditCheckpointEvent):
            kind, at, what = AUDIT_CHECKPOINT_EVENT, event.at, f"audit checkpoint #{event.seq}"
        elif isinstance(event, KeyAliasChangedEvent):
            kind, at, what = (
                KEY_ALIAS_CHANGED_EVENT,
                event.changed_at,
                f"the change of {event.alias}",
            )
        else:
            kind, at = KEY_STATE_CHANGED_EVENT, event.changed_at
            what = f"the state change of key {event.key_id} v{event.version}"
        message = aio_pika.Message(
            event.model_dump_json().encode(),
            content_type=JSON_CONTENT_TYPE,
            type=kind,
            message_id=uuid.uuid4().hex,
            timestamp=at,
        )
        try:
            exchange = await self._ready_exchange()
            # Not mandatory: with no signer running nobody needs to hear about it.
            await exchange.publish(message, routing_key="", mandatory=False)
        except TRANSPORT_FAILURES as exc:
            await self.close()
            raise BrokerUnavailable(f"could not publish {what}: {type(exc).__name__}") from exc

    async def _ready_exchange(self) -> AbstractExchange:
        async with self._connecting:
            if self._exchange is None or self._connection is None or self._connection.is_closed:
                self._connection = await connect_plain(self._amqp_url, connection_name=self._name)
                channel = await self._connection.channel(publisher_confirms=True)
                self._exchange = (await _topology(channel, self._declare)).events
            return self._exchange

    async def close(self) -> None:
        """Close the connection (the next publish opens a new one)."""
        connection, self._connection, self._exchange = self._connection, None, None
        if connection is not None and not connection.is_closed:
            await connection.close()


class EventSubscriber:
    """Hands every event on ``zandd.events`` to ``on_event``, through an exclusive queue."""

    def __init__(
        self,
        amqp_url: str,
        on_event: EventCallback,
        *,
        on_gap: Callable[[], None],
        declare: bool = True,
        name: str = "zandd-events-subscriber",
        max_backoff_s: float = 30.0,
        on_alias: AliasEventCallback | None = None,
    ) -> None:
        self._amqp_url = amqp_url
        self._declare = declare
        self._on_event = on_event
        self._on_gap = on_gap
        self._on_alias = on_alias
        self._name = name
        self._max_backoff_s = max_backoff_s
        host = socket.gethostname()[:64]
        self._queue_name = f"{EVENTS_EXCHANGE}.{host}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        #: Set while the queue is bound and consumed: events published from then on arrive.
        self.ready = asyncio.Event()
        #: Events received (a health figure, and what tests wait on).
        self.received = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Subscribe until ``stop``; after a lost connection, reconnect and call ``on_gap``."""
        await serve_reconnecting(
            self._connect,
            lambda connection: self._subscribed(connection, stop),
            stop=stop,
            what=f"{self._name}: reconnecting to the broker",
            retry_on=(BrokerUnavailable, *TRANSPORT_FAILURES),
            max_delay_s=self._max_backoff_s,
            on_lost=self._on_gap,
        )

    async def _connect(self) -> AbstractConnection:
        return await connect_plain(self._amqp_url, connection_name=self._name)

    async def _subscribed(self, connection: AbstractConnection, stop: asyncio.Event) -> None:
        lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_: lost.set())
        try:
            # The topology on a channel of its own: looking shards up passively closes the
            # channel it runs on each time one is missing (and reopens it), which must not
            # pass for the subscription's channel being lost.
            setup = await connection.channel()
            exchange = (await _topology(setup, self._declare)).events.name
            await setup.close()
            channel = await connection.channel()
            channel.close_callbacks.add(lambda *_: lost.set())
            queue = await channel.declare_queue(self._queue_name, exclusive=True, auto_delete=True)
            await queue.bind(exchange)
            await queue.consume(self._deliver, no_ack=True)
            self.ready.set()
            log.info("%s listening for key state changes on %s", self._name, queue.name)
            await _first_of(stop, lost)
        except _SETUP_FAILURES as exc:
            # BrokerUnavailable: the topology could not be set up now (another declarer held
            # its lock too long, a node went away mid-way): reconnect, as after a loss.
            log.warning("%s lost the broker (%s)", self._name, type(exc).__name__)
        finally:
            self.ready.clear()
            if not connection.is_closed:
                await connection.close()

    async def _deliver(self, message: AbstractIncomingMessage) -> None:
        if message.type in (AUDIT_HEAD_EVENT, AUDIT_CHECKPOINT_EVENT):
            return  # for whoever keeps audit heads; a signer has no use for them
        if message.type == KEY_ALIAS_CHANGED_EVENT:
            self._deliver_alias(message)
            return
        if message.type != KEY_STATE_CHANGED_EVENT:
            log.warning("%s ignored an event of type %.40r", self._name, message.type)
            return
        try:
            event = KeyStateChangedEvent.model_validate_json(message.body)
        except ValidationError:
            log.warning("%s ignored a malformed key.state_changed event", self._name)
            return
        self.received += 1
        self._on_event(event)

    def _deliver_alias(self, message: AbstractIncomingMessage) -> None:
        if self._on_alias is None:
            return
        try:
            event = KeyAliasChangedEvent.model_validate_json(message.body)
        except ValidationError:
            log.warning("%s ignored a malformed key.alias_changed event", self._name)
            return
        self.received += 1
        self._on_alias(event)


#: What ends a subscription and makes it reconnect: a lost broker, or a topology that could
#: not be set up now.
_SETUP_FAILURES: tuple[type[BaseException], ...] = (BrokerUnavailable, *TRANSPORT_FAILURES)


async def _topology(channel: AbstractChannel, declare: bool) -> Topology:
    # A least-privilege worker user may not declare: it looks the topology up (passively).
    return await (declare_topology if declare else bind_topology)(channel)


async def _first_of(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
