"""Every worker keeps checking that its KEK ring opens every record of the vault.

At start-up a worker refuses to run on a ring that lacks a KEK the vault uses
(``vault.coverage``). Afterwards the vault can still gain such records — another host with
another ring writing to a shared MongoDB vault, a row copied in from elsewhere — so each
worker asks again every ``RING_CHECK_INTERVAL_S`` and publishes the count as
``zandd_vault_records_unreadable``, on which the ``ZanddVaultRecordsUnreadable`` alert fires.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress

from contracts.errors import ZanddError
from vault.coverage import RingCoverage, coverage_of
from vault.kek import KekRing
from vault.store import VaultStore
from workers.observability.metrics import Metrics

log = logging.getLogger("zandd.ring")

RING_CHECK_INTERVAL_S = 60.0


class RingWatch:
    """The periodic check of one worker's ring against the vault."""

    def __init__(
        self,
        store: VaultStore,
        ring: KekRing,
        metrics: Metrics,
        *,
        interval_s: float = RING_CHECK_INTERVAL_S,
    ) -> None:
        self._store = store
        self._ring = ring
        self._metrics = metrics
        self._interval_s = interval_s
        self._last: RingCoverage | None = None

    async def check(self) -> RingCoverage:
        """Compare once and set the metric."""
        usage = await self._store.kek_usage()
        coverage = coverage_of(usage, self._ring.kek_ids)
        # A KEK added by a rotation elsewhere is in the file, not yet in memory.
        if not coverage.complete and self._ring.refresh():
            coverage = coverage_of(usage, self._ring.kek_ids)
        self._metrics.vault_records_unreadable(coverage.unreadable)
        return coverage

    async def run(self, stop: asyncio.Event) -> None:
        """Check every interval until ``stop`` is set, logging each change of what is missing;
        a failed check is logged and retried."""
        while not stop.is_set():
            try:
                coverage = await self.check()
            except ZanddError as exc:
                log.warning("cannot compare the KEK ring with the vault: %s", exc.message)
            else:
                if coverage != self._last and not coverage.complete:
                    log.error("this worker's KEK ring cannot open %s", coverage.describe_missing())
                self._last = coverage
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval_s)
