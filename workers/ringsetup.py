"""Opening or creating the KEK ring for ``zandd up`` and ``zandd vault init``: never over a
vault whose records it would not open, unless the operator says so (``--allow-unreadable``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from vault.coverage import RingCoverage, coverage_of, no_ring_error, unreadable_error
from vault.kek import KekRing
from vault.store import open_store
from workers.config import Settings

log = logging.getLogger("zandd.ring")


async def vault_kek_usage(settings: Settings) -> dict[str, int]:
    """Key versions per KEK id in the configured vault (creating an empty vault if none)."""
    store = await open_store(settings.resolved_vault_url)
    try:
        return await store.kek_usage()
    finally:
        await store.close()


def accept(coverage: RingCoverage, settings: Settings, *, created: bool = False) -> None:
    """Refuse a ring that leaves records unreadable, or log it when the operator allowed it.

    Raises:
        ConfigurationError: one sentence naming the ring path and the missing KEK ids.
    """
    if coverage.complete:
        return
    path, url = settings.resolved_kek_file, settings.resolved_vault_url
    error = (no_ring_error if created else unreadable_error)(coverage, path, url)
    if not settings.allow_unreadable:
        raise error
    log.error("allowed by --allow-unreadable: %s", error.message)


async def open_or_create_ring(
    settings: Settings, create: Callable[[Path], KekRing]
) -> tuple[KekRing, bool]:
    """The ring at the configured path, made by ``create`` when there is none; and whether it
    was made. Checked against the vault before anything is written or started."""
    path = settings.resolved_kek_file
    usage = await vault_kek_usage(settings)
    if path.exists():
        ring = KekRing.load(path)
        accept(coverage_of(usage, ring.kek_ids), settings)
        return ring, False
    accept(coverage_of(usage, ()), settings, created=True)
    return create(path), True
