"""Fixtures shared by the test tiers: a private RabbitMQ vhost and an in-process fleet."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.support.broker import private_vhost
from tests.support.fleet import RunningFleet
from tests.support.fleet import counting as _counting
from tests.support.fleet import fleet_vault_url as _fleet_vault_url
from tests.support.fleet import purge_work_queues as _purge_work_queues
from tests.support.mongo import MONGO_IMAGE, mongo_database_url
from tests.support.mongo import docker_unavailable as _docker_unavailable
from tests.support.spans import memory_exporter
from vault.kek import KekRing
from vault.store import open_store
from workers.observability.metrics import Metrics
from workers.service.config import Settings


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


# -- spans: the process-wide in-memory exporter ----------------------------------------------


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The finished spans of this test alone (the exporter is cleared before and after)."""
    exporter = memory_exporter()
    exporter.clear()
    yield exporter
    exporter.clear()


# -- MongoDB: ZANDD_TEST_MONGO_URL, else a testcontainers server, else skip -------------------


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
    from workers.service.serve import build_runtime, keygen_worker, signer_worker

    tpm = TpmSession(swtpm_tcti)
    stack = AsyncExitStack()
    try:
        keygen = await keygen_worker(settings, store, ring, tpm, stack, clock=running.clock)
        workers = [("keygen", keygen)] + [
            (f"signer-{n}", await signer_worker(settings, store, ring, stack))
            for n in range(1, signer_count + 1)
        ]
        for name, worker in workers:
            running.metrics[name] = Metrics()
            runtime = build_runtime(
                settings,
                worker,
                prefetch=settings.signer_concurrency,
                metrics=running.metrics[name],
                name=f"test-{name}",
                handlers=_counting(name, worker.handlers, running.served),
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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Captured output as UTF-8 that can be sent: the hostile-input tests log lone surrogates,
    which pytest-xdist's workers (``ops/test``) cannot pass to the controller as they are."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    report.sections = [
        (title, content.encode("utf-8", "backslashreplace").decode("utf-8"))
        for title, content in report.sections
    ]
