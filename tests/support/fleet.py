"""The in-process test fleet: what the ``fleet`` fixture yields and the pieces it is built from."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from contracts.amqp import connect_plain
from contracts.client import SigningClient
from contracts.operations import Operation
from contracts.topology import declare_topology
from vault.kek import KekRing
from vault.store import VaultStore
from workers.consumer.runtime import ConsumerRuntime, Handler, RequestContext
from workers.observability.metrics import Metrics
from workers.service.config import Settings


@dataclass
class ShiftedClock:
    """The real time plus an offset a test moves forward (the fleet keygen's clock)."""

    offset: timedelta = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, delta: timedelta) -> None:
        self.offset += delta


@dataclass
class RunningFleet:
    """Workers running as tasks in the test's event loop."""

    amqp_url: str
    settings: Settings
    store: VaultStore
    ring: KekRing
    clock: ShiftedClock = field(default_factory=ShiftedClock)
    runtimes: dict[str, ConsumerRuntime] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    served: dict[str, int] = field(default_factory=dict)
    #: Each worker's metrics, by the same names as ``runtimes``.
    metrics: dict[str, Metrics] = field(default_factory=dict)

    def client(self, **kwargs: Any) -> Awaitable[SigningClient]:
        """A connected client for this fleet (close it, or use it as ``async with``)."""
        return SigningClient.connect(self.amqp_url, **kwargs)


def counting(
    name: str, handlers: Mapping[Operation, Handler], served: dict[str, int]
) -> dict[Operation, Handler]:
    """Wrap handlers so a test can see which worker served how many requests."""

    def wrap(handler: Handler) -> Handler:
        async def counted(request: Any, context: RequestContext) -> Any:
            served[name] = served.get(name, 0) + 1
            return await handler(request, context)

        return counted

    return {operation: wrap(handler) for operation, handler in handlers.items()}


def fleet_vault_url(request: pytest.FixtureRequest) -> str | None:
    """The vault URL ``@pytest.mark.vault`` asks for; None for the default SQLite file."""
    marker = request.node.get_closest_marker("vault")
    backend = marker.args[0] if marker else "sqlite"
    if backend == "sqlite":
        return None  # the default: a file in the data dir
    if backend == "mongodb":
        return str(request.getfixturevalue("mongo_vault_url"))
    raise pytest.UsageError(f"unknown vault backend {backend!r} in @pytest.mark.vault")


async def purge_work_queues(amqp_url: str) -> None:
    """Empty the work queues of the vhost of ``amqp_url`` (declaring the topology first)."""
    connection = await connect_plain(amqp_url, connection_name="zandd-test-purge")
    async with connection:
        channel = await connection.channel()
        topology = await declare_topology(channel)
        for queue in topology.queues.values():
            await queue.purge()
