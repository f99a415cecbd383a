"""Closed-loop load drivers and what one measured run leaves behind: count, time, latencies."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from workers.bench.cpu import CpuMeter, added, spent
from workers.bench.progress import Progress

#: Operations every measured run does at least, however short its duration: a p99 of fewer
#: samples would be a maximum, and a rate of one sample mostly noise.
MIN_OPERATIONS = 5
#: A blocking (in-process) run hands control back to the event loop this often, so progress is
#: drawn and Ctrl-C is honoured while it runs.
_YIELD_EVERY_S = 0.05

#: One request of a scenario, awaited to its reply.
Operation = Callable[[], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Load:
    """How hard and how long to drive one scenario."""

    concurrency: int
    duration_s: float
    min_operations: int = MIN_OPERATIONS
    max_operations: int | None = None

    def wants_more(self, done: int, started: int, now: float, deadline: float) -> bool:
        """Whether a worker should start another operation."""
        if self.max_operations is not None and started >= self.max_operations:
            return False
        return now < deadline or done < self.min_operations


@dataclass(frozen=True, slots=True)
class Timing:
    """How long each scenario runs, and its warm-up."""

    duration_s: float
    warmup_s: float

    def load(self, concurrency: int) -> Load:
        """The measured load at ``concurrency``."""
        return Load(concurrency=concurrency, duration_s=self.duration_s)

    def warmup(self, concurrency: int) -> Load:
        """The warm-up load at ``concurrency``."""
        return Load(concurrency=concurrency, duration_s=self.warmup_s, min_operations=1)


@dataclass(frozen=True, slots=True)
class Run:
    """One measured scenario: how many operations completed, in how long, each how fast."""

    operations: int
    elapsed_s: float
    latencies_s: tuple[float, ...]
    #: issue 19: CPU seconds each role spent while it ran (``workers.bench.cpu``; empty when
    #: not metered).
    cpu_s: Mapping[str, float] = field(default_factory=dict)

    @property
    def per_s(self) -> float:
        """Completed operations per second of wall time."""
        return self.operations / self.elapsed_s

    @property
    def p50_ms(self) -> float:
        """Median latency in milliseconds."""
        return self.percentile_ms(50)

    @property
    def p99_ms(self) -> float:
        """99th percentile latency in milliseconds."""
        return self.percentile_ms(99)

    @property
    def p999_ms(self) -> float:
        """99.9th percentile latency in milliseconds (issue 19: the tail under load)."""
        return self.percentile_ms(99.9)

    @classmethod
    def merged(cls, parts: Sequence[Run]) -> Run:
        """One run of several measured apart: their operations, times, latencies and CPU."""
        return cls(
            operations=sum(part.operations for part in parts),
            elapsed_s=sum(part.elapsed_s for part in parts),
            latencies_s=tuple(latency for part in parts for latency in part.latencies_s),
            cpu_s=added([part.cpu_s for part in parts]),
        )

    def percentile_ms(self, percent: float) -> float:
        """The nearest-rank percentile of the latencies, in milliseconds."""
        ordered = sorted(self.latencies_s)
        # Rounded first: 99.9 / 100 * 2000 is 1998.0000000000002 in floating point.
        rank = max(1, math.ceil(round(percent / 100 * len(ordered), 9)))
        return ordered[rank - 1] * 1000


async def drive(
    operation: Operation, load: Load, progress: Progress, meter: CpuMeter | None = None
) -> Run:
    """Keep ``load.concurrency`` operations in flight until the duration is over.

    Each worker starts its next operation when its last one completes (a closed loop), so the
    rate measured is what the system sustains, and the latency includes queueing behind the
    other operations in flight. The first failure stops the run and is raised. With
    ``meter``, the CPU each role spent meanwhile is in the run's ``cpu_s``.
    """
    latencies: list[float] = []
    started = 0
    cpu_before = meter.snapshot() if meter is not None else None
    begin = time.perf_counter()
    deadline = begin + load.duration_s

    async def worker() -> None:
        nonlocal started
        while load.wants_more(len(latencies), started, time.perf_counter(), deadline):
            started += 1
            sent = time.perf_counter()
            await operation()
            latencies.append(time.perf_counter() - sent)
            progress.tick(len(latencies))

    workers = [asyncio.create_task(worker()) for _ in range(load.concurrency)]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    elapsed_s = time.perf_counter() - begin
    cpu_s = spent(cpu_before, meter.snapshot()) if meter is not None and cpu_before else {}
    return Run(len(latencies), elapsed_s, tuple(latencies), cpu_s)


async def drive_blocking(operation: Callable[[], object], load: Load, progress: Progress) -> Run:
    """Run a blocking ``operation`` back to back on this thread (one core) for the duration."""
    latencies: list[float] = []
    begin = time.perf_counter()
    deadline = begin + load.duration_s
    next_yield = begin + _YIELD_EVERY_S
    now = begin
    while load.wants_more(len(latencies), len(latencies), now, deadline):
        operation()
        done = time.perf_counter()
        latencies.append(done - now)
        now = done
        if now >= next_yield:
            progress.tick(len(latencies))
            await asyncio.sleep(0)
            now = next_yield = time.perf_counter()
            next_yield += _YIELD_EVERY_S
    return Run(len(latencies), time.perf_counter() - begin, tuple(latencies))


async def measured(
    label: str,
    operation: Operation,
    load: Load,
    warmup: Load,
    progress: Progress,
) -> Run:
    """Warm up (connections, caches, the JIT-less interpreter's first calls), then measure."""
    progress.begin(f"{label} (warm-up)")
    await drive(operation, warmup, progress)
    progress.begin(label)
    return await drive(operation, load, progress)


async def interleaved(
    scenarios: Sequence[tuple[str, Operation]],
    load: Load,
    warmup: Load,
    progress: Progress,
    *,
    slices: int,
    before: Mapping[str, Callable[[], Awaitable[object]]] | None = None,
    meters: Mapping[str, CpuMeter] | None = None,
) -> list[Run]:
    """Measure scenarios that are to be compared in alternating slices, one ``Run`` each.

    This machine's speed drifts by a fifth over a minute; measured one after the other, two
    scenarios would compare two moments as much as two systems. Each gets ``slices`` slices of
    ``load.duration_s / slices``, in A B B A … order so neither always goes first, and its
    slices are merged. ``before[label]``, when given, runs untimed before each of that
    scenario's warm-up and slices (e.g. moving a route). ``meters[label]``, when given,
    meters that scenario's CPU per role over its slices (not its warm-up).
    """
    before = before or {}
    meters = meters or {}
    for label, operation in scenarios:
        if label in before:
            await before[label]()
        progress.begin(f"{label} (warm-up)")
        await drive(operation, warmup, progress)
    slice_load = replace(load, duration_s=load.duration_s / slices)
    parts: dict[str, list[Run]] = {label: [] for label, _ in scenarios}
    for number in range(slices):
        order = scenarios if number % 2 == 0 else scenarios[::-1]
        for label, operation in order:
            if label in before:
                await before[label]()
            progress.begin(f"{label} (slice {number + 1}/{slices})")
            parts[label].append(await drive(operation, slice_load, progress, meters.get(label)))
    return [Run.merged(parts[label]) for label, _ in scenarios]
