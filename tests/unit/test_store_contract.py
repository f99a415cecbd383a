"""The VaultStore contract, run against every backend through the ``store`` fixture.

Add a backend by adding its name to BACKENDS and a URL for it in ``store_url``; the contract
tests then run against it unchanged. Backend-specific checks sit at the end of the file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sqlite3
import stat
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from contracts.errors import ConfigurationError, IntegrityError, KeyNotFound, VaultUnavailable
from vault import KeyRecord, KeyState, SealedKey, SqliteStore, VaultStore, open_store

BACKENDS = ["sqlite"]
T0 = datetime(2026, 11, 28, 10, 0, 0, 123456, tzinfo=UTC)


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'vault' / 'vault.db'}"
    raise AssertionError(f"no URL for backend {request.param}")


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[VaultStore]:
    opened = await open_store(store_url)
    yield opened
    await opened.close()


def make_record(
    key_id: str | None = None,
    *,
    version: int = 1,
    request_id: str | None = None,
    created_at: datetime = T0,
    destroyed: bool = False,
) -> KeyRecord:
    sealed = SealedKey("kek-20261128-0a0b0c0d", os.urandom(12), os.urandom(48))
    return KeyRecord(
        key_id=key_id or f"key-{uuid.uuid4().hex}",
        version=version,
        algorithm="ecdsa-p256-sha256",
        public_key_der=os.urandom(91),
        sealed=None if destroyed else sealed,
        state=KeyState.DESTROYED if destroyed else KeyState.ENABLED,
        label="payments signing key ✓",
        allowed_signers=("svc-a", "svc-b"),
        created_at=created_at,
        created_by="keygen-user",
        request_id=request_id,
    )


# --- the contract --------------------------------------------------------------------------


@pytest.mark.parametrize("destroyed", [False, True], ids=["sealed", "destroyed"])
async def test_create_get_round_trip_keeps_every_field(store: VaultStore, destroyed: bool) -> None:
    record = make_record(request_id=f"req-{uuid.uuid4()}", destroyed=destroyed)
    assert await store.create_key(record) == record
    fetched = await store.get_key(record.key_id, 1)
    for field in dataclasses.fields(KeyRecord):
        assert getattr(fetched, field.name) == getattr(record, field.name), field.name
    assert fetched.created_at.utcoffset() == timedelta(0)
    assert isinstance(fetched.state, KeyState)
    assert isinstance(fetched.allowed_signers, tuple)


async def test_round_trip_of_empty_optional_fields(store: VaultStore) -> None:
    record = dataclasses.replace(make_record(), label=None, allowed_signers=())
    await store.create_key(record)
    assert await store.get_key(record.key_id) == record


async def test_created_at_in_another_zone_comes_back_as_the_same_instant(
    store: VaultStore,
) -> None:
    paris = datetime(2026, 11, 28, 11, 0, tzinfo=UTC).astimezone(timezone(timedelta(hours=1)))
    record = make_record(created_at=paris)
    await store.create_key(record)
    fetched = await store.get_key(record.key_id)
    assert fetched.created_at == paris
    assert fetched.created_at.utcoffset() == timedelta(0)


async def test_get_without_version_returns_the_latest(store: VaultStore) -> None:
    key_id = "key-versions"
    for version in (2, 1, 3):
        await store.create_key(make_record(key_id, version=version))
    assert (await store.get_key(key_id)).version == 3
    assert (await store.get_key(key_id, None)).version == 3
    assert (await store.get_key(key_id, 1)).version == 1


async def test_missing_key_or_version_is_key_not_found(store: VaultStore) -> None:
    with pytest.raises(KeyNotFound, match="key key-nope not found"):
        await store.get_key("key-nope")
    with pytest.raises(KeyNotFound, match="key key-nope not found"):
        await store.get_key("key-nope", 1)
    await store.create_key(make_record("key-one"))
    with pytest.raises(KeyNotFound, match="key key-one has no version 2"):
        await store.get_key("key-one", 2)


async def test_create_is_idempotent_on_request_id(store: VaultStore) -> None:
    first = make_record(request_id="req-1")
    retry = make_record(request_id="req-1")  # a redelivery that generated another key
    assert await store.create_key(first) == first
    assert await store.create_key(retry) == first
    assert await store.find_by_request_id("req-1") == first
    with pytest.raises(KeyNotFound):
        await store.get_key(retry.key_id)
    assert await store.list_keys() == [first]


async def test_records_without_request_id_do_not_collide(store: VaultStore) -> None:
    records = [make_record() for _ in range(3)]
    for record in records:
        assert await store.create_key(record) == record
    assert len(await store.list_keys()) == 3


async def test_concurrent_creates_with_one_request_id_give_one_record(store: VaultStore) -> None:
    candidates = [make_record(request_id="req-race") for _ in range(20)]
    results = await asyncio.gather(*(store.create_key(c) for c in candidates))
    winner = results[0]
    assert winner in candidates
    assert all(result == winner for result in results)
    assert await store.list_keys() == [winner]


async def test_duplicate_key_id_and_version_is_an_integrity_error(store: VaultStore) -> None:
    await store.create_key(make_record("key-dup", request_id="req-a"))
    with pytest.raises(IntegrityError, match="key key-dup version 1 already exists"):
        await store.create_key(make_record("key-dup", request_id="req-b"))
    with pytest.raises(IntegrityError, match="key key-dup version 1 already exists"):
        await store.create_key(make_record("key-dup"))
    assert await store.find_by_request_id("req-b") is None


async def test_find_by_unknown_request_id_is_none(store: VaultStore) -> None:
    assert await store.find_by_request_id("req-unknown") is None


async def test_list_keys_gives_latest_versions_by_created_at(store: VaultStore) -> None:
    assert await store.list_keys() == []
    a1 = make_record("key-a", created_at=T0)
    b1 = make_record("key-b", created_at=T0 + timedelta(seconds=1))
    a2 = make_record("key-a", version=2, created_at=T0 + timedelta(seconds=2))
    c1 = make_record("key-c", created_at=T0 + timedelta(microseconds=1))
    for record in (a2, b1, a1, c1):
        await store.create_key(record)
    assert await store.list_keys() == [c1, b1, a2]


async def test_two_instances_see_each_others_writes(store: VaultStore, store_url: str) -> None:
    other = await open_store(store_url)
    try:
        mine, theirs = make_record(), make_record()
        await store.create_key(mine)
        await other.create_key(theirs)
        assert await other.get_key(mine.key_id) == mine
        assert await store.get_key(theirs.key_id) == theirs
        candidates = [make_record(request_id="req-shared") for _ in range(20)]
        stores = [store, other] * 10
        results = await asyncio.gather(
            *(s.create_key(c) for s, c in zip(stores, candidates, strict=True))
        )
        assert len(set(results)) == 1
        assert await store.find_by_request_id("req-shared") == results[0]
    finally:
        await other.close()


async def test_closed_store_is_unavailable(store_url: str) -> None:
    store = await open_store(store_url)
    await store.close()
    await store.close()  # closing twice is harmless
    with pytest.raises(VaultUnavailable, match="closed"):
        await store.get_key("key-any")


_WRITER = """
import asyncio, sys, time
from datetime import UTC, datetime
from vault import KeyRecord, KeyState, SealedKey, open_store

async def main(url, prefix, start_at):
    await asyncio.sleep(max(0.0, start_at - time.time()))
    store = await open_store(url)
    try:
        for i in range(-1, 20):
            await asyncio.sleep(0.005)  # spread the writes so the two processes interleave
            request_id = "req-shared" if i < 0 else f"req-{prefix}-{i}"
            await store.create_key(KeyRecord(
                key_id=f"{prefix}-{i}", version=1, algorithm="ecdsa-p256-sha256",
                public_key_der=b"der", sealed=SealedKey("kek-x", bytes(12), bytes(48)),
                state=KeyState.ENABLED, label=None, allowed_signers=(),
                created_at=datetime.now(UTC), created_by=prefix, request_id=request_id,
            ))
    finally:
        await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
"""


async def test_two_processes_write_concurrently(store: VaultStore, store_url: str) -> None:
    start_at = str(time.time() + 1.0)  # both start writing together, after their imports
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _WRITER,
            store_url,
            prefix,
            start_at,
            stderr=asyncio.subprocess.PIPE,
        )
        for prefix in ("proc-a", "proc-b")
    ]
    for proc in procs:
        _, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
    keys = {record.key_id for record in await store.list_keys()}
    expected = {f"{prefix}-{i}" for prefix in ("proc-a", "proc-b") for i in range(20)}
    assert expected <= keys
    assert len(keys - expected) == 1  # the one winner of "req-shared"
    shared = await store.find_by_request_id("req-shared")
    assert shared is not None
    assert shared.key_id in {"proc-a--1", "proc-b--1"}


# --- URLs -------------------------------------------------------------------------------------


async def test_memory_url_opens_a_working_store() -> None:
    store = await open_store("sqlite:///:memory:")
    try:
        record = make_record()
        await store.create_key(record)
        assert await store.get_key(record.key_id) == record
    finally:
        await store.close()


async def test_four_slash_sqlite_url_names_the_same_file(tmp_path: Path) -> None:
    db = tmp_path / "vault.db"
    first = await open_store(f"sqlite://{db}")
    second = await open_store(f"sqlite:///{db}")
    try:
        record = make_record()
        await first.create_key(record)
        assert await second.get_key(record.key_id) == record
    finally:
        await first.close()
        await second.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mongodb://user:hunter2@db/zandd", "MongoDB vault backend is not available yet"),
        ("mongodb+srv://user:hunter2@db/zandd", "MongoDB vault backend is not available yet"),
        ("postgres://user:hunter2@db/zandd", "sqlite:///abs/path.db, mongodb://"),
        ("sqlite://relative/vault.db", "absolute path"),
    ],
)
async def test_bad_urls_are_configuration_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as info:
        await open_store(url)
    assert "hunter2" not in str(info.value)


# --- SQLite specifics --------------------------------------------------------------------------


async def test_sqlite_files_are_private(tmp_path: Path) -> None:
    db = tmp_path / "new" / "vault.db"
    store = await SqliteStore.open(str(db))
    try:
        await store.create_key(make_record())
        for path in (db, Path(f"{db}-wal")):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    finally:
        await store.close()


async def test_sqlite_settings_and_thread(tmp_path: Path) -> None:
    store = await SqliteStore.open(str(tmp_path / "vault.db"))
    try:
        pragmas = await store._run(
            lambda conn: [
                conn.execute(f"PRAGMA {name}").fetchone()[0]
                for name in ("journal_mode", "synchronous", "busy_timeout", "user_version")
            ]
        )
        assert pragmas == ["wal", 2, 10_000, 1]  # synchronous 2 = FULL
        thread_name = await store._run(lambda conn: threading.current_thread().name)
        assert thread_name == "zandd-sqlite"
    finally:
        await store.close()


async def test_sqlite_on_an_unusable_path_fails_clearly(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    db = blocker / "vault.db"
    with pytest.raises((ConfigurationError, VaultUnavailable), match=str(db)) as info:
        await open_store(f"sqlite://{db}")
    assert "Not a directory" in str(info.value)


async def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    db = tmp_path / "vault.db"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(ConfigurationError, match="schema version 99"):
        await SqliteStore.open(str(db))


async def test_sqlite_garbage_file_is_unavailable(tmp_path: Path) -> None:
    db = tmp_path / "vault.db"
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(VaultUnavailable, match="SQLITE_NOTADB"):
        await SqliteStore.open(str(db))
