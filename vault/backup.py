"""Backups of a SQLite vault and its KEK ring file: what ``zandd vault backup|restore`` do on disk.

A backup is a directory (mode 0700) holding:

- ``vault.db``: a consistent copy of the vault made with SQLite's online backup API, safe while
  workers read and write it (a file copy of a WAL database can miss the WAL or tear a page);
- ``kek-ring.json``: the ring file byte for byte, in whatever form it has on disk (sealed to
  the TPM, or plaintext), unless the backup was made without it;
- ``manifest.json``: the format, when, the SHA-256 of each file, the key-version count and the
  audit head the backup reached.

Every file is created 0600 and never replaces an existing one. Nothing is decrypted: the key
versions in the vault are sealed under the KEKs, and the ring is copied as it is.

MongoDB vaults are backed up with ``mongodump``/``mongorestore`` (docs/operations.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.errors import ConfigurationError, IntegrityError

BACKUP_FORMAT = "zandd-vault-backup/1"
VAULT_FILE = "vault.db"
RING_FILE = "kek-ring.json"
MANIFEST_FILE = "manifest.json"
_SQLITE_PREFIX = "sqlite:///"
_DIR_MODE = 0o700
_FILE_MODE = 0o600
_BUSY_TIMEOUT_S = 10.0
#: Pages copied per backup step: small steps let writers in between (the WAL keeps them apart).
_PAGES_PER_STEP = 256


def sqlite_vault_path(url: str) -> Path:
    """The database file a ``sqlite:///`` vault URL names; ConfigurationError for any other."""
    if not url.startswith(_SQLITE_PREFIX) or url == _SQLITE_PREFIX + ":memory:":
        raise ConfigurationError(
            "zandd vault backup/restore handle a SQLite vault file; back a MongoDB vault up "
            "with mongodump and mongorestore (docs/operations.md, 'Backup and restore')"
        )
    path = url.removeprefix(_SQLITE_PREFIX)
    if not path.startswith("/"):
        raise ConfigurationError("a SQLite vault URL needs an absolute path: sqlite:///abs/path.db")
    return Path("/" + path.lstrip("/"))


def make_backup_dir(path: Path) -> None:
    """Create the backup directory 0700; refuses one that exists (a backup never overwrites)."""
    try:
        path.parent.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        path.mkdir(mode=_DIR_MODE)
    except FileExistsError:
        raise ConfigurationError(
            f"{path} exists already: a backup goes to a new directory"
        ) from None
    except OSError as exc:
        raise ConfigurationError(
            f"cannot create the backup directory {path}: {exc.strerror}"
        ) from exc
    path.chmod(_DIR_MODE)


def copy_database(
    source: Path, target: Path, *, replace: bool = False, immutable: bool = False
) -> None:
    """Copy the SQLite database ``source`` into ``target`` with SQLite's online backup API.

    Consistent while other processes write ``source`` (WAL readers are not blocked; the copy
    restarts when a writer changes a page already copied). ``target`` is created 0600 and must
    not exist, unless ``replace``: then its content is replaced under SQLite's locks, so a
    process that has it open sees the whole old or the whole new database. ``immutable``: the
    source is a backup nothing writes; it is read without locks or ``-shm``/``-wal`` files, so
    reading it leaves its directory as it was.
    """
    if not source.is_file():
        raise ConfigurationError(f"there is no SQLite vault at {source}")
    _create_private(target, exist_ok=replace)
    try:
        options = "mode=ro&immutable=1" if immutable else "mode=ro"
        src = sqlite3.connect(f"file:{source}?{options}", uri=True, timeout=_BUSY_TIMEOUT_S)
    except sqlite3.Error as exc:
        raise ConfigurationError(f"cannot open the SQLite vault {source}: {exc}") from exc
    try:
        dst = sqlite3.connect(target, timeout=_BUSY_TIMEOUT_S)
        try:
            src.backup(dst, pages=_PAGES_PER_STEP)
        finally:
            dst.close()
    except sqlite3.Error as exc:
        raise ConfigurationError(
            f"cannot copy the SQLite vault {source} to {target}: {exc}"
        ) from exc
    finally:
        src.close()
    _fsync(target)


def make_self_contained(path: Path) -> None:
    """Switch the database at ``path`` (a backup, no other user) to a rollback journal: one
    file, with no ``-wal`` to carry along, that opens read-only without a ``-shm``. Opening it
    as a vault switches it back to WAL."""
    try:
        conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S)
        try:
            (mode,) = conn.execute("PRAGMA journal_mode = DELETE").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise ConfigurationError(f"cannot finish the backup copy {path}: {exc}") from exc
    if mode != "delete":
        raise ConfigurationError(f"cannot finish the backup copy {path}: journal mode {mode}")
    _fsync(path)


def check_database(path: Path) -> None:
    """IntegrityError unless SQLite's ``integrity_check`` finds the database file sound."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=_BUSY_TIMEOUT_S)
        try:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise IntegrityError(f"{path} is not a readable SQLite database: {exc}") from exc
    if rows != [("ok",)]:
        raise IntegrityError(f"{path} fails SQLite's integrity check: {rows[0][0]}")


def read_private(path: Path, what: str) -> bytes:
    """The bytes of ``path``, refused when group/other may read it (as the ring file is)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigurationError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what} {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as file:
        mode = stat.S_IMODE(os.fstat(file.fileno()).st_mode)
        if mode & 0o077:
            raise ConfigurationError(
                f"{what} {path} is accessible by group/other (mode {mode:04o}): "
                f"run `chmod 600 {path}`"
            )
        return file.read()


def write_private(path: Path, data: bytes, *, replace: bool = False) -> None:
    """Write ``data`` to ``path`` 0600 and fsync it; an existing file only when ``replace``
    (then atomically: a temp file renamed over it)."""
    target = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp") if replace else path
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
    except FileExistsError:
        raise ConfigurationError(f"{path} exists already: refusing to overwrite it") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if replace:
            os.replace(target, path)
    except OSError as exc:
        raise ConfigurationError(f"cannot write {path}: {exc.strerror}") from exc
    finally:
        if replace:
            target.unlink(missing_ok=True)
    _fsync(path.parent)


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Manifest:
    """What ``manifest.json`` says about a backup."""

    created_at: str
    vault_sha256: str
    ring_sha256: str | None
    key_versions: int
    audit_head_seq: int
    audit_head_link: str

    def to_json(self) -> bytes:
        """The manifest file's content."""
        document: dict[str, Any] = {
            "format": BACKUP_FORMAT,
            "created_at": self.created_at,
            "files": {VAULT_FILE: self.vault_sha256}
            | ({RING_FILE: self.ring_sha256} if self.ring_sha256 else {}),
            "key_versions": self.key_versions,
            "audit_head": {"seq": self.audit_head_seq, "link": self.audit_head_link},
        }
        return json.dumps(document, indent=2).encode() + b"\n"

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        """The manifest of the backup in ``directory``, its files' SHA-256 checked.

        Raises:
            ConfigurationError: no backup there, or not one this version reads.
            IntegrityError: a file is missing or changed since the backup was made.
        """
        path = directory / MANIFEST_FILE
        try:
            document = json.loads(read_private(path, "backup manifest"))
            if document.get("format") != BACKUP_FORMAT:
                raise ValueError(f"format {str(document.get('format'))[:40]!r}")
            files = document["files"]
            head = document["audit_head"]
            manifest = cls(
                created_at=str(document["created_at"]),
                vault_sha256=str(files[VAULT_FILE]),
                ring_sha256=str(files[RING_FILE]) if RING_FILE in files else None,
                key_versions=int(document["key_versions"]),
                audit_head_seq=int(head["seq"]),
                audit_head_link=str(head["link"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigurationError(
                f"{path} is not a zandd vault backup manifest ({exc})"
            ) from None
        manifest._check_file(directory / VAULT_FILE, manifest.vault_sha256)
        if manifest.ring_sha256 is not None:
            manifest._check_file(directory / RING_FILE, manifest.ring_sha256)
        return manifest

    @staticmethod
    def _check_file(path: Path, expected: str) -> None:
        if not path.is_file():
            raise IntegrityError(f"the backup lacks {path}")
        if sha256_of(path) != expected:
            raise IntegrityError(f"{path} changed since the backup was made (SHA-256 differs)")


def _create_private(path: Path, *, exist_ok: bool) -> None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
    except FileExistsError:
        if exist_ok:
            return
        raise ConfigurationError(f"{path} exists already: refusing to overwrite it") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot create {path}: {exc.strerror}") from exc
    os.close(fd)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
