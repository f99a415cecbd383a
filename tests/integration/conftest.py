"""Fixtures for integration tests against real services (swtpm, RabbitMQ, stores)."""

from __future__ import annotations

import importlib
import shutil
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from contracts.client import SigningClient
from tests.support.broker import broker_users
from tests.support.fleet import RunningFleet
from tests.support.principals import ADMIN, ALICE, BOB, CAROL
from tests.support.rabbit_cluster import Cluster, available, start_cluster
from workers.keygen.swtpm import start_swtpm


@pytest.fixture(scope="session")
def swtpm_tcti(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """TCTI string of a private swtpm started for this test session on free ports."""
    if shutil.which("swtpm") is None:
        pytest.skip("swtpm is not installed: apt-get install swtpm swtpm-tools")
    try:
        importlib.import_module("tpm2_pytss")
    except ImportError as exc:
        pytest.skip(f"tpm2-pytss is not usable ({exc}): pip install 'zandd-hsm[tpm]'")
    swtpm = start_swtpm(tmp_path_factory.mktemp("swtpm") / "state")
    try:
        yield swtpm.tcti
    finally:
        swtpm.stop()


@pytest.fixture(scope="module")
def rabbit_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A private 3-node RabbitMQ cluster on free local ports (the default node untouched)."""
    yield from _private_nodes(tmp_path_factory, 3)


@pytest.fixture(scope="module")
def rabbit_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One private RabbitMQ node (a cluster of one), for tests that reconfigure their broker."""
    yield from _private_nodes(tmp_path_factory, 1)


def _private_nodes(factory: pytest.TempPathFactory, size: int) -> Iterator[Cluster]:
    reason = available()
    if reason is not None:
        pytest.skip(reason)
    cluster = start_cluster(size, root=factory.mktemp("rabbit"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def users(amqp_url: str) -> Iterator[dict[str, str]]:
    """Broker users with a producer's rights only, in this module's vhost: name → AMQP URL.

    A producer may publish to ``zandd`` and declare and read its own reply queues (the
    documented ``producer_permissions``); it cannot read the work queues, bind to
    ``zandd.events`` or touch anything else.
    """
    with broker_users(amqp_url, (ALICE, BOB, CAROL, ADMIN)) as urls:
        yield urls


@pytest.fixture
async def clients(
    users: dict[str, str], fleet: RunningFleet
) -> AsyncIterator[dict[str, SigningClient]]:
    """One connected client per user (the fleet is up, so the exchange exists)."""
    connected = {name: await SigningClient.connect(url) for name, url in users.items()}
    try:
        yield connected
    finally:
        for client in connected.values():
            await client.close()


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Print one line of figures in pytest's output, even while output is captured."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")

    def write(line: str) -> None:
        if reporter is None:
            return
        if capture is None:
            reporter.write_line(line)
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)

    return write
