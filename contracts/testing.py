"""``FakeFleet``: a test double of the ZANDD fleet for producers' own unit tests.

What FastStream's ``TestRabbitBroker`` is to a FastStream app: the real client, no broker.

    from contracts.testing import FakeFleet

    async def test_invoices_are_signed() -> None:
        fleet = FakeFleet()
        async with await fleet.client() as client:        # a real SigningClient
            key = await client.create_key(label="invoices")
            signature = await my_app.sign_invoice(client, key.key_id, b"...")
            assert await client.verify(key, signature, message=b"...")

The client is ``SigningClient`` itself (or ``SyncSigningClient``, from ``fleet.sync_client()``)
over an in-memory connection: the same methods, the same request validation and limits, the
same reply models (every reply is built from them and parsed back by the client), and the same
errors — ``KeyNotFound`` for an unknown key, ``Forbidden`` for a principal that may not sign,
``KeyDisabled``, ``InvalidRequest``, ``NotDelivered`` for an operation no queue is bound to.
Signatures are real (``contracts.algorithms``, the fleet's own sign and verify code) and verify
with ``cryptography``; keys live in a dict of this process (``contracts.testing_fleet``).

Each client acts as one principal (``fleet.client("alice")``; ``admins=`` names the fleet's
admins), as the broker's ``user_id`` would make it. ``fleet.fail_next(operation, error)``
makes the next request of that operation fail with a ``ZanddError`` of your choice (a
``TpmUnavailable``, a ``Throttled``…) to test a producer's error handling; ``fleet.requests``
lists what was asked, in order.

A test tool only: nothing is sealed, audited or persisted, and ZANDD's own integration tests
never use it (they run the real fleet).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pydantic import BaseModel

from contracts.client import DEFAULT_TIMEOUT_S, SigningClient
from contracts.errors import (
    InternalError,
    InvalidRequest,
    Throttled,
    ZanddError,
)
from contracts.limits import DEFAULT_LIMITS, Limits
from contracts.models import MAX_RETRY_AFTER_MS, ErrorReply, parse_request
from contracts.operations import ERROR_REPLY_TYPE, Operation
from contracts.sync_client import SyncSigningClient
from contracts.testing_fleet import FakeVault
from contracts.topology import EXCHANGE, QUEUE_OPERATIONS
from contracts.wire import DeclaredQueue, Delivery, DeliveryCallback, Properties, WireClosed

__all__ = ["FakeFleet", "FakeRequest"]

#: RabbitMQ's ``basic.return`` code for a mandatory message no queue was bound for.
_NO_ROUTE = 312


@dataclass(frozen=True, slots=True)
class FakeRequest:
    """A request the fake fleet received: its operation, parsed body and principal."""

    operation: Operation
    request: BaseModel
    principal: str


class FakeFleet:
    """An in-process fleet: real crypto, keys in memory, no broker, no TPM, no vault."""

    def __init__(
        self,
        *,
        admins: Iterable[str] = (),
        limits: Limits = DEFAULT_LIMITS,
        operations: Iterable[Operation] | None = None,
    ) -> None:
        """``admins``: principals with the fleet's admin rights. ``limits``: the fleet's
        request limits. ``operations``: the operations served (default: every one the fake
        implements); a request for another fails with ``NotDelivered``, as when no worker
        queue is bound."""
        self.vault = FakeVault(admins=admins)
        self._limits = limits
        self._served = frozenset(self.vault.handlers if operations is None else operations)
        self._failures: dict[Operation, list[ZanddError]] = {}
        #: Every request served, in order.
        self.requests: list[FakeRequest] = []

    def source(self, principal: str = "app") -> FakeSource:
        """A ``contracts.client_wire.WireSource`` for ``SigningClient.connect``."""
        return FakeSource(self, principal)

    async def client(
        self,
        principal: str = "app",
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry: bool = False,
        limits: Limits = DEFAULT_LIMITS,
    ) -> SigningClient:
        """A connected ``SigningClient`` acting as ``principal`` (close it, or ``async with``)."""
        return await SigningClient.connect(
            self.source(principal), timeout_s=timeout_s, retry=retry, limits=limits
        )

    def sync_client(
        self, principal: str = "app", *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> SyncSigningClient:
        """A connected ``SyncSigningClient`` acting as ``principal`` (close it, or ``with``)."""
        return SyncSigningClient.connect(self.source(principal), timeout_s=timeout_s)

    def fail_next(self, operation: Operation | str, error: ZanddError) -> None:
        """The next request of ``operation`` gets ``error`` as its ``error`` reply."""
        self._failures.setdefault(Operation(operation), []).append(error)

    def serve(
        self, operation: Operation, body: bytes, principal: str, message_id: str | None
    ) -> tuple[bytes, str]:
        """Answer one request as the fleet would: (reply body, AMQP ``type``)."""
        try:
            request = parse_request(operation, body, self._limits)
            self.requests.append(FakeRequest(operation, request, principal))
            failures = self._failures.get(operation)
            if failures:
                raise failures.pop(0)
            self.vault.message_id = message_id
            reply = self.vault.handlers[operation](request, principal)
        except ZanddError as error:
            return _error_reply(error), ERROR_REPLY_TYPE
        except Exception as exc:  # a bug of the fake: an ``internal`` reply, as a worker would
            return _error_reply(InternalError(f"the fake fleet failed: {type(exc).__name__}")), (
                ERROR_REPLY_TYPE
            )
        return reply.model_dump_json().encode(), operation.reply_type

    def consumes(self, queue: str) -> bool:
        """Whether a fake worker consumes ``queue`` (it serves one of the queue's operations)."""
        return any(operation in self._served for operation in QUEUE_OPERATIONS.get(queue, ()))

    def routes(self, routing_key: str) -> Operation | None:
        """The operation a routing key is bound to here, or None (unroutable)."""
        try:
            operation = Operation(routing_key)
        except ValueError:
            return None
        return operation if operation in self._served else None


class FakeSource:
    """Opens ``FakeWire``s onto a ``FakeFleet`` for one principal."""

    def __init__(self, fleet: FakeFleet, principal: str) -> None:
        self._fleet = fleet
        self._principal = principal

    @property
    def principal(self) -> str:
        """The principal every request of the client carries."""
        return self._principal

    async def open(self, *, connection_name: str, timeout_s: float) -> FakeWire:
        """A fresh in-memory connection."""
        del connection_name, timeout_s
        return FakeWire(self._fleet, self._principal)

    async def declare_topology(self, *, timeout_s: float) -> None:
        """Nothing to declare."""


class FakeWire:
    """An in-memory ``contracts.client_wire.ClientWire``: a publish is served on the next turn
    of the event loop, and its reply delivered on the one after, as over a broker."""

    _queues = itertools.count(1)

    def __init__(self, fleet: FakeFleet, principal: str) -> None:
        self._fleet = fleet
        self._principal = principal
        self._reply_queue = ""
        self._on_delivery: DeliveryCallback | None = None
        self._tags = itertools.count(1)
        self.lost = asyncio.Event()
        self.reason: WireClosed | None = None
        self.on_return: Callable[[int, str, Delivery], None] | None = None

    async def confirm_select(self) -> None:
        """Every publish is confirmed."""

    async def declare_queue(
        self,
        queue: str,
        *,
        exclusive: bool = False,
        auto_delete: bool = False,
        passive: bool = False,
    ) -> DeclaredQueue:
        """The client's reply queue (named as the broker would); with ``passive``, a work
        queue: consumed (one consumer) when the fake serves any of its operations."""
        del exclusive, auto_delete
        if passive:
            return DeclaredQueue(queue, 0, 1 if self._fleet.consumes(queue) else 0)
        self._reply_queue = queue or f"amq.gen-fake-{next(self._queues)}"
        return DeclaredQueue(self._reply_queue, 0)

    async def consume(
        self, queue: str, on_delivery: DeliveryCallback, *, no_ack: bool = False
    ) -> str:
        """Replies go to ``on_delivery``."""
        del queue, no_ack
        self._on_delivery = on_delivery
        return "fake-consumer"

    def publish(
        self,
        body: bytes,
        properties: Properties,
        *,
        routing_key: str,
        exchange: str = "",
        mandatory: bool = False,
    ) -> asyncio.Future[bool] | None:
        """Serve the request (on the next turn) and confirm it."""
        if self.lost.is_set():
            raise WireClosed("the fake connection is closed")
        properties.encode()  # the same bounds as the real connection (InvalidRequest)
        if properties.user_id != self._principal:
            raise InvalidRequest(
                "user_id differs from the connection's user (the broker would refuse it)"
            )
        loop = asyncio.get_running_loop()
        loop.call_soon(self._serve, body, properties, routing_key, exchange == EXCHANGE, mandatory)
        confirmed: asyncio.Future[bool] = loop.create_future()
        confirmed.set_result(True)
        return confirmed

    def on_blocked(self, callback: Callable[[str | None], None]) -> None:
        """The fake broker never blocks."""
        del callback

    def drop(self, reason: str) -> None:
        """End this connection (the client reconnects, as after a lost broker)."""
        if not self.lost.is_set():
            self.reason = WireClosed(reason)
            self.lost.set()

    async def close(self) -> None:
        """End this connection."""
        self.drop("closed by this client")

    def _serve(
        self, body: bytes, properties: Properties, routing_key: str, to_zandd: bool, mandatory: bool
    ) -> None:
        if self.lost.is_set():
            return
        operation = self._fleet.routes(routing_key) if to_zandd else None
        if operation is None:
            if mandatory and self.on_return is not None:
                self.on_return(_NO_ROUTE, "NO_ROUTE", self._delivery(body, properties, routing_key))
            return
        reply, reply_type = self._fleet.serve(
            operation, body, self._principal, properties.message_id
        )
        asyncio.get_running_loop().call_soon(
            self._deliver,
            Delivery(
                body=reply,
                delivery_tag=next(self._tags),
                exchange="",
                routing_key=self._reply_queue,
                redelivered=False,
                headers={},
                message_id=None,
                correlation_id=properties.correlation_id or properties.message_id,
                type=reply_type,
                reply_to=None,
                user_id=None,
                content_type="application/json",
            ),
        )

    def _deliver(self, delivery: Delivery) -> None:
        if not self.lost.is_set() and self._on_delivery is not None:
            self._on_delivery(delivery)

    @staticmethod
    def _delivery(body: bytes, properties: Properties, routing_key: str) -> Delivery:
        return Delivery(
            body=body,
            delivery_tag=0,
            exchange=EXCHANGE,
            routing_key=routing_key,
            redelivered=False,
            headers=dict(properties.headers or {}),
            message_id=properties.message_id,
            correlation_id=properties.correlation_id,
            type=properties.type,
            reply_to=properties.reply_to,
            user_id=properties.user_id,
            content_type=properties.content_type,
        )


def _error_reply(error: ZanddError) -> bytes:
    retry_after_s = error.retry_after_s if isinstance(error, Throttled) else None
    reply = ErrorReply(
        code=error.code,
        message=error.message,
        retryable=error.retryable,
        retry_after_ms=None
        if retry_after_s is None
        else min(MAX_RETRY_AFTER_MS, round(retry_after_s * 1000)),
    )
    return reply.model_dump_json(exclude_none=True).encode()
