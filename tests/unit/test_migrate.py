"""``vault.migrate`` and ``zandd vault migrate``: from SQLite into SQLite, and into MongoDB.

The migration is backend-agnostic; the ``target`` fixture runs each test into a second SQLite
vault and, in the mongo tier, into a fresh MongoDB database.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import sqlite3
import subprocess
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from contracts.errors import IntegrityError
from tests.support.cli import environment, run_zandd
from tests.support.records import T0, sealed_record
from vault.audit import AuditBroken, AuditEvent, AuditQuery, verify_log
from vault.kek import Kek, KekRing
from vault.migrate import (
    MigrationReport,
    MigrationStage,
    MigrationStep,
    check_opens,
    migrate_vault,
)
from vault.record_mac import authenticated
from vault.records import KeyRecord, KeyState
from vault.store import VaultStore, open_store
from workers.commands.progress import ProgressBar


def audit_event(n: int) -> AuditEvent:
    return AuditEvent(
        at=T0 + timedelta(milliseconds=n),
        principal=f"svc-{n % 3}",
        operation="sign",
        outcome="ok",
        key_id="key-a",
        version=1,
        request_id=f"req-{n}",
        data_sha256=f"{n:064x}",
    )


@pytest.fixture
def ring() -> KekRing:
    return KekRing(Kek.generate())


@pytest.fixture
async def source(tmp_path: Path) -> AsyncIterator[VaultStore]:
    store = await open_store(f"sqlite://{tmp_path / 'source.db'}")
    yield store
    await store.close()


@pytest.fixture(params=["sqlite", pytest.param("mongodb", marks=pytest.mark.mongo)])
async def target(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[VaultStore]:
    if request.param == "mongodb":
        url = str(request.getfixturevalue("mongo_vault_url"))
    else:
        url = f"sqlite://{tmp_path / 'target.db'}"
    store = await open_store(url)
    yield store
    await store.close()


async def fill(source: VaultStore, ring: KekRing, audit_entries: int = 5) -> list[KeyRecord]:
    """Two versions of key-a, and one key in each other state; ``audit_entries`` entries."""
    records = [
        sealed_record(ring, "key-a", 1, state=KeyState.DISABLED),
        sealed_record(ring, "key-a", 2),
        sealed_record(ring, "key-b", state=KeyState.PENDING_DESTRUCTION),
        sealed_record(ring, "key-c", state=KeyState.DESTROYED),
    ]
    for record in records:
        await source.create_key(record)
    if audit_entries:
        await source.append_audit([audit_event(n) for n in range(audit_entries)])
    return records


async def test_everything_is_copied_verified_and_the_chain_kept(
    source: VaultStore, target: VaultStore, ring: KekRing
) -> None:
    records = await fill(source, ring)
    report = await migrate_vault(source, target, ring)
    assert report == MigrationReport(copied=4, audit_copied=5)
    assert await target.list_versions() == records
    assert await target.find_by_request_id("req-key-a-2", owner="keygen-user") == records[1]
    query = AuditQuery()
    assert await target.read_audit(query) == await source.read_audit(query)
    assert await verify_log(target) == await verify_log(source)


async def test_a_second_run_copies_nothing_and_verifies_everything(
    source: VaultStore, target: VaultStore, ring: KekRing
) -> None:
    await fill(source, ring)
    await migrate_vault(source, target, ring)
    again = await migrate_vault(source, target, ring)
    assert again == MigrationReport(already_there=4, audit_already_there=5)
    assert again.verified == 4


class Interrupted(Exception):
    pass


async def test_an_interrupted_run_is_finished_by_the_next(
    source: VaultStore, target: VaultStore, ring: KekRing
) -> None:
    records = await fill(source, ring, audit_entries=0)

    def stop_after_two(progress: MigrationStep) -> None:
        if progress.stage is MigrationStage.KEYS and progress.done == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        await migrate_vault(source, target, ring, on_progress=stop_after_two)
    assert await target.list_versions() == records[:2]
    events = [audit_event(n) for n in range(7)]
    await source.append_audit(events)
    await target.append_audit(events[:3])  # as a run stopped after a first page would leave it
    report = await migrate_vault(source, target, ring)
    assert report == MigrationReport(
        copied=2, already_there=2, audit_copied=4, audit_already_there=3
    )
    assert await target.list_versions() == records


async def test_progress_counts_every_version_and_entry(
    source: VaultStore, target: VaultStore, ring: KekRing
) -> None:
    await fill(source, ring, audit_entries=3)
    seen: list[MigrationStep] = []
    await migrate_vault(source, target, ring, on_progress=seen.append)
    keys = [(p.done, p.total) for p in seen if p.stage is MigrationStage.KEYS]
    audit = [(p.done, p.total) for p in seen if p.stage is MigrationStage.AUDIT]
    assert keys == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]
    assert audit[0] == (0, 3)
    assert audit[-1] == (3, 3)


async def test_a_version_changed_in_the_target_is_reported_not_overwritten(
    source: VaultStore, target: VaultStore, ring: KekRing
) -> None:
    records = await fill(source, ring, audit_entries=0)
    changed = dataclasses.replace(records[1], state=KeyState.DISABLED)
    await target.create_key(changed)
    report = await migrate_vault(source, target, ring)
    assert report.copied == 3
    assert report.not_copied == ["key key-a v2 (differs in state in the target)"]
    assert await target.get_key("key-a", 2) == changed


async def test_a_request_id_taken_in_the_target_is_reported(
    source: VaultStore, target: VaultStore, ring: KekRing
) -> None:
    records = await fill(source, ring, audit_entries=0)
    twin = dataclasses.replace(sealed_record(ring, "key-twin"), request_id=records[0].request_id)
    await target.create_key(twin)
    report = await migrate_vault(source, target, ring)
    assert report.not_copied == ["key key-a v1 (its request id made key key-twin there)"]


@pytest.mark.parametrize(
    "fault", ["unknown KEK", "tampered", "changed metadata", "no MAC", "wrong scalar"]
)
async def test_a_version_that_does_not_open_is_not_copied(
    source: VaultStore, target: VaultStore, ring: KekRing, fault: str
) -> None:
    good = sealed_record(ring, "key-good")
    if fault == "unknown KEK":
        bad = sealed_record(KekRing(Kek.generate()), "key-bad")
        reason = "unknown KEK"
    elif fault == "tampered":
        record = sealed_record(ring, "key-bad")
        assert record.sealed is not None
        flipped = bytes([record.sealed.ciphertext[0] ^ 1]) + record.sealed.ciphertext[1:]
        # MACed again: a record a ring holder wrote, whose ciphertext is damaged.
        bad = authenticated(
            dataclasses.replace(
                record, sealed=dataclasses.replace(record.sealed, ciphertext=flipped)
            ),
            ring,
            generation=2,
        )
        reason = "failed authentication"
    elif fault == "changed metadata":
        bad = dataclasses.replace(sealed_record(ring, "key-bad"), allowed_signers=("mallory",))
        reason = "failed its record MAC"
    elif fault == "no MAC":
        bad = dataclasses.replace(sealed_record(ring, "key-bad"), mac=None)
        reason = "has no record MAC"
    else:
        bad = sealed_record(ring, "key-bad", scalar_of=ec.generate_private_key(ec.SECP256R1()))
        reason = "does not match its stored public key"
    for record in (good, bad):
        await source.create_key(record)
    report = await migrate_vault(source, target, ring)
    assert report.copied == 1
    assert len(report.not_copied) == 1
    assert report.not_copied[0].startswith("key key-bad v1 (")
    assert reason in report.not_copied[0]
    assert await target.list_versions() == [good]


def test_check_opens_passes_a_good_record_and_a_destroyed_one(ring: KekRing) -> None:
    check_opens(sealed_record(ring, "key-ok"), ring)
    check_opens(sealed_record(ring, "key-gone", state=KeyState.DESTROYED), ring)
    with pytest.raises(IntegrityError, match="cannot check"):
        check_opens(
            authenticated(
                dataclasses.replace(sealed_record(ring, "key-x"), algorithm="rsa"),
                ring,
                generation=2,
            ),
            ring,
        )


async def test_a_target_audit_log_of_its_own_is_refused(
    source: VaultStore, target: VaultStore, ring: KekRing
) -> None:
    await fill(source, ring, audit_entries=3)
    await target.append_audit([audit_event(0), audit_event(99)])
    with pytest.raises(IntegrityError, match="differs from the source's from entry #2"):
        await migrate_vault(source, target, ring)


async def test_a_target_written_to_since_is_refused(
    source: VaultStore, target: VaultStore, ring: KekRing
) -> None:
    await fill(source, ring, audit_entries=3)
    await migrate_vault(source, target, ring)
    await target.append_audit([audit_event(3)])
    with pytest.raises(IntegrityError, match="from entry #4"):
        await migrate_vault(source, target, ring)


async def test_a_broken_source_chain_is_not_copied(
    source: VaultStore, target: VaultStore, ring: KekRing, tmp_path: Path
) -> None:
    await fill(source, ring, audit_entries=3)
    with sqlite3.connect(tmp_path / "source.db") as conn:
        conn.execute("UPDATE audit SET outcome = 'forbidden' WHERE seq = 2")
    conn.close()
    with pytest.raises(AuditBroken, match="#2"):
        await migrate_vault(source, target, ring)
    assert await target.read_audit(AuditQuery()) == []


# --- the progress bar ---------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_redraws_one_line_on_a_terminal() -> None:
    terminal = Terminal()
    bar = ProgressBar(terminal)
    for done in range(3):
        bar.update(MigrationStep(MigrationStage.KEYS, done, 2))
    bar.update(MigrationStep(MigrationStage.AUDIT, 0, 0))
    bar.finish()
    lines = terminal.getvalue().split("\n")
    assert lines[0].count("\r") == 3
    assert lines[0].endswith("\rkeys  [" + "#" * 30 + "] 2/2")
    assert lines[1] == "\raudit [" + "#" * 30 + "] 0/0"
    assert lines[2] == ""


def test_progress_bar_writes_a_line_per_tenth_elsewhere() -> None:
    log = io.StringIO()
    bar = ProgressBar(log)
    for done in range(101):
        bar.update(MigrationStep(MigrationStage.KEYS, done, 100))
    bar.finish()
    lines = log.getvalue().splitlines()
    assert len(lines) == 11
    assert "\r" not in log.getvalue()
    assert lines[0].endswith("] 0/100")
    assert lines[5] == "keys  [" + "#" * 15 + "." * 15 + "] 50/100"
    assert lines[-1].endswith("] 100/100")


# --- the command ----------------------------------------------------------------------------


def zandd(*args: str) -> subprocess.CompletedProcess[str]:
    return run_zandd(*args, env=environment())


async def test_the_command_migrates_and_says_so(tmp_path: Path) -> None:
    kek_file = tmp_path / "kek-ring.json"
    ring = KekRing.create(kek_file)
    source_url = f"sqlite://{tmp_path / 'source.db'}"
    target_url = f"sqlite://{tmp_path / 'target.db'}"
    source = await open_store(source_url)
    try:
        await fill(source, ring, audit_entries=2)
    finally:
        await source.close()
    flags = ("--kek-file", str(kek_file), "--data-dir", str(tmp_path))
    run = await asyncio.to_thread(
        zandd, "vault", "migrate", "--from", source_url, "--to", target_url, *flags
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"migrated {source_url} → {target_url}: 4 key versions copied")
    assert "Audit log: 2 entries copied" in run.stdout
    assert "keys  [" + "#" * 30 + "] 4/4" in run.stderr
    # stderr is a pipe here, not a terminal: whole lines, never a carriage return.
    assert "\r" not in run.stderr
    again = await asyncio.to_thread(
        zandd, "vault", "migrate", "--from", source_url, "--to", target_url, *flags
    )
    assert again.returncode == 0, again.stderr
    assert "0 key versions copied, 4 already there" in again.stdout


async def test_the_command_fails_in_one_sentence(tmp_path: Path) -> None:
    kek_file = tmp_path / "kek-ring.json"
    KekRing.create(kek_file)
    source_url = f"sqlite://{tmp_path / 'source.db'}"
    source = await open_store(source_url)
    try:
        await source.create_key(sealed_record(KekRing(Kek.generate()), "key-foreign"))
    finally:
        await source.close()
    flags = ("--kek-file", str(kek_file), "--data-dir", str(tmp_path))
    target_url = f"sqlite://{tmp_path / f'{uuid.uuid4().hex}.db'}"
    same = await asyncio.to_thread(
        zandd, "vault", "migrate", "--from", source_url, "--to", source_url, *flags
    )
    assert (same.returncode, same.stderr) == (1, "zandd: --from and --to name the same vault\n")
    foreign = await asyncio.to_thread(
        zandd, "vault", "migrate", "--from", source_url, "--to", target_url, *flags
    )
    assert foreign.returncode == 1
    last_line = foreign.stderr.splitlines()[-1]
    assert last_line.startswith("zandd: 1 key versions were not copied: key key-foreign v1 (")
    assert "unknown KEK" in last_line
    assert "Traceback" not in foreign.stderr
