"""The VaultStore contract, run against every backend through the ``store`` fixture.

Add a backend by adding its name to BACKENDS and a URL for it in ``store_url``; the contract
tests then run against it unchanged. Backend-specific checks sit at the end of the file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from unittest import mock

import pytest

import vault.sqlite
from contracts.errors import ConfigurationError, IntegrityError, KeyNotFound, VaultUnavailable
from vault import KeyRecord, KeyState, SealedKey, SqliteStore, VaultStore, open_store
from vault.aliases import AliasRecord
from vault.audit import GENESIS_HASH, AuditBroken, AuditEvent, AuditQuery, ChainVerifier, verify_log
from vault.audit_chain import ChainKeys
from vault.audit_checkpoint import Checkpoint
from vault.kek import Kek, KekRing
from vault.listing import KeyListQuery
from vault.records import KeyStamp, RecordMac
from vault.sqlite import _DUE, _ROTATION_DUE
from vault.sqlite import SCHEMA_VERSION as SQLITE_SCHEMA_VERSION

BACKENDS = ["sqlite", pytest.param("mongodb", marks=pytest.mark.mongo)]
T0 = datetime(2026, 11, 28, 10, 0, 0, 123456, tzinfo=UTC)
OWNER = "keygen-user"


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'vault' / 'vault.db'}"
    if request.param == "mongodb":
        return str(request.getfixturevalue("mongo_vault_url"))
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
    created_by: str = "keygen-user",
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
        created_by=created_by,
        request_id=request_id,
        mac=RecordMac("kek-20261128-0a0b0c0d", os.urandom(32)),
    )


def new_mac() -> RecordMac:
    """Another tag, as a write with the ring makes one (the store does not check it)."""
    return RecordMac("kek-20261128-0a0b0c0d", os.urandom(32))


# --- the contract --------------------------------------------------------------------------


@pytest.mark.parametrize("destroyed", [False, True], ids=["sealed", "destroyed"])
async def test_create_get_round_trip_keeps_every_field(store: VaultStore, destroyed: bool) -> None:
    record = dataclasses.replace(
        make_record(request_id=f"req-{uuid.uuid4()}", destroyed=destroyed), generation=7
    )
    assert await store.create_key(record) == record
    fetched = await store.get_key(record.key_id, 1)
    for field in dataclasses.fields(KeyRecord):
        assert getattr(fetched, field.name) == getattr(record, field.name), field.name
    assert fetched.created_at.utcoffset() == timedelta(0)
    assert isinstance(fetched.state, KeyState)
    assert isinstance(fetched.allowed_signers, tuple)


async def test_round_trip_of_an_attested_tpm_bound_key(store: VaultStore) -> None:
    record = dataclasses.replace(
        make_record(), sealed=None, tpm_blob=os.urandom(300), attestation=os.urandom(400)
    )
    await store.create_key(record)
    assert await store.get_key(record.key_id) == record
    assert (await store.kek_usage()).get("kek-20261128-0a0b0c0d") == 1  # its MAC's KEK only


async def test_replace_key_erases_a_tpm_bound_key(store: VaultStore) -> None:
    pending = dataclasses.replace(
        make_record(),
        sealed=None,
        tpm_blob=os.urandom(300),
        attestation=os.urandom(40),
        state=KeyState.PENDING_DESTRUCTION,
        destroy_after=T0,
    )
    await store.create_key(pending)
    gone = dataclasses.replace(pending, state=KeyState.DESTROYED, tpm_blob=None, generation=2)
    assert await store.replace_key(gone, pending)
    fetched = await store.get_key(pending.key_id)
    assert fetched == gone
    assert fetched.tpm_blob is None
    assert fetched.attestation == pending.attestation


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
    assert await store.find_by_request_id("req-1", owner=OWNER) == first
    with pytest.raises(KeyNotFound):
        await store.get_key(retry.key_id)
    assert await store.list_keys() == [first]


async def test_request_ids_are_scoped_per_owner(store: VaultStore) -> None:
    # Another principal reusing (squatting) a request id neither blocks the owner's request
    # nor gets the owner's key: each owner's request id names its own request.
    squatter = make_record(request_id="req-guessable", created_by="mallory")
    assert await store.create_key(squatter) == squatter
    mine = make_record(request_id="req-guessable", created_by="alice")
    assert await store.create_key(mine) == mine
    retry = make_record(request_id="req-guessable", created_by="alice")
    assert await store.create_key(retry) == mine
    assert await store.find_by_request_id("req-guessable", owner="alice") == mine
    assert await store.find_by_request_id("req-guessable", owner="mallory") == squatter
    assert await store.find_by_request_id("req-guessable", owner="bob") is None
    assert {r.key_id for r in await store.list_keys()} == {squatter.key_id, mine.key_id}


async def test_concurrent_creates_of_two_owners_with_one_request_id(store: VaultStore) -> None:
    candidates = [
        make_record(request_id="req-both", created_by=owner)
        for owner in ("alice", "mallory")
        for _ in range(10)
    ]
    results = await asyncio.gather(*(store.create_key(c) for c in candidates))
    winners = {result.owner: result for result in results}
    assert set(winners) == {"alice", "mallory"}
    assert all(result == winners[result.owner] for result in results)
    assert sorted(r.key_id for r in await store.list_keys()) == sorted(
        w.key_id for w in winners.values()
    )


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
    assert await store.find_by_request_id("req-b", owner=OWNER) is None


async def test_find_by_unknown_request_id_is_none(store: VaultStore) -> None:
    assert await store.find_by_request_id("req-unknown", owner=OWNER) is None


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
        assert await store.find_by_request_id("req-shared", owner=OWNER) == results[0]
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
                created_at=datetime.now(UTC), created_by="writer", request_id=request_id,
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
    shared = await store.find_by_request_id("req-shared", owner="writer")
    assert shared is not None
    assert shared.key_id in {"proc-a--1", "proc-b--1"}


# --- versions, compare-and-set and erasure -------------------------------------------------


async def test_list_versions_by_key_and_state(store: VaultStore) -> None:
    assert await store.list_versions() == []
    b1 = make_record("key-b")
    a2 = make_record("key-a", version=2)
    a1 = dataclasses.replace(
        make_record("key-a"), state=KeyState.PENDING_DESTRUCTION, destroy_after=T0
    )
    for record in (b1, a2, a1):
        await store.create_key(record)
    assert await store.list_versions() == [a1, a2, b1]
    assert await store.list_versions("key-a") == [a1, a2]
    assert await store.list_versions("key-nope") == []
    assert await store.list_versions(state=KeyState.PENDING_DESTRUCTION) == [a1]
    assert await store.list_versions("key-b", state=KeyState.DISABLED) == []


async def test_list_due_gives_only_the_pending_versions_whose_time_has_come(
    store: VaultStore,
) -> None:
    def pending(key_id: str, version: int, after: timedelta) -> KeyRecord:
        record = make_record(key_id, version=version)
        return dataclasses.replace(
            record, state=KeyState.PENDING_DESTRUCTION, destroy_after=T0 + after
        )

    due_b = pending("key-b", 1, timedelta(days=-1))
    due_a = pending("key-a", 3, timedelta(0))
    later = pending("key-a", 4, timedelta(microseconds=1))
    disabled = dataclasses.replace(
        make_record("key-c"), state=KeyState.DISABLED, destroy_after=T0 - timedelta(days=9)
    )
    for record in (due_b, due_a, later, disabled, make_record("key-d")):
        await store.create_key(record)
    assert await store.list_due(T0) == [due_a, due_b]
    assert await store.list_due(T0 - timedelta(days=2)) == []
    assert await store.list_due(T0 + timedelta(days=1)) == [due_a, later, due_b]


# --- issue 15, key writes: rotation fields, rotation due, replace of the metadata ----------


async def test_round_trip_keeps_the_rotation_fields(store: VaultStore) -> None:
    record = dataclasses.replace(
        make_record(), rotation_period_s=86_400 * 30, next_rotation_at=T0 + timedelta(days=30)
    )
    await store.create_key(record)
    fetched = await store.get_key(record.key_id)
    assert fetched == record
    assert fetched.next_rotation_at is not None
    assert fetched.next_rotation_at.utcoffset() == timedelta(0)
    plain = await store.create_key(make_record())
    assert (await store.get_key(plain.key_id)).rotation_period_s is None


async def test_list_rotation_due_gives_only_the_versions_whose_rotation_has_come(
    store: VaultStore,
) -> None:
    def rotating(key_id: str, version: int, after: timedelta | None) -> KeyRecord:
        return dataclasses.replace(
            make_record(key_id, version=version),
            rotation_period_s=86_400,
            next_rotation_at=None if after is None else T0 + after,
        )

    due_b = rotating("key-b", 2, timedelta(days=-1))
    due_a = rotating("key-a", 1, timedelta(0))
    later = rotating("key-c", 1, timedelta(microseconds=1))
    old = rotating("key-b", 1, None)  # an older version: no next rotation of its own
    for record in (due_b, due_a, later, old, make_record("key-d")):
        await store.create_key(record)
    assert await store.list_rotation_due(T0) == [due_a, due_b]
    assert await store.list_rotation_due(T0 - timedelta(days=2)) == []
    assert await store.list_rotation_due(T0 + timedelta(days=1)) == [due_a, due_b, later]
    # Rescheduled (or cleared) by a replace, it leaves the answer.
    moved = dataclasses.replace(due_a, next_rotation_at=T0 + timedelta(days=1), generation=2)
    assert await store.replace_key(moved, due_a)
    cleared = dataclasses.replace(due_b, next_rotation_at=None, generation=2)
    assert await store.replace_key(cleared, due_b)
    assert await store.list_rotation_due(T0) == []
    assert await store.list_rotation_due(T0 + timedelta(days=1)) == [moved, later]


# --- issue 19, the signer cache's revalidation ----------------------------------------------


async def test_key_stamps_gives_every_version_of_the_keys_asked(store: VaultStore) -> None:
    first = await store.create_key(make_record())
    second = await store.create_key(make_record(first.key_id, version=2))
    other = await store.create_key(make_record())
    await store.create_key(make_record())  # not asked about
    changed = dataclasses.replace(first, state=KeyState.DISABLED, generation=2, mac=new_mac())
    assert await store.replace_key(changed, first)
    asked = [first.key_id, other.key_id, "key-unknown", first.key_id]
    stamps = await store.key_stamps(asked)
    assert stamps == {
        (first.key_id, 1): KeyStamp.of(changed),
        (first.key_id, 2): KeyStamp.of(second),
        (other.key_id, 1): KeyStamp.of(other),
    }
    assert changed.mac is not None
    assert stamps[first.key_id, 1] == (2, changed.mac.tag)
    assert all(type(stamp.mac_tag) is bytes for stamp in stamps.values())
    # Every change raises the generation and writes a new tag: a destroy (erasing) too.
    pending = dataclasses.replace(
        changed,
        state=KeyState.PENDING_DESTRUCTION,
        destroy_after=T0,
        generation=3,
        mac=new_mac(),
    )
    assert await store.replace_key(pending, changed)
    gone = dataclasses.replace(
        pending, state=KeyState.DESTROYED, sealed=None, generation=4, mac=new_mac()
    )
    assert await store.replace_key(gone, pending)
    assert (await store.key_stamps({first.key_id}))[first.key_id, 1] == KeyStamp.of(gone)
    assert await store.key_stamps([]) == {}
    assert await store.key_stamps(["key-unknown"]) == {}


async def test_key_stamps_of_a_row_without_a_mac(store: VaultStore) -> None:
    # From a vault not upgraded yet (``zandd vault mac-records``): no tag, which no cached
    # record has (a signer caches only records whose MAC holds).
    legacy = await store.create_key(dataclasses.replace(make_record(), mac=None))
    assert await store.key_stamps([legacy.key_id]) == {(legacy.key_id, 1): KeyStamp(1, None)}


async def test_key_stamps_of_more_ids_than_one_query_takes(store: VaultStore) -> None:
    # 1,201 ids: SQLite asks 500 per statement, MongoDB 1,000 per find; the keys that exist
    # sit on either side of each boundary.
    asked = [f"key-missing-{n:04d}" for n in range(1201)]
    made = {}
    for position in (0, 499, 500, 999, 1000, 1200):
        record = await store.create_key(make_record(f"key-{position:04d}-{uuid.uuid4().hex}"))
        asked[position] = record.key_id
        made[record.key_id, 1] = KeyStamp.of(record)
    second = await store.create_key(make_record(asked[500], version=2))
    made[second.key_id, 2] = KeyStamp.of(second)
    assert await store.key_stamps(asked) == made


# ---- issue 15, aliases ----


def make_alias(
    alias: str = "alias/invoices", key_id: str = "key-a", *, owner: str = OWNER, generation: int = 1
) -> AliasRecord:
    return AliasRecord(
        alias=alias,
        key_id=key_id,
        owner=owner,
        created_at=T0,
        updated_at=T0 + timedelta(seconds=generation),
        generation=generation,
        mac=RecordMac("kek-20261128-0a0b0c0d", os.urandom(32)),
    )


async def test_alias_round_trip_keeps_every_field(store: VaultStore) -> None:
    alias = make_alias()
    assert await store.get_alias(alias.alias) is None
    assert await store.put_alias(alias, None)
    assert await store.get_alias(alias.alias) == alias


async def test_an_alias_is_unique_first_writer_wins(store: VaultStore) -> None:
    mine, theirs = make_alias(key_id="key-a"), make_alias(key_id="key-b", owner="mallory")
    results = await asyncio.gather(store.put_alias(mine, None), store.put_alias(theirs, None))
    assert sorted(results) == [False, True]
    stored = await store.get_alias(mine.alias)
    assert stored in (mine, theirs)


async def test_alias_repoint_is_a_compare_and_set(store: VaultStore) -> None:
    first = make_alias(key_id="key-a")
    assert await store.put_alias(first, None)
    moved = dataclasses.replace(make_alias(key_id="key-b", generation=2), mac=first.mac)
    assert await store.put_alias(moved, first)
    assert await store.get_alias(first.alias) == moved
    # A writer that still holds generation 1 loses, whatever it wanted.
    stale = make_alias(key_id="key-c", generation=2)
    assert not await store.put_alias(stale, first)
    assert await store.get_alias(first.alias) == moved
    with pytest.raises(ValueError, match="generation"):
        await store.put_alias(make_alias(key_id="key-c", generation=5), moved)


async def test_alias_delete_is_a_compare_and_set(store: VaultStore) -> None:
    first = make_alias()
    assert await store.put_alias(first, None)
    moved = make_alias(key_id="key-b", generation=2)
    assert await store.put_alias(moved, first)
    assert not await store.delete_alias(first)  # stale: it was re-pointed meanwhile
    assert await store.delete_alias(moved)
    assert await store.get_alias(first.alias) is None
    assert not await store.delete_alias(moved)  # gone
    assert await store.put_alias(make_alias(key_id="key-c"), None)  # the name is free again


async def test_list_aliases_by_key_and_owner(store: VaultStore) -> None:
    b = make_alias("alias/b", "key-1")
    a = make_alias("alias/a", "key-1", owner="bob")
    c = make_alias("alias/c", "key-2")
    for alias in (b, a, c):
        assert await store.put_alias(alias, None)
    assert await store.list_aliases() == [a, b, c]
    assert await store.list_aliases(key_id="key-1") == [a, b]
    assert await store.list_aliases(owner=OWNER) == [b, c]
    assert await store.list_aliases(key_id="key-2", owner="bob") == []


# ---- end issue 15, aliases ----


async def test_replace_key_changes_the_metadata_key_update_changes(store: VaultStore) -> None:
    record = await store.create_key(make_record(request_id="req-update"))
    updated = dataclasses.replace(
        record,
        label=None,
        allowed_signers=("svc-c", "*"),
        rotation_period_s=86_400 * 90,
        next_rotation_at=T0 + timedelta(days=90),
        generation=2,
        mac=RecordMac("kek-20261128-0a0b0c0d", os.urandom(32)),
    )
    assert await store.replace_key(updated, record)
    assert await store.get_key(record.key_id) == updated
    back = dataclasses.replace(
        updated,
        label="again",
        allowed_signers=(),
        rotation_period_s=None,
        next_rotation_at=None,
        generation=3,
    )
    assert await store.replace_key(back, updated)
    assert await store.get_key(record.key_id) == back
    # A writer still holding generation 1 loses, and changes nothing.
    stale = dataclasses.replace(record, label="stale", generation=2)
    assert await store.replace_key(stale, record) is False
    assert await store.get_key(record.key_id) == back


async def test_get_key_without_a_version_is_the_highest_version(store: VaultStore) -> None:
    # The primary version (issue 15): the highest, whatever the order of insertion or state.
    key_id = f"key-{uuid.uuid4().hex}"
    v2 = make_record(key_id, version=2, created_at=T0)
    v1 = make_record(key_id, version=1, created_at=T0 + timedelta(days=1))
    v3 = dataclasses.replace(make_record(key_id, version=3), state=KeyState.DISABLED)
    for record in (v2, v1):
        await store.create_key(record)
    assert (await store.get_key(key_id)).version == 2
    await store.create_key(v3)
    assert await store.get_key(key_id) == v3
    assert [r.version for r in await store.list_keys()] == [3]


async def test_kek_usage_counts_versions_per_kek_they_need(store: VaultStore) -> None:
    assert await store.kek_usage() == {}
    other = SealedKey("kek-20261129-0e0e0e0e", os.urandom(12), os.urandom(48))
    await store.create_key(make_record("key-a"))
    await store.create_key(make_record("key-a", version=2))
    await store.create_key(dataclasses.replace(make_record("key-b"), sealed=other))
    await store.create_key(make_record("key-c", destroyed=True))
    # Every record here is MACed under kek-20261128-0a0b0c0d (make_record): key-b needs both
    # KEKs, the destroyed key-c only its MAC's; a version counts once per KEK.
    assert await store.kek_usage() == {"kek-20261128-0a0b0c0d": 4, "kek-20261129-0e0e0e0e": 1}


async def test_replace_key_changes_state_and_keeps_the_rest(store: VaultStore) -> None:
    record = await store.create_key(make_record(request_id="req-cas"))
    pending = dataclasses.replace(
        record,
        state=KeyState.PENDING_DESTRUCTION,
        destroy_after=T0 + timedelta(days=7),
        generation=2,
        mac=RecordMac("kek-20261128-0a0b0c0d", os.urandom(32)),
    )
    assert await store.replace_key(pending, record) is True
    assert await store.get_key(record.key_id) == pending
    assert await store.find_by_request_id("req-cas", owner=OWNER) == pending


async def test_replace_key_loses_to_a_writer_that_came_first(store: VaultStore) -> None:
    record = await store.create_key(make_record())
    disabled = dataclasses.replace(record, state=KeyState.DISABLED, generation=2)
    assert await store.replace_key(disabled, record)
    # A second writer still holding the enabled record must not overwrite the change.
    other = dataclasses.replace(
        record, state=KeyState.PENDING_DESTRUCTION, destroy_after=T0, generation=2
    )
    assert await store.replace_key(other, record) is False
    assert (await store.get_key(record.key_id)).state == KeyState.DISABLED


async def test_replace_key_compares_the_sealed_material(store: VaultStore) -> None:
    record = await store.create_key(make_record())
    assert record.sealed is not None
    resealed = dataclasses.replace(
        record, sealed=SealedKey("kek-new", os.urandom(12), os.urandom(48)), generation=2
    )
    assert await store.replace_key(resealed, record)
    again = dataclasses.replace(
        record, sealed=SealedKey("kek-newer", os.urandom(12), os.urandom(48)), generation=2
    )
    assert await store.replace_key(again, record) is False  # sealed changed meanwhile
    assert await store.get_key(record.key_id) == resealed


async def test_replace_key_erases_sealed_material(store: VaultStore) -> None:
    pending = dataclasses.replace(
        make_record(), state=KeyState.PENDING_DESTRUCTION, destroy_after=T0
    )
    await store.create_key(pending)
    gone = dataclasses.replace(pending, state=KeyState.DESTROYED, sealed=None, generation=2)
    assert await store.replace_key(gone, pending)
    fetched = await store.get_key(pending.key_id)
    assert fetched == gone
    assert fetched.sealed is None
    assert fetched.destroy_after == T0
    assert fetched.public_key_der == pending.public_key_der


async def test_replace_key_of_a_missing_version_is_false(store: VaultStore) -> None:
    record = make_record()
    assert (
        await store.replace_key(
            dataclasses.replace(record, state=KeyState.DISABLED, generation=2), record
        )
        is False
    )


async def test_replace_key_needs_one_identity(store: VaultStore) -> None:
    record = await store.create_key(make_record())
    with pytest.raises(ValueError, match="same record"):
        await store.replace_key(dataclasses.replace(record, version=2, generation=2), record)


async def test_replace_key_compares_the_generation(store: VaultStore) -> None:
    record = await store.create_key(make_record())
    second = dataclasses.replace(record, generation=2, mac=RecordMac("kek-a", os.urandom(32)))
    assert await store.replace_key(second, record)
    # Same state and sealed material, but a writer still holding generation 1 is too late.
    stale = dataclasses.replace(record, generation=2, mac=RecordMac("kek-b", os.urandom(32)))
    assert await store.replace_key(stale, record) is False
    assert await store.get_key(record.key_id) == second
    third = dataclasses.replace(second, state=KeyState.DISABLED, generation=3)
    assert await store.replace_key(third, second)
    assert await store.get_key(record.key_id) == third


async def test_replace_key_raises_the_generation_by_exactly_one(store: VaultStore) -> None:
    record = await store.create_key(make_record())
    for generation in (1, 3):
        with pytest.raises(ValueError, match="generation by exactly one"):
            await store.replace_key(dataclasses.replace(record, generation=generation), record)
    assert await store.get_key(record.key_id) == record


# --- the audit log -----------------------------------------------------------------------------


def audit_event(n: int, **changes: object) -> AuditEvent:
    event = AuditEvent(
        at=T0 + timedelta(seconds=n),
        principal=f"svc-{n % 3}",
        operation="sign",
        outcome="ok" if n % 2 else "forbidden",
        key_id=f"key-{n % 2}",
        version=1,
        request_id=f"req-{n}",
        data_sha256=hashlib.sha256(str(n).encode()).hexdigest(),
    )
    return dataclasses.replace(event, **changes)  # type: ignore[arg-type]


async def test_append_audit_chains_from_the_first_entry(store: VaultStore) -> None:
    first = await store.append_audit([audit_event(1)])
    rest = await store.append_audit([audit_event(n) for n in range(2, 6)])
    entries = first + rest
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0].prev_hash == GENESIS_HASH
    verifier = ChainVerifier()
    for entry in entries:
        verifier.feed(entry)
    assert await store.read_audit(AuditQuery()) == entries
    assert await verify_log(store) == entries[-1].head


async def test_append_audit_links_under_a_chain_key_when_given(store: VaultStore) -> None:
    keys = ChainKeys(KekRing(Kek.generate()))
    legacy = await store.append_audit([audit_event(1)])
    keyed = await store.append_audit([audit_event(n) for n in range(2, 5)], keys.active())
    assert keyed[0].prev_hash == legacy[0].entry_hash
    assert all(e.entry_hash.startswith(f"hmac-sha256/{keys.active().kek_id}/") for e in keyed)
    assert await store.read_audit(AuditQuery()) == legacy + keyed
    assert await verify_log(store, keys) == keyed[-1].head


async def test_audit_entries_come_back_exactly(store: VaultStore) -> None:
    sparse = AuditEvent(at=T0, principal=None, operation="x" * 128, outcome="invalid_request")
    unicode = audit_event(7, principal="svc-ünïcødé ✓", at=T0 + timedelta(microseconds=500))
    again = audit_event(7, redelivered=True)
    stored = await store.append_audit([sparse, unicode, again])
    assert [e.event for e in await store.read_audit(AuditQuery())] == [sparse, unicode, again]
    assert [e.event.redelivered for e in stored] == [False, False, True]
    assert stored[1].event.at == T0.replace(microsecond=123000)  # kept to the millisecond
    assert stored[1].event.at.utcoffset() == timedelta(0)


async def test_read_audit_filters_pages_and_tails(store: VaultStore) -> None:
    await store.append_audit([audit_event(n) for n in range(1, 11)])
    page = await store.read_audit(AuditQuery(after_seq=3, limit=4))
    assert [e.seq for e in page] == [4, 5, 6, 7]
    by_key = await store.read_audit(AuditQuery(key_id="key-0"))
    assert [e.seq for e in by_key] == [2, 4, 6, 8, 10]
    by_principal = await store.read_audit(AuditQuery(principal="svc-1", key_id="key-1"))
    assert [e.seq for e in by_principal] == [1, 7]
    tail = await store.read_audit(AuditQuery(limit=3, latest=True))
    assert [e.seq for e in tail] == [8, 9, 10]
    key_tail = await store.read_audit(AuditQuery(limit=2, key_id="key-1", latest=True))
    assert [e.seq for e in key_tail] == [7, 9]
    assert await store.read_audit(AuditQuery(after_seq=10)) == []


async def test_concurrent_appends_from_two_instances_keep_one_chain(
    store: VaultStore, store_url: str
) -> None:
    other = await open_store(store_url)
    try:
        stores = [store, other] * 20
        batches = await asyncio.gather(
            *(s.append_audit([audit_event(n), audit_event(n + 100)]) for n, s in enumerate(stores))
        )
    finally:
        await other.close()
    assert sorted(e.seq for batch in batches for e in batch) == list(range(1, 81))
    for batch in batches:  # a batch is appended in one piece
        assert batch[1].seq == batch[0].seq + 1
    head = await verify_log(store)
    assert head.seq == 80


_AUDIT_WRITER = """
import asyncio, sys
from datetime import UTC, datetime
from vault.audit import AuditEvent
from vault.store import open_store

async def main(url, name):
    store = await open_store(url)
    try:
        for i in range(25):
            await asyncio.sleep(0.002)
            await store.append_audit([AuditEvent(
                at=datetime.now(UTC), principal=name, operation="sign", outcome="ok",
                request_id=f"{name}-{i}")])
    finally:
        await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_two_processes_append_to_one_chain(store: VaultStore, store_url: str) -> None:
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _AUDIT_WRITER, store_url, name, stderr=asyncio.subprocess.PIPE
        )
        for name in ("proc-a", "proc-b")
    ]
    for proc in procs:
        _, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
    assert (await verify_log(store)).seq == 50
    mine = await store.read_audit(AuditQuery(principal="proc-a"))
    assert [e.event.request_id for e in mine] == [f"proc-a-{i}" for i in range(25)]


# --- TPM-signed audit checkpoints ---------------------------------------------------------------


def checkpoint(seq: int, **changes: object) -> Checkpoint:
    made = Checkpoint(
        seq=seq,
        link=f"hmac-sha256/kek-1/{seq:064x}",
        at=T0 + timedelta(seconds=seq),
        signature=bytes([seq % 256]) * 71,
    )
    return dataclasses.replace(made, **changes)  # type: ignore[arg-type]


async def test_checkpoints_round_trip_oldest_first(store: VaultStore) -> None:
    for seq in (30, 10, 20):
        assert await store.add_checkpoint(checkpoint(seq))
    assert await store.read_checkpoints() == [checkpoint(10), checkpoint(20), checkpoint(30)]
    assert await store.read_checkpoints(after_seq=10, limit=1) == [checkpoint(20)]
    assert await store.read_checkpoints(latest=True, limit=2) == [checkpoint(20), checkpoint(30)]


async def test_the_first_checkpoint_of_an_entry_is_kept(store: VaultStore) -> None:
    assert await store.add_checkpoint(checkpoint(5))
    later = checkpoint(5, at=T0 + timedelta(hours=1), signature=b"other")
    assert not await store.add_checkpoint(later)
    assert await store.read_checkpoints() == [checkpoint(5)]


async def test_no_checkpoints_is_an_empty_list(store: VaultStore) -> None:
    assert await store.read_checkpoints() == []
    assert await store.read_checkpoints(latest=True, limit=1) == []


# --- key.list pages (vault.listing) -----------------------------------------------------------


def _keyed(key_id: str, owner: str, signers: tuple[str, ...], **changes: object) -> KeyRecord:
    record = dataclasses.replace(
        make_record(key_id, created_by=owner), allowed_signers=signers, label=f"label-{owner}"
    )
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


async def _all_pages(store: VaultStore, query: KeyListQuery) -> list[list[str]]:
    pages: list[list[str]] = []
    while True:
        page = await store.list_key_page(query)
        pages.append([record.key_id for record in page.records])
        if page.next_after is None:
            return pages
        assert page.records, "a page without keys must not be the first of a loop"
        query = dataclasses.replace(query, after=page.next_after)


async def test_list_key_page_of_an_owner_pages_in_key_id_order(store: VaultStore) -> None:
    mine = [f"key-{n:02d}" for n in (7, 1, 5, 3, 9)]
    for key_id in mine:
        await store.create_key(_keyed(key_id, "alice", ("alice",)))
    for key_id in ("key-02", "key-04"):
        await store.create_key(_keyed(key_id, "bob", ("bob", "alice")))
    pages = await _all_pages(store, KeyListQuery(limit=2, owner="alice"))
    assert pages == [["key-01", "key-03"], ["key-05", "key-07"], ["key-09"]]
    whole = await store.list_key_page(KeyListQuery(limit=5, owner="alice"))
    assert [r.key_id for r in whole.records] == sorted(mine)
    assert whole.next_after is None
    assert (await store.list_key_page(KeyListQuery(limit=5, owner="nobody"))).records == []


async def test_list_key_page_gives_the_current_version_only(store: VaultStore) -> None:
    v1 = _keyed("key-a", "alice", ("alice",))
    v2 = _keyed("key-a", "alice", ("alice",), version=2, state=KeyState.DISABLED)
    for record in (v2, v1):
        await store.create_key(record)
    page = await store.list_key_page(KeyListQuery(limit=10))
    assert page.records == [v2]
    # The state filter is the current version's: key-a is disabled, whatever v1 is.
    assert (await store.list_key_page(KeyListQuery(limit=10, state=KeyState.ENABLED))).records == []
    disabled = await store.list_key_page(KeyListQuery(limit=10, state=KeyState.DISABLED))
    assert disabled.records == [v2]


async def test_list_key_page_of_a_signer_counts_star_and_the_current_signers(
    store: VaultStore,
) -> None:
    records = [
        _keyed("key-1", "bob", ("bob", "carol")),
        _keyed("key-2", "bob", ("*",)),
        _keyed("key-3", "bob", ("bob",)),
        _keyed("key-4", "dave", ("carol", "*")),  # named twice: listed once
        # carol could sign with v1, not with the current v2.
        _keyed("key-5", "dave", ("carol",)),
        _keyed("key-5", "dave", ("dave",), version=2),
        _keyed("key-6", "carol", ("erin",)),  # her own key, which she may not sign with
    ]
    for record in records:
        await store.create_key(record)
    pages = await _all_pages(store, KeyListQuery(limit=1, signer="carol"))
    assert pages == [["key-1"], ["key-2"], ["key-4"]]
    page = await store.list_key_page(KeyListQuery(limit=10, signer="carol"))
    assert [r.key_id for r in page.records] == ["key-1", "key-2", "key-4"]
    assert [
        r.key_id for r in (await store.list_key_page(KeyListQuery(limit=10, signer="erin"))).records
    ] == ["key-2", "key-4", "key-6"]
    both = KeyListQuery(limit=10, signer="carol", owner="dave")
    assert [r.key_id for r in (await store.list_key_page(both)).records] == ["key-4"]


async def test_list_key_page_filters_by_exact_label_and_state(store: VaultStore) -> None:
    plain = _keyed("key-1", "alice", ("alice",), label="invoices")
    other = _keyed("key-2", "alice", ("alice",), label="invoices-2024")
    off = _keyed("key-3", "alice", ("alice",), label="invoices", state=KeyState.DISABLED)
    for record in (plain, other, off):
        await store.create_key(record)
    by_label = await store.list_key_page(KeyListQuery(limit=10, owner="alice", label="invoices"))
    assert by_label.records == [plain, off]
    both = KeyListQuery(limit=10, owner="alice", label="invoices", state=KeyState.DISABLED)
    assert (await store.list_key_page(both)).records == [off]
    assert (await store.list_key_page(KeyListQuery(limit=10, label="INVOICES"))).records == []


async def test_list_key_page_after_a_cursor_skips_nothing_created_meanwhile(
    store: VaultStore,
) -> None:
    for key_id in ("key-b", "key-d"):
        await store.create_key(_keyed(key_id, "alice", ("alice",)))
    first = await store.list_key_page(KeyListQuery(limit=1, owner="alice"))
    assert [r.key_id for r in first.records] == ["key-b"]
    await store.create_key(_keyed("key-a", "alice", ("alice",)))  # before the cursor
    await store.create_key(_keyed("key-c", "alice", ("alice",)))  # after it
    rest = await _all_pages(store, KeyListQuery(limit=1, owner="alice", after=first.next_after))
    assert rest == [["key-c"], ["key-d"]]


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
        assert pragmas == ["wal", 2, 10_000, SQLITE_SCHEMA_VERSION]  # synchronous 2 = FULL
        thread_name = await store._run(lambda conn: threading.current_thread().name)
        assert thread_name == "zandd-sqlite"
    finally:
        await store.close()


async def test_sqlite_key_stamps_is_one_trip_to_the_thread(tmp_path: Path) -> None:
    # issue 19: the signer's revalidation of 10,000 cached keys must not queue 20 reads on the
    # lane its sign requests' misses use; and each statement reads the primary key's index.
    store = await SqliteStore.open(str(tmp_path / "vault.db"))
    statements: list[str] = []
    try:
        await store._run(lambda conn: conn.set_trace_callback(statements.append))
        with mock.patch("vault.sqlite._on_thread", wraps=vault.sqlite._on_thread) as trips:
            assert await store.key_stamps([f"key-{n}" for n in range(1201)]) == {}
        assert trips.call_count == 1
        assert len(statements) == 3  # 500 + 500 + 201 ids
        plan = await store._run(
            lambda conn: conn.execute(
                f"EXPLAIN QUERY PLAN {vault.sqlite._STAMPS}(?, ?)", ("a", "b")
            ).fetchall()
        )
    finally:
        await store.close()
    details = " ".join(str(row[-1]) for row in plan)
    assert "SEARCH keys USING" in details, details
    assert "SCAN" not in details, details


async def test_sqlite_on_an_unusable_path_fails_clearly(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    db = blocker / "vault.db"
    with pytest.raises((ConfigurationError, VaultUnavailable), match=str(db)) as info:
        await open_store(f"sqlite://{db}")
    assert "Not a directory" in str(info.value)


async def test_sqlite_finds_due_versions_through_an_index(tmp_path: Path) -> None:
    # Every lifecycle request asks; 3,000 pending versions used to be scanned and decoded
    # each time (issue 12, finding 6).
    store = await SqliteStore.open(str(tmp_path / "vault.db"))
    try:
        plan = await store._run(
            lambda conn: conn.execute(f"EXPLAIN QUERY PLAN {_DUE}", ("now",)).fetchall()
        )
    finally:
        await store.close()
    details = " ".join(str(row[-1]) for row in plan)
    assert "USING INDEX keys_pending_destruction" in details, details


async def test_sqlite_pages_keys_through_indexes(tmp_path: Path) -> None:
    # key.list must cost a page, not the vault: no scan of keys and no sort of what matched.
    store = await SqliteStore.open(str(tmp_path / "vault.db"))
    plans: list[str] = []

    def explain(conn: sqlite3.Connection, sql: str, params: tuple[object, ...]) -> list[KeyRecord]:
        plans.extend(str(row[-1]) for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))
        return []

    try:
        for query in (
            KeyListQuery(limit=10, owner="alice", state=KeyState.ENABLED),
            KeyListQuery(limit=10, signer="alice", label="x"),
            KeyListQuery(limit=10),
        ):
            plans.clear()
            with mock.patch("vault.sqlite._fetch_all", explain):
                await store.list_key_page(query)
            details = " | ".join(plans)
            assert "SEARCH k" in details, details
            assert "SCAN" not in details, details
            assert "TEMP B-TREE" not in details, details
    finally:
        await store.close()


async def test_sqlite_key_signers_follow_every_write_of_allowed_signers(tmp_path: Path) -> None:
    # A writer that changes allowed_signers by any path (key.update, a restore) keeps the
    # signer index true: triggers keep it, not the writers.
    store = await SqliteStore.open(str(tmp_path / "vault.db"))
    try:
        await store.create_key(_keyed("key-1", "bob", ("bob", "carol")))
        carol = KeyListQuery(limit=10, signer="carol")
        assert [r.key_id for r in (await store.list_key_page(carol)).records] == ["key-1"]
        await store._run(
            lambda conn: conn.execute(
                "UPDATE keys SET allowed_signers = ? WHERE key_id = 'key-1'", ('["dave"]',)
            )
        )
        assert (await store.list_key_page(carol)).records == []
        dave = KeyListQuery(limit=10, signer="dave")
        assert [r.key_id for r in (await store.list_key_page(dave)).records] == ["key-1"]
        await store._run(lambda conn: conn.execute("DELETE FROM keys"))
        rows = await store._run(
            lambda conn: conn.execute("SELECT COUNT(*) FROM key_signers").fetchone()[0]
        )
        assert rows == 0
    finally:
        await store.close()


async def test_sqlite_rotation_due_uses_its_partial_index(tmp_path: Path) -> None:
    store = await SqliteStore.open(str(tmp_path / "vault.db"))
    try:
        plan = await store._run(
            lambda conn: conn.execute(f"EXPLAIN QUERY PLAN {_ROTATION_DUE}", ("now",)).fetchall()
        )
    finally:
        await store.close()
    details = " ".join(str(row[-1]) for row in plan)
    assert "USING INDEX keys_rotation_due" in details, details


async def test_sqlite_upgrade_to_10_keeps_old_records_and_their_macs(tmp_path: Path) -> None:
    # A schema-9 vault: written by this code, then the rotation columns taken away again.
    db = tmp_path / "vault.db"
    store = await SqliteStore.open(str(db))
    old = await store.create_key(make_record(request_id="req-8"))
    await store.close()
    with sqlite3.connect(db) as conn:
        conn.execute("DROP INDEX keys_rotation_due")
        conn.execute("ALTER TABLE keys DROP COLUMN next_rotation_at")
        conn.execute("ALTER TABLE keys DROP COLUMN rotation_period_s")
        conn.execute("PRAGMA user_version = 9")
    conn.close()
    store = await SqliteStore.open(str(db))
    try:
        assert await store.get_key(old.key_id) == old  # same fields, so the same MAC holds
        assert await store.list_rotation_due(T0 + timedelta(days=9999)) == []
        version = await store._run(lambda conn: conn.execute("PRAGMA user_version").fetchone()[0])
        assert version == SQLITE_SCHEMA_VERSION >= 10
    finally:
        await store.close()


async def test_sqlite_upgrade_to_11_adds_aliases_and_keeps_old_records(tmp_path: Path) -> None:
    # A schema-10 vault: written by this code, then the aliases table taken away again.
    db = tmp_path / "vault.db"
    store = await SqliteStore.open(str(db))
    old = await store.create_key(make_record(request_id="req-10"))
    await store.close()
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE aliases")
        conn.execute("PRAGMA user_version = 10")
    conn.close()
    store = await SqliteStore.open(str(db))
    try:
        assert await store.get_key(old.key_id) == old
        assert await store.get_alias("alias/x") is None
        assert await store.put_alias(make_alias("alias/x", old.key_id), None)
        version = await store._run(lambda conn: conn.execute("PRAGMA user_version").fetchone()[0])
        assert version == SQLITE_SCHEMA_VERSION == 11
    finally:
        await store.close()


async def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    db = tmp_path / "vault.db"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(ConfigurationError, match="schema version 99"):
        await SqliteStore.open(str(db))


async def test_sqlite_garbage_file_is_damaged_not_unavailable(tmp_path: Path) -> None:
    # Permanent (issue 17): waiting does not mend the file, so it is no VaultUnavailable.
    db = tmp_path / "vault.db"
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(
        IntegrityError, match=r"is damaged \(SQLITE_NOTADB.*restore it from a backup"
    ):
        await SqliteStore.open(str(db))


def _vault_bytes(db: Path) -> bytes:
    # Read by another process: closing a descriptor of the file here would drop the locks
    # this process's SQLite connections hold on it.
    files = [str(p) for p in (db, Path(f"{db}-wal")) if p.exists()]
    return subprocess.run(["cat", *files], capture_output=True, check=True).stdout


async def test_sqlite_erased_ciphertext_is_gone_from_the_files(tmp_path: Path) -> None:
    db = tmp_path / "vault.db"
    store, reader = await SqliteStore.open(str(db)), await SqliteStore.open(str(db))
    try:
        pending = dataclasses.replace(
            make_record(), state=KeyState.PENDING_DESTRUCTION, destroy_after=T0
        )
        await store.create_key(pending)
        await store.create_key(make_record())  # a neighbour on the same page
        assert pending.sealed is not None
        secret_parts = (pending.sealed.ciphertext, pending.sealed.nonce)
        await reader.get_key(pending.key_id)  # another process has read it
        assert all(part in _vault_bytes(db) for part in secret_parts)
        gone = dataclasses.replace(pending, state=KeyState.DESTROYED, sealed=None, generation=2)
        assert await store.replace_key(gone, pending)
        contents = _vault_bytes(db)
        assert not any(part in contents for part in secret_parts)
        assert pending.public_key_der in contents
        assert await reader.get_key(pending.key_id) == gone
    finally:
        await store.close()
        await reader.close()


_SCHEMA_V1 = """
CREATE TABLE keys (
    key_id TEXT NOT NULL, version INTEGER NOT NULL, algorithm TEXT NOT NULL,
    public_key_der BLOB NOT NULL, kek_id TEXT, nonce BLOB, ciphertext BLOB, state TEXT NOT NULL,
    label TEXT, allowed_signers TEXT NOT NULL, created_at TEXT NOT NULL, created_by TEXT NOT NULL,
    request_id TEXT, PRIMARY KEY (key_id, version));
CREATE UNIQUE INDEX keys_request_id ON keys (request_id) WHERE request_id IS NOT NULL;
INSERT INTO keys VALUES ('key-old', 1, 'ecdsa-p256-sha256', x'3059', 'kek-1', zeroblob(12),
    zeroblob(48), 'enabled', NULL, '["svc"]', '2026-01-01T00:00:00.000000+00:00', 'svc', 'r-1');
PRAGMA user_version = 1;
"""


async def test_sqlite_upgrades_a_version_1_vault(tmp_path: Path) -> None:
    db = tmp_path / "vault.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(_SCHEMA_V1)
    conn.close()
    store = await SqliteStore.open(str(db))
    try:
        old = await store.get_key("key-old")
        assert (old.state, old.destroy_after, old.created_by) == (KeyState.ENABLED, None, "svc")
        # Rows from before record MACs: generation 1, no MAC (readers refuse them until the
        # upgrade vouches for them).
        assert (old.generation, old.mac) == (1, None)
        assert (await store.append_audit([audit_event(1)]))[0].seq == 1
        version = await store._run(lambda conn: conn.execute("PRAGMA user_version").fetchone()[0])
        assert version == SQLITE_SCHEMA_VERSION
        # The vault-wide request id index is gone: the id is now scoped per owner.
        assert await store.find_by_request_id("r-1", owner="svc") == old
        other = make_record(request_id="r-1", created_by="another")
        assert await store.create_key(other) == other
        assert await store.create_key(make_record(request_id="r-1", created_by="svc")) == old
        assert await store.list_due(T0) == []
        # The signer index is filled from the rows already there.
        signable = await store.list_key_page(KeyListQuery(limit=5, signer="svc"))
        assert [r.key_id for r in signable.records] == ["key-old"]
    finally:
        await store.close()


async def test_sqlite_upgrade_to_8_keeps_the_keyed_audit_verifying(tmp_path: Path) -> None:
    # A schema-7 vault: written by this code, then the redelivered column taken away again.
    db = tmp_path / "vault.db"
    keys = ChainKeys(KekRing(Kek.generate()))
    store = await SqliteStore.open(str(db))
    old = await store.append_audit([audit_event(n) for n in range(1, 4)], keys.active())
    await store.close()
    with sqlite3.connect(db) as conn:
        conn.execute("ALTER TABLE audit DROP COLUMN redelivered")
        # ...and what later steps added (issue 15's rotation columns).
        conn.execute("DROP INDEX keys_rotation_due")
        conn.execute("ALTER TABLE keys DROP COLUMN next_rotation_at")
        conn.execute("ALTER TABLE keys DROP COLUMN rotation_period_s")
        conn.execute("PRAGMA user_version = 7")
    conn.close()
    store = await SqliteStore.open(str(db))
    try:
        assert await store.read_audit(AuditQuery()) == old
        new = await store.append_audit([audit_event(4, redelivered=True)], keys.active())
        assert await verify_log(store, keys) == new[-1].head
        # The flag is in the link: setting it on an old entry (or clearing it) is an edit.
        await store._run(
            lambda conn: conn.execute("UPDATE audit SET redelivered = 1 WHERE seq = 2")
        )
        with pytest.raises(AuditBroken, match="#2 was altered"):
            await verify_log(store, keys)
        await store._run(
            lambda conn: conn.execute("UPDATE audit SET redelivered = 7 WHERE seq = 2")
        )
        with pytest.raises(IntegrityError, match="#2 is malformed"):
            await store.read_audit(AuditQuery())
    finally:
        await store.close()


async def test_sqlite_refuses_a_row_put_back_from_an_older_copy(tmp_path: Path) -> None:
    db = tmp_path / "vault.db"
    store = await SqliteStore.open(str(db))
    try:
        first = await store.create_key(make_record(request_id="req-old"))
        second = dataclasses.replace(first, state=KeyState.DISABLED, generation=2)
        assert await store.replace_key(second, first)
        with sqlite3.connect(db) as conn:  # a vault writer restores the row alone
            conn.execute("UPDATE keys SET state = 'enabled', generation = 1")
        conn.close()
        reads = (
            store.get_key(first.key_id),
            store.get_key(first.key_id, 1),
            store.find_by_request_id("req-old", owner="keygen-user"),
            store.list_keys(),
            store.list_versions(),
        )
        for read in reads:
            with pytest.raises(IntegrityError, match="generation 1, but the vault wrote"):
                await read
    finally:
        await store.close()


_OPEN_READ_CLOSE = """
import asyncio, sys
from vault.store import open_store

async def main(url, key_id):
    store = await open_store(url)
    try:
        if key_id:
            print((await store.get_key(key_id)).key_id)
    finally:
        await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_sqlite_connections_of_one_process_keep_their_wal(tmp_path: Path) -> None:
    # Regression: opening a second connection used to open and close the database file
    # outside SQLite, which released this process's locks; another process closing its
    # connection then believed it was the last one and removed the WAL from under us.
    url = f"sqlite://{tmp_path / 'vault.db'}"

    def other_process(key_id: str = "") -> str:
        done = subprocess.run(
            [sys.executable, "-c", _OPEN_READ_CLOSE, url, key_id],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return done.stdout.strip()

    first, second = await open_store(url), await open_store(url)
    try:
        other_process()
        record = make_record()
        await first.create_key(record)
        assert await second.get_key(record.key_id) == record
        assert other_process(record.key_id) == record.key_id
    finally:
        await first.close()
        await second.close()


@pytest.mark.mongo
async def test_mongodb_upgrades_a_schema_1_vault(mongo_vault_url: str) -> None:
    from pymongo import ASCENDING, AsyncMongoClient

    from vault.mongo import SCHEMA_VERSION

    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongo_vault_url)
    try:
        database = client.get_default_database()
        # What schema 1 left: its version and the vault-wide unique request id index.
        await database["meta"].insert_one({"_id": "schema", "version": 1})
        await database["keys"].create_index(
            [("request_id", ASCENDING)],
            unique=True,
            name="request_id",
            partialFilterExpression={"request_id": {"$type": "string"}},
        )
        store = await open_store(mongo_vault_url)
        try:
            mine = make_record(request_id="req-old", created_by="alice")
            theirs = make_record(request_id="req-old", created_by="mallory")
            assert await store.create_key(mine) == mine
            assert await store.create_key(theirs) == theirs
        finally:
            await store.close()
        indexes = await (await database["keys"].list_indexes()).to_list()
        assert "request_id" not in {index["name"] for index in indexes}
        schema = await database["meta"].find_one({"_id": "schema"})
        assert schema is not None
        assert schema["version"] == SCHEMA_VERSION
    finally:
        await client.close()


# --- issue 19: an audit append on the calling thread (append_audit_now) -------------------


async def test_append_audit_now_writes_in_the_same_chain_as_append_audit(
    store: VaultStore, store_url: str
) -> None:
    keys = ChainKeys(KekRing(Kek.generate()))
    threaded = await store.append_audit([audit_event(1)], keys.active())
    now = store.append_audit_now([audit_event(2), audit_event(3)], keys.active())
    if store_url.startswith("mongodb"):
        assert now is None, "a network store never writes on the loop's thread"
        return
    assert now is not None
    after = await store.append_audit([audit_event(4)], keys.active())
    assert [e.seq for e in threaded + now + after] == [1, 2, 3, 4]
    assert now[0].prev_hash == threaded[0].entry_hash
    assert after[0].prev_hash == now[-1].entry_hash
    assert await store.read_audit(AuditQuery()) == threaded + now + after
    assert await verify_log(store, keys) == after[-1].head


async def test_append_audit_now_never_waits_for_another_writer(tmp_path: Path) -> None:
    path = tmp_path / "vault.db"
    store = await SqliteStore.open(str(path))
    try:
        await store.append_audit([audit_event(1)])
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # another worker holds the write lock
            started = asyncio.get_running_loop().time()
            assert store.append_audit_now([audit_event(2)]) is None
            assert asyncio.get_running_loop().time() - started < 1.0, "it did not wait"
            other.execute("ROLLBACK")
        finally:
            other.close()
        assert [e.seq for e in await store.read_audit(AuditQuery())] == [1], "nothing written"
        written = store.append_audit_now([audit_event(2)])
        assert written is not None
        assert [e.seq for e in written] == [2]
    finally:
        await store.close()
    assert store.append_audit_now([audit_event(3)]) is None, "a closed store writes nothing"


async def test_append_audit_now_rolls_back_what_fails_and_says_why(tmp_path: Path) -> None:
    path = tmp_path / "vault.db"
    store = await SqliteStore.open(str(path))
    try:
        await store.append_audit([audit_event(1)])
        # A row the database refuses (here a trigger) fails the transaction after its first
        # insert: all of it is rolled back, and the error is the store's own.
        with sqlite3.connect(path) as admin:
            admin.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON audit WHEN NEW.request_id = 'req-3'"
                " BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
        with pytest.raises(IntegrityError, match="refused"):
            store.append_audit_now([audit_event(2), audit_event(3)])
        assert [e.seq for e in await store.read_audit(AuditQuery())] == [1]
        later = store.append_audit_now([audit_event(2)])
        assert later is not None, "no transaction left open"
        assert [e.seq for e in later] == [2]
    finally:
        await store.close()


async def test_an_in_memory_store_never_writes_now() -> None:
    store = await SqliteStore.open(":memory:")
    try:
        assert store.append_audit_now([audit_event(1)]) is None
    finally:
        await store.close()
