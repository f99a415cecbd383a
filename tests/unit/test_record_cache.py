"""The signer's cache of sealed records: hits, invalidation, expiry, bounds, revalidation."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
from collections.abc import Collection
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

import workers.signer.cache
from contracts.crypto import public_key_der
from contracts.errors import IntegrityError, KeyNotFound, VaultUnavailable
from vault.kek import Kek, KekRing
from vault.record_mac import authenticated
from vault.records import KeyRecord, KeyStamp, KeyState
from vault.sealing import SealedKey
from workers.signer.cache import RecordCache

RING = KekRing(Kek.generate())


def record(key_id: str, version: int = 1) -> KeyRecord:
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    unsigned = KeyRecord(
        key_id=key_id,
        version=version,
        algorithm="ecdsa-p256-sha256",
        public_key_der=public_key_der(public),
        sealed=SealedKey("kek-1", os.urandom(12), os.urandom(48)),
        state=KeyState.ENABLED,
        label=None,
        allowed_signers=("alice",),
        created_at=datetime(2026, 11, 28, tzinfo=UTC),
        created_by="alice",
        request_id=None,
    )
    return authenticated(unsigned, RING, generation=1)


class CountingVault:
    """A vault in memory that counts reads (the cache is what is under test here)."""

    def __init__(self, *records: KeyRecord) -> None:
        self.records = {(r.key_id, r.version): r for r in records}
        self.reads = 0
        # issue 19: the key ids of each key_stamps query; a failure to raise instead.
        self.asked: list[set[str]] = []
        self.failure: Exception | None = None

    async def key_stamps(self, key_ids: Collection[str]) -> dict[tuple[str, int], KeyStamp]:
        self.asked.append(set(key_ids))
        if self.failure is not None:
            raise self.failure
        return {at: KeyStamp.of(r) for at, r in self.records.items() if at[0] in key_ids}

    async def get_key(self, key_id: str, version: int | None = None) -> KeyRecord:
        self.reads += 1
        versions = [v for (k, v) in self.records if k == key_id]
        if not versions or (version is not None and version not in versions):
            raise KeyNotFound(f"key {key_id} not found")
        return self.records[key_id, version if version is not None else max(versions)]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cache_over(vault: CountingVault, **options: object) -> RecordCache:
    return RecordCache(vault, RING, **options)  # type: ignore[arg-type]


async def test_a_second_request_is_served_from_the_cache() -> None:
    vault = CountingVault(record("k1"), record("k1", 2))
    cache = cache_over(vault)
    first = await cache.get("k1", None)
    assert first.record.version == 2
    assert (await cache.get("k1", None)).record is first.record
    assert (await cache.get("k1", 2)).record is first.record
    assert vault.reads == 1
    assert (await cache.get("k1", 1)).record.version == 1
    assert vault.reads == 2
    assert (cache.hits, cache.misses) == (2, 2)
    assert (
        first.public_key.public_numbers()
        == ec.EllipticCurvePublicKey.from_encoded_point(
            ec.SECP256R1(), first.public_key.public_bytes(*_uncompressed())
        ).public_numbers()
    )


def _uncompressed() -> tuple[object, object]:
    from cryptography.hazmat.primitives import serialization

    return serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint


async def test_invalidating_a_key_forgets_every_version_and_the_latest() -> None:
    vault = CountingVault(record("k1"), record("k2"))
    cache = cache_over(vault)
    await cache.get("k1", None)
    await cache.get("k1", 1)
    await cache.get("k2", 1)
    cache.invalidate("k1")
    await cache.get("k1", None)
    await cache.get("k2", 1)
    assert vault.reads == 3  # k1 read again, k2 still cached
    cache.clear()
    await cache.get("k2", 1)
    assert vault.reads == 4


async def test_entries_expire_after_the_ttl() -> None:
    clock = Clock()
    vault = CountingVault(record("k1"))
    cache = cache_over(vault, ttl_s=60.0, clock=clock)
    await cache.get("k1", None)
    clock.now += 59.9
    await cache.get("k1", None)
    assert vault.reads == 1
    clock.now += 0.2
    await cache.get("k1", None)
    assert vault.reads == 2


async def test_the_least_recently_used_entry_leaves_first() -> None:
    vault = CountingVault(*(record(f"k{i}") for i in range(3)))
    cache = cache_over(vault, max_entries=2)
    await cache.get("k0", 1)
    await cache.get("k1", 1)
    await cache.get("k0", 1)  # k0 is now the most recent
    await cache.get("k2", 1)  # evicts k1
    reads = vault.reads
    await cache.get("k0", 1)
    assert vault.reads == reads
    await cache.get("k1", 1)
    assert vault.reads == reads + 1


async def test_a_missing_key_is_not_cached() -> None:
    vault = CountingVault()
    cache = cache_over(vault)
    for _ in range(2):
        with pytest.raises(KeyNotFound):
            await cache.get("nope", None)
    assert vault.reads == 2


class _SlowVault(CountingVault):
    """A vault whose reads wait until the test lets them finish."""

    def __init__(self, *records: KeyRecord) -> None:
        super().__init__(*records)
        self.release = asyncio.Event()
        self.reading = asyncio.Event()

    async def get_key(self, key_id: str, version: int | None = None) -> KeyRecord:
        found = await super().get_key(key_id, version)
        self.reading.set()
        await self.release.wait()
        return found


@pytest.mark.parametrize("how", ["invalidate", "clear"])
async def test_a_read_overtaken_by_an_invalidation_is_used_once_not_cached(how: str) -> None:
    # A rotation (or an update of the allowed signers) committed and announced while a
    # request's vault read was under way: that read may predate it, so it must not become
    # what the cache answers afterwards (it would for the cache's whole TTL).
    vault = _SlowVault(record("k1"))
    cache = cache_over(vault)
    pending = asyncio.create_task(cache.get("k1", None))
    await vault.reading.wait()
    vault.records["k1", 2] = record("k1", 2)  # the rotation commits...
    cache.invalidate("k1") if how == "invalidate" else cache.clear()  # ...and is announced
    vault.release.set()
    # The request that read the old primary asks again (once): it gets the new one.
    assert (await pending).record.version == 2
    assert vault.reads == 2
    assert (await cache.get("k1", None)).record.version == 2
    assert vault.reads == 2  # the second read was cached


async def test_a_read_of_one_version_overtaken_by_an_invalidation_is_not_cached() -> None:
    vault = _SlowVault(record("k1"))
    cache = cache_over(vault)
    pending = asyncio.create_task(cache.get("k1", 1))
    await vault.reading.wait()
    cache.invalidate("k1")  # e.g. an update of the allowed signers
    vault.release.set()
    assert (await pending).record.version == 1  # used once, as read
    await cache.get("k1", 1)
    assert vault.reads == 2  # not cached: read again


class _IndexedVault(CountingVault):
    """A CountingVault that finds a key without looking at every other (10,000 of them)."""

    async def get_key(self, key_id: str, version: int | None = None) -> KeyRecord:
        self.reads += 1
        found = self.records.get((key_id, version if version is not None else 1))
        if found is None:
            raise KeyNotFound(f"key {key_id} not found")
        return found


async def test_the_default_bound_holds_10_000_keys_beside_others() -> None:
    # issue 15: the seed's sizing is 10,000 keys, and a fleet has other keys beside them
    # (here 100 more); a random key of them is a hit once each was loaded.
    template = record("k0")
    vault = _IndexedVault(
        *(
            authenticated(dataclasses.replace(template, key_id=f"k{n}"), RING, generation=1)
            for n in range(10_100)
        )
    )
    cache = cache_over(vault)
    for n in range(10_100):
        await cache.get(f"k{n}", None)
    assert len(cache) == 10_100
    for n in random.Random(15).sample(range(10_100), 1000):
        assert (await cache.get(f"k{n}", None)).record.key_id == f"k{n}"
    assert vault.reads == 10_100
    assert (cache.hits, cache.misses) == (1000, 10_100)


async def test_invalidating_finds_the_keys_versions_also_after_evictions() -> None:
    vault = CountingVault(record("k0"), record("k0", 2), record("k1"), record("k2"))
    cache = cache_over(vault, max_entries=3)
    await cache.get("k0", 1)
    await cache.get("k0", 2)
    await cache.get("k1", 1)
    await cache.get("k2", 1)  # evicts k0 v1, keeps k0 v2
    assert len(cache) == 3
    cache.invalidate("k0")  # forgets v2 (v1 is gone already)
    assert len(cache) == 2
    cache.invalidate("k0")  # nothing left of it: harmless
    reads = vault.reads
    await cache.get("k1", 1)
    await cache.get("k2", 1)
    assert vault.reads == reads  # the other keys stay cached
    await cache.get("k0", 2)
    await cache.get("k0", 1)
    assert vault.reads == reads + 2
    assert len(cache) == 3  # k1 evicted by the bound
    cache.clear()
    assert len(cache) == 0
    await cache.get("k0", 2)
    assert vault.reads == reads + 3


# --- issue 19: revalidation off the request path -------------------------------------------


def changed(original: KeyRecord, **changes: object) -> KeyRecord:
    """``original`` changed as the keygen worker writes it: the next generation, MACed."""
    return authenticated(
        dataclasses.replace(original, **changes),  # type: ignore[arg-type]
        RING,
        generation=original.generation + 1,
    )


async def test_revalidated_entries_stay_hits_after_their_ttl() -> None:
    clock = Clock()
    vault = CountingVault(record("k1"), record("k2"), record("k2", 2))
    cache = cache_over(vault, ttl_s=60.0, clock=clock)  # revalidated every 15 s, 30 s ahead
    await cache.get("k1", None)
    await cache.get("k2", 1)
    await cache.get("k2", None)
    clock.now += 20.0
    assert await cache.revalidate() == 0  # nothing expires within 30 s: nothing asked
    assert vault.asked == []
    clock.now += 15.0
    assert await cache.revalidate() == 3
    assert vault.asked == [{"k1", "k2"}]
    clock.now += 50.0  # 85 s after the load, 50 s after the revalidation
    assert (await cache.get("k1", None)).record.version == 1
    assert (await cache.get("k2", None)).record.version == 2
    assert (await cache.get("k2", 1)).record.version == 1
    assert vault.reads == 3  # the loads only
    assert (cache.revalidated, cache.revalidation_drops) == (3, 0)
    clock.now += 10.1  # 60 s after the revalidation, which was the last: they expire
    await cache.get("k1", None)
    assert vault.reads == 4


async def test_an_entry_lives_ttl_s_from_the_start_of_the_query_that_confirmed_it() -> None:
    clock = Clock()

    class SlowVault(CountingVault):
        async def key_stamps(self, key_ids: Collection[str]) -> dict[tuple[str, int], KeyStamp]:
            clock.now += 20.0  # the answer takes 20 s: it says nothing of the 20 s before it
            return await super().key_stamps(key_ids)

    vault = SlowVault(record("k1"))
    cache = cache_over(vault, ttl_s=60.0, clock=clock)
    await cache.get("k1", 1)
    clock.now += 40.0
    assert await cache.revalidate() == 1  # asked at 40 s, answered at 60 s
    clock.now += 39.9  # 99.9 s after the load: 59.9 s after the question
    await cache.get("k1", 1)
    assert vault.reads == 1
    clock.now += 0.2
    await cache.get("k1", 1)
    assert vault.reads == 2


async def test_revalidation_keeps_the_lru_order() -> None:
    clock = Clock()
    vault = CountingVault(record("k0"), record("k1"), record("k2"))
    cache = cache_over(vault, ttl_s=60.0, clock=clock, max_entries=2)
    await cache.get("k0", 1)
    await cache.get("k1", 1)
    clock.now += 40.0
    assert await cache.revalidate() == 2
    await cache.get("k2", 1)  # evicts k0, the least recently used, as without revalidation
    reads = vault.reads
    await cache.get("k1", 1)
    assert vault.reads == reads
    await cache.get("k0", 1)
    assert vault.reads == reads + 1


async def test_a_changed_generation_drops_the_key() -> None:
    clock = Clock()
    first = record("k1")
    vault = CountingVault(first, record("k1", 2), record("k2"))
    cache = cache_over(vault, ttl_s=60.0, clock=clock)
    await cache.get("k1", 1)
    await cache.get("k1", 2)
    await cache.get("k2", 1)
    # Disabled (an event the signer missed): the row's generation moved on.
    vault.records["k1", 1] = changed(first, state=KeyState.DISABLED)
    clock.now += 40.0
    assert await cache.revalidate() == 1  # k2 only
    assert (cache.revalidated, cache.revalidation_drops) == (1, 2)  # both versions of k1
    assert len(cache) == 1
    assert (await cache.get("k1", 1)).record.state == KeyState.DISABLED  # read, as on a miss
    assert vault.reads == 4


async def test_a_vanished_version_drops_the_key() -> None:
    clock = Clock()
    vault = CountingVault(record("k1"), record("k1", 2))
    cache = cache_over(vault, ttl_s=60.0, clock=clock)
    assert (await cache.get("k1", None)).record.version == 2
    del vault.records["k1", 2]  # put back from an older copy of the vault
    clock.now += 40.0
    assert await cache.revalidate() == 0
    assert cache.revalidation_drops == 1
    assert (await cache.get("k1", None)).record.version == 1
    assert vault.reads == 2


async def test_a_new_latest_version_drops_the_latest() -> None:
    clock = Clock()
    vault = CountingVault(record("k1"))
    cache = cache_over(vault, ttl_s=60.0, clock=clock)
    await cache.get("k1", None)
    vault.records["k1", 2] = record("k1", 2)  # rotated, the event missed
    clock.now += 40.0
    assert await cache.revalidate() == 0
    assert cache.revalidation_drops == 1  # the key, as the rotation's event would have
    assert (await cache.get("k1", None)).record.version == 2
    assert vault.reads == 2


async def test_a_new_version_leaves_the_versions_named_alone() -> None:
    clock = Clock()
    vault = CountingVault(record("k1"))
    cache = cache_over(vault, ttl_s=60.0, clock=clock)
    await cache.get("k1", 1)  # named: no latest to keep
    vault.records["k1", 2] = record("k1", 2)
    clock.now += 40.0
    assert await cache.revalidate() == 1
    clock.now += 40.0
    await cache.get("k1", 1)
    assert vault.reads == 1


class _HeldVault(CountingVault):
    """A vault whose stamp queries wait until the test lets them answer, with what the
    vault held when they were asked."""

    def __init__(self, *records: KeyRecord) -> None:
        super().__init__(*records)
        self.release = asyncio.Event()
        self.asking = asyncio.Event()

    async def key_stamps(self, key_ids: Collection[str]) -> dict[tuple[str, int], KeyStamp]:
        found = await super().key_stamps(key_ids)
        self.asking.set()
        await self.release.wait()
        return found


@pytest.mark.parametrize("how", ["invalidate", "clear"])
async def test_an_invalidation_during_the_query_wins(how: str) -> None:
    clock = Clock()
    first = record("k1")
    vault = _HeldVault(first, record("k2"))
    cache = cache_over(vault, ttl_s=60.0, clock=clock)
    await cache.get("k1", None)
    await cache.get("k2", 1)
    clock.now += 40.0
    revalidating = asyncio.create_task(cache.revalidate())
    await vault.asking.wait()  # the answer says k1 is unchanged, rotated a moment later...
    vault.records["k1", 2] = record("k1", 2)
    cache.invalidate("k1") if how == "invalidate" else cache.clear()  # ...and announced
    assert (await cache.get("k1", None)).record.version == 2  # a request reads the vault
    vault.release.set()
    assert await revalidating == (1 if how == "invalidate" else 0)  # k2's, unless cleared
    assert cache.revalidation_drops == 0  # the fresh k1 is left alone
    reads = vault.reads
    assert (await cache.get("k1", None)).record.version == 2
    clock.now += 30.0  # 70 s after the first loads
    await cache.get("k1", None)  # loaded 30 s ago: still fresh
    await cache.get("k2", 1)
    assert vault.reads == reads + (0 if how == "invalidate" else 1)


async def test_the_walk_yields_between_slices_and_an_invalidation_there_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(workers.signer.cache, "REVALIDATE_SLICE", 2)
    clock = Clock()
    keys = [f"k{n}" for n in range(7)]
    vault = CountingVault(*(record(key_id) for key_id in keys))
    cache = cache_over(vault, ttl_s=60.0, clock=clock)
    for key_id in keys:
        await cache.get(key_id, None)
    answer = vault.key_stamps

    async def answering(key_ids: Collection[str]) -> dict[tuple[str, int], KeyStamp]:
        # Announced once the answer is in, while the walk over the entries is under way.
        asyncio.get_running_loop().call_soon(cache.invalidate, "k5")
        return await answer(key_ids)

    vault.key_stamps = answering  # type: ignore[method-assign]
    clock.now += 40.0
    assert await cache.revalidate() == 6
    assert (cache.revalidated, cache.revalidation_drops, len(cache)) == (6, 0, 6)
    clock.now += 40.0
    for key_id in keys:
        await cache.get(key_id, None)
    assert vault.reads == len(keys) + 1  # k5 only, invalidated


async def test_a_vault_that_fails_leaves_the_entries_to_expire() -> None:
    clock = Clock()
    vault = CountingVault(record("k1"))
    cache = cache_over(vault, ttl_s=60.0, clock=clock)
    await cache.get("k1", None)
    vault.failure = VaultUnavailable("the vault is down")
    clock.now += 40.0
    with pytest.raises(VaultUnavailable):
        await cache.revalidate()
    clock.now += 19.9
    await cache.get("k1", None)
    assert vault.reads == 1
    clock.now += 0.2  # 60 s after the load, which the vault last confirmed
    await cache.get("k1", None)
    assert vault.reads == 2
    assert (cache.revalidated, cache.revalidation_drops) == (0, 0)


class _NotifyingVault(CountingVault):
    """A CountingVault that tells the test of each stamp query."""

    def __init__(self, *records: KeyRecord) -> None:
        super().__init__(*records)
        self.queried = asyncio.Event()

    async def key_stamps(self, key_ids: Collection[str]) -> dict[tuple[str, int], KeyStamp]:
        self.queried.set()
        return await super().key_stamps(key_ids)

    async def queries(self, count: int) -> None:
        for _ in range(count):
            self.queried.clear()
            await asyncio.wait_for(self.queried.wait(), 5)


async def test_revalidate_forever_runs_every_period_logs_a_failure_streak_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    vault = _NotifyingVault(record("k1"))
    # A TTL shorter than the horizon of two periods: the entry is due at every run.
    cache = cache_over(vault, ttl_s=0.015, revalidate_every_s=0.01)
    await cache.get("k1", None)
    stop = asyncio.Event()
    caplog.set_level(logging.INFO, "zandd.signer")
    running = asyncio.create_task(cache.revalidate_forever(stop))
    await vault.queries(2)
    vault.failure = VaultUnavailable("the vault is down")
    await vault.queries(3)
    vault.failure = None
    await vault.queries(2)
    vault.failure = VaultUnavailable("the vault is down")
    await vault.queries(3)
    stop.set()
    await asyncio.wait_for(running, 5)
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    warning = (logging.WARNING, "cannot revalidate cached keys: the vault is down")
    again = (logging.INFO, "revalidating cached keys works again")
    assert messages == [warning, again, warning]  # once a streak
    assert cache.revalidated >= 2
    assert vault.reads == 1  # never read again: the entry lived on


async def test_revalidate_forever_stops_during_a_query_that_does_not_answer() -> None:
    vault = _HeldVault(record("k1"))
    cache = cache_over(vault, ttl_s=0.04, revalidate_every_s=0.01)
    await cache.get("k1", None)
    stop = asyncio.Event()
    running = asyncio.create_task(cache.revalidate_forever(stop))
    await asyncio.wait_for(vault.asking.wait(), 5)
    stop.set()
    await asyncio.wait_for(running, 1)  # the query never answers: abandoned


async def test_revalidate_forever_does_nothing_without_a_ttl() -> None:
    cache = cache_over(CountingVault(), ttl_s=0.0)
    await asyncio.wait_for(cache.revalidate_forever(asyncio.Event()), 1)


async def test_the_signer_revalidates_its_cache_until_stopped() -> None:
    from workers.signer.worker import Signer

    vault = _NotifyingVault(record("k1"))
    cache = cache_over(vault, ttl_s=0.015, revalidate_every_s=0.01)
    signer = Signer(vault, RING, cache=cache)  # type: ignore[arg-type]
    await cache.get("k1", None)
    stop = asyncio.Event()
    running = asyncio.create_task(signer.revalidate_cache_forever(stop))
    await vault.queries(2)
    stop.set()
    await asyncio.wait_for(running, 5)
    assert cache.revalidated >= 1


# --- issue 19: the MAC tag in the stamp, the maximum age -------------------------------------


async def revalidate_until(cache: RecordCache, clock: Clock, end: float) -> None:
    """Revalidate every 15 s, as ``revalidate_forever`` would with a TTL of 60 s, until
    ``end`` (the clock is left at the last run)."""
    while clock.now + 15.0 <= end:
        clock.now += 15.0
        await cache.revalidate()


async def test_a_forked_generation_drops_the_key() -> None:
    clock = Clock()
    first = record("k1")
    disabled = changed(first, state=KeyState.DISABLED)
    vault = CountingVault(disabled)
    cache = cache_over(vault, ttl_s=60.0, clock=clock)
    assert (await cache.get("k1", None)).record.state == KeyState.DISABLED
    # A restore puts generation 1 back, and a change written after it reaches generation 2
    # again with other content: same generation, another tag.
    relabelled = changed(first, label="restored")
    assert relabelled.generation == disabled.generation
    vault.records["k1", 1] = relabelled
    clock.now += 40.0
    assert await cache.revalidate() == 0
    assert cache.revalidation_drops == 1
    assert (await cache.get("k1", None)).record == relabelled  # read, as on a miss
    assert vault.reads == 2


async def test_a_row_that_kept_its_stamp_is_read_again_at_its_maximum_age() -> None:
    clock = Clock()
    loaded = clock.now
    original = record("k1")
    vault = CountingVault(original)
    cache = cache_over(vault, ttl_s=60.0, clock=clock, jitter=lambda: 0.0)
    assert cache.max_age_s == 600.0  # 10 times ttl_s
    entry = await cache.get("k1", None)
    assert entry.reload_at == loaded + 600.0
    # Edited in place by someone without the ring: generation and tag kept, the MAC now fails.
    vault.records["k1", 1] = dataclasses.replace(original, allowed_signers=("alice", "eve"))
    await revalidate_until(cache, clock, loaded + 599.0)  # the stamps match: served on
    assert cache.revalidated > 0
    assert cache.revalidation_drops == 0
    assert entry.expires_at == loaded + 600.0  # never extended past its maximum age
    clock.now = loaded + 599.9
    assert (await cache.get("k1", None)).record == original
    assert (await cache.get("k1", 1)).record == original
    assert vault.reads == 1
    clock.now = loaded + 600.0
    with pytest.raises(IntegrityError, match="failed its record MAC"):
        await cache.get("k1", None)  # read again and checked, as on its first load
    with pytest.raises(IntegrityError, match="failed its record MAC"):
        await cache.get("k1", 1)  # refused: not cached, the old entry not served again
    assert vault.reads == 3


async def test_the_maximum_age_bounds_revalidation_and_restarts_at_the_reload() -> None:
    clock = Clock()
    loaded = clock.now
    vault = CountingVault(record("k1"))
    cache = cache_over(vault, ttl_s=60.0, clock=clock, max_age_s=100.0, jitter=lambda: 0.0)
    entry = await cache.get("k1", 1)
    assert (entry.expires_at, entry.reload_at) == (loaded + 60.0, loaded + 100.0)
    clock.now += 40.0
    assert await cache.revalidate() == 1
    assert entry.expires_at == loaded + 100.0  # not 40 + 60 s
    clock.now += 30.0
    assert await cache.revalidate() == 0  # confirmed, but no further: not counted
    assert (entry.expires_at, cache.revalidation_drops, len(cache)) == (loaded + 100.0, 0, 1)
    clock.now = loaded + 99.9
    assert await cache.get("k1", 1) is entry
    clock.now = loaded + 100.0
    reloaded = await cache.get("k1", 1)
    assert reloaded is not entry
    assert vault.reads == 2
    assert (reloaded.expires_at, reloaded.reload_at) == (clock.now + 60.0, clock.now + 100.0)


async def test_the_jitter_takes_up_to_a_tenth_off_the_maximum_age() -> None:
    clock = Clock()
    draws = iter([0.0, 0.5, 0.999, 0.0])  # the last for k2's reload
    vault = CountingVault(record("k0"), record("k1"), record("k2"))
    cache = cache_over(vault, ttl_s=60.0, clock=clock, jitter=lambda: next(draws))
    ages = [(await cache.get(f"k{n}", 1)).reload_at - clock.now for n in range(3)]
    assert ages == pytest.approx([600.0, 570.0, 540.06])
    # A key whose jitter came out short is read again first.
    await revalidate_until(cache, clock, clock.now + 555.0)
    assert vault.reads == 3
    await cache.get("k2", 1)
    await cache.get("k1", 1)
    assert vault.reads == 4


async def test_keys_loaded_together_are_read_again_spread_over_the_last_tenth() -> None:
    clock = Clock()
    loaded = clock.now
    keys = [f"k{n}" for n in range(200)]
    vault = CountingVault(*(record(key_id) for key_id in keys))
    cache = cache_over(vault, ttl_s=60.0, clock=clock)  # the default, random, jitter
    reloads = [(await cache.get(key_id, None)).reload_at - loaded for key_id in keys]
    assert all(540.0 <= at <= 600.0 for at in reloads)
    assert len(set(reloads)) == len(reloads)
    # Spread over the 60 s, not bunched: every 10 s of them holds some, none most.
    buckets = [sum(540.0 + 10 * b <= at < 550.0 + 10 * b for at in reloads) for b in range(6)]
    assert all(0 < count < 100 for count in buckets), buckets
