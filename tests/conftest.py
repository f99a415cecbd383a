"""Fixtures shared by the test tiers: a private RabbitMQ vhost and an in-process fleet."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from yarl import URL

from contracts.client import SigningClient
from contracts.operations import Operation
from contracts.topology import KEYGEN_QUEUE, SIGN_QUEUE, declare_topology
from vault.kek import KekRing
from vault.store import VaultStore, open_store
from workers.config import Settings
from workers.runtime import ConsumerRuntime, Handler, RequestContext


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "signers(n): how many signers the fleet fixture starts")


# -- RabbitMQ: a private vhost per test module -----------------------------------------------

BASE_AMQP_URL = os.environ.get("ZANDD_TEST_AMQP_URL", "amqp://guest:guest@localhost:5672/")


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@contextmanager
def private_vhost() -> Iterator[str]:
    """A vhost of our own on the test broker, removed afterwards; yields its AMQP URL."""
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is needed to create a test vhost (run the tests through ops/test)")
    vhost = f"zandd-test-{uuid.uuid4().hex[:12]}"
    user = URL(BASE_AMQP_URL).user or "guest"
    try:
        _rabbitmqctl("add_vhost", vhost)
        _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"cannot create a test vhost: {exc.stderr.decode(errors='replace').strip()}")
    try:
        yield str(URL(BASE_AMQP_URL).with_path("/" + vhost))
    finally:
        _rabbitmqctl("delete_vhost", vhost)


@pytest.fixture(scope="module")
def amqp_url() -> Iterator[str]:
    """A private vhost for a test module: tests never share queues with a running fleet."""
    with private_vhost() as url:
        yield url


@pytest.fixture
def empty_amqp_url() -> Iterator[str]:
    """A private vhost for one test, with nothing declared in it."""
    with private_vhost() as url:
        yield url


# -- a fleet of in-process workers on real RabbitMQ, swtpm and SQLite -------------------------


@dataclass
class RunningFleet:
    """Workers running as tasks in the test's event loop."""

    amqp_url: str
    settings: Settings
    store: VaultStore
    ring: KekRing
    runtimes: dict[str, ConsumerRuntime] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    served: dict[str, int] = field(default_factory=dict)

    def client(self, **kwargs: Any) -> Awaitable[SigningClient]:
        """A connected client for this fleet (close it, or use it as ``async with``)."""
        return SigningClient.connect(self.amqp_url, **kwargs)


def _counting(
    name: str, handlers: Mapping[Operation, Handler], served: dict[str, int]
) -> dict[Operation, Handler]:
    """Wrap handlers so a test can see which worker served how many requests."""

    def wrap(handler: Handler) -> Handler:
        async def counted(request: Any, context: RequestContext) -> Any:
            served[name] = served.get(name, 0) + 1
            return await handler(request, context)

        return counted

    return {operation: wrap(handler) for operation, handler in handlers.items()}


@pytest.fixture
async def fleet(
    amqp_url: str, swtpm_tcti: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[RunningFleet]:
    """A keygen worker and two signers (``@pytest.mark.signers(n)`` for another count)."""
    marker = request.node.get_closest_marker("signers")
    signer_count = marker.args[0] if marker else 2
    settings = Settings(
        amqp_url=amqp_url, data_dir=tmp_path, tpm_tcti=swtpm_tcti, drain_timeout_s=5.0
    )
    ring = KekRing.create(settings.resolved_kek_file)
    store = await open_store(settings.resolved_vault_url)
    running = RunningFleet(amqp_url, settings, store, ring)
    await _purge_work_queues(amqp_url)
    stop = asyncio.Event()
    from workers.keygen.session import TpmSession
    from workers.keygen.worker import Keygen
    from workers.signer.worker import Signer

    tpm = TpmSession(swtpm_tcti)
    try:
        keygen = Keygen(store, ring, tpm)
        workers: list[tuple[str, str, Mapping[Operation, Handler]]] = [
            ("keygen", KEYGEN_QUEUE, keygen.handlers)
        ]
        workers += [
            (f"signer-{n}", SIGN_QUEUE, Signer(store, ring).handlers)
            for n in range(1, signer_count + 1)
        ]
        for name, queue, handlers in workers:
            runtime = ConsumerRuntime(
                amqp_url=amqp_url,
                queue=queue,
                handlers=_counting(name, handlers, running.served),
                prefetch=settings.signer_concurrency,
                limits=settings.limits,
                drain_timeout_s=settings.drain_timeout_s,
                name=f"test-{name}",
            )
            running.runtimes[name] = runtime
            running.tasks.append(asyncio.create_task(runtime.run(stop)))
        await asyncio.wait_for(
            asyncio.gather(*(r.ready.wait() for r in running.runtimes.values())), 30
        )
        yield running
    finally:
        stop.set()
        await asyncio.gather(*running.tasks)
        tpm.close()
        await store.close()


async def _purge_work_queues(amqp_url: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        topology = await declare_topology(channel)
        for queue in topology.queues.values():
            await queue.purge()
