"""The embedded SQLite vault backend, for one machine.

All database work runs on one dedicated thread that owns the connection, so the event loop
never blocks on disk. WAL plus a busy timeout lets several processes on the machine (a keygen
worker and several signers) share the file; ``synchronous=FULL`` makes a created key survive
power loss.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from contracts.errors import (
    ConfigurationError,
    IntegrityError,
    KeyNotFound,
    VaultUnavailable,
    ZanddError,
)
from vault.records import KeyRecord, KeyState
from vault.sealing import SealedKey

_T = TypeVar("_T")

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 10.0
_THREAD_NAME = "zandd-sqlite"
_MEMORY = ":memory:"
_DIR_MODE = 0o700
_FILE_MODE = 0o600

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS keys (
        key_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        algorithm TEXT NOT NULL,
        public_key_der BLOB NOT NULL,
        kek_id TEXT,
        nonce BLOB,
        ciphertext BLOB,
        state TEXT NOT NULL,
        label TEXT,
        allowed_signers TEXT NOT NULL,
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL,
        request_id TEXT,
        PRIMARY KEY (key_id, version)
    )
    """,
    "CREATE UNIQUE INDEX IF NOT EXISTS keys_request_id ON keys (request_id)"
    " WHERE request_id IS NOT NULL",
    f"PRAGMA user_version = {SCHEMA_VERSION}",  # PRAGMA takes no bound parameters
)

_COLUMNS = (
    "key_id, version, algorithm, public_key_der, kek_id, nonce, ciphertext, state, label,"
    " allowed_signers, created_at, created_by, request_id"
)
# The f-strings below join module constants only; every value is a bound parameter.
_INSERT = f"INSERT INTO keys ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"  # noqa: S608
_SELECT = f"SELECT {_COLUMNS} FROM keys"  # noqa: S608
_BY_REQUEST_ID = f"{_SELECT} WHERE request_id = ?"
_LATEST = f"{_SELECT} WHERE key_id = ? ORDER BY version DESC LIMIT 1"
_BY_VERSION = f"{_SELECT} WHERE key_id = ? AND version = ?"
_LIST_LATEST = (
    f"{_SELECT} AS k WHERE version = (SELECT MAX(version) FROM keys WHERE key_id = k.key_id)"  # noqa: S608
    " ORDER BY created_at, key_id"
)


class SqliteStore:
    """A VaultStore on one SQLite file; open it with ``await SqliteStore.open(path)``."""

    def __init__(self, executor: ThreadPoolExecutor, conn: sqlite3.Connection, path: str) -> None:
        self._executor = executor
        self._conn = conn
        self._path = path
        self._closed = False

    @classmethod
    async def open(cls, path: str) -> SqliteStore:
        """Open (creating if needed, dir 0700 and file 0600) the database at ``path``."""
        executor = ThreadPoolExecutor(max_workers=1, initializer=_name_thread)
        try:
            conn = await _on_thread(executor, path, _connect, path)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(executor, conn, path)

    async def create_key(self, record: KeyRecord) -> KeyRecord:
        """Insert ``record``; on a known request id return the record that request created."""
        existing = await self._run(_insert, _to_row(record))
        return record if existing is None else existing

    async def get_key(self, key_id: str, version: int | None = None) -> KeyRecord:
        """The given version of a key, or its latest; KeyNotFound if there is none."""
        if version is not None:
            found = await self._run(_fetch_one, _BY_VERSION, (key_id, version))
            if found is not None:
                return found
        latest = await self._run(_fetch_one, _LATEST, (key_id,))
        if latest is None:
            raise KeyNotFound(f"key {key_id} not found")
        if version is not None:
            raise KeyNotFound(f"key {key_id} has no version {version}")
        return latest

    async def find_by_request_id(self, request_id: str) -> KeyRecord | None:
        """The record created by request ``request_id``, if any."""
        return await self._run(_fetch_one, _BY_REQUEST_ID, (request_id,))

    async def list_keys(self) -> list[KeyRecord]:
        """The latest version of every key, ordered by ``created_at``."""
        return await self._run(_fetch_all, _LIST_LATEST)

    async def close(self) -> None:
        """Close the connection and stop the database thread; closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        try:
            await _on_thread(self._executor, self._path, _close, self._conn)
        finally:
            self._executor.shutdown(wait=False)

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._closed:
            raise VaultUnavailable(f"SQLite vault {self._path} is closed")
        return await _on_thread(self._executor, self._path, fn, self._conn, *args)

    def __repr__(self) -> str:
        return f"SqliteStore(path={self._path!r})"


async def _on_thread(
    executor: ThreadPoolExecutor, path: str, fn: Callable[..., _T], *args: Any
) -> _T:
    try:
        return await asyncio.wrap_future(executor.submit(fn, *args))
    except sqlite3.Error as exc:
        raise _translate(exc, path) from exc


def _translate(exc: sqlite3.Error, path: str) -> ZanddError:
    # sqlite3 messages name the failure ("database is locked"), never row data.
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    if isinstance(exc, sqlite3.IntegrityError):
        return IntegrityError(f"SQLite vault {path} refused a write: {name}: {exc}")
    return VaultUnavailable(f"SQLite vault {path} failed: {name}: {exc}")


def _name_thread() -> None:
    threading.current_thread().name = _THREAD_NAME


# Everything below runs on the database thread.


def _connect(path: str) -> sqlite3.Connection:
    if path != _MEMORY:
        _create_private_file(path)
    # timeout= is SQLite's busy_timeout: wait for another process's lock instead of failing.
    # isolation_level=None: autocommit; the module must not open transactions behind our back.
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        _configure(conn, path)
        _ensure_schema(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _create_private_file(path: str) -> None:
    # SQLite would create the file 0644; create it 0600 first (its -wal/-shm files copy the mode).
    db = Path(path)
    try:
        if not db.parent.exists():
            db.parent.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        os.close(os.open(db, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE))
    except OSError as exc:
        raise ConfigurationError(
            f"cannot create or open the SQLite vault {path}: {exc.strerror}"
        ) from exc


def _configure(conn: sqlite3.Connection, path: str) -> None:
    (journal_mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
    if path != _MEMORY and journal_mode != "wal":
        raise VaultUnavailable(f"SQLite vault {path} cannot use WAL (journal mode {journal_mode})")
    conn.execute("PRAGMA synchronous = FULL")


def _ensure_schema(conn: sqlite3.Connection, path: str) -> None:
    if _schema_version(conn, path) == SCHEMA_VERSION:
        return
    # IMMEDIATE takes the write lock first, so concurrent openers create the schema once.
    conn.execute("BEGIN IMMEDIATE")
    try:
        if _schema_version(conn, path) != SCHEMA_VERSION:
            for statement in _SCHEMA:
                conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _schema_version(conn: sqlite3.Connection, path: str) -> int:
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise ConfigurationError(
            f"SQLite vault {path} has schema version {version}; this software knows only "
            f"up to {SCHEMA_VERSION}: upgrade zandd"
        )
    return int(version)


def _close(conn: sqlite3.Connection) -> None:
    conn.close()


def _insert(conn: sqlite3.Connection, row: tuple[Any, ...]) -> KeyRecord | None:
    key_id, version, request_id = row[0], row[1], row[-1]
    try:
        conn.execute(_INSERT, row)
    except sqlite3.IntegrityError as exc:
        # The unique index on request_id arbitrates between concurrent creators, in any
        # process: the loser reads back the winner's record.
        existing = None if request_id is None else _fetch_one(conn, _BY_REQUEST_ID, (request_id,))
        if existing is None:
            raise IntegrityError(f"key {key_id} version {version} already exists") from exc
        return existing
    return None


def _fetch_one(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> KeyRecord | None:
    row = conn.execute(sql, params).fetchone()
    return None if row is None else _to_record(row)


def _fetch_all(conn: sqlite3.Connection, sql: str) -> list[KeyRecord]:
    return [_to_record(row) for row in conn.execute(sql).fetchall()]


def _to_row(record: KeyRecord) -> tuple[Any, ...]:
    sealed = record.sealed
    return (
        record.key_id,
        record.version,
        record.algorithm,
        record.public_key_der,
        None if sealed is None else sealed.kek_id,
        None if sealed is None else sealed.nonce,
        None if sealed is None else sealed.ciphertext,
        record.state.value,
        record.label,
        json.dumps(list(record.allowed_signers)),
        # Fixed-width UTC text, so ORDER BY created_at is chronological.
        record.created_at.astimezone(UTC).isoformat(timespec="microseconds"),
        record.created_by,
        record.request_id,
    )


def _to_record(row: tuple[Any, ...]) -> KeyRecord:
    (key_id, version, algorithm, public_key_der, kek_id, nonce, ciphertext) = row[:7]
    (state, label, allowed_signers, created_at, created_by, request_id) = row[7:]
    try:
        sealed = None if kek_id is None else SealedKey(kek_id, bytes(nonce), bytes(ciphertext))
        return KeyRecord(
            key_id=key_id,
            version=version,
            algorithm=algorithm,
            public_key_der=bytes(public_key_der),
            sealed=sealed,
            state=KeyState(state),
            label=label,
            allowed_signers=tuple(json.loads(allowed_signers)),
            created_at=datetime.fromisoformat(created_at),
            created_by=created_by,
            request_id=request_id,
        )
    except (TypeError, ValueError) as exc:
        raise IntegrityError(f"stored record for key {key_id} v{version} is malformed") from exc
