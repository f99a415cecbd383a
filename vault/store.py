"""The async store interface every vault backend implements, and the URL-based opener."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Protocol

from contracts.errors import ConfigurationError
from vault.aliases import AliasRecord
from vault.audit import AuditEntry, AuditEvent, AuditQuery
from vault.audit_chain import ChainKey
from vault.audit_checkpoint import READ_PAGE_CHECKPOINTS, Checkpoint
from vault.listing import KeyListQuery, KeyPage
from vault.records import KeyRecord, KeyStamp, KeyState
from vault.sqlite import SqliteStore

_SQLITE_PREFIX = "sqlite://"
_MEMORY_PATH = "/:memory:"


class VaultStore(Protocol):
    """Sealed key records and the audit log behind a small async interface.

    Backends store and read; the rules (state transitions, the audit hash chain, sealing)
    live in ``vault`` modules shared by every backend.
    """

    async def create_key(self, record: KeyRecord) -> KeyRecord:
        """Insert ``record``, idempotently on its owner's request id.

        If a record with the same owner (``created_by``) and non-null ``request_id`` exists,
        nothing is inserted and that existing record is returned (the caller compares
        ``key_id``); safe against concurrent creators in several processes. Request ids are
        scoped per owner: two owners' records with one request id are two records. A duplicate
        (key_id, version) raises IntegrityError.
        """
        ...

    async def get_key(self, key_id: str, version: int | None = None) -> KeyRecord:
        """The given version of a key, or its latest when ``version`` is None; else KeyNotFound."""
        ...

    async def find_by_request_id(self, request_id: str, *, owner: str) -> KeyRecord | None:
        """The record ``owner``'s request ``request_id`` created, if any (never another's)."""
        ...

    async def key_stamps(self, key_ids: Collection[str]) -> dict[tuple[str, int], KeyStamp]:
        """(key id, version) → the stored ``generation`` and MAC tag of every version of
        ``key_ids`` (``vault.records.KeyStamp``), nothing else read.

        What the signer's cache revalidates its entries with (``workers/signer/cache.py``):
        one cheap read for many keys instead of a full read per key. A key id with no version
        in the vault contributes nothing; an empty ``key_ids`` asks nothing. The row is not
        checked against its head (``vault.records.check_head``) nor its MAC: a stamp that
        differs from a cached record's sends the reader back to ``get_key``, which checks.

        What an unchanged stamp says: every change of a stored version goes through
        ``replace_key``, a compare-and-set on the generation that writes exactly the next one
        (``vault.records.check_replacement``) and a new MAC — the keygen worker's lifecycle
        changes, ``key.update`` and rotation schedules (``workers.keygen.lifecycle``,
        ``workers.keygen.versions``), the MAC upgrade (``vault.mac_upgrade``) and re-wrapping
        (``vault.rewrap``); a rotation inserts a new version (``create_key``), which is new
        here, and nothing deletes one. A restore of the vault (``zandd vault restore``,
        ``mongorestore``) puts older rows back; a change written after it may reach a
        generation a running process had cached before it, but not with the same tag (the
        MAC covers every field, the generation among them). A row edited in place by someone
        without the ring that keeps both its generation and its tag no longer matches its MAC:
        only a full read (``get_key`` and ``vault.record_mac.verify_record``) finds it, which
        is why the cache reloads every entry within its maximum age whatever the stamps say.
        """
        ...

    async def list_keys(self) -> list[KeyRecord]:
        """The latest version of every key, ordered by that version's ``created_at``."""
        ...

    async def list_versions(
        self, key_id: str | None = None, *, state: KeyState | None = None
    ) -> list[KeyRecord]:
        """Every version of one key (or of all keys), optionally only those in ``state``.

        Ordered by key id, then version. An unknown ``key_id`` gives an empty list.
        """
        ...

    async def list_key_page(self, query: KeyListQuery) -> KeyPage:
        """One page of keys' current versions matching ``query``, by key id after
        ``query.after`` (``vault.listing``: the semantics every backend shares).

        Indexed: a page costs what it holds and what it skips within the owner's, the
        signer's (and ``*``'s) or everyone's keys, never the whole vault's versions.
        """
        ...

    async def kek_usage(self) -> dict[str, int]:
        """How many key versions need each KEK id: to open their sealed key or check their MAC.

        What the vault needs from a KEK ring: every id here must be in it, or those versions
        cannot be opened.
        """
        ...

    async def list_due(self, now: datetime) -> list[KeyRecord]:
        """The versions pending destruction whose ``destroy_after`` is at or before ``now``.

        Ordered by key id, then version. Every lifecycle request asks, so backends index it:
        the answer costs what is due, not what is pending.
        """
        ...

    async def list_rotation_due(self, now: datetime) -> list[KeyRecord]:
        """The versions whose ``next_rotation_at`` is at or before ``now`` (issue 15).

        Ordered by key id, then version. The keygen worker asks periodically, so backends
        index it: the answer costs what is due, not how many keys rotate.
        """
        ...

    async def replace_key(self, record: KeyRecord, expected: KeyRecord) -> bool:
        """Compare-and-set one version's mutable fields: state, destroy_after, sealed,
        generation and MAC; label, allowed signers, rotation period and next rotation.

        ``record.generation`` must be ``expected.generation + 1`` (else ValueError). Stores
        ``record``'s values iff the stored version (same key id and version) still has
        ``expected``'s generation, state and sealed material (KEK id and nonce); True when it
        did, False when another writer changed it first (re-read, decide again). When
        ``record.sealed`` is None the backend erases the old sealed material from its storage,
        not only from view, as far as the backend can.
        """
        ...

    # ---- issue 15, aliases (vault.aliases) ----

    async def get_alias(self, alias: str) -> AliasRecord | None:
        """The alias's row exactly as stored, or None."""
        ...

    async def list_aliases(
        self, *, key_id: str | None = None, owner: str | None = None
    ) -> list[AliasRecord]:
        """Every alias (pointing at ``key_id``, owned by ``owner``), ordered by alias; indexed
        on the key id and the owner."""
        ...

    async def put_alias(self, record: AliasRecord, expected: AliasRecord | None) -> bool:
        """Create ``record`` (``expected`` None: generation 1; False if the alias exists) or
        replace it iff the stored row still has ``expected``'s generation and key id
        (``record.generation`` must be one more, else ValueError); False when another writer
        changed it first. An alias is unique vault-wide, against writers in other processes."""
        ...

    async def delete_alias(self, expected: AliasRecord) -> bool:
        """Delete the alias iff the stored row still has ``expected``'s generation and key id;
        False otherwise (gone, or changed first)."""
        ...

    # ---- end issue 15, aliases ----

    async def append_audit(
        self, events: Sequence[AuditEvent], chain_key: ChainKey | None = None
    ) -> list[AuditEntry]:
        """Chain ``events`` after the newest stored entry and store them durably, atomically.

        Read the newest entry and insert ``vault.audit.link(head, events, chain_key)`` (keyed
        links when ``chain_key`` is given, legacy ones otherwise) in one transaction,
        safe against appenders in other processes: sequence numbers never repeat or skip.
        Returns the stored entries once durable.
        """
        ...

    def append_audit_now(
        self, events: Sequence[AuditEvent], chain_key: ChainKey | None = None
    ) -> list[AuditEntry] | None:
        """As ``append_audit``, on the calling thread, when the store can write at once (no
        lock held by another writer, no network round trip); None when it cannot, and the
        caller then uses ``append_audit`` (``vault.audit.serving_alone`` says when to try).

        It never half-writes: None means nothing was written; an error is the write's own.
        """
        ...

    async def read_audit(self, query: AuditQuery) -> list[AuditEntry]:
        """Audit entries matching ``query``, oldest first, exactly as stored."""
        ...

    async def add_checkpoint(self, checkpoint: Checkpoint) -> bool:
        """Store a TPM-signed audit checkpoint durably; False (nothing stored) when its
        sequence number already has one: the first checkpoint of an entry is kept."""
        ...

    async def read_checkpoints(
        self, after_seq: int = 0, limit: int = READ_PAGE_CHECKPOINTS, *, latest: bool = False
    ) -> list[Checkpoint]:
        """Checkpoints after ``after_seq`` (or the newest ``limit`` with ``latest``), oldest
        first, exactly as stored."""
        ...

    async def close(self) -> None:
        """Release the backend's connections; the store is unusable afterwards."""
        ...


async def open_store(url: str) -> VaultStore:
    """Open the backend a vault URL names.

    ``sqlite:///abs/path.db`` or ``sqlite:///:memory:`` (one machine), or ``mongodb://…`` /
    ``mongodb+srv://…`` (a fleet; the ``mongo`` extra), see ``vault.mongo`` for its options.
    """
    if url.startswith(_SQLITE_PREFIX):
        path = url.removeprefix(_SQLITE_PREFIX)
        if path == _MEMORY_PATH:
            return await SqliteStore.open(":memory:")
        if not path.startswith("/"):
            raise ConfigurationError(
                "a SQLite vault URL needs an absolute path: sqlite:///abs/path.db"
            )
        # sqlite:////abs/path.db (the SQLAlchemy spelling) names the same file.
        return await SqliteStore.open("/" + path.lstrip("/"))
    if url.startswith(("mongodb://", "mongodb+srv://")):
        try:
            from vault.mongo import MongoStore
        except ImportError as exc:
            if (exc.name or "").partition(".")[0] not in {"pymongo", "bson"}:
                raise
            raise ConfigurationError(
                "the MongoDB vault needs PyMongo: install zandd-hsm[mongo] (pip install "
                "'zandd-hsm[mongo]')"
            ) from exc
        return await MongoStore.open(url)
    raise ConfigurationError(
        "unsupported vault URL scheme: use sqlite:///abs/path.db, mongodb:// or mongodb+srv://"
    )
