"""Measure the sharded sign path on ONE private RabbitMQ node (docs/performance.md).

    PYTHONPATH=. python ops/bench/shards.py [--duration 30] [--signers 2]

Starts a private node with the consistent-hash plugin (tests/support/rabbit_cluster.py; the
machine's default node is never touched), a keygen worker and signers with
ZANDD_SIGN_SHARDS=3 in a vhost of it, and prints the ``route`` pair (the broker alone: one
quorum queue vs 3 behind the hash exchange) and the ``sign`` pair (the fleet, the route moved
between slices), each measured interleaved in the same run. Everything is stopped after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

from tests.support.rabbit_cluster import start_cluster
from workers.bench.environment import bench_settings, bench_tpm, running_fleet
from workers.bench.measure import Timing
from workers.bench.progress import Progress
from workers.bench.queue_scenarios import CONCURRENCY
from workers.bench.shards import SHARDS, measure_route, measure_sign_shards, plugin_missing
from workers.operator.fleet import ensure_kek_ring
from workers.service.config import Settings


async def measure(url: str, workdir: Path, duration_s: float, signers: int) -> None:
    progress = Progress(sys.stderr)
    missing = await plugin_missing(url)
    assert missing is None, missing
    timing = Timing(duration_s=duration_s, warmup_s=3.0)
    route_one, route_sharded = await measure_route(url, timing, progress)
    settings = Settings(amqp_url=url, sign_shards=SHARDS)
    tcti_cm = bench_tpm(settings, workdir / "swtpm")
    tcti = tcti_cm.__enter__()
    try:
        local = bench_settings(settings, amqp_url=url, data_dir=workdir, tcti=tcti)
        local = local.model_copy(update={"sign_shards": SHARDS})
        ring = await ensure_kek_ring(local, tcti)
        async with running_fleet(local, tcti, signers, progress, ring):
            sign_one, sign_sharded = await measure_sign_shards(
                url, signers, timing, progress, CONCURRENCY
            )
    finally:
        tcti_cm.__exit__(None, None, None)
    print(f"machine: {os.cpu_count()} cores; one private node; {duration_s:g} s per scenario")
    for name, run in (
        ("route [1 queue]", route_one),
        (f"route [{SHARDS} queues]", route_sharded),
        (f"sign [{signers} signers, 1 queue]", sign_one),
        (f"sign [{signers} signers, {SHARDS} shards]", sign_sharded),
    ):
        print(
            f"{name:<34} {run.per_s:>9,.0f}/s  p50 {run.p50_ms:7.2f} ms  p99 {run.p99_ms:7.2f} ms"
        )
    print(f"route {SHARDS}/1: {route_sharded.per_s / route_one.per_s:.2f}x")
    print(f"sign {SHARDS}/1: {sign_sharded.per_s / sign_one.per_s:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--signers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="zandd-shards-") as tmp:
        cluster = start_cluster(1, root=Path(tmp) / "rabbit")
        try:
            node = cluster.nodes[0]
            cluster.add_vhost("bench")
            asyncio.run(measure(node.url("bench"), Path(tmp), args.duration, args.signers))
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
