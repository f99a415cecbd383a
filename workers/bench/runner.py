"""One ``zandd bench`` run, start to finish, and the clean-up of everything it started."""

from __future__ import annotations

import asyncio
import os
import tempfile
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

from aio_pika.exceptions import AMQPError, ChannelInvalidStateError

from contracts.amqp import connect
from contracts.errors import BrokerUnavailable
from contracts.urls import redact_url
from vault.kek import KekRing
from workers.bench.cpu import local_broker_pid
from workers.bench.environment import (
    attached_signers,
    bench_settings,
    bench_tpm,
    private_vhost,
    require_local_broker,
    running_fleet,
)
from workers.bench.in_process import measure_in_process
from workers.bench.measure import Run, Timing
from workers.bench.progress import Progress
from workers.bench.queue_scenarios import (
    CONCURRENCY,
    FleetResults,
    Processes,
    measure_fleet,
    measure_keygen,
    measure_sign,
)
from workers.bench.report import BenchReport
from workers.bench.shards import (
    SHARDS,
    ShardResults,
    measure_route,
    measure_sign_shards,
    plugin_missing,
)
from workers.operator.fleet import ensure_kek_ring
from workers.service.config import Settings


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """What to measure: fleet sizes to start (or ``attach``), timing, and the keygen bound."""

    signer_counts: tuple[int, ...]
    attach: bool
    timing: Timing
    max_keys: int
    #: issue 15: keys of ``sign_many_keys`` (0: not measured); with ``attach`` found again.
    many_keys: int = 0
    #: issue 19: how many times the compared pairs run (their ratios judged on the median).
    repeat: int = 1


async def run_bench(settings: Settings, options: BenchOptions, progress: Progress) -> BenchReport:
    """Measure every scenario; whatever was started is stopped again, also on Ctrl-C.

    Without ``attach`` each fleet size runs as child processes in a vhost created for the run,
    with its vault and KEK ring in a temporary directory; with ``attach`` the fleet at
    ``settings.amqp_url`` is measured as it is (``keygen`` then adds up to ``max_keys`` keys
    labelled ``zandd-bench`` to its vault).
    """
    if not options.attach:
        require_local_broker(settings.amqp_url)
    # An unreachable broker is one sentence before anything was started.
    await (await connect(settings.amqp_url, connection_name="zandd-bench")).close()
    try:
        return await _run(settings, options, progress)
    except asyncio.CancelledError:
        progress.note("interrupted; what this run started is stopped and removed")
        raise
    except (AMQPError, ChannelInvalidStateError) as exc:
        raise BrokerUnavailable(
            f"lost the broker during the benchmark ({type(exc).__name__})"
        ) from exc


async def _run(settings: Settings, options: BenchOptions, progress: Progress) -> BenchReport:
    async with AsyncExitStack() as stack:
        if options.attach:
            amqp_url = settings.amqp_url
            signer_counts: tuple[int, ...] = (await attached_signers(amqp_url),)
            where = f"the running fleet at {redact_url(amqp_url)}"
        else:
            amqp_url = await stack.enter_async_context(private_vhost(settings.amqp_url, progress))
            signer_counts = options.signer_counts
            where = f"its own fleet in {redact_url(amqp_url)}"
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="zandd-bench-")))
        tcti = stack.enter_context(bench_tpm(settings, workdir / "swtpm"))
        local = bench_settings(settings, amqp_url=amqp_url, data_dir=workdir, tcti=tcti)
        ring = await ensure_kek_ring(local, tcti)
        in_process = await measure_in_process(
            tcti, ring, options.timing, progress, options.max_keys
        )
        fleets: list[FleetResults] = []
        keygen: Run | None = None
        broker = local_broker_pid(amqp_url)
        for signers in signer_counts:
            async with AsyncExitStack() as fleet_stack:
                processes = Processes(broker=broker)
                if not options.attach:
                    fleet = await fleet_stack.enter_async_context(
                        running_fleet(local, tcti, signers, progress, ring)
                    )
                    processes = Processes(signers=fleet.signer_pids(), broker=broker)
                many_keys = options.many_keys if not fleets else 0
                fleets.append(
                    await measure_fleet(
                        amqp_url,
                        signers,
                        options.timing,
                        progress,
                        many_keys,
                        repeat=options.repeat,
                        processes=processes,
                    )
                )
                if keygen is None:
                    keygen = await measure_keygen(
                        amqp_url, options.max_keys, options.timing, progress
                    )
        other = None
        if not options.attach:
            other = await _sign_on_other_transport(
                local, tcti, signer_counts[0], options, progress, ring
            )
        shards = await _sharded(local, tcti, signer_counts[0], options, progress, ring)
        progress.note("done; cleaning up")
    assert keygen is not None  # signer_counts is never empty
    return BenchReport(
        where=f"{where}, {os.cpu_count()} cores",
        duration_s=options.timing.duration_s,
        warmup_s=options.timing.warmup_s,
        fleets=tuple(fleets),
        keygen=keygen,
        in_process=in_process,
        other_transport=other,
        shards=shards,
    )


async def _sharded(
    local: Settings,
    tcti: str,
    signers: int,
    options: BenchOptions,
    progress: Progress,
    ring: KekRing,
) -> ShardResults | str:
    """The sharded option beside the targets: its results, or why it was skipped.

    With ``attach`` only the broker pair runs: the bench does not move a running fleet's route.
    """
    missing = await plugin_missing(local.amqp_url)
    if missing is not None:
        progress.note(f"sharded sign path skipped: {missing}")
        return missing
    route_one, route_sharded = await measure_route(local.amqp_url, options.timing, progress)
    sign_one = sign_sharded = None
    if not options.attach:
        settings = local.model_copy(update={"sign_shards": SHARDS})
        async with running_fleet(settings, tcti, signers, progress, ring):
            sign_one, sign_sharded = await measure_sign_shards(
                local.amqp_url, signers, options.timing, progress, CONCURRENCY
            )
    return ShardResults(SHARDS, route_one, route_sharded, sign_one, sign_sharded)


async def _sign_on_other_transport(
    local: Settings,
    tcti: str,
    signers: int,
    options: BenchOptions,
    progress: Progress,
    ring: KekRing,
) -> tuple[str, Run]:
    """``sign`` once more, the workers on the transport the targets are not measured on."""
    other = "aiormq" if local.transport == "lean" else "lean"
    settings = local.model_copy(update={"transport": other})
    async with running_fleet(settings, tcti, signers, progress, ring):
        run = await measure_sign(
            local.amqp_url, signers, options.timing, progress, f"sign ({other})"
        )
    return other, run
