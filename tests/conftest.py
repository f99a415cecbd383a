"""Fixtures shared by the test tiers: a private RabbitMQ vhost and an in-process fleet."""

from __future__ import annotations

import asyncio
import gc
import os
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from contracts.client import SigningClient
from contracts.operations import Operation
from contracts.topology import declare_topology
from tests.support.broker import private_vhost
from vault.kek import KekRing
from vault.store import VaultStore, open_store
from workers.config import Settings
from workers.runtime import ConsumerRuntime, Handler, RequestContext


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "signers(n): how many signers the fleet fixture starts")
    config.addinivalue_line(
        "markers", "fleet_settings(**overrides): Settings fields the fleet fixture's workers get"
    )
    config.addinivalue_line(
        "markers", "vault(backend): the fleet fixture's vault, 'sqlite' (default) or 'mongodb'"
    )


# -- RabbitMQ: a private vhost per test module -----------------------------------------------


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


# -- MongoDB: ZANDD_TEST_MONGO_URL, else a testcontainers server, else skip -------------------

MONGO_IMAGE = os.environ.get("ZANDD_TEST_MONGO_IMAGE", "mongo:7.0")


def _docker_unavailable() -> str | None:
    """Why no Docker engine can start a MongoDB container here; None when one answers."""
    try:
        import docker
        import requests
        from testcontainers.community.mongodb import MongoDbContainer  # noqa: F401
    except ImportError as exc:
        return f"testcontainers >= 4.15 is not installed ({exc.name}): pip install 'zandd-hsm[dev]'"
    # docker-py leaves the socket of a failed probe to the garbage collector.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = docker.from_env(timeout=10)
            try:
                client.ping()
            finally:
                client.close()
        except (docker.errors.DockerException, requests.RequestException) as exc:
            return f"no Docker engine answers ({exc})"
        finally:
            gc.collect()
    return None


@pytest.fixture(scope="session")
def mongo_url() -> Iterator[str]:
    """A MongoDB server for the session: ZANDD_TEST_MONGO_URL, else one in a container.

    Skips (with the reason in pytest's summary) when neither is available.
    """
    configured = os.environ.get("ZANDD_TEST_MONGO_URL")
    if configured:
        yield configured
        return
    reason = _docker_unavailable()
    if reason is not None:
        pytest.skip(f"no MongoDB: ZANDD_TEST_MONGO_URL is not set and {reason}")
    from pymongo import MongoClient
    from testcontainers.community.mongodb import MongoDbContainer

    with MongoDbContainer(MONGO_IMAGE) as container:
        url = container.get_connection_url()
        # The image's first mongod (creating the root user) logs "waiting for connections"
        # too, then restarts: wait until the real one answers.
        client: MongoClient[dict[str, Any]] = MongoClient(url, serverSelectionTimeoutMS=60_000)
        with client:
            client.admin.command("ping")
        yield url


def mongo_database_url(server_url: str, database: str) -> str:
    """``server_url`` naming ``database``, still authenticating where ``server_url`` did."""
    base, _, query = server_url.partition("?")
    scheme, _, rest = base.partition("://")
    hosts, _, auth_database = rest.partition("/")
    options = [option for option in query.split("&") if option]
    has_auth_source = any(o.lower().startswith("authsource=") for o in options)
    if "@" in hosts and not has_auth_source:
        # Credentials are checked against the URL's database unless authSource says otherwise.
        options.append(f"authSource={auth_database or 'admin'}")
    return f"{scheme}://{hosts}/{database}" + ("?" + "&".join(options) if options else "")


@pytest.fixture
def mongo_vault_url(mongo_url: str) -> Iterator[str]:
    """A vault URL naming a fresh database of its own on the test MongoDB, dropped afterwards."""
    from pymongo import MongoClient

    database = f"zandd_test_{uuid.uuid4().hex[:16]}"
    url = mongo_database_url(mongo_url, database)
    yield url
    client: MongoClient[dict[str, Any]] = MongoClient(url, serverSelectionTimeoutMS=10_000)
    with client:
        client.drop_database(database)


# -- a fleet of in-process workers on real RabbitMQ, swtpm and a vault -------------------------


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
    """A keygen worker and two signers (``@pytest.mark.signers(n)`` for another count).

    The vault is SQLite in ``tmp_path``; ``@pytest.mark.vault("mongodb")`` puts it in a fresh
    database on the test MongoDB instead (skipping when there is none).
    """
    marker = request.node.get_closest_marker("signers")
    signer_count = marker.args[0] if marker else 2
    overrides = request.node.get_closest_marker("fleet_settings")
    settings = Settings(
        amqp_url=amqp_url,
        data_dir=tmp_path,
        tpm_tcti=swtpm_tcti,
        drain_timeout_s=5.0,
        vault_url=_fleet_vault_url(request),
        **(overrides.kwargs if overrides else {}),
    )
    ring = KekRing.create(settings.resolved_kek_file)
    store = await open_store(settings.resolved_vault_url)
    running = RunningFleet(amqp_url, settings, store, ring)
    await _purge_work_queues(amqp_url)
    stop = asyncio.Event()
    from workers.keygen.session import TpmSession
    from workers.serve import keygen_worker, signer_worker

    tpm = TpmSession(swtpm_tcti)
    stack = AsyncExitStack()
    try:
        keygen = await keygen_worker(settings, store, ring, tpm, stack, clock=running.clock)
        workers = [("keygen", keygen)] + [
            (f"signer-{n}", await signer_worker(settings, store, ring, stack))
            for n in range(1, signer_count + 1)
        ]
        for name, worker in workers:
            runtime = ConsumerRuntime(
                amqp_url=amqp_url,
                queue=worker.queue,
                handlers=_counting(name, worker.handlers, running.served),
                prefetch=settings.signer_concurrency,
                limits=settings.limits,
                drain_timeout_s=settings.drain_timeout_s,
                name=f"test-{name}",
                audit=worker.audit,
                admission=worker.admission,
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
        await stack.aclose()
        tpm.close()
        await store.close()


def _fleet_vault_url(request: pytest.FixtureRequest) -> str | None:
    marker = request.node.get_closest_marker("vault")
    backend = marker.args[0] if marker else "sqlite"
    if backend == "sqlite":
        return None  # the default: a file in the data dir
    if backend == "mongodb":
        return str(request.getfixturevalue("mongo_vault_url"))
    raise pytest.UsageError(f"unknown vault backend {backend!r} in @pytest.mark.vault")


async def _purge_work_queues(amqp_url: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        topology = await declare_topology(channel)
        for queue in topology.queues.values():
            await queue.purge()
