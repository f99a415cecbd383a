"""The one-time upgrade of a vault whose records predate record MACs.

Readers refuse a record without a MAC, so after installing a version with record MACs the
operator vouches once for the records as they are (``zandd vault mac-records``). That trusts
the rows at that moment: a change a vault writer made before the upgrade is MACed with the
rest. What can still be checked is checked: a sealed scalar must open and give the stored
public key (so a swapped public key is not vouched for); such a record is left without a MAC
and stays refused.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum

from contracts.errors import IntegrityError
from vault.kek import KekRing
from vault.migrate import check_scalar
from vault.record_mac import authenticated
from vault.records import KeyRecord
from vault.store import VaultStore


class MacOutcome(StrEnum):
    """What happened to one version."""

    MACED = "maced"
    #: It had a MAC already (a re-run after an interruption).
    ALREADY = "already"
    #: Changed by another writer meanwhile; a later run picks it up.
    CHANGED = "changed"
    #: Its sealed scalar does not open or does not give its public key: left without a MAC.
    UNREADABLE = "integrity_error"


@dataclass(frozen=True, slots=True)
class MacStep:
    """One version handled: ``done`` of ``total``."""

    done: int
    total: int
    record: KeyRecord
    outcome: MacOutcome


async def count_unmaced(store: VaultStore) -> tuple[int, int]:
    """(versions with a MAC, versions without one)."""
    records = await store.list_versions()
    without = sum(record.mac is None for record in records)
    return len(records) - without, without


async def mac_records(store: VaultStore, ring: KekRing) -> AsyncIterator[MacStep]:
    """MAC every version that has no MAC yet, under the active KEK, as its next generation."""
    ring.refresh()
    records = await store.list_versions()
    for done, record in enumerate(records, start=1):
        outcome = await _mac_one(store, ring, record)
        yield MacStep(done=done, total=len(records), record=record, outcome=outcome)


async def _mac_one(store: VaultStore, ring: KekRing, record: KeyRecord) -> MacOutcome:
    if record.mac is not None:
        return MacOutcome.ALREADY
    try:
        check_scalar(record, ring)
    except IntegrityError:
        return MacOutcome.UNREADABLE
    updated = authenticated(record, ring, generation=record.generation + 1)
    if await store.replace_key(updated, record):
        return MacOutcome.MACED
    return MacOutcome.CHANGED
