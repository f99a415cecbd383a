"""The signer's cache of sealed key records: ciphertext and public key, never a private key.

It saves the vault read and the public-key parse a sign request would otherwise pay. Entries
leave the cache when ``zandd.events`` announces a change of their key (the keygen worker
publishes the event, confirmed by the broker, before it answers the request that made the
change), when the event subscription had a gap (``clear``), and after ``ttl_s`` at the latest.

Every record is checked once, as it is loaded: its MAC (``vault.record_mac``) must hold, so a
row changed behind the keygen worker's back is refused (``integrity_error``) and never cached;
requests served from the cache pay nothing for the check.

Sizing (issue 15, ``docs/performance.md`` "10,000 keys"): an entry is ~1.8 KB (a P-256
record and its parsed public key), so the default bound of 20,000 entries — twice the seed's
10,000 keys, room for a second version of each or for the keys beside them — is ~36 MB per
signer at most. A hit costs ~1 µs; a miss ~110 µs (the vault read, the MAC, the parse).
Invalidating a key costs as many steps as it has cached versions, not one per entry.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from contracts.algorithms import PublicKey
from vault.kek import KekRing
from vault.record_mac import verify_record
from vault.records import KeyRecord
from vault.store import VaultStore
from workers.signer.signing import stored_public_key

DEFAULT_TTL_S = 60.0
DEFAULT_MAX_ENTRIES = 20_000


@dataclass(frozen=True, slots=True)
class CachedKey:
    """A sealed record and its parsed public key."""

    record: KeyRecord
    public_key: PublicKey
    expires_at: float


class RecordCache:
    """``(key_id, version)`` → sealed record, least recently used out first."""

    def __init__(
        self,
        store: VaultStore,
        ring: KekRing,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._ring = ring
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, int], CachedKey] = OrderedDict()
        # The cached versions of each key: an event invalidates a key without a walk over
        # every entry (~1 ms per event with 10,000 of them).
        self._versions: dict[str, set[int]] = {}
        # The current version of a key, for requests that name none.
        self._latest: dict[str, tuple[int, float]] = {}
        # issue 15: how often each key (and the whole cache) was invalidated, so a vault read
        # that an invalidation overtook is used once but not cached: it may predate the
        # change (a rotation, an update of the allowed signers) the event announced.
        self._invalidations: dict[str, int] = {}
        self._clears = 0
        self.hits = 0
        self.misses = 0

    async def get(self, key_id: str, version: int | None) -> CachedKey:
        """The record (from the cache when fresh), or the vault's ``KeyNotFound``.

        A record loaded from the vault whose MAC fails raises IntegrityError.
        """
        now = self._clock()
        wanted = version if version is not None else self._latest_version(key_id, now)
        if wanted is not None:
            cached = self._entries.get((key_id, wanted))
            if cached is not None and cached.expires_at > now:
                self._entries.move_to_end((key_id, wanted))
                self.hits += 1
                return cached
        self.misses += 1
        before = self._invalidation_count(key_id)
        record = await self._store.get_key(key_id, version)
        if self._invalidation_count(key_id) != before:
            if version is None:
                # The primary may have changed (a rotation): ask again, once.
                before = self._invalidation_count(key_id)
                record = await self._store.get_key(key_id, version)
            if self._invalidation_count(key_id) != before:
                verify_record(record, self._ring)
                return CachedKey(record, stored_public_key(record), now)
        return self._put(record, latest=version is None, now=now)

    def _invalidation_count(self, key_id: str) -> tuple[int, int]:
        return self._invalidations.get(key_id, 0), self._clears

    def _latest_version(self, key_id: str, now: float) -> int | None:
        latest = self._latest.get(key_id)
        if latest is None or latest[1] <= now:
            return None
        return latest[0]

    def _put(self, record: KeyRecord, *, latest: bool, now: float) -> CachedKey:
        verify_record(record, self._ring)
        entry = CachedKey(record, stored_public_key(record), now + self._ttl_s)
        self._entries[record.key_id, record.version] = entry
        self._entries.move_to_end((record.key_id, record.version))
        self._versions.setdefault(record.key_id, set()).add(record.version)
        if latest:
            self._latest[record.key_id] = (record.version, entry.expires_at)
        while len(self._entries) > self._max_entries:
            (old_key_id, old_version), _ = self._entries.popitem(last=False)
            self._forget_version(old_key_id, old_version)
            self._latest.pop(old_key_id, None)
        return entry

    @property
    def ttl_s(self) -> float:
        """How long an entry stays fresh at most (issue 15: the alias cache uses it too)."""
        return self._ttl_s

    def _forget_version(self, key_id: str, version: int) -> None:
        versions = self._versions.get(key_id)
        if versions is not None:
            versions.discard(version)
            if not versions:
                del self._versions[key_id]

    def __len__(self) -> int:
        """How many versions are cached."""
        return len(self._entries)

    def invalidate(self, key_id: str) -> None:
        """Forget every version of ``key_id`` (a state change, a new version)."""
        self._invalidations[key_id] = self._invalidations.get(key_id, 0) + 1
        self._latest.pop(key_id, None)
        for version in self._versions.pop(key_id, ()):
            self._entries.pop((key_id, version), None)

    def clear(self) -> None:
        """Forget everything (the event subscription may have missed changes)."""
        self._clears += 1
        self._invalidations.clear()
        self._entries.clear()
        self._versions.clear()
        self._latest.clear()
