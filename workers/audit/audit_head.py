"""The workers' side of the keyed audit chain: keyed appends, and publishing the newest head.

Every worker appends its audit entries linked under the ring's audit key (``KeyedAppender``
between ``AuditLog`` and the store) and shows the newest entry it wrote in the
``zandd_audit_head_seq`` metric. A keyed chain stops edits and forgeries, not the loss of the
newest entries; so the keygen worker also publishes the vault's newest head on ``zandd.events``
(``audit.head``) every ``every_entries`` entries or ``interval_s`` seconds, whichever comes
first. Whoever keeps the heads (a subscriber on another host) can later run ``zandd audit
verify --head SEQ:LINK``. Publishing is best effort and never delays a reply: a head that could
not be published is tried again at the next round, superseded by any newer one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from datetime import UTC, datetime
from typing import Protocol

from contracts.errors import ZanddError
from contracts.models import AuditHeadEvent
from vault.audit import (
    GENESIS,
    AuditBroken,
    AuditEntry,
    AuditEvent,
    AuditQuery,
    AuditReader,
    ChainHead,
    ChainVerifier,
)
from vault.audit_chain import ChainKey, ChainKeys
from workers.observability.metrics import Metrics

log = logging.getLogger("zandd.audit")

#: How long one read-check-publish round may take (the last one, when stopping, included).
FINAL_PUBLISH_TIMEOUT_S = 5.0
#: The newest head is read at least this often (more often with a shorter interval).
MAX_POLL_S = 1.0


async def tick_until_stopped(
    stop: asyncio.Event, poll_s: float, tick: Callable[..., Awaitable[None]]
) -> None:
    """Call ``tick(final=False)`` every ``poll_s`` until ``stop``, then ``tick(final=True)``."""
    while not stop.is_set():
        with suppress(TimeoutError):
            async with asyncio.timeout(poll_s):
                await stop.wait()
        await tick(final=stop.is_set())


class KeyedAuditStore(Protocol):
    """The part of a vault store a keyed append goes through."""

    async def append_audit(
        self, events: Sequence[AuditEvent], chain_key: ChainKey | None = None
    ) -> list[AuditEntry]:
        """Link and store ``events`` in one transaction."""
        ...

    def append_audit_now(
        self, events: Sequence[AuditEvent], chain_key: ChainKey | None = None
    ) -> list[AuditEntry] | None:
        """As ``append_audit`` on the calling thread, or None when that would wait."""
        ...


class KeyedAppender:
    """An ``AuditAppender`` that links under the ring's active audit key and reports each new
    head to ``on_head`` (a worker's ``zandd_audit_head_seq`` metric)."""

    def __init__(
        self,
        store: KeyedAuditStore,
        keys: ChainKeys,
        on_head: Callable[[ChainHead], None] | None = None,
    ) -> None:
        self._store = store
        self._keys = keys
        self._on_head = on_head

    async def append_audit(self, events: Sequence[AuditEvent]) -> list[AuditEntry]:
        """Append ``events`` keyed under the KEK active now; the stored entries."""
        entries = await self._store.append_audit(events, self._keys.active())
        if entries and self._on_head is not None:
            self._on_head(entries[-1].head)
        return entries

    def append_audit_now(self, events: Sequence[AuditEvent]) -> list[AuditEntry] | None:
        """As ``append_audit`` on the calling thread, or None when the store would wait."""
        entries = self._store.append_audit_now(events, self._keys.active())
        if entries and self._on_head is not None:
            self._on_head(entries[-1].head)
        return entries


PublishHead = Callable[[AuditHeadEvent], Awaitable[None]]


class AuditHeadPublisher:
    """The keygen worker's publisher of the vault's newest audit head.

    Signers may not publish on ``zandd.events`` (least privilege: they could forge state
    changes), so the keygen worker publishes for the fleet: every ``poll_s`` it reads the
    newest entry, checks its keyed link with the ring, and publishes it when ``every_entries``
    entries were added since the last publication or ``interval_s`` has passed (and it
    changed), and once more when stopping. A head lower than one already published means the
    log lost its newest entries: that is logged as an error and never published.
    """

    def __init__(
        self,
        store: AuditReader,
        keys: ChainKeys,
        publish: PublishHead,
        *,
        every_entries: int,
        interval_s: float,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._keys = keys
        self._publish = publish
        self._every_entries = every_entries
        self._interval_s = interval_s
        self._poll_s = min(interval_s, MAX_POLL_S)
        self._metrics = metrics
        self._published = GENESIS
        self._published_at = -math.inf
        self._regressed_to: ChainHead | None = None
        self._rejected: ChainHead | None = None
        #: Heads published, and times the vault's head went back below a published one.
        self.published = 0
        self.regressions = 0
        #: Rounds finished (read, check, publish if due), so a caller can wait for one.
        self.rounds = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop``, then publish the last head once more (bounded)."""
        await tick_until_stopped(stop, self._poll_s, self._tick)

    async def _tick(self, *, final: bool) -> None:
        try:
            async with asyncio.timeout(FINAL_PUBLISH_TIMEOUT_S):
                newest = await self._store.read_audit(AuditQuery(latest=True, limit=1))
                if newest and self._due(newest[0], final=final):
                    await self._publish_checked(newest[0])
        except (ZanddError, TimeoutError) as exc:
            log.warning("audit head not published (tried again later): %s", _reason(exc))
        finally:
            self.rounds += 1

    def _due(self, entry: AuditEntry, *, final: bool) -> bool:
        if entry.seq < self._published.seq:
            if entry.head != self._regressed_to:  # once per state, not once per round
                self._regressed_to = entry.head
                self.regressions += 1
                if self._metrics is not None:
                    self._metrics.audit_head_went_back()
                log.error(
                    "the audit log went back from #%d (published) to #%d: its newest entries "
                    "were removed",
                    self._published.seq,
                    entry.seq,
                )
            return False
        if entry.head == self._published:
            return False
        added = entry.seq - self._published.seq
        waited_s = time.monotonic() - self._published_at
        return final or added >= self._every_entries or waited_s >= self._interval_s

    async def _publish_checked(self, entry: AuditEntry) -> None:
        verifier = ChainVerifier(self._keys, head=ChainHead(entry.seq - 1, entry.prev_hash))
        try:
            verifier.feed(entry)
        except AuditBroken as exc:
            if entry.head != self._rejected:
                self._rejected = entry.head
                log.error("the newest audit entry fails its check, not published: %s", exc.message)
            return
        if verifier.legacy_entries:
            # Only keyed heads are worth keeping: a legacy vault gets one with its next entry.
            log.debug("the newest audit entry #%d is unkeyed (legacy): not published", entry.seq)
            return
        published_at = datetime.now(UTC)
        event = AuditHeadEvent(seq=entry.seq, link=entry.entry_hash, published_at=published_at)
        await self._publish(event)
        self._published, self._published_at = entry.head, time.monotonic()
        self.published += 1
        if self._metrics is not None:
            self._metrics.audit_head(entry.seq)


def _reason(exc: Exception) -> str:
    return exc.message if isinstance(exc, ZanddError) else "the vault or the broker took too long"
