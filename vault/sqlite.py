"""The embedded SQLite vault backend, for one machine.

All database work runs on one dedicated thread that owns the connection, so the event loop
never blocks on disk. WAL plus a busy timeout lets several processes on the machine (a keygen
worker and several signers) share the file; ``synchronous=FULL`` makes a created key and an
audit entry survive power loss.

Erasing: ``secure_delete`` zeroes freed space inside the database pages, and after a destroy
the WAL is checkpointed and truncated, so a destroyed key's ciphertext is in neither file.
What the file system or the disk keep of old blocks (copy-on-write, SSD wear levelling,
backups) is beyond SQLite's reach.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
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
from vault.aliases import AliasRecord, check_alias_replacement
from vault.audit import GENESIS, AuditEntry, AuditEvent, AuditQuery, ChainHead, link
from vault.audit_chain import ChainKey
from vault.audit_checkpoint import READ_PAGE_CHECKPOINTS, Checkpoint
from vault.listing import KeyListQuery, KeyPage
from vault.records import (
    KeyRecord,
    KeyStamp,
    KeyState,
    RecordMac,
    check_head,
    check_replacement,
)
from vault.sealing import SealedKey

_T = TypeVar("_T")

log = logging.getLogger("zandd.vault")

SCHEMA_VERSION = 11
BUSY_TIMEOUT_S = 10.0
_CHECKPOINT_ATTEMPTS = 3
_THREAD_NAME = "zandd-sqlite"
_MEMORY = ":memory:"
_DIR_MODE = 0o700
_FILE_MODE = 0o600

_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
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
    ),
    2: (
        "ALTER TABLE keys ADD COLUMN destroy_after TEXT",
        """
        CREATE TABLE audit (
            seq INTEGER PRIMARY KEY,
            at TEXT NOT NULL,
            principal TEXT,
            operation TEXT NOT NULL,
            outcome TEXT NOT NULL,
            key_id TEXT,
            version INTEGER,
            request_id TEXT,
            data_sha256 TEXT,
            prev_hash TEXT NOT NULL,
            entry_hash TEXT NOT NULL
        )
        """,
        "CREATE INDEX audit_key_id ON audit (key_id, seq)",
        "CREATE INDEX audit_principal ON audit (principal, seq)",
    ),
    # A request id is the idempotency key of its principal only: one principal reusing
    # another's id must not be answered with (or refused because of) the other's key.
    3: (
        "DROP INDEX IF EXISTS keys_request_id",
        "CREATE UNIQUE INDEX keys_owner_request_id ON keys (created_by, request_id)"
        " WHERE request_id IS NOT NULL",
    ),
    # Partial: only the versions waiting for destruction, which every lifecycle request asks
    # for (_DUE), are in it.
    4: (
        "CREATE INDEX keys_pending_destruction ON keys (destroy_after)"
        " WHERE state = 'pending_destruction'",
    ),
}

#: Authenticated records (vault.record_mac): each version's generation and MAC, and the
#: highest generation written of each version (key_heads), kept apart from the row so that
#: a row put back on its own from an older copy reads as what it is. Rows from before start
#: at generation 1 without a MAC, which readers refuse until `zandd vault mac-records`
#: vouches for them. A step of its own, so it can take whichever schema number is next.
RECORD_MAC_STEP: tuple[str, ...] = (
    "ALTER TABLE keys ADD COLUMN generation INTEGER NOT NULL DEFAULT 1",
    "ALTER TABLE keys ADD COLUMN mac_kek_id TEXT",
    "ALTER TABLE keys ADD COLUMN mac BLOB",
    """
    CREATE TABLE key_heads (
        key_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        generation INTEGER NOT NULL,
        PRIMARY KEY (key_id, version)
    )
    """,
)
_MIGRATIONS[5] = RECORD_MAC_STEP
#: TPM-signed audit checkpoints (vault/audit_checkpoint.py), one row per checkpointed entry.
CHECKPOINT_STEP: tuple[str, ...] = (
    """
    CREATE TABLE audit_checkpoints (
        seq INTEGER PRIMARY KEY,
        link TEXT NOT NULL,
        at TEXT NOT NULL,
        signature BLOB NOT NULL
    )
    """,
)
_MIGRATIONS[6] = CHECKPOINT_STEP

#: The TPM's attestation of each key version (contracts.attestation), NULL for versions made
#: before attestation, and the TPM-wrapped key of a version of protection "tpm" (NULL for
#: exportable ones), both covered by the MAC. A step of its own, to take the next number.
ATTESTATION_STEP: tuple[str, ...] = (
    "ALTER TABLE keys ADD COLUMN attestation BLOB",
    "ALTER TABLE keys ADD COLUMN tpm_blob BLOB",
)
_MIGRATIONS[7] = ATTESTATION_STEP
#: Whether an audit entry's request had been delivered before (``AuditEvent.redelivered``);
#: entries from before are not (0). A step of its own, to take the next number.
AUDIT_REDELIVERED_STEP: tuple[str, ...] = (
    "ALTER TABLE audit ADD COLUMN redelivered INTEGER NOT NULL DEFAULT 0",
)
_MIGRATIONS[8] = AUDIT_REDELIVERED_STEP
#: ``key.list`` (vault.listing): who may sign with which version, one row per name in a
#: version's ``allowed_signers``, kept by triggers whatever writes the row (so no writer can
#: forget it), and the owner's keys in key id order. A step of its own, to take the next
#: number; idempotent (IF NOT EXISTS), so it may run again under another number.
KEY_LISTING_STEP: tuple[str, ...] = (
    """
    CREATE TABLE IF NOT EXISTS key_signers (
        principal TEXT NOT NULL,
        key_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        PRIMARY KEY (principal, key_id, version)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX IF NOT EXISTS key_signers_version ON key_signers (key_id, version)",
    "INSERT OR IGNORE INTO key_signers (principal, key_id, version)"
    " SELECT j.value, k.key_id, k.version FROM keys AS k, json_each(k.allowed_signers) AS j",
    """
    CREATE TRIGGER IF NOT EXISTS key_signers_on_insert AFTER INSERT ON keys BEGIN
        INSERT OR IGNORE INTO key_signers (principal, key_id, version)
        SELECT value, NEW.key_id, NEW.version FROM json_each(NEW.allowed_signers);
    END
    """,
    """
    CREATE TRIGGER IF NOT EXISTS key_signers_on_update AFTER UPDATE OF key_id, version, allowed_signers
    ON keys BEGIN
        DELETE FROM key_signers WHERE key_id = OLD.key_id AND version = OLD.version;
        INSERT OR IGNORE INTO key_signers (principal, key_id, version)
        SELECT value, NEW.key_id, NEW.version FROM json_each(NEW.allowed_signers);
    END
    """,
    """
    CREATE TRIGGER IF NOT EXISTS key_signers_on_delete AFTER DELETE ON keys BEGIN
        DELETE FROM key_signers WHERE key_id = OLD.key_id AND version = OLD.version;
    END
    """,
    "CREATE INDEX IF NOT EXISTS keys_owner ON keys (created_by, key_id, version)",
)
_MIGRATIONS[9] = KEY_LISTING_STEP
#: issue 15, key writes: each version's rotation period (the key's, copied like the label)
#: and, on the primary version, when it is rotated next (both NULL before, both MACed when
#: set). Partial index: only keys with a rotation scheduled are in it, so the keygen worker's
#: due check (_ROTATION_DUE) costs what is due. A step of its own, to take the next number.
ROTATION_STEP: tuple[str, ...] = (
    "ALTER TABLE keys ADD COLUMN rotation_period_s INTEGER",
    "ALTER TABLE keys ADD COLUMN next_rotation_at TEXT",
    "CREATE INDEX keys_rotation_due ON keys (next_rotation_at) WHERE next_rotation_at IS NOT NULL",
)
_MIGRATIONS[10] = ROTATION_STEP
# ---- issue 15, aliases ----
#: One row per alias (vault.aliases): the key it points at, its owner, its generation and
#: MAC. The primary key makes an alias unique; the index serves "the aliases of a key".
ALIAS_STEP: tuple[str, ...] = (
    """
    CREATE TABLE IF NOT EXISTS aliases (
        alias TEXT NOT NULL PRIMARY KEY,
        key_id TEXT NOT NULL,
        owner TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        generation INTEGER NOT NULL,
        mac_kek_id TEXT,
        mac BLOB
    )
    """,
    "CREATE INDEX IF NOT EXISTS aliases_key ON aliases (key_id, alias)",
)
_MIGRATIONS[11] = ALIAS_STEP
_ALIAS_COLUMNS = "alias, key_id, owner, created_at, updated_at, generation, mac_kek_id, mac"
_ALIAS_SELECT = f"SELECT {_ALIAS_COLUMNS} FROM aliases"  # noqa: S608
_ALIAS_INSERT = (
    f"INSERT INTO aliases ({_ALIAS_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"  # noqa: S608
    " ON CONFLICT (alias) DO NOTHING"
)
_ALIAS_UPDATE = (
    "UPDATE aliases SET key_id = ?, owner = ?, created_at = ?, updated_at = ?, generation = ?,"
    " mac_kek_id = ?, mac = ? WHERE alias = ? AND generation = ? AND key_id = ?"
)
_ALIAS_DELETE = "DELETE FROM aliases WHERE alias = ? AND generation = ? AND key_id = ?"
# ---- end issue 15, aliases ----

_COLUMNS = (
    "key_id, version, algorithm, public_key_der, kek_id, nonce, ciphertext, state, label,"
    " allowed_signers, created_at, created_by, request_id, destroy_after, generation,"
    " mac_kek_id, mac, attestation, tpm_blob, rotation_period_s, next_rotation_at"
)
# The f-strings below join module constants only; every value is a bound parameter.
_INSERT = f"INSERT INTO keys ({_COLUMNS}) VALUES ({', '.join('?' * 21)})"  # noqa: S608
_HEAD = (
    "(SELECT h.generation FROM key_heads AS h WHERE h.key_id = k.key_id AND h.version = k.version)"
)
_SELECT = f"SELECT {_COLUMNS}, {_HEAD} FROM keys AS k"  # noqa: S608
_BY_REQUEST_ID = f"{_SELECT} WHERE created_by = ? AND request_id = ?"
_LATEST = f"{_SELECT} WHERE key_id = ? ORDER BY version DESC LIMIT 1"
_BY_VERSION = f"{_SELECT} WHERE key_id = ? AND version = ?"
_LIST_LATEST = (
    f"{_SELECT} WHERE version = (SELECT MAX(version) FROM keys WHERE key_id = k.key_id)"  # noqa: S608
    " ORDER BY created_at, key_id"
)
# key.list: the current version of each key, by key id (vault.listing).
_QUALIFIED = ", ".join(f"k.{column.strip()}" for column in _COLUMNS.split(","))
_CURRENT = "k.version = (SELECT MAX(m.version) FROM keys AS m WHERE m.key_id = k.key_id)"
# Driven by the signer's rows of key_signers (its primary key is in key id order).
_SIGNABLE = (
    f"SELECT {_QUALIFIED}, {_HEAD} FROM key_signers AS s CROSS JOIN keys AS k"  # noqa: S608
    " ON k.key_id = s.key_id AND k.version = s.version WHERE s.principal = ? AND s.key_id > ?"
)
# The state is a literal, not a parameter: SQLite uses a partial index only for a query
# whose WHERE names the index's own condition. INDEXED BY: without statistics the planner
# prefers walking the primary key in ORDER BY order, which reads every version.
_DUE = (
    f"SELECT {_COLUMNS}, {_HEAD} FROM keys AS k INDEXED BY keys_pending_destruction"  # noqa: S608
    " WHERE state = 'pending_destruction' AND destroy_after <= ? ORDER BY key_id, version"
)
# As _DUE: the index's own condition, and INDEXED BY.
_ROTATION_DUE = (
    f"SELECT {_COLUMNS}, {_HEAD} FROM keys AS k INDEXED BY keys_rotation_due"  # noqa: S608
    " WHERE next_rotation_at IS NOT NULL AND next_rotation_at <= ? ORDER BY key_id, version"
)
#: key_stamps: key ids per statement, far below SQLite's limit on bound variables (999
#: before 3.32).
STAMPS_CHUNK = 500
_STAMPS = "SELECT key_id, version, generation, mac FROM keys WHERE key_id IN "
_RAISE_HEAD = (
    "INSERT INTO key_heads (key_id, version, generation) VALUES (?, ?, ?)"
    " ON CONFLICT (key_id, version) DO UPDATE SET generation = MAX(generation, excluded.generation)"
)
# Every KEK a version needs: the one that sealed it and the one its MAC key comes from
# (counted once when they are the same; a destroyed version needs only its MAC's).
_KEK_USAGE = (
    "SELECT kek, COUNT(*) FROM ("
    " SELECT kek_id AS kek FROM keys WHERE kek_id IS NOT NULL"
    " UNION ALL SELECT mac_kek_id FROM keys"
    " WHERE mac_kek_id IS NOT NULL AND mac_kek_id IS NOT kek_id"
    ") GROUP BY kek"
)
_REPLACE = (
    "UPDATE keys SET state = ?, destroy_after = ?, kek_id = ?, nonce = ?, ciphertext = ?,"
    " tpm_blob = ?, generation = ?, mac_kek_id = ?, mac = ?, label = ?, allowed_signers = ?,"
    " rotation_period_s = ?, next_rotation_at = ?"
    " WHERE key_id = ? AND version = ? AND generation = ? AND state = ? AND kek_id IS ?"
    " AND nonce IS ?"
)
_AUDIT_COLUMNS = (
    "seq, at, principal, operation, outcome, key_id, version, request_id, data_sha256,"
    " prev_hash, entry_hash, redelivered"
)
_AUDIT_INSERT = f"INSERT INTO audit ({_AUDIT_COLUMNS}) VALUES ({', '.join('?' * 12)})"  # noqa: S608
_AUDIT_HEAD = "SELECT seq, entry_hash FROM audit ORDER BY seq DESC LIMIT 1"
_CHECKPOINT_INSERT = (
    "INSERT INTO audit_checkpoints (seq, link, at, signature) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (seq) DO NOTHING"
)
_CHECKPOINTS = "SELECT seq, link, at, signature FROM audit_checkpoints WHERE seq > ? ORDER BY seq"


@dataclass(frozen=True, slots=True)
class _Lane:
    """One connection and the one thread that uses it."""

    executor: ThreadPoolExecutor
    conn: sqlite3.Connection


class SqliteStore:
    """A VaultStore on one SQLite file; open it with ``await SqliteStore.open(path)``.

    Audit appends have a connection and thread of their own: their durable commit (an fsync)
    must not hold up the key reads every sign request makes meanwhile.
    """

    def __init__(self, main: _Lane, appends: _Lane, path: str) -> None:
        self._main = main
        self._appends = appends
        self._path = path
        self._closed = False
        # append_audit_now's connection: opened on the loop's thread at its first use.
        self._now: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: str) -> SqliteStore:
        """Open (creating if needed, dir 0700 and file 0600) the database at ``path``."""
        main = await _open_lane(path)
        if path == _MEMORY:  # a second connection would open a second, empty database
            return cls(main, main, path)
        try:
            appends = await _open_lane(path)
        except BaseException:
            await _close_lane(main, path)
            raise
        return cls(main, appends, path)

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

    async def find_by_request_id(self, request_id: str, *, owner: str) -> KeyRecord | None:
        """The record ``owner``'s request ``request_id`` created, if any."""
        return await self._run(_fetch_one, _BY_REQUEST_ID, (owner, request_id))

    async def key_stamps(self, key_ids: Collection[str]) -> dict[tuple[str, int], KeyStamp]:
        """The generation and MAC tag of every version of ``key_ids``: ``STAMPS_CHUNK`` ids
        per statement (the primary key's index), every statement in one trip to the thread."""
        wanted = list(dict.fromkeys(key_ids))
        if not wanted:
            return {}
        return await self._run(_fetch_stamps, wanted)

    async def list_keys(self) -> list[KeyRecord]:
        """The latest version of every key, ordered by ``created_at``."""
        return await self._run(_fetch_all, _LIST_LATEST, ())

    async def list_versions(
        self, key_id: str | None = None, *, state: KeyState | None = None
    ) -> list[KeyRecord]:
        """Every version of one key (or all keys), optionally in one state; by key id, version."""
        conditions, params = _where(key_id=key_id, state=None if state is None else state.value)
        sql = f"{_SELECT}{conditions} ORDER BY key_id, version"
        return await self._run(_fetch_all, sql, params)

    async def list_key_page(self, query: KeyListQuery) -> KeyPage:
        """One page of current versions by key id (``vault.listing``): the owner's through
        index ``keys_owner``, a signer's through ``key_signers`` (its name's rows and
        ``*``'s, merged), everyone's through the primary key."""
        # Column names are ours; every value is a bound parameter.
        equal = {
            "k.created_by": query.owner,
            "k.state": None if query.state is None else query.state.value,
            "k.label": query.label,
        }
        given = {column: value for column, value in equal.items() if value is not None}
        filters = "".join(f" AND {column} = ?" for column in given)
        after, fetch = query.after or "", query.limit + 1
        if query.signer is None:
            sql = (
                f"SELECT {_QUALIFIED}, {_HEAD} FROM keys AS k WHERE k.key_id > ?"  # noqa: S608
                f"{filters} AND {_CURRENT} ORDER BY k.key_id LIMIT ?"
            )
            found = await self._run(_fetch_all, sql, (after, *given.values(), fetch))
        else:
            sql = f"{_SIGNABLE}{filters} AND {_CURRENT} ORDER BY s.key_id LIMIT ?"
            by_id: dict[str, KeyRecord] = {}
            for name in dict.fromkeys((query.signer, "*")):
                rows = await self._run(_fetch_all, sql, (name, after, *given.values(), fetch))
                by_id.update((record.key_id, record) for record in rows)
            found = [by_id[key_id] for key_id in sorted(by_id)]
        if len(found) <= query.limit:
            return KeyPage(found, None)
        page = found[: query.limit]
        return KeyPage(page, page[-1].key_id)

    async def list_due(self, now: datetime) -> list[KeyRecord]:
        """Versions pending destruction due at ``now`` (index keys_pending_destruction)."""
        return await self._run(_fetch_all, _DUE, (_time_text(now),))

    async def list_rotation_due(self, now: datetime) -> list[KeyRecord]:
        """Versions whose ``next_rotation_at`` is at or before ``now`` (index
        keys_rotation_due)."""
        return await self._run(_fetch_all, _ROTATION_DUE, (_time_text(now),))

    async def kek_usage(self) -> dict[str, int]:
        """Key versions per KEK id they need: to open their sealed key or check their MAC."""
        return await self._run(_count_by_kek)

    async def replace_key(self, record: KeyRecord, expected: KeyRecord) -> bool:
        """Compare-and-set state, destroy_after, sealed material, generation, MAC, label,
        allowed signers, rotation period and next rotation.

        Erases on destroy.
        """
        check_replacement(record, expected)
        sealed, mac = record.sealed, record.mac
        params = (
            record.state.value,
            None if record.destroy_after is None else _time_text(record.destroy_after),
            None if sealed is None else sealed.kek_id,
            None if sealed is None else sealed.nonce,
            None if sealed is None else sealed.ciphertext,
            record.tpm_blob,
            record.generation,
            None if mac is None else mac.kek_id,
            None if mac is None else mac.tag,
            record.label,
            json.dumps(list(record.allowed_signers)),
            record.rotation_period_s,
            _optional_time_text(record.next_rotation_at),
            record.key_id,
            record.version,
            expected.generation,
            expected.state.value,
            expected.kek_id,
            None if expected.sealed is None else expected.sealed.nonce,
        )
        erase = record.state == KeyState.DESTROYED and expected.state != KeyState.DESTROYED
        return await self._run(_replace, params, erase)

    # ---- issue 15, aliases ----

    async def get_alias(self, alias: str) -> AliasRecord | None:
        """The alias row, or None."""
        rows = await self._run(_fetch_aliases, f"{_ALIAS_SELECT} WHERE alias = ?", (alias,))
        return rows[0] if rows else None

    async def list_aliases(
        self, *, key_id: str | None = None, owner: str | None = None
    ) -> list[AliasRecord]:
        """Every alias (of one key, of one owner), by alias."""
        conditions, params = _where(key_id=key_id, owner=owner)
        return await self._run(
            _fetch_aliases, f"{_ALIAS_SELECT}{conditions} ORDER BY alias", params
        )

    async def put_alias(self, record: AliasRecord, expected: AliasRecord | None) -> bool:
        """Insert (``expected`` None) or compare-and-set an alias; False if it changed first."""
        check_alias_replacement(record, expected)
        row = _alias_row(record)
        if expected is None:
            return await self._run(_write_one, _ALIAS_INSERT, row)
        where = (record.alias, expected.generation, expected.key_id)
        return await self._run(_write_one, _ALIAS_UPDATE, (*row[1:], *where))

    async def delete_alias(self, expected: AliasRecord) -> bool:
        """Delete the alias iff it is still ``expected``; False if it changed first."""
        params = (expected.alias, expected.generation, expected.key_id)
        return await self._run(_write_one, _ALIAS_DELETE, params)

    # ---- end issue 15, aliases ----

    async def append_audit(
        self, events: Sequence[AuditEvent], chain_key: ChainKey | None = None
    ) -> list[AuditEntry]:
        """Chain (keyed under ``chain_key`` when given) and insert ``events`` in one IMMEDIATE
        transaction, durable on return."""
        return await self._run(_append_audit, list(events), chain_key, lane=self._appends)

    def append_audit_now(
        self, events: Sequence[AuditEvent], chain_key: ChainKey | None = None
    ) -> list[AuditEntry] | None:
        """``append_audit`` on the calling thread (the event loop's, while it serves a lone
        request: ``vault.audit.serving_alone``), through a connection of its own that never
        waits: when another writer (this process's database thread, another worker) holds
        the write lock, nothing is written and it returns None.

        The same transaction as ``append_audit`` (head read, link, insert, durable COMMIT),
        without the two thread handoffs around it.
        """
        if self._closed or self._path == _MEMORY:
            return None
        try:
            if self._now is None:
                self._now = _connect_now(self._path)
            conn = self._now
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error:
            return None  # locked (or not openable now): the database thread will say why
        try:
            entries = _append_in_transaction(conn, list(events), chain_key)
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise _translate(exc, self._path) from exc
            raise
        return entries

    async def read_audit(self, query: AuditQuery) -> list[AuditEntry]:
        """Audit entries matching ``query``, oldest first."""
        conditions, params = _where(key_id=query.key_id, principal=query.principal)
        conditions += " AND seq > ?" if conditions else " WHERE seq > ?"
        order = "DESC" if query.latest else "ASC"
        sql = f"SELECT {_AUDIT_COLUMNS} FROM audit{conditions} ORDER BY seq {order} LIMIT ?"  # noqa: S608
        entries = await self._run(_fetch_audit, sql, (*params, query.after_seq, query.limit))
        return entries[::-1] if query.latest else entries

    async def add_checkpoint(self, checkpoint: Checkpoint) -> bool:
        """Store a TPM-signed checkpoint durably; False when its number already has one."""
        row = (checkpoint.seq, checkpoint.link, _time_text(checkpoint.at), checkpoint.signature)
        return await self._run(_add_checkpoint, row, lane=self._appends)

    async def read_checkpoints(
        self, after_seq: int = 0, limit: int = READ_PAGE_CHECKPOINTS, *, latest: bool = False
    ) -> list[Checkpoint]:
        """Checkpoints after ``after_seq`` (the newest ``limit`` with ``latest``), oldest first."""
        order = "DESC" if latest else "ASC"
        sql = f"{_CHECKPOINTS} {order} LIMIT ?"
        found = await self._run(_fetch_checkpoints, sql, (after_seq, limit))
        return found[::-1] if latest else found

    async def close(self) -> None:
        """Close the connections and stop the database threads; closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        if self._now is not None:
            self._now.close()
        try:
            await _close_lane(self._main, self._path)
        finally:
            if self._appends is not self._main:
                await _close_lane(self._appends, self._path)

    async def _run(self, fn: Callable[..., _T], *args: Any, lane: _Lane | None = None) -> _T:
        if self._closed:
            raise VaultUnavailable(f"SQLite vault {self._path} is closed")
        lane = lane or self._main
        return await _on_thread(lane.executor, self._path, fn, lane.conn, *args)

    def __repr__(self) -> str:
        return f"SqliteStore(path={self._path!r})"


async def _open_lane(path: str) -> _Lane:
    executor = ThreadPoolExecutor(max_workers=1, initializer=_name_thread)
    try:
        conn = await _on_thread(executor, path, _connect, path)
    except BaseException:
        executor.shutdown(wait=False)
        raise
    return _Lane(executor, conn)


async def _close_lane(lane: _Lane, path: str) -> None:
    try:
        await _on_thread(lane.executor, path, _close, lane.conn)
    finally:
        lane.executor.shutdown(wait=False)


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
    if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
        # Permanent: waiting does not mend a damaged file (a worker exits, zandd up stops).
        return IntegrityError(
            f"SQLite vault {path} is damaged ({name}: {exc}): restore it from a backup"
        )
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
    # An existing file is not touched: closing a descriptor of it here would release every
    # POSIX lock this process's SQLite connections hold on it, and a connection closing in
    # another process could then take the WAL away from under them.
    db = Path(path)
    try:
        if not db.parent.exists():
            db.parent.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        fd = os.open(db, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
    except FileExistsError:
        return
    except OSError as exc:
        raise ConfigurationError(
            f"cannot create or open the SQLite vault {path}: {exc.strerror}"
        ) from exc
    os.close(fd)


def _configure(conn: sqlite3.Connection, path: str) -> None:
    (journal_mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
    if path != _MEMORY and journal_mode != "wal":
        raise VaultUnavailable(f"SQLite vault {path} cannot use WAL (journal mode {journal_mode})")
    conn.execute("PRAGMA synchronous = FULL")
    # Freed space (an erased ciphertext, a re-wrapped one) is zeroed, not left in the page.
    conn.execute("PRAGMA secure_delete = ON")


def _ensure_schema(conn: sqlite3.Connection, path: str) -> None:
    if _schema_version(conn, path) == SCHEMA_VERSION:
        return
    # IMMEDIATE takes the write lock first, so concurrent openers migrate once.
    with _immediate(conn):
        current = _schema_version(conn, path)
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[version]:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")  # PRAGMA takes no parameters


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


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
    key_id, version, owner, request_id = row[0], row[1], row[11], row[12]
    generation = row[14]
    try:
        with _immediate(conn):
            conn.execute(_INSERT, row)
            conn.execute(_RAISE_HEAD, (key_id, version, generation))
    except sqlite3.IntegrityError as exc:
        # The unique index on (owner, request_id) arbitrates between concurrent creators, in
        # any process: the loser reads back the winner's record.
        existing = (
            None if request_id is None else _fetch_one(conn, _BY_REQUEST_ID, (owner, request_id))
        )
        if existing is None:
            raise IntegrityError(f"key {key_id} version {version} already exists") from exc
        return existing
    return None


def _fetch_one(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> KeyRecord | None:
    row = conn.execute(sql, params).fetchone()
    return None if row is None else _to_record(row)


def _fetch_all(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> list[KeyRecord]:
    return [_to_record(row) for row in conn.execute(sql, params).fetchall()]


def _fetch_stamps(conn: sqlite3.Connection, key_ids: list[str]) -> dict[tuple[str, int], KeyStamp]:
    # One statement per chunk, each its own snapshot: a key's versions are all in one of them.
    # A BLOB comes back as bytes (or None): kept as it is, no copy (~0.6 µs a row); a value
    # of another type stored there matches no cached tag.
    found: dict[tuple[str, int], KeyStamp] = {}
    for start in range(0, len(key_ids), STAMPS_CHUNK):
        chunk = key_ids[start : start + STAMPS_CHUNK]
        sql = f"{_STAMPS}({', '.join('?' * len(chunk))})"
        for key_id, version, generation, mac in conn.execute(sql, chunk):
            found[key_id, version] = KeyStamp(generation, mac)
    return found


def _count_by_kek(conn: sqlite3.Connection) -> dict[str, int]:
    return {str(kek_id): int(count) for kek_id, count in conn.execute(_KEK_USAGE).fetchall()}


def _where(**equal: str | None) -> tuple[str, tuple[str, ...]]:
    # Column names come from our keyword arguments, never from callers' data.
    given = {column: value for column, value in equal.items() if value is not None}
    if not given:
        return "", ()
    return " WHERE " + " AND ".join(f"{c} = ?" for c in given), tuple(given.values())


def _replace(conn: sqlite3.Connection, params: tuple[Any, ...], erase: bool) -> bool:
    key_id, version, generation = params[13], params[14], params[6]
    with _immediate(conn):
        replaced = conn.execute(_REPLACE, params).rowcount == 1
        if replaced:
            conn.execute(_RAISE_HEAD, (key_id, version, generation))
    if replaced and erase:
        _truncate_wal(conn)
    return replaced


def _truncate_wal(conn: sqlite3.Connection) -> None:
    # The WAL still holds the page images that carried the ciphertext; a TRUNCATE checkpoint
    # copies the current pages home and empties the WAL file. It waits (busy timeout) for
    # readers in other processes; if they keep it busy, the old frames stay in the WAL until
    # later writes overwrite them.
    for _ in range(_CHECKPOINT_ATTEMPTS):
        (busy, _log, _done) = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if not busy:
            return
    log.warning("the WAL could not be truncated after erasing a key: readers kept it busy")


def _append_audit(
    conn: sqlite3.Connection, events: list[AuditEvent], chain_key: ChainKey | None
) -> list[AuditEntry]:
    with _immediate(conn):
        return _append_in_transaction(conn, events, chain_key)


def _append_in_transaction(
    conn: sqlite3.Connection, events: list[AuditEvent], chain_key: ChainKey | None
) -> list[AuditEntry]:
    row = conn.execute(_AUDIT_HEAD).fetchone()
    head = GENESIS if row is None else ChainHead(seq=row[0], entry_hash=row[1])
    entries = link(head, events, chain_key)
    conn.executemany(_AUDIT_INSERT, [_audit_row(entry) for entry in entries])
    return entries


def _connect_now(path: str) -> sqlite3.Connection:
    """A connection for ``append_audit_now``: it never waits for another writer's lock."""
    conn = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        _configure(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _add_checkpoint(conn: sqlite3.Connection, row: tuple[Any, ...]) -> bool:
    with _immediate(conn):
        return conn.execute(_CHECKPOINT_INSERT, row).rowcount == 1


def _fetch_checkpoints(
    conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]
) -> list[Checkpoint]:
    found = []
    for seq, link_text, at, signature in conn.execute(sql, params).fetchall():
        try:
            found.append(Checkpoint(seq, link_text, datetime.fromisoformat(at), bytes(signature)))
        except (TypeError, ValueError) as exc:
            raise IntegrityError(f"audit checkpoint #{seq} is malformed") from exc
    return found


def _fetch_audit(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> list[AuditEntry]:
    return [_to_audit_entry(row) for row in conn.execute(sql, params).fetchall()]


def _audit_row(entry: AuditEntry) -> tuple[Any, ...]:
    event = entry.event
    return (
        entry.seq,
        _time_text(event.at),
        event.principal,
        event.operation,
        event.outcome,
        event.key_id,
        event.version,
        event.request_id,
        event.data_sha256,
        entry.prev_hash,
        entry.entry_hash,
        int(event.redelivered),
    )


def _to_audit_entry(row: tuple[Any, ...]) -> AuditEntry:
    (seq, at, principal, operation, outcome, key_id, version, request_id, data_sha256) = row[:9]
    try:
        if row[11] not in (0, 1):
            raise ValueError("redelivered is neither 0 nor 1")
        event = AuditEvent(
            at=datetime.fromisoformat(at),
            principal=principal,
            operation=operation,
            outcome=outcome,
            key_id=key_id,
            version=version,
            request_id=request_id,
            data_sha256=data_sha256,
            redelivered=row[11] == 1,
        )
    except (TypeError, ValueError) as exc:
        raise IntegrityError(f"audit entry #{seq} is malformed") from exc
    return AuditEntry(seq=seq, event=event, prev_hash=row[9], entry_hash=row[10])


def _time_text(moment: datetime) -> str:
    # Fixed-width UTC text, so ORDER BY on it is chronological.
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _optional_time_text(moment: datetime | None) -> str | None:
    return None if moment is None else _time_text(moment)


# ---- issue 15, aliases ----


def _alias_row(record: AliasRecord) -> tuple[Any, ...]:
    mac = record.mac
    return (
        record.alias,
        record.key_id,
        record.owner,
        _time_text(record.created_at),
        _time_text(record.updated_at),
        record.generation,
        None if mac is None else mac.kek_id,
        None if mac is None else mac.tag,
    )


def _fetch_aliases(
    conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]
) -> list[AliasRecord]:
    return [
        AliasRecord(
            alias=alias,
            key_id=key_id,
            owner=owner,
            created_at=datetime.fromisoformat(created_at),
            updated_at=datetime.fromisoformat(updated_at),
            generation=int(generation),
            mac=None if mac is None else RecordMac(mac_kek_id, bytes(mac)),
        )
        for alias, key_id, owner, created_at, updated_at, generation, mac_kek_id, mac in (
            conn.execute(sql, params).fetchall()
        )
    ]


def _write_one(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> bool:
    with _immediate(conn):
        return bool(conn.execute(sql, params).rowcount == 1)


# ---- end issue 15, aliases ----


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
        _time_text(record.created_at),
        record.created_by,
        record.request_id,
        None if record.destroy_after is None else _time_text(record.destroy_after),
        record.generation,
        None if record.mac is None else record.mac.kek_id,
        None if record.mac is None else record.mac.tag,
        record.attestation,
        record.tpm_blob,
        record.rotation_period_s,
        _optional_time_text(record.next_rotation_at),
    )


def _to_record(row: tuple[Any, ...]) -> KeyRecord:
    (key_id, version, algorithm, public_key_der, kek_id, nonce, ciphertext) = row[:7]
    (state, label, allowed_signers, created_at, created_by, request_id, destroy_after) = row[7:14]
    (generation, mac_kek_id, mac, attestation, tpm_blob) = row[14:19]
    (rotation_period_s, next_rotation_at, head) = row[19:]
    check_head(key_id, version, generation, head)
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
            destroy_after=None if destroy_after is None else datetime.fromisoformat(destroy_after),
            generation=generation,
            mac=None if mac_kek_id is None or mac is None else RecordMac(mac_kek_id, bytes(mac)),
            attestation=None if attestation is None else bytes(attestation),
            tpm_blob=None if tpm_blob is None else bytes(tpm_blob),
            rotation_period_s=rotation_period_s,
            next_rotation_at=None
            if next_rotation_at is None
            else datetime.fromisoformat(next_rotation_at),
        )
    except (TypeError, ValueError) as exc:
        raise IntegrityError(f"stored record for key {key_id} v{version} is malformed") from exc
