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

Refresh ahead (issue 19): an entry used in the last quarter of its life (from 70 to 80 % of
``ttl_s``, jittered so a set loaded together is not read again together) is read again in
the background while the request is served from the cache. When the row is unchanged (equal
field by field, ~2 µs) the entry simply lives on, without a second MAC check or parse; a
changed row replaces it (checked as on a load), and one that is gone or fails its MAC is
dropped, so the next request goes to the vault and is refused there. A key in steady use
thus never waits on the vault: with 10,000 keys and a 60 s TTL each signer would otherwise
reload ~170 keys a second, a quarter of its requests at 650 requests a second, each waiting
~0.1 ms for the read. The TTL bound itself is unchanged: an entry not refreshed still
expires at ``ttl_s``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from contracts.algorithms import PublicKey
from contracts.errors import VaultUnavailable, ZanddError
from vault.kek import KekRing
from vault.record_mac import verify_record
from vault.records import KeyRecord
from vault.store import VaultStore
from workers.signer.signing import stored_public_key

log = logging.getLogger("zandd.signer")

DEFAULT_TTL_S = 60.0
DEFAULT_MAX_ENTRIES = 20_000
#: issue 19: an entry used after this share of its TTL is read again in the background
#: (jittered by ±``REFRESH_JITTER``).
REFRESH_AFTER = 0.75
REFRESH_JITTER = 0.05


@dataclass(frozen=True, slots=True)
class CachedKey:
    """A sealed record and its parsed public key."""

    record: KeyRecord
    public_key: PublicKey
    expires_at: float
    #: From this moment a hit also reads the row again in the background (issue 19).
    refresh_at: float = float("inf")


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
        # issue 19: the entries being read again in the background, and their tasks.
        self._refreshing: set[tuple[str, int]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.hits = 0
        self.misses = 0
        self.refreshes = 0

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
                if now >= cached.refresh_at:
                    self._refresh_soon(key_id, wanted, latest=version is None)
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
        return self._keep(CachedKey(record, stored_public_key(record), 0.0), latest=latest, now=now)

    def _keep(self, loaded: CachedKey, *, latest: bool, now: float) -> CachedKey:
        """Cache ``loaded`` (its record checked) with a fresh life from ``now``."""
        record = loaded.record
        share = REFRESH_AFTER + random.uniform(-REFRESH_JITTER, REFRESH_JITTER)  # noqa: S311 - spread, not a secret
        entry = CachedKey(record, loaded.public_key, now + self._ttl_s, now + self._ttl_s * share)
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

    def _refresh_soon(self, key_id: str, version: int, *, latest: bool) -> None:
        """Read ``key_id`` v``version`` (the primary, when ``latest``) again in the background."""
        if (key_id, version) in self._refreshing:
            return
        self._refreshing.add((key_id, version))
        task = asyncio.get_running_loop().create_task(self._refresh(key_id, version, latest))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh(self, key_id: str, version: int, latest: bool) -> None:
        try:
            before = self._invalidation_count(key_id)
            try:
                record = await self._store.get_key(key_id, None if latest else version)
            except ZanddError as exc:
                # Gone (or unreadable): the next request reads it and is told so; a vault
                # that is down leaves the entry to expire at its TTL.
                log.debug("refreshing key %s v%d: %s", key_id, version, exc.message)
                unchanged = before == self._invalidation_count(key_id)
                if not isinstance(exc, VaultUnavailable) and unchanged:
                    self.invalidate(key_id)
                return
            if self._invalidation_count(key_id) != before:
                return  # an event overtook the read: the next request reads anew
            self.refreshes += 1
            cached = self._entries.get((key_id, version))
            now = self._clock()
            if cached is not None and record == cached.record:
                self._keep(cached, latest=latest, now=now)  # the same row: no check again
                return
            try:
                self._put(record, latest=latest, now=now)
            except ZanddError as exc:  # its MAC failed: refused on the next request
                log.warning("key %s v%d changed in the vault: %s", key_id, version, exc.message)
                self.invalidate(key_id)
        finally:
            self._refreshing.discard((key_id, version))

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
