"""Aliases (issue 15): caller-chosen names (``alias/<name>``) bound to one key id each.

An alias row is MACed like a key record (``vault.record_mac``), under the same HKDF-derived
key of a KEK of the ring, with a domain tag of its own: a vault writer without the ring
cannot re-point an alias, so it cannot redirect a producer's signatures to a key the producer
did not mean (the signer would still refuse a key the caller may not sign with, but a key the
caller may sign with and did not name is the attack the MAC stops). ``generation`` grows with
every change, so the store's compare-and-set (``put_alias``/``delete_alias``) lets only one
writer win, and an older copy of a row can be told from the current one.
"""

from __future__ import annotations

import dataclasses
import hmac
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from hashlib import sha256
from typing import TYPE_CHECKING

from contracts.errors import IntegrityError
from vault.kek import KekRing
from vault.record_mac import _mac_key, _moment, _number, _text
from vault.records import RecordMac

if TYPE_CHECKING:
    from vault.store import VaultStore

_ALIAS_DOMAIN_TAG = b"zandd-alias/1"


@dataclass(frozen=True, slots=True, repr=False)
class AliasRecord:
    """One alias as the vault stores it: the key it points at, who owns it, and since when."""

    alias: str
    key_id: str
    owner: str
    created_at: datetime
    updated_at: datetime
    generation: int = 1
    mac: RecordMac | None = None

    def __repr__(self) -> str:
        return (
            f"AliasRecord(alias={self.alias!r}, key_id={self.key_id!r}, owner={self.owner!r}, "
            f"generation={self.generation})"
        )


def alias_fields(record: AliasRecord, mac_kek_id: str) -> bytes:
    """The canonical, length-prefixed encoding of every MACed field of an alias row."""
    created = _moment(record.created_at)
    updated = _moment(record.updated_at)
    assert created is not None
    assert updated is not None
    return b"".join(
        (
            _text(_ALIAS_DOMAIN_TAG.decode("ascii")),
            _text(record.alias),
            _text(record.key_id),
            _text(record.owner),
            _text(created.decode("ascii")),
            _text(updated.decode("ascii")),
            _number(record.generation),
            _text(mac_kek_id),
        )
    )


def authenticated_alias(record: AliasRecord, ring: KekRing, *, generation: int) -> AliasRecord:
    """``record`` at ``generation``, MACed under the ring's active KEK."""
    kek = ring.active
    updated = dataclasses.replace(record, generation=generation, mac=None)
    tag = hmac.new(_mac_key(kek), alias_fields(updated, kek.kek_id), sha256).digest()
    return dataclasses.replace(updated, mac=RecordMac(kek.kek_id, tag))


def verify_alias(record: AliasRecord, ring: KekRing) -> AliasRecord:
    """``record`` if its MAC holds; else IntegrityError (also without a MAC)."""
    if record.mac is None:
        raise IntegrityError(f"{record.alias} has no MAC: nothing vouches for its key")
    kek = ring.get(record.mac.kek_id)
    expected = hmac.new(_mac_key(kek), alias_fields(record, kek.kek_id), sha256).digest()
    if not hmac.compare_digest(expected, record.mac.tag):
        raise IntegrityError(f"{record.alias} failed its MAC: its binding was changed")
    return record


def check_alias_replacement(record: AliasRecord, expected: AliasRecord | None) -> None:
    """A write's generation is its predecessor's plus one (1 for a new alias)."""
    want = 1 if expected is None else expected.generation + 1
    if record.generation != want or (expected is not None and expected.alias != record.alias):
        raise ValueError(f"alias write must be generation {want} of the same alias")


async def rewrap_aliases(store: VaultStore, ring: KekRing) -> Counter[str]:
    """Re-MAC every alias row not MACed under the ring's active KEK (``zandd vault rewrap``),
    each as its next generation with the store's compare-and-set; the binding is unchanged,
    so no signer needs telling. Counts of ``rewrapped``, ``current``, ``changed`` (another
    writer was first: run again) and ``integrity_error`` (its MAC fails: left as it is)."""
    ring.refresh()
    outcomes: Counter[str] = Counter()
    for row in await store.list_aliases():
        if row.mac is not None and row.mac.kek_id == ring.active.kek_id:
            outcomes["current"] += 1
            continue
        try:
            verify_alias(row, ring)
        except IntegrityError:
            outcomes["integrity_error"] += 1
            continue
        moved = authenticated_alias(row, ring, generation=row.generation + 1)
        outcomes["rewrapped" if await store.put_alias(moved, row) else "changed"] += 1
    return outcomes
