"""SIGTERM to a ``zandd`` command cleans up as Ctrl-C does: what it started is stopped and
removed (``zandd bench``: its vhost, and the temporary directory with its KEK ring and vault)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.broker import BASE_AMQP_URL, rabbitmqctl
from tests.support.cli import ZANDD, environment

#: A bench as small as it goes: it is stopped long before it would measure anything.
SMALL_BENCH = ("bench", "--signers", "1", "--duration-s", "0.2", "--warmup-s", "0.1")
SMALL_BENCH_SIZES = ("--max-keys", "1", "--many-keys", "0")


async def _until(check: Callable[[], bool], timeout_s: float = 60.0) -> None:
    for _ in range(int(timeout_s * 10)):
        if check():
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"not within {timeout_s} s: {check.__name__}")


def _bench_directories(tmp_path: Path) -> list[Path]:
    return list(tmp_path.glob("zandd-bench-*"))


def _bench_vhosts() -> set[str]:
    listed = rabbitmqctl("list_vhosts", "--no-table-headers", "name").split()
    return {name for name in listed if name.startswith("zandd-bench-")}


@pytest.mark.rabbitmq
@pytest.mark.tpm
async def test_sigterm_to_bench_removes_its_vhost_and_temporary_directory(
    tmp_path: Path,
) -> None:
    before = _bench_vhosts()
    env = environment(ZANDD_AMQP_URL=BASE_AMQP_URL, TMPDIR=str(tmp_path))
    process = await asyncio.create_subprocess_exec(
        *ZANDD,
        *SMALL_BENCH,
        *SMALL_BENCH_SIZES,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:

        def ring_written() -> bool:
            return any(tmp_path.glob("zandd-bench-*/kek-ring.json"))

        # Its vhost and its temporary KEK ring exist: now it has something to clean up.
        await _until(ring_written)
        started = _bench_vhosts() - before
        assert len(started) == 1, started
        process.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    err = stderr.decode()
    assert process.returncode == 143, err
    assert "interrupted; what this run started is stopped and removed" in err
    assert "Traceback" not in err
    assert stdout == b""
    assert not started & _bench_vhosts()
    assert not _bench_directories(tmp_path), "the temporary directory was left behind"
