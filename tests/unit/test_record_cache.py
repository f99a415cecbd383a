"""The signer's cache of sealed records: hits, invalidation, expiry, bounds."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from contracts.crypto import public_key_der
from contracts.errors import KeyNotFound
from vault.kek import Kek, KekRing
from vault.record_mac import authenticated
from vault.records import KeyRecord, KeyState
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
