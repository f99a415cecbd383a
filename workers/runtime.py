"""The one consumer runtime both workers run: connect, declare, consume, dispatch, reply, ack.

Where is a request acked? In ``ConsumerRuntime._on_message`` and nowhere else: after its
reply (a result or a typed error) has been confirmed by the broker. A malformed request is
answered with ``invalid_request`` and acked, never requeued; the worker keeps running.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
from pydantic import BaseModel

from contracts.amqp import JSON_CONTENT_TYPE, connect
from contracts.errors import (
    ErrorCode,
    InternalError,
    InvalidRequest,
    UnknownOperation,
    ZanddError,
)
from contracts.limits import Limits
from contracts.models import ErrorReply, parse_request
from contracts.operations import ERROR_REPLY_TYPE, IDEMPOTENT_OPERATIONS, Operation
from contracts.topology import declare_topology

log = logging.getLogger("zandd.runtime")

_MAX_ECHOED_NAME_CHARS = 40


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What a handler knows about a request besides its validated body."""

    operation: Operation
    request_id: str | None
    principal: str | None


Handler = Callable[[Any, RequestContext], Awaitable[BaseModel]]


@dataclass(frozen=True, slots=True)
class _Outcome:
    body: bytes
    type: str


class ConsumerRuntime:
    """Consumes one work queue and dispatches each request by operation to a handler."""

    def __init__(
        self,
        *,
        amqp_url: str,
        queue: str,
        handlers: Mapping[Operation, Handler],
        prefetch: int,
        limits: Limits,
        drain_timeout_s: float,
        name: str,
    ) -> None:
        self._amqp_url = amqp_url
        self._queue = queue
        self._handlers = dict(handlers)
        self._prefetch = prefetch
        self._limits = limits
        self._drain_timeout_s = drain_timeout_s
        self._name = name
        self._in_flight: set[asyncio.Task[None]] = set()
        self._channel: AbstractChannel | None = None
        #: Set once the worker consumes; tests and ``zandd up`` wait on it.
        self.ready = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then drain in-flight requests within the bound."""
        connection = await connect(self._amqp_url, connection_name=self._name)
        try:
            channel = await connection.channel(publisher_confirms=True)
            self._channel = channel
            # Per-consumer QoS: global QoS on a quorum queue closes the connection.
            await channel.set_qos(prefetch_count=self._prefetch)
            queue = (await declare_topology(channel)).queues[self._queue]
            consumer_tag = await queue.consume(self._on_message)
            self.ready.set()
            log.info("%s consuming %s (prefetch %d)", self._name, self._queue, self._prefetch)
            await stop.wait()
            log.info("%s stopping: no new requests, draining %d", self._name, len(self._in_flight))
            await queue.cancel(consumer_tag)
            await self._drain()
        finally:
            # Closing the channel returns prefetched, unacked messages to the queue.
            await connection.close()

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

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        assert task is not None  # aio-pika runs every delivery callback in its own task
        self._in_flight.add(task)
        try:
            outcome = await self._serve(message)
            if message.reply_to:
                await self._reply(message.reply_to, message, outcome)
            await message.ack()
        except (AMQPError, ChannelInvalidStateError, ConnectionError) as exc:
            # Without a confirmed reply the request is not acked: the broker redelivers it.
            log.warning(
                "reply to %s not confirmed (%s): left for redelivery", message.message_id, exc
            )
        finally:
            self._in_flight.discard(task)

    async def _serve(self, message: AbstractIncomingMessage) -> _Outcome:
        try:
            operation, handler = self._route(message)
            request = parse_request(operation, message.body, self._limits)
            context = RequestContext(operation, message.message_id, message.user_id)
            reply = await handler(request, context)
        except ZanddError as exc:
            log.warning(
                "request %s refused: %s %s", message.message_id, exc.code.value, exc.message
            )
            return _error_outcome(exc)
        except Exception:
            log.exception("request %s failed inside the worker", message.message_id)
            return _error_outcome(InternalError("internal error; the worker log has the details"))
        return _Outcome(reply.model_dump_json().encode(), operation.reply_type)

    def _route(self, message: AbstractIncomingMessage) -> tuple[Operation, Handler]:
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

    async def _reply(
        self, reply_to: str, message: AbstractIncomingMessage, outcome: _Outcome
    ) -> None:
        assert self._channel is not None  # set before consuming starts
        reply = aio_pika.Message(
            outcome.body,
            content_type=JSON_CONTENT_TYPE,
            type=outcome.type,
            correlation_id=message.correlation_id or message.message_id,
        )
        # mandatory=False: a caller that went away must not bounce the reply back to us, and
        # direct reply-to on 3.10 returns mandatory replies spuriously.
        await self._channel.default_exchange.publish(reply, routing_key=reply_to, mandatory=False)


def _error_outcome(error: ZanddError) -> _Outcome:
    reply = ErrorReply(code=ErrorCode(error.code), message=error.message, retryable=error.retryable)
    return _Outcome(reply.model_dump_json().encode(), ERROR_REPLY_TYPE)
