"""Copying a vault to another store (e.g. SQLite → MongoDB), resumably and verified.

Works on any two ``VaultStore`` backends. Every key version is copied as it is (still sealed:
nothing is re-encrypted, its record MAC and generation kept), read back from the target and
checked: equal to the source's, its record MAC holds, and, unless destroyed, it opens with the
KEK ring and its scalar gives the stored public key. The
audit log follows with its hash chain intact: entries are re-linked in the target with the
same sequence numbers, so their hashes come out identical, and the target's chain is verified
at the end.

Running it again is safe and finishes an interrupted run: versions already in the target and
identical are only verified, audit entries already there are compared and skipped. A version
that differs in the target (changed there after an earlier run) is never overwritten, and one
that does not open in the source is not copied: both are reported after everything else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import groupby

from contracts.algorithms import ALGORITHMS
from contracts.crypto import public_key_der
from contracts.errors import IntegrityError, KeyNotFound
from vault.audit import AuditEntry, AuditQuery, verify_log
from vault.audit_chain import ChainKeys, link_kek_id
from vault.kek import KekRing
from vault.opening import private_key_of
from vault.record_mac import verify_record
from vault.records import KeyRecord
from vault.store import VaultStore


class MigrationStage(StrEnum):
    """The two parts of a migration, in the order they run."""

    KEYS = "keys"
    AUDIT = "audit"


@dataclass(frozen=True, slots=True)
class MigrationStep:
    """``done`` of ``total`` items of ``stage`` handled."""

    stage: MigrationStage
    done: int
    total: int


ProgressCallback = Callable[[MigrationStep], None]


@dataclass
class MigrationReport:
    """What a run did; ``not_copied`` says which versions were left alone, and why."""

    copied: int = 0
    already_there: int = 0
    audit_copied: int = 0
    audit_already_there: int = 0
    not_copied: list[str] = field(default_factory=list)

    @property
    def verified(self) -> int:
        """Key versions checked in the target (copied now or found there identical)."""
        return self.copied + self.already_there


async def migrate_vault(
    source: VaultStore,
    target: VaultStore,
    ring: KekRing,
    *,
    on_progress: ProgressCallback | None = None,
) -> MigrationReport:
    """Copy every key version and the audit log from ``source`` to ``target``, verified."""
    report = MigrationReport()
    notify = on_progress or _ignore
    await _copy_keys(source, target, ring, report, notify)
    await _copy_audit(source, target, ChainKeys(ring), report, notify)
    return report


def check_opens(record: KeyRecord, ring: KekRing) -> None:
    """Check ``record``'s MAC, open it into a wiped buffer and check its scalar gives the
    stored public key.

    Raises IntegrityError when its MAC fails (or it has none: run ``zandd vault mac-records``
    on the source first), it does not open (tampered, or its KEK is not in the ring) or
    belongs to another public key. A destroyed version has nothing to open; its MAC must hold.
    """
    verify_record(record, ring)
    check_scalar(record, ring)


def check_scalar(record: KeyRecord, ring: KekRing) -> None:
    """Open ``record`` into a wiped buffer and check its scalar gives the stored public key.

    ``check_opens`` without the record MAC; IntegrityError as there.
    """
    if record.sealed is None:
        return
    if record.algorithm not in ALGORITHMS:
        raise IntegrityError(
            f"key {record.key_id} v{record.version} has algorithm {record.algorithm!r}, "
            "which this software cannot check"
        )
    with private_key_of(record, ring) as private_key:
        matches = public_key_der(private_key.public_key()) == record.public_key_der
    if not matches:
        raise IntegrityError(
            f"key {record.key_id} v{record.version} opens to a scalar that does not match "
            "its stored public key"
        )


async def _copy_keys(
    source: VaultStore,
    target: VaultStore,
    ring: KekRing,
    report: MigrationReport,
    notify: ProgressCallback,
) -> None:
    records = await source.list_versions()
    notify(MigrationStep(MigrationStage.KEYS, 0, len(records)))
    for done, record in enumerate(records, start=1):
        stored = await _copy_record(record, target, ring, report)
        if stored is not None:
            if stored != record:
                raise IntegrityError(
                    f"key {record.key_id} v{record.version} reads back from the target "
                    "different from what was written"
                )
            check_opens(stored, ring)
        notify(MigrationStep(MigrationStage.KEYS, done, len(records)))


async def _copy_record(
    record: KeyRecord, target: VaultStore, ring: KekRing, report: MigrationReport
) -> KeyRecord | None:
    """The target's copy of ``record`` (written now or found), None when left alone."""
    name = f"key {record.key_id} v{record.version}"
    try:
        # Nothing goes into the target that its workers could not use.
        check_opens(record, ring)
    except IntegrityError as exc:
        report.not_copied.append(f"{name} ({exc.message})")
        return None
    try:
        existing = await target.get_key(record.key_id, record.version)
    except KeyNotFound:
        created = await target.create_key(record)
        if created != record:
            report.not_copied.append(f"{name} (its request id made key {created.key_id} there)")
            return None
        report.copied += 1
        return await target.get_key(record.key_id, record.version)
    if existing != record:
        report.not_copied.append(f"{name} ({_difference(existing, record)} in the target)")
        return None
    report.already_there += 1
    return existing


def _difference(existing: KeyRecord, record: KeyRecord) -> str:
    names = [
        spec.name
        for spec in dataclasses.fields(KeyRecord)
        if getattr(existing, spec.name) != getattr(record, spec.name)
    ]
    return "differs in " + ", ".join(names)


async def _copy_audit(
    source: VaultStore,
    target: VaultStore,
    keys: ChainKeys,
    report: MigrationReport,
    notify: ProgressCallback,
) -> None:
    # A broken source chain would be re-linked into a valid-looking one: refuse it instead.
    source_head = await verify_log(source, keys)
    notify(MigrationStep(MigrationStage.AUDIT, 0, source_head.seq))
    copied_up_to = await _skip_common_audit(source, target)
    report.audit_already_there = copied_up_to
    notify(MigrationStep(MigrationStage.AUDIT, copied_up_to, source_head.seq))
    while True:
        page = await source.read_audit(AuditQuery(after_seq=copied_up_to))
        if not page:
            break
        stored = await _relink(target, page, keys)
        if stored != page:
            raise IntegrityError(
                f"the target's audit log took entries #{stored[0].seq}… where the source has "
                f"#{page[0].seq}…: something else is writing to the target; stop it and re-run"
            )
        report.audit_copied += len(page)
        copied_up_to = page[-1].seq
        notify(MigrationStep(MigrationStage.AUDIT, copied_up_to, source_head.seq))
    if await verify_log(target, keys) != source_head:
        raise IntegrityError("the target's audit log does not end where the source's does")


async def _skip_common_audit(source: VaultStore, target: VaultStore) -> int:
    """How many leading entries the target already has, identical to the source's."""
    after = 0
    while True:
        theirs = await target.read_audit(AuditQuery(after_seq=after))
        if not theirs:
            return after
        ours = await source.read_audit(AuditQuery(after_seq=after, limit=len(theirs)))
        mismatch = _first_mismatch(ours, theirs)
        if mismatch is not None:
            raise IntegrityError(
                f"the target's audit log differs from the source's from entry #{mismatch} on "
                "(written to since an earlier run, or another vault's): logs are not merged"
            )
        after = theirs[-1].seq


async def _relink(target: VaultStore, page: list[AuditEntry], keys: ChainKeys) -> list[AuditEntry]:
    """Append ``page``'s events to ``target``, each run keyed as in the source (legacy runs
    unkeyed), so the target's links come out identical to the source's."""
    stored: list[AuditEntry] = []
    for kek_id, run in groupby(page, key=lambda entry: link_kek_id(entry.entry_hash)):
        chain_key = None if kek_id is None else keys.get(kek_id)
        stored += await target.append_audit([entry.event for entry in run], chain_key)
    return stored


def _first_mismatch(ours: list[AuditEntry], theirs: list[AuditEntry]) -> int | None:
    for mine, other in zip(ours, theirs, strict=False):
        if mine != other:
            return other.seq
    if len(theirs) > len(ours):
        return theirs[len(ours)].seq
    return None


def _ignore(progress: MigrationStep) -> None:
    """The default progress callback."""
