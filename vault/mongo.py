"""The MongoDB vault backend, shared by a fleet of hosts; install it with ``zandd-hsm[mongo]``.

Built on PyMongo's native asyncio API (``AsyncMongoClient``, stable since PyMongo 4.13) rather
than Motor, which MongoDB deprecated in its favour. Defaults suit a replica set: writes wait
for a majority (an acknowledged key survives a fail-over), reads see majority-committed data,
writes and reads are retried once after a network error, and every wait is bounded so a
missing server turns into a retryable ``vault_unavailable`` instead of a hung worker. Any of
these can be overridden by the URL's own options, e.g. ``mongodb://h1,h2,h3/zandd?
replicaSet=rs0&readConcernLevel=local``; the URL's path names the database (default ``zandd``).

The backend only stores and reads documents; uniqueness is the server's job (unique indexes),
so concurrent writers in several processes or hosts need no lock of ours and no transaction
(which a standalone server would not have): ``keys`` holds one document per key version,
unique on (key_id, version) and on (created_by, request_id); ``audit`` one document per
appended batch of entries, unique on its first sequence number; ``meta`` the schema version;
``key_heads`` the highest generation written of each key version (see
``vault.records.check_head``).
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Final

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, IndexModel, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import ConfigurationError as PyMongoConfigurationError
from pymongo.errors import (
    ConnectionFailure,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
)
from pymongo.read_concern import ReadConcern
from pymongo.read_preferences import ReadPreference

from contracts.errors import (
    ConfigurationError,
    IntegrityError,
    KeyNotFound,
    VaultUnavailable,
    ZanddError,
)
from contracts.urls import redact_url, scrub
from vault.aliases import AliasRecord, check_alias_replacement
from vault.audit import GENESIS, AuditEntry, AuditEvent, AuditQuery, ChainHead, link
from vault.audit_chain import ChainKey
from vault.audit_checkpoint import READ_PAGE_CHECKPOINTS, Checkpoint
from vault.listing import MAX_EXAMINED, KeyListQuery, KeyPage
from vault.records import (
    KeyRecord,
    KeyStamp,
    KeyState,
    RecordMac,
    check_head,
    check_replacement,
)
from vault.sealing import SealedKey

Document = dict[str, Any]

DEFAULT_DATABASE: Final = "zandd"
#: 2: request ids are unique per owner (index ``owner_request_id``), no longer vault-wide.
#: 3: audit entries may say ``redelivered`` (absent: not), which older software would not put
#: into an entry's link: it must not read (or verify) such a log.
#: 4 (issue 15): key versions may carry ``rotation_period_s`` and ``next_rotation_at``, which
#: their MACs cover and older software would not: it must not read such a vault.
SCHEMA_VERSION: Final = 4
KEYS_COLLECTION: Final = "keys"
AUDIT_COLLECTION: Final = "audit"
META_COLLECTION: Final = "meta"
HEADS_COLLECTION: Final = "key_heads"
#: TPM-signed audit checkpoints, ``_id`` the checkpointed entry's sequence number. A new
#: collection needs no schema step: nothing reads it but the code that writes it.
CHECKPOINTS_COLLECTION: Final = "audit_checkpoints"
_SCHEMA_ID: Final = "schema"
#: issue 15, aliases: one document per alias, ``_id`` the alias (so unique by construction).
#: Like the checkpoints, a new collection needs no schema step: nothing reads it but the code
#: that writes it, and older software refuses an alias on the wire (its schema has none).
ALIASES_COLLECTION: Final = "aliases"
_ALIAS_INDEXES: Final = (
    IndexModel([("key_id", ASCENDING), ("_id", ASCENDING)], name="alias_key"),
    IndexModel([("owner", ASCENDING), ("_id", ASCENDING)], name="alias_owner"),
)

# Applied only where the URL does not set the option itself (PyMongo lets keyword arguments
# win over the URL, so they are left out rather than passed).
DEFAULT_CLIENT_OPTIONS: Final[Mapping[str, Any]] = {
    "w": "majority",
    "readConcernLevel": "majority",
    "retryWrites": True,
    "retryReads": True,
    "serverSelectionTimeoutMS": 5_000,
    "connectTimeoutMS": 5_000,
    "socketTimeoutMS": 10_000,
    "appname": "zandd",
}

# Server error codes that mean "wrong credentials or rights": fix the set-up, do not retry.
_AUTH_ERROR_CODES: Final = frozenset({13, 18})  # Unauthorized, AuthenticationFailed
# Each lost race means another appender went ahead, so this bounds the wait under contention
# by that many other appenders' batches.
AUDIT_APPEND_ATTEMPTS: Final = 100
# Entries per audit document: far below the 16 MiB document limit, and as many as a reader
# pages through at once (vault.audit.READ_PAGE_ENTRIES).
AUDIT_DOCUMENT_ENTRIES: Final = 1000
_MESSAGE_LIMIT = 300
_INDEX_NOT_FOUND: Final = 27
#: The vault-wide request id index of schema 1, dropped by the upgrade to 2.
_OLD_REQUEST_ID_INDEX: Final = "request_id"

_KEY_INDEXES: Final = (
    IndexModel([("key_id", ASCENDING), ("version", ASCENDING)], unique=True, name="key_version"),
    # A request id is the idempotency key of its owner only. Partial: records created without
    # a request id must not collide on null.
    IndexModel(
        [("created_by", ASCENDING), ("request_id", ASCENDING)],
        unique=True,
        name="owner_request_id",
        partialFilterExpression={"request_id": {"$type": "string"}},
    ),
    # Partial: only the versions waiting for destruction, which every lifecycle request asks
    # for (list_due). Created on open, so existing databases gain it without a migration.
    IndexModel(
        [("destroy_after", ASCENDING)],
        name="pending_destruction",
        partialFilterExpression={"state": KeyState.PENDING_DESTRUCTION.value},
    ),
    # key.list (vault.listing): an owner's keys and a signer's (multikey on allowed_signers)
    # in key id order, highest version first. Created on open, like the others.
    IndexModel(
        [("created_by", ASCENDING), ("key_id", ASCENDING), ("version", DESCENDING)],
        name="owner_keys",
    ),
    IndexModel(
        [("allowed_signers", ASCENDING), ("key_id", ASCENDING), ("version", DESCENDING)],
        name="signer_keys",
    ),
    # issue 15: partial, only the primary versions of keys with a rotation scheduled, which
    # the keygen worker's due check asks for (list_rotation_due).
    IndexModel(
        [("next_rotation_at", ASCENDING)],
        name="rotation_due",
        partialFilterExpression={"next_rotation_at": {"$type": "string"}},
    ),
)
# One audit document holds one appended batch, ``_id`` its first sequence number and ``last``
# its last: the unique _id is what makes two appenders that read the same head collide
# instead of forking the chain, and one document is written whole or not at all.
_AUDIT_INDEXES: Final = (
    IndexModel([("last", ASCENDING)], name="last_seq"),
    IndexModel([("entries.key_id", ASCENDING), ("_id", ASCENDING)], name="key_id_seq"),
    IndexModel([("entries.principal", ASCENDING), ("_id", ASCENDING)], name="principal_seq"),
)
#: key_stamps: key ids per query (the ``key_version`` index), so no query nears the 16 MiB
#: command limit whatever the ids' length.
STAMPS_CHUNK: Final = 1000
_STAMP_FIELDS: Final = {
    "_id": False,
    "key_id": True,
    "version": True,
    "generation": True,
    "mac.tag": True,
}
_NO_ID: Final = {"_id": False}
_BY_KEY_VERSION: Final = [("key_id", ASCENDING), ("version", ASCENDING)]
_BY_KEY_NEWEST_FIRST: Final = [("key_id", ASCENDING), ("version", DESCENDING)]
_LATEST_PER_KEY: Final[list[Document]] = [
    {"$sort": {"key_id": ASCENDING, "version": DESCENDING}},
    {"$group": {"_id": "$key_id", "latest": {"$first": "$$ROOT"}}},
    {"$replaceRoot": {"newRoot": "$latest"}},
    {"$project": _NO_ID},
    {"$sort": {"created_at": ASCENDING, "key_id": ASCENDING}},
]

# Every KEK a version needs: the one that sealed it and the one its MAC key comes from
# (counted once when they are the same; a destroyed version needs only its MAC's).
_KEK_USAGE: Final[list[Document]] = [
    {"$project": {"keks": {"$setDifference": [["$sealed.kek_id", "$mac.kek_id"], [None]]}}},
    {"$unwind": "$keks"},
    {"$group": {"_id": "$keks", "count": {"$sum": 1}}},
]


class MongoStore:
    """A VaultStore on one MongoDB database; open it with ``await MongoStore.open(url)``."""

    def __init__(self, client: AsyncMongoClient[Document], url: str) -> None:
        """Use ``open``: it connects, checks the schema and creates the indexes."""
        self._client = client
        self._url = url
        self._shown = redact_url(url)
        database = client.get_default_database(DEFAULT_DATABASE)
        self._keys: AsyncCollection[Document] = database[KEYS_COLLECTION]
        self._audit: AsyncCollection[Document] = database[AUDIT_COLLECTION]
        self._meta: AsyncCollection[Document] = database[META_COLLECTION]
        self._heads: AsyncCollection[Document] = database[HEADS_COLLECTION]
        self._checkpoints: AsyncCollection[Document] = database[CHECKPOINTS_COLLECTION]
        self._aliases: AsyncCollection[Document] = database[ALIASES_COLLECTION]
        self._closed = False

    @classmethod
    async def open(cls, url: str) -> MongoStore:
        """Connect, check the schema version and create the indexes (idempotent)."""
        options = client_options(url)
        try:
            # Nothing connects yet (the async client connects on first use), so a bad URL or
            # database name fails here with nothing to close.
            with warnings.catch_warnings():
                # PyMongo only warns about an invalid or unknown URL option, then ignores it:
                # a mistyped readConcernLevel must not quietly weaken the vault.
                warnings.simplefilter("error", UserWarning)
                client: AsyncMongoClient[Document] = AsyncMongoClient(url, **options)
            store = cls(client, url)
        except (PyMongoError, UserWarning, ValueError, TypeError) as exc:
            raise ConfigurationError(
                f"invalid MongoDB vault URL {redact_url(url)}: {_describe(exc, url)}"
            ) from exc
        try:
            await store._prepare()
        except BaseException:
            await client.close()
            raise
        return store

    async def create_key(self, record: KeyRecord) -> KeyRecord:
        """Insert ``record``; on a known request id return the record that request created."""
        with self._translated():
            try:
                await self._keys.insert_one(_to_document(record))
            except DuplicateKeyError as exc:
                # The unique indexes arbitrate between concurrent creators on any host: the
                # loser reads back the winner's record.
                existing = None
                if record.request_id is not None:
                    existing = await self._find_winner(record.owner, record.request_id)
                if existing is None:
                    raise IntegrityError(
                        f"key {record.key_id} version {record.version} already exists"
                    ) from exc
                return existing
            await self._raise_head(record)
        return record

    async def get_key(self, key_id: str, version: int | None = None) -> KeyRecord:
        """The given version of a key, or its latest; KeyNotFound if there is none."""
        with self._translated():
            heads = await self._heads_of({"_id.key_id": key_id})
            if version is not None:
                found = await self._keys.find_one({"key_id": key_id, "version": version}, _NO_ID)
                if found is not None:
                    return _to_record(found, heads)
            latest = await self._keys.find_one(
                {"key_id": key_id}, _NO_ID, sort=[("version", DESCENDING)]
            )
        if latest is None:
            raise KeyNotFound(f"key {key_id} not found")
        if version is not None:
            raise KeyNotFound(f"key {key_id} has no version {version}")
        return _to_record(latest, heads)

    async def find_by_request_id(self, request_id: str, *, owner: str) -> KeyRecord | None:
        """The record ``owner``'s request ``request_id`` created, if any."""
        with self._translated():
            query = {"created_by": owner, "request_id": request_id}
            found = await self._keys.find_one(query, _NO_ID)
            if found is None:
                return None
            # The key id comes from a first read; the heads read after it are a floor for a
            # second read of the record (see _raise_head), not for the first.
            heads = await self._heads_of({"_id.key_id": found.get("key_id")})
            found = await self._keys.find_one(query, _NO_ID)
        return None if found is None else _to_record(found, heads)

    async def key_stamps(self, key_ids: Collection[str]) -> dict[tuple[str, int], KeyStamp]:
        """The generation and MAC tag of every version of ``key_ids``: one ``find`` with
        ``$in`` per ``STAMPS_CHUNK`` ids, only those four fields read (index ``key_version``).

        A document from before record MACs, without a generation, is generation 1 (as
        ``get_key`` reads it) without a tag; a malformed generation answers 0 and a malformed
        tag None, which match no cached record (a cached record has a MAC).
        """
        wanted = list(dict.fromkeys(key_ids))
        found: dict[tuple[str, int], KeyStamp] = {}
        with self._translated():
            for start in range(0, len(wanted), STAMPS_CHUNK):
                chunk = wanted[start : start + STAMPS_CHUNK]
                query = {"key_id": {"$in": chunk}}
                for document in await self._keys.find(query, _STAMP_FIELDS).to_list():
                    key_id, version = document.get("key_id"), document.get("version")
                    if isinstance(key_id, str) and isinstance(version, int):
                        found[key_id, version] = KeyStamp(_generation(document), _mac_tag(document))
        return found

    async def list_keys(self) -> list[KeyRecord]:
        """The latest version of every key, ordered by ``created_at``."""
        with self._translated():
            heads = await self._heads_of({})
            cursor = await self._keys.aggregate(_LATEST_PER_KEY)
            documents = await cursor.to_list()
        return [_to_record(document, heads) for document in documents]

    async def list_versions(
        self, key_id: str | None = None, *, state: KeyState | None = None
    ) -> list[KeyRecord]:
        """Every version of one key (or all keys), optionally in one state; by key id, version."""
        query: Document = {}
        if key_id is not None:
            query["key_id"] = key_id
        if state is not None:
            query["state"] = state.value
        with self._translated():
            heads = await self._heads_of({} if key_id is None else {"_id.key_id": key_id})
            documents = await self._keys.find(query, _NO_ID, sort=_BY_KEY_VERSION).to_list()
        return [_to_record(document, heads) for document in documents]

    async def list_key_page(self, query: KeyListQuery) -> KeyPage:
        """One page of current versions by key id (``vault.listing``), through the indexes
        ``owner_keys``, ``signer_keys`` or ``key_version``.

        The matching versions are read in key id order, newest first, a batch at a time: the
        first of each key is its newest match, kept when it is the key's current version.
        After ``MAX_EXAMINED`` versions the page is returned as it is, with a cursor.
        """
        found: list[KeyRecord] = []
        after, examined = query.after or "", 0
        batch = min(query.limit + 1, MAX_EXAMINED)
        with self._translated():
            while True:
                documents = await self._keys.find(
                    _page_filter(query, after),
                    {"_id": False, "key_id": True, "version": True},
                    sort=_BY_KEY_NEWEST_FIRST,
                    limit=batch,
                ).to_list()
                examined += len(documents)
                newest: dict[str, int] = {}
                for document in documents:
                    newest.setdefault(str(document.get("key_id")), int(document.get("version", 0)))
                found += await self._current_of(newest, query)
                if len(found) > query.limit:
                    page = found[: query.limit]
                    return KeyPage(page, page[-1].key_id)
                if len(documents) < batch:
                    return KeyPage(found, None)
                after = str(documents[-1].get("key_id"))
                if examined >= MAX_EXAMINED:
                    return KeyPage(found, after)

    async def _current_of(self, newest: dict[str, int], query: KeyListQuery) -> list[KeyRecord]:
        """The records of ``newest`` (key id → a version) that are their key's current
        version and still match ``query``, by key id."""
        if not newest:
            return []
        cursor = await self._keys.aggregate(
            [
                {"$match": {"key_id": {"$in": list(newest)}}},
                {"$group": {"_id": "$key_id", "current": {"$max": "$version"}}},
            ]
        )
        current = {str(d.get("_id")): d.get("current") for d in await cursor.to_list()}
        chosen = [(key_id, v) for key_id, v in newest.items() if current.get(key_id) == v]
        if not chosen:
            return []
        # As in list_due: the heads are a floor for a second read of the records.
        heads = await self._heads_of({"_id.key_id": {"$in": [key_id for key_id, _ in chosen]}})
        documents = await self._keys.find(
            {"$or": [{"key_id": key_id, "version": v} for key_id, v in chosen]}, _NO_ID
        ).to_list()
        records = [_to_record(document, heads) for document in documents]
        return sorted((r for r in records if query.matches(r)), key=lambda r: r.key_id)

    async def list_due(self, now: datetime) -> list[KeyRecord]:
        """Versions pending destruction due at ``now`` (index pending_destruction)."""
        query = {
            "state": KeyState.PENDING_DESTRUCTION.value,
            "destroy_after": {"$lte": _timestamp(now)},
        }
        with self._translated():
            due = await self._keys.find(query, {"key_id": 1}).to_list()
            if not due:
                return []
            # As in find_by_request_id: the heads are a floor for a second read of the records.
            key_ids = sorted({str(document.get("key_id")) for document in due})
            heads = await self._heads_of({"_id.key_id": {"$in": key_ids}})
            documents = await self._keys.find(query, _NO_ID, sort=_BY_KEY_VERSION).to_list()
        return [_to_record(document, heads) for document in documents]

    async def list_rotation_due(self, now: datetime) -> list[KeyRecord]:
        """Versions whose ``next_rotation_at`` is at or before ``now`` (index rotation_due)."""
        query = {"next_rotation_at": {"$type": "string", "$lte": _timestamp(now)}}
        with self._translated():
            due = await self._keys.find(query, {"key_id": 1}).to_list()
            if not due:
                return []
            # As in list_due: the heads are a floor for a second read of the records.
            key_ids = sorted({str(document.get("key_id")) for document in due})
            heads = await self._heads_of({"_id.key_id": {"$in": key_ids}})
            documents = await self._keys.find(query, _NO_ID, sort=_BY_KEY_VERSION).to_list()
        return [_to_record(document, heads) for document in documents]

    async def kek_usage(self) -> dict[str, int]:
        """Key versions per KEK id they need: to open their sealed key or check their MAC."""
        with self._translated():
            cursor = await self._keys.aggregate(_KEK_USAGE)
            documents = await cursor.to_list()
        return {str(document["_id"]): int(document["count"]) for document in documents}

    async def replace_key(self, record: KeyRecord, expected: KeyRecord) -> bool:
        """Compare-and-set state, destroy_after, key material, generation, MAC, label, allowed
        signers and rotation schedule in one document update.

        Erasing: the update removes the ciphertext from the document. Older copies that
        MongoDB keeps for a while (the oplog entry of the insert until the oplog rolls over,
        freed blocks until reused, backups) are beyond a client's reach.
        """
        check_replacement(record, expected)
        query: Document = {
            "key_id": expected.key_id,
            "version": expected.version,
            "state": expected.state.value,
        }
        # Documents from before record MACs have no generation field: they are generation 1.
        if expected.generation == 1:
            query["generation"] = {"$in": [1, None]}
        else:
            query["generation"] = expected.generation
        if expected.sealed is None:
            query["sealed"] = None
        else:
            query["sealed.kek_id"] = expected.sealed.kek_id
            query["sealed.nonce"] = expected.sealed.nonce
        document = _to_document(record)
        changed = (
            "state",
            "destroy_after",
            "sealed",
            "tpm_blob",
            "generation",
            "mac",
            "label",
            "allowed_signers",
            "rotation_period_s",
            "next_rotation_at",
        )
        update = {"$set": {name: document.get(name) for name in changed}}
        with self._translated():
            result = await self._keys.update_one(query, update)
            if result.matched_count != 1:
                return False
            await self._raise_head(record)
        return True

    async def append_audit(
        self, events: Sequence[AuditEvent], chain_key: ChainKey | None = None
    ) -> list[AuditEntry]:
        """Chain ``events`` (keyed under ``chain_key`` when given) after the newest entry in one
        document; durable (majority) on return.

        No transaction (a standalone server has none): of the appenders that read the same
        head, the unique ``_id`` (the batch's first sequence number) lets exactly one insert
        its batch; the others re-read the head and link again. So numbers never repeat or
        skip, every entry links to the one stored before it, and a batch lands in one piece
        (one above AUDIT_DOCUMENT_ENTRIES events lands in pieces of that size).
        """
        stored: list[AuditEntry] = []
        with self._translated():
            for start in range(0, len(events), AUDIT_DOCUMENT_ENTRIES):
                batch = events[start : start + AUDIT_DOCUMENT_ENTRIES]
                stored += await self._append_batch(batch, chain_key)
        return stored

    def append_audit_now(
        self, events: Sequence[AuditEvent], chain_key: ChainKey | None = None
    ) -> list[AuditEntry] | None:
        """Never: a MongoDB write is a network round trip, not something to block a loop on."""
        return None

    async def read_audit(self, query: AuditQuery) -> list[AuditEntry]:
        """Audit entries matching ``query``, oldest first."""
        if query.limit < 1:
            return []  # MongoDB refuses a $limit of 0
        with self._translated():
            cursor = await self._audit.aggregate(_audit_pipeline(query))
            documents = await cursor.to_list()
        entries = [_to_audit_entry(document) for document in documents]
        return entries[::-1] if query.latest else entries

    async def add_checkpoint(self, checkpoint: Checkpoint) -> bool:
        """Store a TPM-signed checkpoint (majority); False when its number already has one."""
        document = {
            "_id": checkpoint.seq,
            "link": checkpoint.link,
            "at": checkpoint.at,
            "signature": checkpoint.signature,
        }
        with self._translated():
            try:
                await self._checkpoints.insert_one(document)
            except DuplicateKeyError:
                return False
        return True

    async def read_checkpoints(
        self, after_seq: int = 0, limit: int = READ_PAGE_CHECKPOINTS, *, latest: bool = False
    ) -> list[Checkpoint]:
        """Checkpoints after ``after_seq`` (the newest ``limit`` with ``latest``), oldest first."""
        if limit < 1:
            return []
        order = DESCENDING if latest else ASCENDING
        with self._translated():
            cursor = self._checkpoints.find({"_id": {"$gt": after_seq}}, sort=[("_id", order)])
            documents = await cursor.limit(limit).to_list()
        found = [_to_checkpoint(document) for document in documents]
        return found[::-1] if latest else found

    # ---- issue 15, aliases ----

    async def get_alias(self, alias: str) -> AliasRecord | None:
        """The alias document, or None."""
        with self._translated():
            found = await self._aliases.find_one({"_id": alias})
        return None if found is None else _to_alias(found)

    async def list_aliases(
        self, *, key_id: str | None = None, owner: str | None = None
    ) -> list[AliasRecord]:
        """Every alias (of one key, of one owner), by alias."""
        query: Document = {}
        if key_id is not None:
            query["key_id"] = key_id
        if owner is not None:
            query["owner"] = owner
        with self._translated():
            return [_to_alias(d) async for d in self._aliases.find(query).sort("_id", ASCENDING)]

    async def put_alias(self, record: AliasRecord, expected: AliasRecord | None) -> bool:
        """Insert (``expected`` None) or compare-and-set an alias; False if it changed first."""
        check_alias_replacement(record, expected)
        document = _alias_document(record)
        with self._translated():
            if expected is None:
                try:
                    await self._aliases.insert_one(document)
                except DuplicateKeyError:
                    return False
                return True
            result = await self._aliases.replace_one(
                {"_id": record.alias, "generation": expected.generation, "key_id": expected.key_id},
                document,
            )
        return result.modified_count == 1

    async def delete_alias(self, expected: AliasRecord) -> bool:
        """Delete the alias iff it is still ``expected``; False if it changed first."""
        with self._translated():
            result = await self._aliases.delete_one(
                {
                    "_id": expected.alias,
                    "generation": expected.generation,
                    "key_id": expected.key_id,
                }
            )
        return result.deleted_count == 1

    # ---- end issue 15, aliases ----

    async def close(self) -> None:
        """Close the client's connections; closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        await self._client.close()

    def __repr__(self) -> str:
        return f"MongoStore(url={self._shown!r})"

    async def _prepare(self) -> None:
        with self._translated():
            schema = await self._meta.find_one_and_update(
                {"_id": _SCHEMA_ID},
                {"$setOnInsert": {"version": SCHEMA_VERSION}},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
            version = schema["version"] if schema is not None else SCHEMA_VERSION
            if version > SCHEMA_VERSION:
                raise ConfigurationError(
                    f"MongoDB vault {self._shown} has schema version {version}; this software "
                    f"knows only up to {SCHEMA_VERSION}: upgrade zandd"
                )
            await self._keys.create_indexes(list(_KEY_INDEXES))
            await self._audit.create_indexes(list(_AUDIT_INDEXES))
            await self._aliases.create_indexes(list(_ALIAS_INDEXES))
            if version < SCHEMA_VERSION:
                await self._upgrade()

    async def _upgrade(self) -> None:
        # Schema 3 → 4 (issue 15) needs no change to the data either (the rotation fields are
        # absent from older versions: none) and its index is created above.
        # Schema 2 → 3 needs no change to the data (``redelivered`` is absent from older
        # entries, which reads as not redelivered): only the version, set last.
        # Schema 1 → 2. The per-owner index exists by now (a schema-1 vault satisfies it: its
        # request ids were unique vault-wide), so dropping the old one leaves no moment
        # without a unique request id index. Concurrent openers may both drop: one finds it gone.
        try:
            await self._keys.drop_index(_OLD_REQUEST_ID_INDEX)
        except OperationFailure as exc:
            if exc.code != _INDEX_NOT_FOUND:
                raise
        # $max: a concurrent opener that already upgraded is never set back.
        await self._meta.update_one({"_id": _SCHEMA_ID}, {"$max": {"version": SCHEMA_VERSION}})

    async def _find_winner(self, owner: str, request_id: str) -> KeyRecord | None:
        # The winner's insert is on the primary (it made ours fail) but may not be majority-
        # committed yet; a majority read could miss it, so read the primary's own data.
        found = await self._primary(self._keys).find_one(
            {"created_by": owner, "request_id": request_id}, _NO_ID
        )
        return None if found is None else _to_record(found, {})

    async def _raise_head(self, record: KeyRecord) -> None:
        # After the record's own write, never before: a head read first is then a floor for
        # the record read after it, so a reader racing a writer sees no false rollback. A
        # crash in between leaves the head one change behind, which only weakens the tripwire.
        await self._heads.update_one(
            {"_id": _head_id(record.key_id, record.version)},
            {"$max": {"generation": record.generation}},
            upsert=True,
        )

    async def _heads_of(self, query: Document) -> dict[tuple[str, int], int]:
        # Read before the records they guard (see _raise_head).
        heads: dict[tuple[str, int], int] = {}
        for document in await self._heads.find(query).to_list():
            head_id, generation = document.get("_id"), document.get("generation")
            # A malformed head guards nothing, like a missing one.
            if isinstance(head_id, dict) and isinstance(generation, int):
                heads[str(head_id.get("key_id")), head_id.get("version", 0)] = generation
        return heads

    async def _append_batch(
        self, events: Sequence[AuditEvent], chain_key: ChainKey | None
    ) -> list[AuditEntry]:
        for _attempt in range(AUDIT_APPEND_ATTEMPTS):
            entries = link(await self._audit_head(), events, chain_key)
            try:
                await self._audit.insert_one(_audit_document(entries))
            except DuplicateKeyError:
                continue  # another appender took these numbers first: link again
            return entries
        raise VaultUnavailable(
            f"MongoDB vault {self._shown}: the audit log is too contended; "
            f"{len(events)} entries were not written"
        )

    async def _audit_head(self) -> ChainHead:
        # The primary's own data: a majority read may lag behind the newest batch, and
        # linking to a stale head only loses the race again.
        newest = await self._primary(self._audit).find_one(
            {}, {"last": True, "entries": {"$slice": -1}}, sort=[("_id", DESCENDING)]
        )
        if newest is None:
            return GENESIS
        try:
            (last,) = newest["entries"]
            return ChainHead(seq=newest["last"], entry_hash=last["entry_hash"])
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"the newest audit batch (#{newest['_id']}) is malformed") from exc

    @staticmethod
    def _primary(collection: AsyncCollection[Document]) -> AsyncCollection[Document]:
        return collection.with_options(
            read_preference=ReadPreference.PRIMARY, read_concern=ReadConcern("local")
        )

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """Run a database step, turning PyMongo's errors into ours (without the URL's secrets)."""
        if self._closed:
            raise VaultUnavailable(f"MongoDB vault {self._shown} is closed")
        try:
            yield
        except PyMongoError as exc:
            raise translate_error(exc, self._url) from exc


def client_options(url: str) -> dict[str, Any]:
    """Our defaults for the options ``url`` leaves unset (keyword arguments would win)."""
    query = url.partition("?")[2]
    given = {option.partition("=")[0].lower() for option in query.split("&") if option}
    return {
        name: value for name, value in DEFAULT_CLIENT_OPTIONS.items() if name.lower() not in given
    }


def translate_error(exc: PyMongoError, url: str) -> ZanddError:
    """Our typed error for a PyMongo error; the message never carries the URL's secrets."""
    where = f"MongoDB vault {redact_url(url)}"
    detail = _describe(exc, url)
    if isinstance(exc, DuplicateKeyError):
        return IntegrityError(f"{where} refused a duplicate: {detail}")
    if isinstance(exc, OperationFailure) and exc.code in _AUTH_ERROR_CODES:
        return ConfigurationError(f"{where} refused our credentials or rights: {detail}")
    if isinstance(exc, PyMongoConfigurationError):
        return ConfigurationError(f"{where} is misconfigured: {detail}")
    if isinstance(exc, ConnectionFailure):
        return VaultUnavailable(f"{where} is unreachable: {detail}")
    # Timeouts (ExecutionTimeout, WTimeoutError, client-side timeoutMS) and any other failure
    # of the server: the worker's back-off may outlast it.
    return VaultUnavailable(f"{where} failed: {detail}")


def _describe(exc: Exception, url: str) -> str:
    if isinstance(exc, OperationFailure):
        details = exc.details or {}
        # errmsg only: the full details may echo document values back.
        text = f"{details.get('codeName', 'error')} (code {exc.code}): {details.get('errmsg', '')}"
    else:
        # Server selection errors end in a long topology dump; the first part says it all.
        text = str(exc).split(", Timeout: ")[0]
    text = scrub(text.strip().rstrip(":"), url)
    if len(text) > _MESSAGE_LIMIT:
        text = text[: _MESSAGE_LIMIT - 1] + "…"
    return f"{type(exc).__name__}: {text}"


def _to_document(record: KeyRecord) -> Document:
    sealed = record.sealed
    return {
        "key_id": record.key_id,
        "version": record.version,
        "algorithm": record.algorithm,
        "public_key_der": record.public_key_der,
        "sealed": None
        if sealed is None
        else {"kek_id": sealed.kek_id, "nonce": sealed.nonce, "ciphertext": sealed.ciphertext},
        "state": record.state.value,
        "label": record.label,
        "allowed_signers": list(record.allowed_signers),
        # Fixed-width UTC text, not a BSON date: dates keep only milliseconds, and sorting the
        # text is chronological.
        "created_at": _timestamp(record.created_at),
        "created_by": record.created_by,
        "request_id": record.request_id,
        "destroy_after": None if record.destroy_after is None else _timestamp(record.destroy_after),
        "generation": record.generation,
        "mac": None if record.mac is None else {"kek_id": record.mac.kek_id, "tag": record.mac.tag},
        "tpm_blob": record.tpm_blob,
        # Absent, not null, before attestation: documents need no migration.
        **({} if record.attestation is None else {"attestation": record.attestation}),
        # Absent before a rotation period is set (issue 15), likewise.
        **(
            {}
            if record.rotation_period_s is None
            else {"rotation_period_s": record.rotation_period_s}
        ),
        **(
            {}
            if record.next_rotation_at is None
            else {"next_rotation_at": _timestamp(record.next_rotation_at)}
        ),
    }


# ---- issue 15, aliases ----


def _alias_document(record: AliasRecord) -> Document:
    return {
        "_id": record.alias,
        "key_id": record.key_id,
        "owner": record.owner,
        "created_at": _timestamp(record.created_at),
        "updated_at": _timestamp(record.updated_at),
        "generation": record.generation,
        "mac": None if record.mac is None else {"kek_id": record.mac.kek_id, "tag": record.mac.tag},
    }


def _to_alias(document: Mapping[str, Any]) -> AliasRecord:
    return AliasRecord(
        alias=str(document["_id"]),
        key_id=str(document["key_id"]),
        owner=str(document["owner"]),
        created_at=datetime.fromisoformat(document["created_at"]),
        updated_at=datetime.fromisoformat(document["updated_at"]),
        generation=int(document["generation"]),
        mac=_optional_mac(document.get("mac")),
    )


# ---- end issue 15, aliases ----


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _page_filter(query: KeyListQuery, after: str) -> Document:
    """The versions that may be a page's keys: any version of the query's (newest first)."""
    found: Document = {"key_id": {"$gt": after}}
    if query.owner is not None:
        found["created_by"] = query.owner
    if query.signer is not None:
        found["allowed_signers"] = {"$in": sorted({query.signer, "*"})}
    if query.label is not None:
        found["label"] = query.label
    if query.state is not None:
        found["state"] = query.state.value
    return found


def _head_id(key_id: str, version: int) -> Document:
    return {"key_id": key_id, "version": version}


def _to_record(document: Mapping[str, Any], heads: Mapping[tuple[str, int], int]) -> KeyRecord:
    key_id, version = document.get("key_id"), document.get("version")
    number = version if isinstance(version, int) else 0
    check_head(str(key_id), number, _generation(document), heads.get((str(key_id), number)))
    try:
        sealed_doc = document["sealed"]
        sealed = (
            None
            if sealed_doc is None
            else SealedKey(
                sealed_doc["kek_id"], bytes(sealed_doc["nonce"]), bytes(sealed_doc["ciphertext"])
            )
        )
        return KeyRecord(
            key_id=document["key_id"],
            version=document["version"],
            algorithm=document["algorithm"],
            public_key_der=bytes(document["public_key_der"]),
            sealed=sealed,
            state=KeyState(document["state"]),
            label=document["label"],
            allowed_signers=tuple(document["allowed_signers"]),
            created_at=datetime.fromisoformat(document["created_at"]),
            created_by=document["created_by"],
            request_id=document["request_id"],
            destroy_after=_optional_time(document["destroy_after"]),
            generation=_generation(document),
            mac=_optional_mac(document.get("mac")),
            attestation=_optional_bytes(document.get("attestation")),
            tpm_blob=_optional_bytes(document.get("tpm_blob")),
            rotation_period_s=document.get("rotation_period_s"),
            next_rotation_at=_optional_time(document.get("next_rotation_at")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"stored record for key {key_id} v{version} is malformed") from exc


def _optional_bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


def _optional_time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _generation(document: Mapping[str, Any]) -> int:
    # Documents from before record MACs have neither a generation nor a MAC.
    generation = document.get("generation", 1)
    return generation if isinstance(generation, int) else 0


def _mac_tag(document: Mapping[str, Any]) -> bytes | None:
    mac = document.get("mac")
    tag = mac.get("tag") if isinstance(mac, Mapping) else None
    return bytes(tag) if isinstance(tag, bytes) else None


def _optional_mac(document: Mapping[str, Any] | None) -> RecordMac | None:
    return None if document is None else RecordMac(document["kek_id"], bytes(document["tag"]))


def _audit_document(entries: Sequence[AuditEntry]) -> Document:
    return {
        "_id": entries[0].seq,
        "last": entries[-1].seq,
        "entries": [_audit_entry_document(entry) for entry in entries],
    }


def _audit_entry_document(entry: AuditEntry) -> Document:
    event = entry.event
    document: Document = {
        "seq": entry.seq,
        # A BSON date: audit times have millisecond precision, which BSON keeps exactly.
        "at": event.at,
        "principal": event.principal,
        "operation": event.operation,
        "outcome": event.outcome,
        "key_id": event.key_id,
        "version": event.version,
        "request_id": event.request_id,
        "data_sha256": event.data_sha256,
        "prev_hash": entry.prev_hash,
        "entry_hash": entry.entry_hash,
    }
    if event.redelivered:
        # Absent, not false, otherwise: the documents of older entries need no migration.
        document["redelivered"] = True
    return document


def _audit_pipeline(query: AuditQuery) -> list[Document]:
    """Entries matching ``query`` in reading order, limited, from the batch documents."""
    # A batch holding an entry after ``after_seq`` starts at most AUDIT_DOCUMENT_ENTRIES - 1
    # before it: bounding _id too lets the _id index skip the older batches.
    batches: Document = {
        "_id": {"$gt": query.after_seq - AUDIT_DOCUMENT_ENTRIES},
        "last": {"$gt": query.after_seq},
    }
    entries: Document = {"seq": {"$gt": query.after_seq}}
    for name, value in (("key_id", query.key_id), ("principal", query.principal)):
        if value is not None:
            batches[f"entries.{name}"] = value
            entries[name] = value
    order = DESCENDING if query.latest else ASCENDING
    # Batches in order and each batch's entries in order make the stream ordered, so the
    # limit stops reading early instead of sorting the whole log.
    pipeline: list[Document] = [{"$match": batches}, {"$sort": {"_id": order}}]
    if query.latest:
        pipeline.append({"$set": {"entries": {"$reverseArray": "$entries"}}})
    return [
        *pipeline,
        {"$unwind": "$entries"},
        {"$replaceRoot": {"newRoot": "$entries"}},
        {"$match": entries},
        {"$limit": query.limit},
    ]


def _to_audit_entry(document: Mapping[str, Any]) -> AuditEntry:
    seq = document.get("seq")
    try:
        at = document["at"]
        event = AuditEvent(
            # PyMongo returns BSON dates as naive UTC datetimes.
            at=at.replace(tzinfo=UTC),
            principal=document["principal"],
            operation=document["operation"],
            outcome=document["outcome"],
            key_id=document["key_id"],
            version=document["version"],
            request_id=document["request_id"],
            data_sha256=document["data_sha256"],
            # Anything but an absent flag or a boolean is malformed (AuditEvent refuses it).
            redelivered=document.get("redelivered", False),
        )
        return AuditEntry(
            seq=document["seq"],
            event=event,
            prev_hash=document["prev_hash"],
            entry_hash=document["entry_hash"],
        )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"audit entry #{seq} is malformed") from exc


def _to_checkpoint(document: Mapping[str, Any]) -> Checkpoint:
    seq = document.get("_id")
    try:
        at = document["at"]
        return Checkpoint(
            seq=int(seq),  # type: ignore[arg-type]
            link=str(document["link"]),
            at=at if at.tzinfo is not None else at.replace(tzinfo=UTC),
            signature=bytes(document["signature"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise IntegrityError(f"audit checkpoint #{seq} is malformed") from exc
