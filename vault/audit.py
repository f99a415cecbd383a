"""The tamper-evident audit log: a hash chain over every operation and every refusal.

Each entry carries the SHA-256 of its predecessor, so removing, reordering or editing an entry
breaks the chain at that point. The chain logic lives here, not in the backends: a backend
stores and reads rows and, when appending, links new events to its last entry with
:func:`link` inside one transaction.

An entry's hash is the SHA-256 of a canonical JSON document (sorted keys, no spaces, UTF-8)
of every field but the hash itself, including ``prev_hash``; ``at`` is UTC with millisecond
precision, so every backend (BSON dates included) stores it exactly. The first entry's
``prev_hash`` is 64 zeros.

Workers link with a key (``vault/audit_chain.py``): the "hash" is then an HMAC-SHA256 under a
key derived from the KEK ring, over the same document with format ``zandd-audit/2`` and the
KEK's id. Unkeyed entries are legacy: accepted only before the first keyed one. The entry of
a request the broker had delivered before (``redelivered``: a worker lost its connection before
it acked) is format ``zandd-audit/3``: the same document plus ``"redelivered": true``; every
other entry keeps the bytes it always had, so entries written before the field verify as
they did. What no chain
shows on its own is the loss of the newest entries: :func:`check_log` compares the log with a
head published elsewhere (workers publish theirs on ``zandd.events``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from contracts.errors import (
    ConfigurationError,
    IntegrityError,
    InternalError,
    VaultUnavailable,
    ZanddError,
)
from vault.audit_chain import ChainKey, ChainKeyLookup, link_kek_id

AUDIT_FORMAT = "zandd-audit/1"
KEYED_AUDIT_FORMAT = "zandd-audit/2"
#: The document of a redelivered request's entry: format 1 or 2 plus ``"redelivered": true``.
REDELIVERED_AUDIT_FORMAT = "zandd-audit/3"
GENESIS_HASH = "0" * 64
OUTCOME_OK = "ok"
READ_PAGE_ENTRIES = 1000
#: The largest number every backend stores as an integer (SQLite INTEGER, BSON int64).
MAX_STORED_INT = 2**63 - 1


def _audit_time(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("audit times must be timezone-aware")
    moment = moment.astimezone(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """What happened, before it takes its place in the chain.

    ``outcome`` is ``ok`` or the wire error code of the refusal; ``data_sha256`` is the hex
    SHA-256 of the signed data, never the data. ``redelivered``: the broker had delivered the
    request before (to this worker or another, which lost its connection before acking it), so
    an earlier entry may record the same request (same ``request_id``); an ``ok`` one may have
    signed it already, though only the answer that reached the caller was used.
    """

    at: datetime
    principal: str | None
    operation: str
    outcome: str
    key_id: str | None = None
    version: int | None = None
    request_id: str | None = None
    data_sha256: str | None = None
    redelivered: bool = False

    def __post_init__(self) -> None:
        # Refused here, not by the store inside a group commit it would fail as a whole.
        if self.version is not None and not 0 <= self.version <= MAX_STORED_INT:
            raise ValueError("an audit version must fit a signed 64-bit integer")
        if not isinstance(self.redelivered, bool):
            raise ValueError("an audit entry's redelivered flag must be a boolean")
        object.__setattr__(self, "at", _audit_time(self.at))


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The newest entry's sequence number and hash (``seq`` 0 for an empty log)."""

    seq: int
    entry_hash: str


GENESIS = ChainHead(seq=0, entry_hash=GENESIS_HASH)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """An event at its place in the chain: ``seq`` counts from 1 without gaps."""

    seq: int
    event: AuditEvent
    prev_hash: str
    entry_hash: str

    @property
    def head(self) -> ChainHead:
        """This entry as the head of the chain."""
        return ChainHead(seq=self.seq, entry_hash=self.entry_hash)


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Which entries to read: after ``after_seq``, optionally of one key or one principal.

    ``latest=True`` gives the last ``limit`` matching entries instead of the first; either
    way they come oldest first.
    """

    after_seq: int = 0
    limit: int = READ_PAGE_ENTRIES
    key_id: str | None = None
    principal: str | None = None
    latest: bool = False


def canonical_bytes(
    seq: int, event: AuditEvent, prev_hash: str, kek_id: str | None = None
) -> bytes:
    """The bytes an entry's link is taken over; for a keyed link they name the KEK of its key.

    ``redelivered`` is in the document only when true (format ``zandd-audit/3``), so every
    entry without it has the bytes it had before the field existed.
    """
    document: dict[str, object] = {
        "format": AUDIT_FORMAT if kek_id is None else KEYED_AUDIT_FORMAT,
        "seq": seq,
        "at": event.at.isoformat(timespec="milliseconds"),
        "principal": event.principal,
        "operation": event.operation,
        "outcome": event.outcome,
        "key_id": event.key_id,
        "version": event.version,
        "request_id": event.request_id,
        "data_sha256": event.data_sha256,
        "prev_hash": prev_hash,
    }
    if kek_id is not None:
        document["kek_id"] = kek_id
    if event.redelivered:
        document["format"] = REDELIVERED_AUDIT_FORMAT
        document["redelivered"] = True
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(seq: int, event: AuditEvent, prev_hash: str, key: ChainKey | None = None) -> str:
    """The link that chains an entry: keyed under ``key``, else (legacy) its hex SHA-256."""
    if key is None:
        return hashlib.sha256(canonical_bytes(seq, event, prev_hash)).hexdigest()
    return key.link(canonical_bytes(seq, event, prev_hash, key.kek_id))


def link(
    head: ChainHead, events: Iterable[AuditEvent], key: ChainKey | None = None
) -> list[AuditEntry]:
    """Chain ``events`` after ``head`` (keyed under ``key`` when given): what a backend appends
    in one transaction."""
    entries = []
    for event in events:
        seq = head.seq + 1
        entry = AuditEntry(
            seq, event, head.entry_hash, entry_hash(seq, event, head.entry_hash, key)
        )
        entries.append(entry)
        head = entry.head
    return entries


class AuditBroken(IntegrityError):
    """The audit chain is broken at entry ``seq``: it was removed, reordered or edited."""

    def __init__(self, seq: int, message: str) -> None:
        super().__init__(message)
        self.seq = seq


@dataclass
class ChainVerifier:
    """Checks entries fed oldest first; raises AuditBroken naming the first broken entry.

    Keyed links are checked with ``keys`` (without them a keyed entry cannot be checked: that
    is a ConfigurationError, not a verdict); unkeyed ones only before the first keyed entry.
    """

    keys: ChainKeyLookup | None = None
    head: ChainHead = field(default=GENESIS)
    #: Unkeyed entries seen (all before the first keyed one), and keyed ones.
    legacy_entries: int = 0
    keyed_entries: int = 0
    kek_ids: list[str] = field(default_factory=list)
    #: Entries of requests the broker had delivered before (``AuditEvent.redelivered``).
    redelivered_entries: int = 0

    def feed(self, entry: AuditEntry) -> None:
        """Check one entry against the chain so far and make it the head."""
        expected = self.head.seq + 1
        if entry.seq != expected:
            raise AuditBroken(
                expected,
                f"audit entry #{expected} is missing: the log jumps from "
                f"#{self.head.seq} to #{entry.seq}",
            )
        if entry.prev_hash != self.head.entry_hash:
            raise AuditBroken(
                entry.seq,
                f"audit entry #{entry.seq} does not follow entry #{self.head.seq}: "
                "an entry was removed, reordered or rewritten",
            )
        key = self._key_of(entry)
        if not hmac.compare_digest(
            entry_hash(entry.seq, entry.event, entry.prev_hash, key), entry.entry_hash
        ):
            raise AuditBroken(
                entry.seq,
                f"audit entry #{entry.seq} was altered: its hash does not match its content",
            )
        self.head = entry.head
        self.redelivered_entries += entry.event.redelivered

    def _key_of(self, entry: AuditEntry) -> ChainKey | None:
        try:
            kek_id = link_kek_id(entry.entry_hash)
        except ValueError:
            raise AuditBroken(entry.seq, f"audit entry #{entry.seq} has a malformed link") from None
        if kek_id is None:
            if self.keyed_entries:
                raise AuditBroken(
                    entry.seq,
                    f"audit entry #{entry.seq} is unkeyed but follows keyed entries: it was "
                    "written or re-chained without the KEK ring",
                )
            self.legacy_entries += 1
            return None
        if self.keys is None:
            raise ConfigurationError(
                f"audit entry #{entry.seq} is keyed: checking it needs the KEK ring"
            )
        try:
            key = self.keys.get(kek_id)
        except KeyError:
            raise AuditBroken(
                entry.seq,
                f"audit entry #{entry.seq} is keyed under KEK {kek_id!r}, which the ring does "
                "not hold: restore that KEK to check it (or the entry is forged)",
            ) from None
        self.keyed_entries += 1
        if kek_id not in self.kek_ids:
            self.kek_ids.append(kek_id)
        return key


class AuditAppender(Protocol):
    """The part of a vault store the audit log writes through."""

    async def append_audit(self, events: Sequence[AuditEvent]) -> list[AuditEntry]:
        """Link ``events`` after the stored chain and store them durably, in one transaction."""
        ...

    def append_audit_now(self, events: Sequence[AuditEvent]) -> list[AuditEntry] | None:
        """As ``append_audit``, on the calling thread, when that needs no wait for a lock or a
        worker thread; None when it cannot (the caller then uses ``append_audit``).

        A store that never can returns None. Raises as ``append_audit`` when the write itself
        failed; it never half-writes.
        """
        ...


#: Set by a worker's runtime while the request it audits is the only one it is serving:
#: nothing else waits for the event loop, so ``AuditLog.record`` may write that entry on the
#: loop's own thread (``append_audit_now``) instead of handing it to the database thread and
#: waiting to be woken again. A lone request's reply waits for its entry either way; the two
#: thread handoffs it saves are its share of the latency (issue 19, serial latency).
#: Under load it stays False: the entries then go to the database thread together (group
#: commit) while the loop serves the other requests.
serving_alone: ContextVar[bool] = ContextVar("zandd_serving_alone", default=False)


class AuditReader(Protocol):
    """The part of a vault store the audit log is read through."""

    async def read_audit(self, query: AuditQuery) -> list[AuditEntry]:
        """Entries matching ``query``, oldest first."""
        ...


@dataclass(frozen=True, slots=True)
class AuditReport:
    """What ``check_log`` checked: the head it reached, how many entries had legacy (unkeyed,
    all before the first keyed one) and keyed links, under which KEKs, and the known head the
    log was found to reach (None when none was given)."""

    head: ChainHead
    legacy_entries: int
    keyed_entries: int
    kek_ids: tuple[str, ...]
    known_head: ChainHead | None
    #: The newest checkpoint the log was checked against (None when none was given), and how
    #: many checkpoints it matched.
    checkpoint: ChainHead | None = None
    checkpoints: int = 0
    #: Entries of requests the broker had delivered before (``AuditEvent.redelivered``).
    redelivered_entries: int = 0


async def check_log(
    reader: AuditReader,
    keys: ChainKeyLookup | None = None,
    known_head: ChainHead | None = None,
    vouched: Mapping[int, str] | None = None,
) -> AuditReport:
    """Walk the whole log, checking every link, that it reaches ``known_head`` (a head
    published earlier) with the same link, and that every entry ``vouched`` names (the links
    of TPM-signed checkpoints, by sequence number; their signatures already checked) is there
    with that link; AuditBroken names the first bad entry."""
    vouched = vouched or {}
    verifier = ChainVerifier(keys)
    while True:
        page = await reader.read_audit(AuditQuery(after_seq=verifier.head.seq))
        for entry in page:
            verifier.feed(entry)
            if known_head is not None and entry.seq == known_head.seq:
                _check_known_head(entry, known_head)
            if entry.seq in vouched:
                _check_checkpoint(entry, vouched[entry.seq])
        if len(page) < READ_PAGE_ENTRIES:
            break
    head = verifier.head
    if known_head is not None and known_head.seq > head.seq:
        raise AuditBroken(
            head.seq + 1,
            f"the audit log ends at #{head.seq} but a published head is #{known_head.seq}: "
            f"its newest {known_head.seq - head.seq} entries were cut",
        )
    newest = max(vouched, default=None)
    if newest is not None and newest > head.seq:
        raise AuditBroken(
            head.seq + 1,
            f"the audit log ends at #{head.seq} but the TPM signed a checkpoint at #{newest}: "
            f"at least its newest {newest - head.seq} entries were cut",
        )
    return AuditReport(
        head,
        verifier.legacy_entries,
        verifier.keyed_entries,
        tuple(verifier.kek_ids),
        known_head,
        None if newest is None else ChainHead(newest, vouched[newest]),
        len(vouched),
        verifier.redelivered_entries,
    )


def _check_checkpoint(entry: AuditEntry, link: str) -> None:
    if not hmac.compare_digest(entry.entry_hash, link):
        raise AuditBroken(
            entry.seq,
            f"audit entry #{entry.seq} is not the entry the TPM-signed checkpoint #{entry.seq} "
            "vouches for: the log was cut and re-linked (by a holder of the KEK ring) at or "
            "before it",
        )


def _check_known_head(entry: AuditEntry, known_head: ChainHead) -> None:
    # A head known by its number alone (a metric) has no link to compare.
    if known_head.entry_hash and not hmac.compare_digest(entry.entry_hash, known_head.entry_hash):
        raise AuditBroken(
            entry.seq,
            f"audit entry #{entry.seq} is not the published head #{known_head.seq}: the log was "
            "rewritten at or before it",
        )


async def verify_log(reader: AuditReader, keys: ChainKeyLookup | None = None) -> ChainHead:
    """Walk the whole log; the head when intact, else AuditBroken naming the first bad entry."""
    return (await check_log(reader, keys)).head


@dataclass(eq=False)
class _Pending:
    event: AuditEvent
    done: asyncio.Future[AuditEntry]


class AuditLog:
    """Appends events durably, batching concurrent appends into one transaction.

    ``record`` returns only once its entry is committed. While one batch is being written,
    newly recorded events wait and go together in the next (group commit), so a busy worker
    pays one durable write per batch, not per request.

    A batch the store refuses for what is in it (not because it is unavailable) is written
    again one entry at a time, so one entry the store cannot hold never costs the others
    theirs; that entry's ``record`` raises ``InternalError``, not ``VaultUnavailable``:
    waiting for the vault would not help it.
    """

    def __init__(self, store: AuditAppender) -> None:
        self._store = store
        self._queue: list[_Pending] = []
        self._writer: asyncio.Task[None] | None = None

    async def record(self, event: AuditEvent) -> AuditEntry:
        """Append ``event``; returns its entry once durable, or raises VaultUnavailable.

        While ``serving_alone`` is set and no batch is pending, the entry is written on this
        thread when the store can do that without waiting (see ``serving_alone``).
        """
        if (
            serving_alone.get()
            and not self._queue
            and (self._writer is None or self._writer.done())
        ):
            try:
                written = self._store.append_audit_now([event])
            except Exception as exc:  # as the batch writer hands a lone entry's failure on
                raise _not_written(exc) from exc
            if written is not None:
                return written[0]
        pending = _Pending(event, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_batches(), name="zandd-audit-writer")
        # A caller that gives up must not cancel the batch other callers wait on.
        return await asyncio.shield(pending.done)

    async def close(self) -> None:
        """Wait until every recorded event has been written (or failed)."""
        if self._writer is not None:
            await self._writer

    async def _write_batches(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                entries = await self._store.append_audit([p.event for p in batch])
                written = list(zip(batch, entries, strict=True))
            except Exception as exc:  # every waiter learns; the writer itself goes on
                if len(batch) == 1 or isinstance(exc, VaultUnavailable):
                    for pending in batch:
                        pending.done.set_exception(_not_written(exc))
                else:
                    for pending in batch:
                        await self._write_alone(pending)
                continue
            for pending, entry in written:
                pending.done.set_result(entry)

    async def _write_alone(self, pending: _Pending) -> None:
        try:
            (entry,) = await self._store.append_audit([pending.event])
        except Exception as exc:  # handed to its waiter
            pending.done.set_exception(_not_written(exc))
        else:
            pending.done.set_result(entry)


def _not_written(cause: Exception) -> ZanddError:
    reason = cause.message if isinstance(cause, ZanddError) else type(cause).__name__
    error: ZanddError
    if isinstance(cause, VaultUnavailable):
        error = VaultUnavailable(f"the audit entry could not be written: {reason}")
    else:
        error = InternalError(f"the audit entry could not be stored: {reason}")
    error.__cause__ = cause
    return error
