"""The signer's cache of sealed key records: ciphertext and public key, never a private key.

It saves the vault read and the public-key parse a sign request would otherwise pay. Entries
leave the cache when ``zandd.events`` announces a change of their key (the keygen worker
publishes the event, confirmed by the broker, before it answers the request that made the
change), when the event subscription had a gap (``clear``), ``ttl_s`` after the vault last
confirmed them, and ``max_age_s`` after they were loaded, at the latest.

Every record is checked as it is loaded: its MAC (``vault.record_mac``) must hold, so a row
changed behind the keygen worker's back is refused (``integrity_error``) and never cached;
requests served from the cache pay nothing for the check.

Revalidation (issue 19, ``docs/performance.md`` "10,000 keys"): instead of dropping an entry
at its TTL and making the next request for it pay a full vault read (the thread hop, the row
decode, the MAC, the public-key parse: ~110 µs; with 10,000 keys and a 60 s TTL, ~170 such
reads a second per signer), a background task (``revalidate_forever``, every
``revalidate_every_s``, ``ttl_s / 4`` by default) asks the vault once for the stamps — the
generation and the MAC tag — of the keys whose entries expire within the next two periods
(``VaultStore.key_stamps``: one indexed query for thousands of versions, no record read).
Every change of a stored version raises its generation and writes a new MAC
(``replace_key``), and a restore that forks a generation (a change written after it reaching a
generation cached before it) changes the tag; so an entry whose version still has the
generation and tag it was loaded with is taken for the vault's current record: its life
starts again from the moment the query started, up to its maximum age. An entry whose stamp
changed or whose version is gone, and a key whose highest version is no longer the one cached
as its latest (a rotation), is invalidated as an event would, and the next request reads the
vault (and checks what it reads) as on a miss. An invalidation or a ``clear`` that comes
while the query runs wins: those keys are left alone. When the vault does not answer, nothing
is extended and entries expire as without revalidation; so no entry is served more than
``ttl_s`` after the vault last confirmed it. Entries in no use are revalidated too until the
LRU bound evicts them. Cost, measured on this project's (slow, shared) machine with 10,000
P-256 keys all due at once on SQLite: ~30 ms on the database thread and ~30 ms of the event
loop, the latter in slices of ``REVALIDATE_SLICE`` entries (the longest pause 3 to 6 ms),
once every other period per entry; the reads it replaces cost ~170 reads of ~110 µs every
second (reading the MAC tags beside the generations added ~6 ms on the database thread and
~3 ms of the event loop, measured alternately against generations alone). A revalidated
entry is the same object with a later ``expires_at``, so nothing new is left for the garbage
collector.

Maximum age: a row edited in place by someone without the ring that keeps both its
generation and its tag fails its MAC, but only a full read sees that. So every entry is read
again (and its MAC checked, as on its first load) at the latest ``max_age_s`` after it was
loaded (``MAX_AGE_TTLS`` times ``ttl_s``, 600 s, by default), whatever revalidation said;
less a random jitter of up to ``MAX_AGE_JITTER`` of it, drawn at the load, so that keys
loaded together are not all read again together (10,000 keys and 600 s: ~17 reads a second
per signer, on the request path like any miss).

How long a signer serves a cached record after its row changed: a change announced by an
event, not at all; a change of generation or tag, until the entry's next revalidation (an
entry is asked about once it has two periods or less to live: within about ``ttl_s -
revalidate_every_s``, 45 s by default, while the vault answers promptly; never later than
``ttl_s`` after the vault last confirmed it); any other change, within ``max_age_s``.

Sizing (issue 15, ``docs/performance.md`` "10,000 keys"): an entry is ~1.8 KB (a P-256
record and its parsed public key), so the default bound of 20,000 entries — twice the seed's
10,000 keys, room for a second version of each or for the keys beside them — is ~36 MB per
signer at most. A hit costs ~1 µs; a miss ~110 µs (the vault read, the MAC, the parse).
Invalidating a key costs as many steps as it has cached versions, not one per entry.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, TypeVar

from contracts.algorithms import PublicKey
from contracts.errors import ZanddError
from vault.kek import KekRing
from vault.record_mac import verify_record
from vault.records import KeyRecord, KeyStamp
from vault.store import VaultStore
from workers.signer.signing import stored_public_key

log = logging.getLogger("zandd.signer")

DEFAULT_TTL_S = 60.0
DEFAULT_MAX_ENTRIES = 20_000
#: The maximum age's multiple of the TTL when none is given.
MAX_AGE_TTLS = 10.0
#: The share of ``max_age_s`` an entry's age may be cut by at random, to spread the reloads.
MAX_AGE_JITTER = 0.1
#: The revalidation period's share of the TTL when none is given (issue 19).
REVALIDATE_SHARE = 0.25
#: Entries expiring within this many periods are revalidated: one run may be late or slow
#: (a vault that takes its time, a busy loop) without its entries lapsing before the next.
REVALIDATE_HORIZON_PERIODS = 2.0
#: Entries a revalidation handles between two yields to the event loop (a few ms of work).
REVALIDATE_SLICE = 1000

_T = TypeVar("_T")


@dataclass(slots=True)
class CachedKey:
    """A sealed record and its parsed public key.

    ``expires_at`` is the one field that changes: a revalidation moves it on in place
    (issue 19), so that 10,000 revalidated entries are not 10,000 new objects for the
    garbage collector's full collections, which would pause the event loop for tens of ms;
    never past ``reload_at``, when the entry must be read from the vault again (its maximum
    age, less its jitter, after its load).
    """

    record: KeyRecord
    public_key: PublicKey
    expires_at: float
    reload_at: float
    #: The record's generation and MAC tag, as revalidation compares them with the vault's.
    stamp: KeyStamp


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
        revalidate_every_s: float | None = None,
        max_age_s: float | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        """``max_age_s``: ``MAX_AGE_TTLS`` times ``ttl_s`` when None. ``jitter`` draws, at
        each load, a number in [0, 1): that share of ``MAX_AGE_JITTER`` times ``max_age_s``
        is taken off the entry's maximum age (random, not secret: it only spreads reloads)."""
        self._store = store
        self._ring = ring
        self._ttl_s = ttl_s
        self._max_age_s = ttl_s * MAX_AGE_TTLS if max_age_s is None else max_age_s
        self._jitter = jitter
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, int], CachedKey] = OrderedDict()
        # The cached versions of each key: an event invalidates a key without a walk over
        # every entry (~1 ms per event with 10,000 of them).
        self._versions: dict[str, set[int]] = {}
        # The current version of a key, for requests that name none: the version, when it
        # expires, and when it must be read again (its entry's reload_at when it was loaded).
        self._latest: dict[str, tuple[int, float, float]] = {}
        # issue 15: when each key was last invalidated (a number that grows with every
        # invalidation: issue 19) and how often the whole cache was, so a vault read that an
        # invalidation overtook is used once but not cached: it may predate the change (a
        # rotation, an update of the allowed signers) the event announced.
        self._invalidations: dict[str, int] = {}
        self._invalidated = 0
        self._clears = 0
        self._revalidate_every_s = (
            ttl_s * REVALIDATE_SHARE if revalidate_every_s is None else revalidate_every_s
        )
        self.hits = 0
        self.misses = 0
        # issue 19: cached versions the vault confirmed (their life started again), and those
        # revalidation dropped (a changed stamp or a vanished version, a new latest version).
        self.revalidated = 0
        self.revalidation_drops = 0

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
                return CachedKey(record, stored_public_key(record), now, now, KeyStamp.of(record))
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
        reload_at = now + self._max_age_s * (1.0 - MAX_AGE_JITTER * self._jitter())
        entry = CachedKey(
            record,
            stored_public_key(record),
            min(now + self._ttl_s, reload_at),
            reload_at,
            KeyStamp.of(record),
        )
        self._entries[record.key_id, record.version] = entry
        self._entries.move_to_end((record.key_id, record.version))
        self._versions.setdefault(record.key_id, set()).add(record.version)
        if latest:
            self._latest[record.key_id] = (record.version, entry.expires_at, reload_at)
        while len(self._entries) > self._max_entries:
            (old_key_id, old_version), _ = self._entries.popitem(last=False)
            self._forget_version(old_key_id, old_version)
            self._latest.pop(old_key_id, None)
        return entry

    async def revalidate(self) -> int:
        """Ask the vault once for the stamps of the entries that expire soon; extend those
        still current (never past their ``reload_at``), invalidate the keys that changed.
        Returns how many were extended.

        Raises what the store raises (nothing is then changed: the entries expire as they
        would without revalidation). The walks over the entries yield to the event loop
        every ``REVALIDATE_SLICE`` entries, so requests are not held up behind them.
        """
        started = self._clock()
        due, due_latest = await self._due(
            started + self._revalidate_every_s * REVALIDATE_HORIZON_PERIODS
        )
        key_ids = {entry.record.key_id for entry in due}
        key_ids.update(key_id for key_id, _ in due_latest)
        if not key_ids:
            return 0
        # From here on an invalidation (or a clear) wins over the answer, which may predate
        # the change it announces.
        mark = (self._invalidated, self._clears)
        stamps = await self._store.key_stamps(key_ids)
        expires_at = started + self._ttl_s
        changed = await self._check_latest(due_latest, stamps, mark, expires_at)
        extended = await self._extend(due, stamps, mark, expires_at, changed)
        for key_id in changed:
            self.revalidation_drops += len(self._versions.get(key_id, ()))
            self.invalidate(key_id)
        count = sum(key_id not in changed for key_id in extended)
        self.revalidated += count
        return count

    async def _due(self, horizon: float) -> tuple[list[CachedKey], list[tuple[str, int]]]:
        """The entries, and the latest versions, that expire at ``horizon`` or before."""
        due: list[CachedKey] = []
        async for entries in _slices(list(self._entries.values())):
            due += [entry for entry in entries if entry.expires_at <= horizon]
        due_latest: list[tuple[str, int]] = []
        async for latest in _slices(list(self._latest.items())):
            due_latest += [(key_id, at[0]) for key_id, at in latest if at[1] <= horizon]
        return due, due_latest

    async def _check_latest(
        self,
        due: list[tuple[str, int]],
        stamps: dict[tuple[str, int], KeyStamp],
        mark: tuple[int, int],
        expires_at: float,
    ) -> set[str]:
        """Extend the ``due`` latest versions that are still their key's highest to
        ``expires_at`` (or their ``reload_at``, if sooner); the keys whose highest version is
        another (rotated, or gone)."""
        highest: dict[str, int] = {}
        async for found in _slices(list(stamps)):
            for key_id, version in found:
                if version > highest.get(key_id, 0):
                    highest[key_id] = version
        changed: set[str] = set()
        async for part in _slices(due):
            for key_id, version in part:
                latest = self._latest.get(key_id)
                if latest is None or latest[0] != version or self._overtaken(key_id, mark):
                    continue
                if highest.get(key_id) != version:
                    changed.add(key_id)
                    continue
                _, until, reload_at = latest
                if until < expires_at and until < reload_at:
                    until = expires_at if expires_at < reload_at else reload_at
                    self._latest[key_id] = (version, until, reload_at)
        return changed

    async def _extend(
        self,
        due: list[CachedKey],
        stamps: dict[tuple[str, int], KeyStamp],
        mark: tuple[int, int],
        expires_at: float,
        changed: set[str],
    ) -> list[str]:
        """Extend the ``due`` entries whose stamp is unchanged to ``expires_at`` (or their
        ``reload_at``, if sooner; their keys, one per entry); add the keys of the others to
        ``changed``."""
        extended: list[str] = []
        async for part in _slices(due):
            for entry in part:
                record = entry.record
                key_id = record.key_id
                at = (key_id, record.version)
                if (
                    key_id in changed
                    or self._entries.get(at) is not entry  # evicted, or reloaded
                    or self._overtaken(key_id, mark)
                ):
                    continue
                if stamps.get(at) != entry.stamp:  # changed, or gone (None)
                    changed.add(key_id)
                    continue
                reload_at = entry.reload_at
                until = expires_at if expires_at < reload_at else reload_at
                if entry.expires_at < until:
                    # In place: the entry keeps its place in the LRU order. Each version has
                    # a row of its own: its life does not wait for its key's other versions
                    # (a key that changed is invalidated after the walk).
                    entry.expires_at = until
                    extended.append(key_id)
        return extended

    def _overtaken(self, key_id: str, mark: tuple[int, int]) -> bool:
        """Whether ``key_id`` was invalidated, or the cache cleared, since ``mark`` (costs
        two comparisons while nothing was)."""
        invalidated, clears = mark
        if self._clears != clears:
            return True
        return self._invalidated != invalidated and self._invalidations.get(key_id, 0) > invalidated

    async def revalidate_forever(self, stop: asyncio.Event) -> None:
        """``revalidate`` every ``revalidate_every_s`` until ``stop``; a run under way when
        ``stop`` is set is abandoned. A failure is logged (once until a run works again),
        never fatal: the entries it could not revalidate expire at their TTL."""
        if self._revalidate_every_s <= 0 or self._ttl_s <= 0:
            return  # nothing is cached for long: nothing to revalidate
        failing = False
        while True:
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._revalidate_every_s)
            if stop.is_set():
                return
            failing = await self._revalidate_once(stop, failing=failing)

    async def _revalidate_once(self, stop: asyncio.Event, *, failing: bool) -> bool:
        """One ``revalidate`` (abandoned once ``stop`` is set): whether it failed, logged
        when it is the first failure since one worked."""
        try:
            extended = await _unless_stopped(self.revalidate(), stop)
        except ZanddError as exc:
            if not failing:
                log.warning("cannot revalidate cached keys: %s", exc.message)
            return True
        except Exception:
            if not failing:
                log.exception("cannot revalidate cached keys")
            return True
        if extended is not None:
            if failing:
                log.info("revalidating cached keys works again")
            log.debug("revalidated %d cached key versions", extended)
        return False

    @property
    def max_age_s(self) -> float:
        """How long after its load an entry is read from the vault again at the latest."""
        return self._max_age_s

    @property
    def revalidate_every_s(self) -> float:
        """How often ``revalidate_forever`` revalidates (issue 19)."""
        return self._revalidate_every_s

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
        self._invalidated += 1
        self._invalidations[key_id] = self._invalidated
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


async def _slices(items: list[_T]) -> AsyncIterator[list[_T]]:
    """``items`` ``REVALIDATE_SLICE`` at a time, yielding to the event loop in between."""
    for start in range(0, len(items), REVALIDATE_SLICE):
        if start:
            await asyncio.sleep(0)
        yield items[start : start + REVALIDATE_SLICE]


async def _unless_stopped(run: Coroutine[Any, Any, int], stop: asyncio.Event) -> int | None:
    """What ``run`` returns, or None once ``stop`` is set first (``run`` is then cancelled)."""
    task = asyncio.ensure_future(run)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not task.done():
            task.cancel()  # stopped, or this task itself is being cancelled
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # this task is being cancelled, not only stopped
        return None
