"""``zandd vault backup|restore``: a verified copy of a SQLite vault and its KEK ring file.

The backup is taken online (SQLite's backup API; workers keep serving), then checked as a
restore would be: SQLite's integrity check, every key version's record MAC under the ring
copied with it, and the audit chain from its first entry to its head. ``restore`` checks the
backup again (files against the manifest, then the same checks) before it writes anything,
refuses to replace an existing vault or ring without ``--force``, and checks the result.

Nothing is decrypted to disk: key versions stay sealed under their KEKs and the ring file is
copied in the form it has (sealed to this host's TPM, or plaintext). The ring is opened in
memory only to check MACs and links, as ``zandd audit verify`` does. See docs/operations.md,
"Backup and restore"; for MongoDB, mongodump/mongorestore.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from contracts.errors import ConfigurationError, IntegrityError
from contracts.urls import redact_url
from vault.audit import AuditLog, ChainHead, check_log
from vault.audit_chain import ChainKeys
from vault.backup import (
    MANIFEST_FILE,
    RING_FILE,
    VAULT_FILE,
    Manifest,
    check_database,
    copy_database,
    make_backup_dir,
    make_self_contained,
    read_private,
    sha256_of,
    sqlite_vault_path,
    write_private,
)
from vault.kek import ring_file_info
from vault.record_mac import verify_record
from vault.store import open_store
from workers.audit.audit_head import KeyedAppender
from workers.audit.auditing import utc_now
from workers.commands.base import CommandTree
from workers.commands.vault import _vault_event
from workers.service.config import Settings
from workers.service.hygiene import harden_for_key_material

if TYPE_CHECKING:
    from vault.kek import KekRing


async def _cmd_vault_backup(args: argparse.Namespace, settings: Settings) -> int:
    harden_for_key_material(lock_memory=settings.lock_memory)
    source = sqlite_vault_path(settings.resolved_vault_url)
    live_ring = settings.resolved_kek_file
    directory: Path = args.directory.absolute()
    make_backup_dir(directory)
    copy_database(source, directory / VAULT_FILE)
    ring_path = live_ring
    if not args.without_ring:
        ring_path = directory / RING_FILE
        write_private(ring_path, read_private(live_ring, "KEK file"))
    ring = _open_ring(settings, ring_path)
    versions, head = await _check(directory / VAULT_FILE, ring)
    make_self_contained(directory / VAULT_FILE)
    manifest = Manifest(
        created_at=utc_now().isoformat(),
        vault_sha256=sha256_of(directory / VAULT_FILE),
        ring_sha256=None if args.without_ring else sha256_of(ring_path),
        key_versions=versions,
        audit_head_seq=head.seq,
        audit_head_link=head.entry_hash,
    )
    write_private(directory / MANIFEST_FILE, manifest.to_json())
    # The live log records who took a backup (after the copy: the backup does not hold it).
    await _audit(settings.resolved_vault_url, ring, "vault.backup")
    what = "the vault" if args.without_ring else "the vault and the KEK ring"
    print(f"backed up {what} of {redact_url(settings.resolved_vault_url)} to {directory}")
    print(f"verified: {versions} key versions (record MACs), audit chain #1 to #{head.seq}")
    if args.without_ring:
        print(f"the ring is not in the backup: keep {live_ring} backed up apart from it")
    elif not ring_file_info(ring_path).sealed:
        print(
            "WARNING: the backup holds the KEK ring in PLAINTEXT next to the vault: whoever "
            "reads it has every key; store it as the ring itself (or back up --without-ring "
            "and keep the ring elsewhere)",
            file=sys.stderr,
        )
    return 0


async def _cmd_vault_restore(args: argparse.Namespace, settings: Settings) -> int:
    harden_for_key_material(lock_memory=settings.lock_memory)
    directory: Path = args.directory.absolute()
    manifest = Manifest.read(directory)
    target = sqlite_vault_path(settings.resolved_vault_url)
    target_ring = settings.resolved_kek_file
    backup_ring = directory / RING_FILE if manifest.ring_sha256 is not None else target_ring
    if manifest.ring_sha256 is None and not target_ring.exists():
        raise ConfigurationError(
            f"the backup {directory} holds no KEK ring (made --without-ring): put the ring that "
            f"sealed it at {target_ring} first"
        )
    existing = [p for p in (target, _wal(target)) if p.exists()]
    if manifest.ring_sha256 is not None and target_ring.exists():
        existing.append(target_ring)
    if existing and not args.force:
        raise ConfigurationError(
            f"{', '.join(map(str, existing))} exist: refusing to overwrite a vault or a ring; "
            "stop every worker that uses them and pass --force to replace them"
        )
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    ring = _open_ring(settings, backup_ring)
    # The backup is checked whole before anything is written, on a copy: opening a database
    # may bring its schema up to date, and the backup itself stays as its manifest says.
    with tempfile.TemporaryDirectory(prefix=".zandd-restore-", dir=target.parent) as work:
        checked = Path(work) / VAULT_FILE
        copy_database(directory / VAULT_FILE, checked, immutable=True)
        versions, head = await _check(checked, ring)
        if (versions, head.seq, head.entry_hash) != (
            manifest.key_versions,
            manifest.audit_head_seq,
            manifest.audit_head_link,
        ):
            raise IntegrityError(
                f"{directory}: the vault's key versions or audit head are not those its "
                "manifest names"
            )
        if manifest.ring_sha256 is not None:
            data = read_private(backup_ring, "KEK file")
            if not target_ring.exists() or read_private(target_ring, "KEK file") != data:
                write_private(target_ring, data, replace=args.force)
        copy_database(checked, target, replace=args.force)
    restored, restored_head = await _check(target, _open_ring(settings, target_ring))
    await _audit(settings.resolved_vault_url, ring, "vault.restore")
    print(f"restored {restored} key versions to {redact_url(settings.resolved_vault_url)}")
    print(
        f"from the backup of {manifest.created_at}; verified: record MACs, audit chain #1 to "
        f"#{restored_head.seq} (+1 entry: this restore)"
    )
    if manifest.ring_sha256 is not None:
        print(f"KEK ring {target_ring} restored from the backup")
    return 0


def _open_ring(settings: Settings, path: Path) -> KekRing:
    from vault.kek import KekRing
    from workers.service.ringsetup import file_sealer

    return KekRing.load(path, sealer=file_sealer(settings, path))


async def _check(database: Path, ring: KekRing) -> tuple[int, ChainHead]:
    """Check a vault file as a restore needs it: SQLite's integrity check, then every key
    version's record MAC and sealing KEK against ``ring``, and the audit chain. Its number of
    key versions and its audit head."""
    check_database(database)
    store = await open_store(f"sqlite:///{database}")
    try:
        records = await store.list_versions()
        for record in records:
            verify_record(record, ring)
            if record.kek_id is not None:
                ring.get(record.kek_id)
        report = await check_log(store, ChainKeys(ring))
    finally:
        await store.close()
    return len(records), report.head


async def _audit(vault_url: str, ring: KekRing, operation: str) -> None:
    store = await open_store(vault_url)
    try:
        audit = AuditLog(KeyedAppender(store, ChainKeys(ring)))
        await audit.record(_vault_event(operation, key_id=ring.active.kek_id))
    finally:
        await store.close()


def _wal(database: Path) -> Path:
    return database.with_name(database.name + "-wal")


def register(tree: CommandTree) -> None:
    """Add ``vault backup`` and ``vault restore``."""
    backup = tree.add(
        "vault backup",
        _cmd_vault_backup,
        "copy the SQLite vault (online) and the KEK ring file to a new directory, verified",
    )
    backup.add_argument("directory", type=Path, help="the backup directory (must not exist)")
    backup.add_argument(
        "--without-ring",
        action="store_true",
        help="leave the KEK ring file out (back it up apart; the backup is checked with the "
        "live ring)",
    )
    restore = tree.add(
        "vault restore",
        _cmd_vault_restore,
        "check a backup, then restore the vault (and its ring) to ZANDD_DATA_DIR/VAULT_URL",
    )
    restore.add_argument("directory", type=Path, help="a directory written by `vault backup`")
    restore.add_argument(
        "--force",
        action="store_true",
        help="replace an existing vault and ring (stop every worker that uses them first)",
    )
