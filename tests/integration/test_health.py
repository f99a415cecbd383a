"""``zandd health`` against the real broker (private vhosts), SQLite and a real swtpm."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from contracts.errors import BrokerUnavailable
from contracts.topology import (
    KEYGEN_QUEUE,
    SIGN_QUEUE,
    QueueMissing,
    consumer_count,
    declare_topology,
)
from tests.support.cli import environment, run_zandd
from tests.support.net import free_port
from workers.operator.health import (
    HEARTBEAT_MAX_AGE_S,
    Role,
    TpmCheck,
    TpmHeartbeat,
    Unhealthy,
    check_health,
    heartbeat_path,
    read_tpm_check,
)
from workers.service.config import Settings

pytestmark = pytest.mark.rabbitmq


async def _never(message: AbstractIncomingMessage) -> None:
    """Holds the consumer slot; the tests publish nothing."""


@pytest.fixture
async def topology(empty_amqp_url: str) -> str:
    """A private vhost with the topology declared and nobody consuming."""
    connection = await aio_pika.connect(empty_amqp_url)
    async with connection:
        await declare_topology(await connection.channel())
    return empty_amqp_url


async def _attach(amqp_url: str, queue: str) -> aio_pika.abc.AbstractConnection:
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    await (await channel.get_queue(queue)).consume(_never)
    return connection


async def test_consumer_count_is_one_function_with_one_failure_behaviour(
    empty_amqp_url: str,
) -> None:
    """fleet, health and bench all ask it: a missing queue is QueueMissing, then counts."""
    connection = await aio_pika.connect(empty_amqp_url)
    async with connection:
        with pytest.raises(QueueMissing, match=f"queue {SIGN_QUEUE} does not exist") as missing:
            await consumer_count(connection, SIGN_QUEUE)
        assert isinstance(missing.value, BrokerUnavailable)
        # The failed question closed only its own channel: the connection answers the next.
        await declare_topology(await connection.channel())
        assert await consumer_count(connection, SIGN_QUEUE) == 0
        consumer = await _attach(empty_amqp_url, SIGN_QUEUE)
        try:
            assert await consumer_count(connection, SIGN_QUEUE) == 1
        finally:
            await consumer.close()


def _zandd(*args: str, amqp_url: str | None = None) -> subprocess.CompletedProcess[str]:
    # The URL in the environment, as operators are told to: on the command line it draws a
    # warning (a password there is visible in ps).
    urls = {} if amqp_url is None else {"ZANDD_AMQP_URL": amqp_url}
    return run_zandd(*args, env=environment(**urls))


async def test_a_signer_with_broker_consumer_and_vault_is_healthy(
    topology: str, tmp_path: Path
) -> None:
    attached = await _attach(topology, SIGN_QUEUE)
    try:
        result = await asyncio.to_thread(
            _zandd, "health", "--role", "signer", "--data-dir", str(tmp_path), amqp_url=topology
        )
    finally:
        await attached.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout == "healthy: broker, zandd.sign (1 consumer), vault\n"


async def test_without_a_consumer_one_line_says_so_and_the_exit_code_is_1(
    topology: str, tmp_path: Path
) -> None:
    result = await asyncio.to_thread(
        _zandd, "health", "--role", "signer", "--data-dir", str(tmp_path), amqp_url=topology
    )
    assert result.returncode == 1
    assert result.stderr == "zandd: no consumer on zandd.sign\n"
    assert result.stdout == ""


async def test_an_unreachable_broker_fails_in_one_line(tmp_path: Path) -> None:
    url = f"amqp://guest:secret-pw@127.0.0.1:{free_port()}/"
    result = await asyncio.to_thread(_zandd, "health", "--data-dir", str(tmp_path), amqp_url=url)
    assert result.returncode == 1
    assert result.stderr.startswith("zandd: cannot reach the broker at amqp://guest:***@127.0.0.1:")
    assert result.stderr.count("\n") == 1
    assert "secret-pw" not in result.stderr


async def test_a_password_on_the_command_line_draws_a_warning(tmp_path: Path) -> None:
    url = f"amqp://guest:secret-pw@127.0.0.1:{free_port()}/"
    result = await asyncio.to_thread(
        _zandd, "health", f"--amqp-url={url}", "--data-dir", str(tmp_path)
    )
    assert result.returncode == 1
    warning, error = result.stderr.splitlines()
    assert " WARNING zandd.cli" in warning
    assert "(--amqp-url=amqp://guest:***@127.0.0.1:" in warning
    assert "visible to every local user (ps)" in warning
    assert "ZANDD_AMQP_URL" in warning
    assert error.startswith("zandd: cannot reach the broker at amqp://guest:***@127.0.0.1:")
    assert "secret-pw" not in result.stderr


async def test_a_queue_nobody_declared_is_named(empty_amqp_url: str, tmp_path: Path) -> None:
    settings = Settings(amqp_url=empty_amqp_url, data_dir=tmp_path)
    with pytest.raises(Unhealthy, match=r"queue zandd\.keygen does not exist"):
        await check_health(settings, Role.KEYGEN)


async def test_without_a_role_both_queues_need_a_consumer(topology: str, tmp_path: Path) -> None:
    settings = Settings(amqp_url=topology, data_dir=tmp_path)
    signer = await _attach(topology, SIGN_QUEUE)
    try:
        with pytest.raises(Unhealthy, match=r"no consumer on zandd\.keygen"):
            await check_health(settings, None)
        keygen = await _attach(topology, KEYGEN_QUEUE)
        try:
            report = await check_health(settings, None)
        finally:
            await keygen.close()
    finally:
        await signer.close()
    assert report.line == (
        "healthy: broker, zandd.keygen (1 consumer), zandd.sign (1 consumer), vault"
    )


async def test_a_vault_that_cannot_open_is_named(topology: str, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    settings = Settings(
        amqp_url=topology, data_dir=tmp_path, vault_url=f"sqlite:///{blocker}/vault.db"
    )
    attached = await _attach(topology, SIGN_QUEUE)
    try:
        with pytest.raises(Unhealthy, match=f"the vault at sqlite:///{blocker}/vault.db failed"):
            await check_health(settings, Role.SIGNER)
    finally:
        await attached.close()


# -- keygen: the TPM as the worker sees it ---------------------------------------------------


@pytest.fixture
def tpm_thread() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-tpm")
    yield executor
    executor.shutdown(wait=True)


@pytest.mark.tpm
async def test_keygen_is_healthy_while_its_heartbeat_says_the_tpm_answers_then_not(
    topology: str, tmp_path: Path, swtpm_tcti: str, tpm_thread: ThreadPoolExecutor
) -> None:
    from workers.keygen.swtpm import start_swtpm
    from workers.keygen.tpm import Tpm

    swtpm = start_swtpm(tmp_path / "swtpm")
    settings = Settings(amqp_url=topology, data_dir=tmp_path / "data", tpm_tcti=swtpm.tcti)
    loop = asyncio.get_running_loop()
    try:
        tpm = await loop.run_in_executor(tpm_thread, Tpm, swtpm.tcti)

        async def probe() -> object:
            return await loop.run_in_executor(tpm_thread, tpm.info)

        heartbeat = TpmHeartbeat(heartbeat_path(settings), probe)
        attached = await _attach(topology, KEYGEN_QUEUE)
        try:
            with pytest.raises(Unhealthy, match="no TPM heartbeat at"):
                await check_health(settings, Role.KEYGEN)
            assert (await heartbeat.beat()).ok
            report = await check_health(settings, Role.KEYGEN)
            assert report.line.startswith(
                "healthy: broker, zandd.keygen (1 consumer), vault, TPM (answered "
            )
            swtpm.stop()
            failed = await heartbeat.beat()
            assert not failed.ok
            with pytest.raises(Unhealthy, match="the TPM did not answer the keygen worker: "):
                await check_health(settings, Role.KEYGEN)
        finally:
            await attached.close()
            await loop.run_in_executor(tpm_thread, tpm.close)
    finally:
        swtpm.stop()


@pytest.mark.tpm
async def test_the_heartbeat_runs_until_stopped_and_then_vouches_for_nothing(
    tmp_path: Path, swtpm_tcti: str, tpm_thread: ThreadPoolExecutor
) -> None:
    from workers.keygen.tpm import Tpm

    loop = asyncio.get_running_loop()
    tpm = await loop.run_in_executor(tpm_thread, Tpm, swtpm_tcti)
    path = tmp_path / "keygen-tpm.json"
    beats = asyncio.Event()

    async def probe() -> object:
        info = await loop.run_in_executor(tpm_thread, tpm.info)
        beats.set()
        return info

    stop = asyncio.Event()
    running = asyncio.create_task(TpmHeartbeat(path, probe, interval_s=0.05).run(stop))
    try:
        await asyncio.wait_for(beats.wait(), 30)
        beats.clear()
        await asyncio.wait_for(beats.wait(), 30)
        assert TpmCheck.from_json(path.read_text()).ok
    finally:
        stop.set()
        await running
        await loop.run_in_executor(tpm_thread, tpm.close)
    assert not path.exists()


def test_a_stale_or_unreadable_heartbeat_is_unhealthy(tmp_path: Path) -> None:
    path = tmp_path / "keygen-tpm.json"
    path.write_text(TpmCheck(ok=True, checked_at=1000.0, detail="answered").to_json())
    assert read_tpm_check(path, now=1000.0 + HEARTBEAT_MAX_AGE_S) == "TPM (answered 30 s ago)"
    with pytest.raises(Unhealthy, match="last checked the TPM 31 s ago"):
        read_tpm_check(path, now=1000.0 + HEARTBEAT_MAX_AGE_S + 1)
    path.write_text("{}")
    with pytest.raises(Unhealthy, match="cannot read the TPM heartbeat"):
        read_tpm_check(path, now=1000.0)
