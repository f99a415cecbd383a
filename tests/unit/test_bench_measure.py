"""The benchmark's interleaved measurement: compared scenarios alternate, slices are merged."""

from __future__ import annotations

import asyncio
import io
import os
import socket

from workers.bench.cpu import CpuMeter, local_broker_pid, process_cpu_s
from workers.bench.measure import Load, Operation, Run, drive, interleaved
from workers.bench.progress import Progress


async def test_compared_scenarios_alternate_in_abba_order_and_their_slices_merge() -> None:
    calls: list[str] = []

    def operation(name: str) -> Operation:
        async def call() -> object:
            if not calls or calls[-1] != name:
                calls.append(name)
            await asyncio.sleep(0.001)
            return None

        return call

    load = Load(concurrency=2, duration_s=0.2)
    warmup = Load(concurrency=1, duration_s=0.0, min_operations=1)
    a, b = await interleaved(
        [("a", operation("a")), ("b", operation("b"))],
        load,
        warmup,
        Progress(io.StringIO()),
        slices=4,
    )
    # Warm-ups (a, b), then the slices: a b | b a | a b | b a.
    assert calls == ["a", "b", "a", "b", "a", "b", "a"]
    for run in (a, b):
        assert run.operations == len(run.latencies_s) > 4
        assert 0.15 < run.elapsed_s < 0.6  # four slices of 0.05 s and their tails


def test_a_merged_run_holds_every_slice() -> None:
    merged = Run.merged(
        [
            Run(2, 1.0, (0.001, 0.003), {"client": 0.5, "worker": 1.0}),
            Run(1, 0.5, (0.002,), {"client": 0.25}),
        ]
    )
    # A role metered in only some slices is left out: its sum would not be the run's.
    assert merged == Run(3, 1.5, (0.001, 0.003, 0.002), {"client": 0.75})
    assert merged.per_s == 2.0
    assert merged.p50_ms == 2.0


def test_p999_is_the_nearest_rank_of_the_slowest_tenth_of_a_percent() -> None:
    run = Run(2000, 1.0, tuple((n + 1) / 1000 for n in range(2000)))
    assert run.p99_ms == 1980.0
    assert run.p999_ms == 1998.0


async def test_a_metered_drive_reports_the_cpu_each_role_spent() -> None:
    """The client's CPU is this process's; a worker is any process by pid (here: this one)."""

    async def busy() -> object:
        sum(range(20_000))  # CPU, not sleep
        await asyncio.sleep(0)
        return None

    meter = CpuMeter(workers=(os.getpid(),))
    run = await drive(busy, Load(concurrency=1, duration_s=0.3), Progress(io.StringIO()), meter)
    assert set(run.cpu_s) == {"client", "worker"}  # no broker named
    assert 0.1 < run.cpu_s["client"] <= run.elapsed_s + 0.05
    # /proc counts ticks of 10 ms: the same process seen through it agrees to a few ticks.
    assert abs(run.cpu_s["worker"] - run.cpu_s["client"]) < 0.05


def test_a_vanished_process_is_not_metered() -> None:
    assert process_cpu_s(os.getpid()) is not None
    assert CpuMeter(workers=(2**22 + 12345,)).snapshot()["worker"] is None


def test_the_broker_is_the_process_listening_on_the_urls_port() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert local_broker_pid(f"amqp://u:p@127.0.0.1:{port}/v") == os.getpid()
    # Nobody listens there any more; another machine's broker is not metered.
    assert local_broker_pid(f"amqp://u:p@127.0.0.1:{port}/v") is None
    assert local_broker_pid("amqp://u:p@192.0.2.1:5672/v") is None
