"""Audit entries for tests: made-up events, appended under a ring's chain key, and read back."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.support.fleet import RunningFleet
from vault.audit import AuditEvent, AuditQuery
from vault.audit_chain import ChainKeys
from vault.kek import KekRing
from vault.store import VaultStore
from workers.audit.audit_head import KeyedAppender

T0 = datetime(2026, 11, 29, 20, 0, 0, tzinfo=UTC)
"""The events' clock: event ``n`` happens ``n`` seconds after it."""


def event(n: int, principal: str = "svc-a") -> AuditEvent:
    """Signing event number ``n`` of ``principal``."""
    return AuditEvent(
        at=T0 + timedelta(seconds=n),
        principal=principal,
        operation="sign",
        outcome="ok",
        key_id="zk-1",
        version=1,
        request_id=f"req-{n}",
        data_sha256=hashlib.sha256(bytes([n % 256])).hexdigest(),
    )


def vault_db(tmp_path: Path) -> Path:
    """The SQLite file of the unit tests' ``store`` fixture."""
    return tmp_path / "vault" / "vault.db"


async def append_keyed(store: VaultStore, ring: KekRing, numbers: range) -> None:
    """Append ``event(n)`` for each of ``numbers``, linked under ``ring``'s chain key."""
    await KeyedAppender(store, ChainKeys(ring)).append_audit([event(n) for n in numbers])


async def audit_outcomes(fleet: RunningFleet) -> dict[str, list[str]]:
    """request id → outcomes the fleet's audit log recorded for it."""
    outcomes: dict[str, list[str]] = {}
    after = 0
    while page := await fleet.store.read_audit(AuditQuery(after_seq=after)):
        for entry in page:
            if entry.event.request_id is not None:
                outcomes.setdefault(entry.event.request_id, []).append(entry.event.outcome)
        after = page[-1].seq
    return outcomes


def vault_file(fleet: RunningFleet) -> Path:
    """The fleet's SQLite vault file."""
    return fleet.settings.data_dir / "vault.db"
