"""The benchmark's interleaved measurement: compared scenarios alternate, slices are merged."""

from __future__ import annotations

import asyncio
import io

from workers.bench.measure import Load, Operation, Run, interleaved
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
    merged = Run.merged([Run(2, 1.0, (0.001, 0.003)), Run(1, 0.5, (0.002,))])
    assert merged == Run(3, 1.5, (0.001, 0.003, 0.002))
    assert merged.per_s == 2.0
    assert merged.p50_ms == 2.0
