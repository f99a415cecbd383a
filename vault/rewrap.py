"""Re-sealing every key version under the active KEK, so an old KEK can be retired.

One version at a time, each written with the store's compare-and-set: a run interrupted at
any point (killed, crashed, Ctrl-C) leaves every version sealed under either its old KEK or
the new one — both in the ring — and running it again finishes the job. A version someone
else changed meanwhile (disabled, destroyed, re-wrapped by a second run) is left to them.

Each record's MAC is checked first and recomputed under the active KEK with the next
generation (destroyed versions too: they have nothing sealed, but their MAC must not depend
on a KEK that is about to be retired). A record whose MAC fails is left as it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum

from contracts.errors import IntegrityError
from vault.kek import KekRing
from vault.record_mac import authenticated, verify_record
from vault.records import KeyRecord
from vault.sealing import open_into, plaintext_size, seal, wipe
from vault.store import VaultStore


class RewrapOutcome(StrEnum):
    """What happened to one version."""

    REWRAPPED = "rewrapped"
    #: Already sealed under the active KEK.
    CURRENT = "current"
    #: Destroyed: nothing sealed to re-wrap, its MAC already under the active KEK.
    DESTROYED = "destroyed"
    #: Changed by another writer while we worked on it; a later run picks it up.
    CHANGED = "changed"
    #: The sealed material does not open or the record's MAC fails (tampered, its KEK is
    #: missing, or a vault whose records were never MACed): left as it is.
    UNREADABLE = "integrity_error"


@dataclass(frozen=True, slots=True)
class RewrapStep:
    """One version handled: ``done`` of ``total``."""

    done: int
    total: int
    record: KeyRecord
    outcome: RewrapOutcome


def resealed(record: KeyRecord, ring: KekRing) -> KeyRecord:
    """``record`` sealed (if it holds anything sealed) and MACed under the ring's active KEK,
    as its next generation; the plaintext lives in a wiped buffer."""
    if record.sealed is None:
        return authenticated(record, ring, generation=record.generation + 1)
    scalar = bytearray(max(0, plaintext_size(record.sealed)))
    try:
        open_into(record.sealed, record.binding, ring, scalar)
        sealed = seal(scalar, record.binding, ring.active)
    finally:
        wipe(scalar)
    moved = dataclasses.replace(record, sealed=sealed)
    return authenticated(moved, ring, generation=record.generation + 1)


async def rewrap(store: VaultStore, ring: KekRing) -> AsyncIterator[RewrapStep]:
    """Re-seal every version not under the active KEK, yielding a step per version."""
    ring.refresh()
    records = await store.list_versions()
    for done, record in enumerate(records, start=1):
        outcome = await _rewrap_one(store, ring, record)
        yield RewrapStep(done=done, total=len(records), record=record, outcome=outcome)


async def _rewrap_one(store: VaultStore, ring: KekRing, record: KeyRecord) -> RewrapOutcome:
    active = ring.active.kek_id
    if record.mac is not None and record.mac.kek_id == active:
        if record.sealed is None:
            # A key of protection "tpm" has nothing sealed either; its MAC is current.
            return RewrapOutcome.DESTROYED if record.tpm_blob is None else RewrapOutcome.CURRENT
        if record.sealed.kek_id == active:
            return RewrapOutcome.CURRENT
    try:
        updated = resealed(verify_record(record, ring), ring)
    except IntegrityError:
        return RewrapOutcome.UNREADABLE
    if await store.replace_key(updated, record):
        return RewrapOutcome.REWRAPPED
    return RewrapOutcome.CHANGED
