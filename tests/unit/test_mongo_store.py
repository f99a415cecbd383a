"""The MongoDB backend's parts that need no server: options, errors, encoding, the append race.

Everything against a real server is in the shared contract suite (test_store_contract.py,
``mongodb`` param) and tests/integration/test_fleet_mongo.py.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
import warnings
from collections.abc import AsyncIterator, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import bson
import pytest
from pymongo import AsyncMongoClient
from pymongo.errors import (
    AutoReconnect,
    ConnectionFailure,
    DuplicateKeyError,
    ExecutionTimeout,
    NetworkTimeout,
    NotPrimaryError,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
    WaitQueueTimeoutError,
    WTimeoutError,
)
from pymongo.errors import ConfigurationError as PyMongoConfigurationError

import vault.mongo
from contracts.errors import ConfigurationError, IntegrityError, VaultUnavailable, ZanddError
from contracts.urls import redact_url, scrub, url_secrets
from vault.audit import AuditEntry, AuditEvent, ChainVerifier, link
from vault.mongo import (
    MongoStore,
    _audit_document,
    _to_audit_entry,
    _to_document,
    _to_record,
    client_options,
    translate_error,
)
from vault.records import KeyRecord, KeyStamp, KeyState, RecordMac
from vault.sealing import SealedKey
from vault.store import open_store

PASSWORD = "hunter2-s3cret"
T0 = datetime(2026, 11, 28, 10, 0, 0, 123456, tzinfo=UTC)


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A local port that refuses connections (bound, never listening).

    PyMongo 4.20 leaves the socket of a connection attempt that ``close()`` cancels to the
    garbage collector, whose ResourceWarning would fail whichever test runs then: collect
    it here, where it is expected.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


# --- opening ------------------------------------------------------------------------------


async def test_without_pymongo_the_url_asks_for_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "vault.mongo")
    monkeypatch.setitem(sys.modules, "pymongo", None)
    with pytest.raises(ConfigurationError, match=r"install zandd-hsm\[mongo\]") as info:
        await open_store(f"mongodb://zandd:{PASSWORD}@db.example/zandd")
    assert PASSWORD not in str(info.value)


async def test_an_unreachable_server_is_vault_unavailable(refused_port: int) -> None:
    url = f"mongodb://zandd:{PASSWORD}@127.0.0.1:{refused_port}/zandd?serverSelectionTimeoutMS=200"
    with pytest.raises(VaultUnavailable) as info:
        await open_store(url)
    error = info.value
    assert error.retryable
    assert isinstance(error.__cause__, ConnectionFailure)
    assert error.message.startswith(
        f"MongoDB vault mongodb://zandd:***@127.0.0.1:{refused_port}/zandd"
        "?serverSelectionTimeoutMS=200 is unreachable: ServerSelectionTimeoutError: "
    )
    assert "Connect" in error.message  # PyMongo's own reason, without the topology dump
    assert "Topology Description" not in error.message
    assert PASSWORD not in str(error)


@pytest.mark.parametrize(
    "url",
    [
        f"mongodb://zandd:{PASSWORD}@db/zandd?serverSelectionTimeoutMS=soon",
        f"mongodb://zandd:{PASSWORD}@db/zandd?w=majority&journal=perhaps",
        f"mongodb://zandd:{PASSWORD}@db/zandd?readConcernLvl=majority",
        f"mongodb://zandd:{PASSWORD}@db/no$dollars",
        f"mongodb://zandd:{PASSWORD}@db:notaport/zandd",
    ],
)
async def test_a_bad_url_is_a_configuration_error(url: str) -> None:
    with pytest.raises(
        ConfigurationError, match="invalid MongoDB vault URL mongodb://zandd:"
    ) as info:
        await open_store(url)
    assert isinstance(info.value.__cause__, PyMongoError | UserWarning | ValueError | TypeError)
    assert PASSWORD not in str(info.value)


async def test_defaults_apply_where_the_url_is_silent() -> None:
    url = "mongodb://db1,db2/zandd?replicaSet=rs0"
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url, **client_options(url))
    try:
        options = client.options
        assert client.write_concern.document == {"w": "majority"}
        assert client.read_concern.level == "majority"
        assert (options.retry_writes, options.retry_reads) == (True, True)
        assert options.server_selection_timeout == 5.0
        assert options.pool_options.connect_timeout == 5.0
        assert options.pool_options.socket_timeout == 10.0
        assert client.get_default_database("other").name == "zandd"
    finally:
        await client.close()


async def test_the_url_overrides_every_default() -> None:
    url = (
        "mongodb://db/vault?W=1&readconcernlevel=local&retryWrites=false"
        "&serverSelectionTimeoutMS=250&connectTimeoutMS=300&socketTimeoutMS=0&appName=mine"
    )
    assert client_options(url) == {"retryReads": True}
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url, **client_options(url))
    try:
        assert client.write_concern.document == {"w": 1}
        assert client.read_concern.level == "local"
        assert client.options.retry_writes is False
        assert client.options.server_selection_timeout == 0.25
        assert client.options.pool_options.socket_timeout is None
    finally:
        await client.close()


async def test_repr_and_closed_store_hide_the_password() -> None:
    url = f"mongodb://zandd:{PASSWORD}@db/zandd"
    store = MongoStore(AsyncMongoClient(url, **client_options(url)), url)
    await store.close()
    await store.close()  # closing twice is harmless
    assert repr(store) == "MongoStore(url='mongodb://zandd:***@db/zandd')"
    with pytest.raises(VaultUnavailable, match=r"mongodb://zandd:\*\*\*@db/zandd is closed"):
        await store.get_key("key-any")


# --- errors ---------------------------------------------------------------------------------

URL = f"mongodb://zandd:{PASSWORD}@db/zandd"


@pytest.mark.parametrize(
    ("error", "expected", "phrase"),
    [
        (ServerSelectionTimeoutError(f"db:27017: timed out {PASSWORD}"), VaultUnavailable, "unreachable"),
        (AutoReconnect("connection closed"), VaultUnavailable, "unreachable"),
        (NetworkTimeout("db:27017: timed out"), VaultUnavailable, "unreachable"),
        (NotPrimaryError("not primary", {}), VaultUnavailable, "unreachable"),
        (WaitQueueTimeoutError("pool exhausted"), VaultUnavailable, "unreachable"),
        (ExecutionTimeout("operation exceeded time limit", 50, {"codeName": "MaxTimeMSExpired", "errmsg": "operation exceeded time limit"}), VaultUnavailable, "MaxTimeMSExpired (code 50)"),
        (WTimeoutError("waiting for replication timed out", 64, {"codeName": "WriteConcernFailed", "errmsg": "waiting for replication timed out"}), VaultUnavailable, "WriteConcernFailed (code 64)"),
        (OperationFailure("Authentication failed.", 18, {"codeName": "AuthenticationFailed", "errmsg": "Authentication failed."}), ConfigurationError, "refused our credentials"),
        (OperationFailure("not authorized", 13, {"codeName": "Unauthorized", "errmsg": "not authorized on zandd"}), ConfigurationError, "refused our credentials"),
        (PyMongoConfigurationError("The DNS query name does not exist"), ConfigurationError, "misconfigured"),
        (DuplicateKeyError("E11000 duplicate key", 11000, {"codeName": "DuplicateKey", "errmsg": "E11000 dup key: { _id: 7 }"}), IntegrityError, "refused a duplicate"),
        (OperationFailure("interrupted at shutdown", 11600, {"codeName": "InterruptedAtShutdown", "errmsg": "interrupted at shutdown"}), VaultUnavailable, "failed"),
    ],
)  # fmt: skip
def test_pymongo_errors_become_ours(
    error: PyMongoError, expected: type[ZanddError], phrase: str
) -> None:
    translated = translate_error(error, URL)
    assert type(translated) is expected
    assert translated.message.startswith("MongoDB vault mongodb://zandd:***@db/zandd ")
    assert phrase in translated.message
    assert PASSWORD not in translated.message


def test_long_messages_are_cut() -> None:
    translated = translate_error(AutoReconnect("x" * 5000), URL)
    assert len(translated.message) < 450
    assert translated.message.endswith("…")


# --- documents ------------------------------------------------------------------------------


def record(**changes: Any) -> KeyRecord:
    fields: dict[str, Any] = {
        "key_id": "zk-0123456789abcdef0123",
        "version": 3,
        "algorithm": "ecdsa-p256-sha256",
        "public_key_der": bytes(range(91)),
        "sealed": SealedKey("kek-20261128-0a0b0c0d", bytes(12), bytes(range(48))),
        "state": KeyState.ENABLED,
        "label": "payments ✓",
        "allowed_signers": ("svc-a", "svc-b"),
        "created_at": T0,
        "created_by": "keygen-user",
        "request_id": "req-1",
    }
    fields.update(changes)
    return KeyRecord(**fields)


def through_bson(document: Mapping[str, Any]) -> dict[str, Any]:
    """What PyMongo hands back for ``document`` (default codec options, as the store uses)."""
    return bson.decode(bson.encode(document))


@pytest.mark.parametrize(
    "original",
    [
        record(),
        record(label=None, allowed_signers=(), request_id=None),
        record(state=KeyState.PENDING_DESTRUCTION, destroy_after=T0 + timedelta(days=7)),
        record(sealed=None, state=KeyState.DESTROYED, destroy_after=T0),
        record(generation=9, mac=RecordMac("kek-20261128-0a0b0c0d", bytes(range(32)))),
        record(attestation=bytes(range(200))),
        record(sealed=None, tpm_blob=bytes(range(250)), attestation=b"\x00\x01a"),
    ],
    ids=["enabled", "empty-optionals", "pending", "destroyed", "maced", "attested", "tpm"],
)
def test_records_survive_bson_exactly(original: KeyRecord) -> None:
    document = through_bson(_to_document(original))
    assert isinstance(document["public_key_der"], bytes)
    restored = _to_record(document, {})
    assert restored == original
    assert restored.created_at.microsecond == 123456  # BSON dates would keep milliseconds


def test_a_malformed_document_is_an_integrity_error() -> None:
    document = through_bson(_to_document(record()))
    document["state"] = "lost"
    with pytest.raises(IntegrityError, match="stored record for key zk-0123456789abcdef0123 v3"):
        _to_record(document, {})


def test_a_document_from_before_record_macs_is_generation_1_without_a_mac() -> None:
    document = through_bson(_to_document(record()))
    del document["generation"], document["mac"]
    assert (_to_record(document, {}).generation, _to_record(document, {}).mac) == (1, None)


def test_a_document_older_than_its_head_is_an_integrity_error() -> None:
    document = through_bson(_to_document(record(generation=2)))
    key = ("zk-0123456789abcdef0123", 3)
    assert _to_record(document, {key: 2}).generation == 2
    with pytest.raises(IntegrityError, match="generation 2, but the vault wrote generation 5"):
        _to_record(document, {key: 5})


def events(count: int, start: int = 0) -> list[AuditEvent]:
    return [
        AuditEvent(
            at=T0 + timedelta(milliseconds=n),
            principal=f"svc-{n}",
            operation="sign",
            outcome="ok",
            key_id="zk-a",
            version=1,
            request_id=f"req-{n}",
            data_sha256=f"{n:064x}",
        )
        for n in range(start, start + count)
    ]


def test_audit_batches_survive_bson_and_keep_their_chain() -> None:
    entries = link(vault.audit.GENESIS, events(3))
    document = through_bson(_audit_document(entries))
    assert (document["_id"], document["last"]) == (1, 3)
    restored = [_to_audit_entry(entry) for entry in document["entries"]]
    assert restored == entries
    verifier = ChainVerifier()
    for entry in restored:
        verifier.feed(entry)


# --- appending under competition (a stand-in for the audit collection) ----------------------


class ContestedAudit:
    """The audit collection as seen while another process appends at the worst moments.

    Just before our insert of a batch starting at a sequence number in ``stolen``, a
    competitor links its own one-entry batch to the current newest entry and inserts it, as
    a second appender that read the head just then would.
    """

    def __init__(self, stolen: set[int]) -> None:
        self.batches: dict[int, dict[str, Any]] = {}
        self.stolen = stolen
        self.competitor_events = iter(events(1000, start=1000))

    def with_options(self, **_: Any) -> ContestedAudit:
        return self

    async def find_one(
        self, selector: Mapping[str, Any], projection: Mapping[str, Any], sort: Any
    ) -> dict[str, Any] | None:
        assert (selector, sort) == ({}, [("_id", -1)])
        assert projection == {"last": True, "entries": {"$slice": -1}}
        if not self.batches:
            return None
        newest = through_bson(self.batches[max(self.batches)])
        return {"_id": newest["_id"], "last": newest["last"], "entries": newest["entries"][-1:]}

    async def insert_one(self, document: dict[str, Any]) -> None:
        if document["_id"] in self.stolen:
            self.stolen.discard(document["_id"])
            newest = self.chain()[-1].head if self.batches else vault.audit.GENESIS
            theirs = link(newest, [next(self.competitor_events)])
            self.batches[theirs[0].seq] = _audit_document(theirs)
        if document["_id"] in self.batches:
            raise DuplicateKeyError("E11000 duplicate key", 11000, {"codeName": "DuplicateKey"})
        self.batches[document["_id"]] = document

    def chain(self) -> list[AuditEntry]:
        """Every stored entry in order, checked: no gap, no repeat, every link intact."""
        entries = [
            _to_audit_entry(entry)
            for first in sorted(self.batches)
            for entry in self.batches[first]["entries"]
        ]
        verifier = ChainVerifier()
        for entry in entries:
            verifier.feed(entry)
        return entries


@pytest.fixture
async def store() -> AsyncIterator[MongoStore]:
    opened = MongoStore(AsyncMongoClient(URL, **client_options(URL)), URL)
    yield opened
    await opened.close()


@pytest.mark.parametrize(
    ("already", "stolen"),
    [(0, set()), (0, {1}), (2, {3}), (0, {1, 2})],
    ids=["alone", "first", "after-others", "twice"],
)
async def test_an_append_that_loses_a_race_links_again_in_one_piece(
    store: MongoStore, already: int, stolen: set[int]
) -> None:
    audit = ContestedAudit(set())
    store._audit = audit  # type: ignore[assignment]
    await store.append_audit(events(already, start=100))
    audit.stolen = set(stolen)
    mine = events(2)
    stored = await store.append_audit(mine)
    assert [entry.event for entry in stored] == mine
    first = already + len(stolen) + 1
    assert [entry.seq for entry in stored] == [first, first + 1]
    assert audit.chain()[-2:] == stored  # gap-free and linked, competitors' entries included


async def test_an_endlessly_contested_append_gives_up_as_unavailable(
    store: MongoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vault.mongo, "AUDIT_APPEND_ATTEMPTS", 3)
    audit = ContestedAudit({1, 2, 3})
    store._audit = audit  # type: ignore[assignment]
    with pytest.raises(VaultUnavailable, match="too contended; 2 entries were not written"):
        await store.append_audit(events(2))
    assert len(audit.chain()) == 3


async def test_a_large_append_lands_in_document_sized_pieces(
    store: MongoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vault.mongo, "AUDIT_DOCUMENT_ENTRIES", 2)
    audit = ContestedAudit(set())
    store._audit = audit  # type: ignore[assignment]
    stored = await store.append_audit(events(5))
    assert audit.chain() == stored
    assert sorted(audit.batches) == [1, 3, 5]
    assert [batch["last"] for _, batch in sorted(audit.batches.items())] == [2, 4, 5]


async def test_appending_nothing_writes_nothing(store: MongoStore) -> None:
    audit = ContestedAudit(set())
    store._audit = audit  # type: ignore[assignment]
    assert await store.append_audit([]) == []
    assert audit.batches == {}


# --- URLs as shown --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("sqlite:////var/lib/zandd/vault.db", "sqlite:////var/lib/zandd/vault.db"),
        ("mongodb://db1,db2/zandd?replicaSet=rs0", "mongodb://db1,db2/zandd?replicaSet=rs0"),
        (f"mongodb://zandd:{PASSWORD}@db1:27017,db2/zandd", "mongodb://zandd:***@db1:27017,db2/zandd"),
        ("mongodb://zandd:p%40ss%2Fword@db/?w=1", "mongodb://zandd:***@db/?w=1"),
        (
            "mongodb+srv://db.example/zandd?authMechanism=MONGODB-AWS"
            "&authMechanismProperties=AWS_SESSION_TOKEN:tok%2Fen",
            "mongodb+srv://db.example/zandd?authMechanism=MONGODB-AWS&authMechanismProperties=***",
        ),
        ("mongodb://zandd:pw@[::1/zandd", "mongodb://zandd:***@[::1/zandd"),
        # Unescaped URL delimiters in a password must not make it pass for the path.
        ("mongodb://zandd:pa#ss@db/zandd", "mongodb://zandd:***@db/zandd"),
        ("mongodb://zandd:pa?ss/x@db/zandd", "mongodb://zandd:***@db/zandd"),
    ],
)  # fmt: skip
def test_urls_are_shown_without_secrets(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_scrub_removes_every_spelling_of_a_secret() -> None:
    url = "mongodb://zandd:p%40ss%2Fword@db/?tlsCertificateKeyFilePassword=k%20ey"
    assert set(url_secrets(url)) >= {"p%40ss%2Fword", "p@ss/word", "k%20ey", "k ey"}
    text = "auth p@ss/word failed; p%40ss%2Fword; key k ey"
    assert scrub(text, url) == "auth *** failed; ***; key ***"


# --- key heads, against collections in memory -----------------------------------------------


class _Found:
    def __init__(self, documents: list[dict[str, Any]]) -> None:
        self._documents = documents

    async def to_list(self) -> list[dict[str, Any]]:
        return self._documents


class _Updated:
    def __init__(self, matched_count: int) -> None:
        self.matched_count = matched_count


def _value(document: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(document, Mapping):
            return None
        document = document.get(part)  # type: ignore[assignment]
    return document


def _matches(document: Mapping[str, Any], query: Mapping[str, Any]) -> bool:
    for name, wanted in query.items():
        value = _value(document, name)
        if isinstance(wanted, dict) and "$in" in wanted:
            if value not in wanted["$in"]:
                return False
        elif value != wanted:
            return False
    return True


def _projected(document: dict[str, Any], projection: Mapping[str, Any] | None) -> dict[str, Any]:
    """``document`` as MongoDB projects it: ``_id`` left out on request, and with inclusions,
    only the paths named (a dotted path through a value that is not a document: left out)."""
    if not projection:
        return document
    included = [name for name, wanted in projection.items() if wanted and name != "_id"]
    if not included:
        if projection.get("_id", True) is False:
            document.pop("_id", None)
        return document
    kept: dict[str, Any] = {}
    if projection.get("_id", True) and "_id" in document:
        kept["_id"] = document["_id"]
    for path in included:
        *parents, leaf = path.split(".")
        source: Any = document
        for part in parents:
            source = source.get(part)
            if not isinstance(source, Mapping):
                break
        else:
            target = kept
            for part in parents:
                target = target.setdefault(part, {})
            if leaf in source:
                target[leaf] = source[leaf]
    return kept


class MemoryCollection:
    """The few collection calls the key methods make, with MongoDB's meaning, in memory."""

    def __init__(self) -> None:
        self.documents: list[dict[str, Any]] = []

    def find(self, query: Mapping[str, Any], projection: Any = None, sort: Any = None) -> _Found:
        found = [through_bson(d) for d in self.documents if _matches(d, query)]
        for name, direction in reversed(sort or []):
            found.sort(key=lambda d, n=name: d[n], reverse=direction < 0)
        return _Found([_projected(document, projection) for document in found])

    async def find_one(
        self, query: Mapping[str, Any], projection: Any = None, sort: Any = None
    ) -> dict[str, Any] | None:
        found = await self.find(query, projection, sort).to_list()
        return found[0] if found else None

    async def insert_one(self, document: dict[str, Any]) -> None:
        self.documents.append(dict(document))

    async def update_one(
        self, query: Mapping[str, Any], update: Mapping[str, Any], upsert: bool = False
    ) -> _Updated:
        target = next((d for d in self.documents if _matches(d, query)), None)
        if target is None:
            if not upsert:
                return _Updated(0)
            target = dict(query)
            self.documents.append(target)
        target.update(update.get("$set", {}))
        for name, value in update.get("$max", {}).items():
            target[name] = max(target.get(name, value), value)
        return _Updated(1)


@pytest.fixture
def memory_store(store: MongoStore) -> MongoStore:
    store._keys = MemoryCollection()  # type: ignore[assignment]
    store._heads = MemoryCollection()  # type: ignore[assignment]
    return store


async def test_mongo_refuses_a_document_put_back_from_an_older_copy(
    memory_store: MongoStore,
) -> None:
    first = await memory_store.create_key(record(version=1))
    second = record(version=1, state=KeyState.DISABLED, generation=2)
    assert await memory_store.replace_key(second, first)
    assert await memory_store.replace_key(record(version=1, generation=2), first) is False
    assert await memory_store.get_key(first.key_id) == second
    keys: MemoryCollection = memory_store._keys  # type: ignore[assignment]
    keys.documents[0].update(state="enabled", generation=1)  # a vault writer's restore
    reads = (
        memory_store.get_key(first.key_id),
        memory_store.get_key(first.key_id, 1),
        memory_store.find_by_request_id("req-1", owner=first.owner),
        memory_store.list_versions(),
        memory_store.list_versions(first.key_id),
    )
    for read in reads:
        with pytest.raises(IntegrityError, match="generation 1, but the vault wrote generation 2"):
            await read


async def test_mongo_replaces_a_document_from_before_generations(
    memory_store: MongoStore,
) -> None:
    legacy = record(version=1)
    await memory_store.create_key(legacy)
    keys: MemoryCollection = memory_store._keys  # type: ignore[assignment]
    del keys.documents[0]["generation"], keys.documents[0]["mac"]
    heads: MemoryCollection = memory_store._heads  # type: ignore[assignment]
    heads.documents.clear()
    maced = record(
        version=1, generation=2, mac=RecordMac("kek-20261128-0a0b0c0d", bytes(range(32)))
    )
    assert await memory_store.replace_key(maced, legacy)
    assert await memory_store.get_key(legacy.key_id) == maced
    assert heads.documents == [{"_id": {"key_id": legacy.key_id, "version": 1}, "generation": 2}]


# --- issue 19: key_stamps, against collections in memory -------------------------------------


def maced(key_id: str, version: int = 1) -> KeyRecord:
    return record(
        key_id=key_id,
        version=version,
        request_id=None,
        mac=RecordMac("kek-20261128-0a0b0c0d", os.urandom(32)),
    )


async def test_mongo_key_stamps_asks_in_chunks_for_four_fields(
    memory_store: MongoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vault.mongo, "STAMPS_CHUNK", 2)
    made = [await memory_store.create_key(maced(f"key-{n}")) for n in range(5)]
    newer = await memory_store.create_key(maced("key-4", version=2))
    keys: MemoryCollection = memory_store._keys  # type: ignore[assignment]
    asked: list[tuple[Any, Any]] = []
    answered: list[dict[str, Any]] = []
    find = keys.find

    def recording(query: Mapping[str, Any], projection: Any = None, sort: Any = None) -> _Found:
        asked.append((query, projection))
        found = find(query, projection, sort)
        answered.extend(found._documents)
        return found

    monkeypatch.setattr(keys, "find", recording)
    wanted = ["key-0", "key-1", "key-0", "key-3", "key-4", "key-nope"]
    found = await memory_store.key_stamps(wanted)
    assert found == {
        ("key-0", 1): KeyStamp.of(made[0]),
        ("key-1", 1): KeyStamp.of(made[1]),
        ("key-3", 1): KeyStamp.of(made[3]),
        ("key-4", 1): KeyStamp.of(made[4]),
        ("key-4", 2): KeyStamp.of(newer),
    }
    assert all(stamp.mac_tag is not None for stamp in found.values())
    assert [query for query, _ in asked] == [
        {"key_id": {"$in": ["key-0", "key-1"]}},
        {"key_id": {"$in": ["key-3", "key-4"]}},
        {"key_id": {"$in": ["key-nope"]}},
    ]
    assert {str(projection) for _, projection in asked} == {
        str({"_id": False, "key_id": True, "version": True, "generation": True, "mac.tag": True})
    }
    # Nothing else comes back: not the sealed key, not the MAC's KEK id.
    assert {str(sorted(document)) for document in answered} == {
        str(["generation", "key_id", "mac", "version"])
    }
    assert all(list(document["mac"]) == ["tag"] for document in answered)
    assert await memory_store.key_stamps([]) == {}
    assert len(asked) == 3  # nothing asked for nothing


async def test_mongo_key_stamps_reads_legacy_and_malformed_documents(
    memory_store: MongoStore,
) -> None:
    made = [await memory_store.create_key(maced(f"key-{n}")) for n in range(6)]
    tags = [stamp.mac_tag for stamp in map(KeyStamp.of, made)]
    keys: MemoryCollection = memory_store._keys  # type: ignore[assignment]
    documents = keys.documents
    # From before record MACs: generation 1, as get_key reads it, and no tag.
    del documents[0]["generation"], documents[0]["mac"]
    documents[1]["generation"] = "7"  # malformed: matches no cached record
    documents[2]["version"] = "1"  # malformed: no version to report
    documents[3]["mac"] = None  # written without a MAC
    documents[4]["mac"] = {"kek_id": "kek-20261128-0a0b0c0d", "tag": "not bytes"}
    documents[5]["mac"] = "not a document"
    assert await memory_store.key_stamps([f"key-{n}" for n in range(6)]) == {
        ("key-0", 1): KeyStamp(1, None),
        ("key-1", 1): KeyStamp(0, tags[1]),
        ("key-3", 1): KeyStamp(1, None),
        ("key-4", 1): KeyStamp(1, None),
        ("key-5", 1): KeyStamp(1, None),
    }
