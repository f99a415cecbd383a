"""Each worker's periodic check of its KEK ring against the vault, and its metric."""

from __future__ import annotations

from pathlib import Path

from tests.support.records import record_under
from vault import SqliteStore
from vault.kek import KekRing
from workers.observability.metrics import Metrics
from workers.service.ringwatch import RingWatch


async def test_the_metric_counts_versions_the_ring_cannot_open(tmp_path: Path) -> None:
    ring = KekRing.create(tmp_path / "kek-ring.json")
    store = await SqliteStore.open(str(tmp_path / "vault.db"))
    metrics = Metrics()
    watch = RingWatch(store, ring, metrics)
    try:
        await store.create_key(record_under(ring.active.kek_id))
        assert (await watch.check()).complete
        assert metrics.registry.get_sample_value("zandd_vault_records_unreadable") == 0
        for _ in range(3):
            await store.create_key(record_under("kek-20200101-deadbeef"))
        coverage = await watch.check()
        assert coverage.missing == {"kek-20200101-deadbeef": 3}
        assert metrics.registry.get_sample_value("zandd_vault_records_unreadable") == 3
    finally:
        await store.close()


async def test_a_kek_rotated_in_by_another_process_is_not_missing(tmp_path: Path) -> None:
    path = tmp_path / "kek-ring.json"
    ring = KekRing.create(path)
    rotated = KekRing.load(path).rotate(path)
    store = await SqliteStore.open(str(tmp_path / "vault.db"))
    metrics = Metrics()
    try:
        await store.create_key(record_under(rotated.active.kek_id))
        assert (await RingWatch(store, ring, metrics).check()).complete
        assert metrics.registry.get_sample_value("zandd_vault_records_unreadable") == 0
    finally:
        await store.close()
