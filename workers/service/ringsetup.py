"""How a process gets its KEK ring, and how ``zandd up`` and ``zandd vault init`` make one.

- A child of ``zandd up`` reads the ring its supervisor opened from an inherited pipe
  (``ZANDD_KEK_FD``); the ring is never written anywhere in the clear for it.
- Any other process reads the ring file, unsealing it with this host's TPM when it is sealed.
- A new ring is sealed to the TPM when there is one; a plaintext ring is an explicit choice.
- Nothing opens or creates a ring that leaves records of the vault unreadable, unless the
  operator says so (``--allow-unreadable``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from vault.coverage import RingCoverage, coverage_of, no_ring_error, unreadable_error
from vault.kek import KekRing, RingSealer, ring_file_info
from vault.store import open_store
from workers.service.config import Settings

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


def tpm_sealer(settings: Settings, tcti: str | None = None, *, pcrs: str | None) -> RingSealer:
    """A sealer on this host's TPM (``tcti``, else the configured or local one)."""
    from workers.keygen.ringseal import TpmRingSealer
    from workers.service.serve import resolve_tcti

    return TpmRingSealer(tcti or resolve_tcti(settings), pcrs=pcrs)


def file_sealer(settings: Settings, path: Path, tcti: str | None = None) -> RingSealer | None:
    """What opens the ring file at ``path``: this host's TPM when the file is sealed, else None
    (also when this host has no TPM stack: loading then says the file needs a TPM)."""
    if not path.exists():
        return None
    info = ring_file_info(path)
    if not info.sealed:
        return None
    try:
        return tpm_sealer(settings, tcti, pcrs=info.pcrs)
    except ImportError as exc:
        log.debug("no TPM stack to unseal the KEK ring: %s", exc)
        return None


def load_ring(settings: Settings) -> KekRing:
    """The ring this process uses: the one ``zandd up`` passed on ``ZANDD_KEK_FD``, else the
    file (unsealed in memory by this host's TPM when it is sealed)."""
    if settings.kek_fd is not None:
        return KekRing.from_fd(settings.kek_fd)
    path = settings.resolved_kek_file
    return KekRing.load(path, sealer=file_sealer(settings, path))


def describe(ring: KekRing, settings: Settings) -> str:
    """One line for the start-up log and ``zandd vault status``: where the ring is and how it
    is kept."""
    path = settings.resolved_kek_file
    if settings.kek_fd is not None:
        return f"KEK ring {path} received from zandd up (active {ring.active.kek_id})"
    if ring.sealer is not None:
        return f"KEK ring {path} sealed to {ring.sealer.description} (active {ring.active.kek_id})"
    return (
        f"KEK ring {path} in PLAINTEXT, not sealed to a TPM (active {ring.active.kek_id}): "
        "`zandd vault seal-ring` seals it"
    )


async def open_or_create_ring(
    settings: Settings, create: Callable[[Path], KekRing], tcti: str | None = None
) -> tuple[KekRing, bool]:
    """The ring at the configured path, made by ``create`` when there is none; and whether it
    was made. Checked against the vault before anything is written or started."""
    path = settings.resolved_kek_file
    usage = await vault_kek_usage(settings)
    if path.exists():
        ring = KekRing.load(path, sealer=file_sealer(settings, path, tcti))
        accept(coverage_of(usage, ring.kek_ids), settings)
        return ring, False
    accept(coverage_of(usage, ()), settings, created=True)
    return create(path), True
