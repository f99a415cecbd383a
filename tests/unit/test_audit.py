"""The audit chain: hashing, what verification detects, and group commit."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from contracts.errors import InternalError, VaultUnavailable
from vault.audit import (
    GENESIS,
    GENESIS_HASH,
    AuditBroken,
    AuditEntry,
    AuditEvent,
    AuditLog,
    AuditQuery,
    ChainHead,
    ChainVerifier,
    canonical_bytes,
    entry_hash,
    link,
    serving_alone,
    verify_log,
)
from vault.audit_chain import ChainKey
from vault.sqlite import SqliteStore

T0 = datetime(2026, 11, 28, 10, 0, 0, 123456, tzinfo=UTC)


def event(n: int) -> AuditEvent:
    return AuditEvent(
        at=T0 + timedelta(seconds=n),
        principal="svc-a",
        operation="sign",
        outcome="ok",
        key_id="zk-1",
        version=1,
        request_id=f"req-{n}",
        data_sha256=hashlib.sha256(bytes([n])).hexdigest(),
    )


CHAIN = link(GENESIS, [event(n) for n in range(1, 8)])


def verify(entries: Sequence[AuditEntry]) -> ChainHead:
    verifier = ChainVerifier()
    for entry in entries:
        verifier.feed(entry)
    return verifier.head


def test_canonical_form_is_stable_json() -> None:
    data = canonical_bytes(1, event(1), GENESIS_HASH)
    document = json.loads(data)
    assert document["format"] == "zandd-audit/1"
    assert document["at"] == "2026-11-28T10:00:01.123+00:00"
    assert document["prev_hash"] == GENESIS_HASH
    assert data == json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    assert entry_hash(1, event(1), GENESIS_HASH) == hashlib.sha256(data).hexdigest()


def test_times_are_kept_to_the_millisecond_in_utc() -> None:
    paris = datetime(2026, 11, 28, 11, 0, 0, 999999, tzinfo=timezone(timedelta(hours=1)))
    at = AuditEvent(at=paris, principal=None, operation="x", outcome="ok").at
    assert at == datetime(2026, 11, 28, 10, 0, 0, 999000, tzinfo=UTC)
    assert at.utcoffset() == timedelta(0)
    with pytest.raises(ValueError, match="timezone-aware"):
        AuditEvent(at=datetime(2026, 1, 1), principal=None, operation="x", outcome="ok")


def test_link_chains_each_entry_to_its_predecessor() -> None:
    assert [e.seq for e in CHAIN] == list(range(1, 8))
    assert CHAIN[0].prev_hash == GENESIS_HASH
    for before, after in itertools.pairwise(CHAIN):
        assert after.prev_hash == before.entry_hash
    assert verify(CHAIN) == CHAIN[-1].head
    more = link(CHAIN[-1].head, [event(8)])
    assert more[0].seq == 8
    assert verify([*CHAIN, *more]).seq == 8


def test_an_empty_log_verifies() -> None:
    assert verify([]) == GENESIS


#: Links the code made before ``redelivered`` existed, for ``event(1)`` after the genesis: unkeyed,
#: and keyed under ``ChainKey("kek-1", b"k" * 32)``. Entries without the flag keep their bytes.
LINKS_BEFORE_REDELIVERED = (
    "eaa4963dd5666ea9ceaa10449ab3891eb05b1623ad2f5f8a077c63cdf51a447f",
    "hmac-sha256/kek-1/e662920c2b61cf9e38aaf756c3037c5ef2fe2100e7e98b8745f80590bfe01dce",
)


def test_entries_not_redelivered_keep_the_links_they_always_had() -> None:
    key = ChainKey("kek-1", b"k" * 32)
    assert entry_hash(1, event(1), GENESIS_HASH) == LINKS_BEFORE_REDELIVERED[0]
    assert entry_hash(1, event(1), GENESIS_HASH, key) == LINKS_BEFORE_REDELIVERED[1]
    assert "redelivered" not in json.loads(canonical_bytes(1, event(1), GENESIS_HASH, "kek-1"))


def test_a_redelivered_entry_is_format_3_and_says_so() -> None:
    again = dataclasses.replace(event(1), redelivered=True)
    document = json.loads(canonical_bytes(1, again, GENESIS_HASH, "kek-1"))
    assert document["format"] == "zandd-audit/3"
    assert document["redelivered"] is True
    assert document["kek_id"] == "kek-1"
    key = ChainKey("kek-1", b"k" * 32)
    assert entry_hash(1, again, GENESIS_HASH, key) != LINKS_BEFORE_REDELIVERED[1]
    with pytest.raises(ValueError, match="boolean"):
        dataclasses.replace(event(1), redelivered=1)
    chain = link(GENESIS, [event(1), again, event(3)], key)
    verifier = ChainVerifier(keys={"kek-1": key})  # type: ignore[arg-type]
    for entry in chain:
        verifier.feed(entry)
    assert verifier.redelivered_entries == 1


@pytest.mark.parametrize(
    "field",
    [
        "at",
        "principal",
        "operation",
        "outcome",
        "key_id",
        "version",
        "request_id",
        "data_sha256",
        "redelivered",
    ],
)
def test_editing_any_field_names_the_entry(field: str) -> None:
    original = getattr(CHAIN[3].event, field)
    forged_value: object = {
        "at": T0,
        "version": 2,
        "redelivered": True,
    }.get(field, f"{original}-forged")
    forged = dataclasses.replace(
        CHAIN[3], event=dataclasses.replace(CHAIN[3].event, **{field: forged_value})
    )
    with pytest.raises(AuditBroken, match=r"audit entry #4 was altered") as info:
        verify([*CHAIN[:3], forged, *CHAIN[4:]])
    assert info.value.seq == 4


def test_an_edited_entry_with_a_recomputed_hash_breaks_the_next_link() -> None:
    event4 = dataclasses.replace(CHAIN[3].event, outcome="forbidden")
    rehashed = AuditEntry(4, event4, CHAIN[3].prev_hash, entry_hash(4, event4, CHAIN[3].prev_hash))
    with pytest.raises(AuditBroken, match=r"#5 does not follow entry #4") as info:
        verify([*CHAIN[:3], rehashed, *CHAIN[4:]])
    assert info.value.seq == 5


def test_a_removed_entry_is_named() -> None:
    with pytest.raises(AuditBroken, match=r"audit entry #3 is missing: .* from #2 to #4"):
        verify([*CHAIN[:2], *CHAIN[3:]])
    with pytest.raises(AuditBroken, match=r"audit entry #1 is missing"):
        verify(CHAIN[1:])


def test_a_removed_and_renumbered_entry_breaks_the_link() -> None:
    renumbered = [dataclasses.replace(e, seq=e.seq - 1) for e in CHAIN[3:]]
    with pytest.raises(AuditBroken, match=r"#3 does not follow entry #2"):
        verify([*CHAIN[:2], *renumbered])


def test_swapped_entries_are_detected() -> None:
    swapped = [
        *CHAIN[:2],
        dataclasses.replace(CHAIN[3], seq=3),
        dataclasses.replace(CHAIN[2], seq=4),
        *CHAIN[4:],
    ]
    with pytest.raises(AuditBroken, match=r"#3 does not follow entry #2"):
        verify(swapped)


class _ListStore:
    """A store holding the audit log in a list; optionally failing, optionally slow."""

    def __init__(self) -> None:
        self.entries: list[AuditEntry] = []
        self.batches: list[int] = []
        self.fail_with: Exception | None = None
        self.gate = asyncio.Event()
        self.gate.set()
        #: Whether append_audit_now can write at once, and the batches it wrote.
        self.now_ok = False
        self.now_calls = 0
        self.now_batches: list[int] = []

    async def append_audit(self, events: Sequence[AuditEvent]) -> list[AuditEntry]:
        await self.gate.wait()
        linked = self._linked(events)
        self.batches.append(len(linked))
        return linked

    def append_audit_now(self, events: Sequence[AuditEvent]) -> list[AuditEntry] | None:
        self.now_calls += 1
        if not self.now_ok:
            return None
        linked = self._linked(events)
        self.now_batches.append(len(linked))
        return linked

    def _linked(self, events: Sequence[AuditEvent]) -> list[AuditEntry]:
        if self.fail_with is not None:
            raise self.fail_with
        head = self.entries[-1].head if self.entries else GENESIS
        linked = link(head, events)
        self.entries += linked
        return linked

    async def read_audit(self, query: AuditQuery) -> list[AuditEntry]:
        after = [e for e in self.entries if e.seq > query.after_seq]
        return after[: query.limit]


async def test_verify_log_walks_every_page() -> None:
    store = _ListStore()
    store.entries = link(GENESIS, [event(n % 200) for n in range(2500)])
    assert (await verify_log(store)).seq == 2500
    del store.entries[1700]
    with pytest.raises(AuditBroken, match="#1701 is missing"):
        await verify_log(store)


async def test_concurrent_records_are_committed_in_batches() -> None:
    store = _ListStore()
    log = AuditLog(store)
    store.gate.clear()  # the first batch waits on the disk...
    first = asyncio.create_task(log.record(event(0)))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(log.record(event(n))) for n in range(1, 50)]
    await asyncio.sleep(0)
    store.gate.set()  # ...while 49 more arrive; they go together in the next one
    entries = await asyncio.gather(first, *rest)
    assert store.batches == [1, 49]
    assert [e.event.request_id for e in entries] == [f"req-{n}" for n in range(50)]
    assert [e.seq for e in entries] == list(range(1, 51))
    await log.close()


async def test_a_failed_batch_fails_its_waiters_and_the_log_goes_on() -> None:
    store = _ListStore()
    log = AuditLog(store)
    store.fail_with = VaultUnavailable("SQLite vault /v.db failed: SQLITE_BUSY")
    results = await asyncio.gather(
        log.record(event(1)), log.record(event(2)), return_exceptions=True
    )
    for result in results:
        assert isinstance(result, VaultUnavailable)
        assert (
            str(result)
            == "the audit entry could not be written: SQLite vault /v.db failed: SQLITE_BUSY"
        )
        assert result.__cause__ is store.fail_with
    store.fail_with = None
    assert (await log.record(event(3))).seq == 1
    await log.close()


async def test_a_caller_that_gives_up_does_not_cancel_the_batch() -> None:
    store = _ListStore()
    log = AuditLog(store)
    store.gate.clear()
    impatient = asyncio.create_task(log.record(event(1)))
    patient = asyncio.create_task(log.record(event(2)))
    await asyncio.sleep(0)
    impatient.cancel()
    store.gate.set()
    assert (await patient).seq == 2
    assert [e.event.request_id for e in store.entries] == ["req-1", "req-2"]
    await log.close()


class _PickyStore(_ListStore):
    """Refuses, for what is in it, any batch holding the request id ``req-bad``."""

    async def append_audit(self, events: Sequence[AuditEvent]) -> list[AuditEntry]:
        if any(e.request_id == "req-bad" for e in events):
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        return await super().append_audit(events)


async def test_one_unstorable_entry_never_costs_the_others_theirs() -> None:
    store = _PickyStore()
    log = AuditLog(store)
    store.gate.clear()
    first = asyncio.create_task(log.record(event(0)))
    await asyncio.sleep(0)
    innocent = [asyncio.create_task(log.record(event(n))) for n in range(1, 29)]
    bad = asyncio.create_task(log.record(dataclasses.replace(event(99), request_id="req-bad")))
    await asyncio.sleep(0)
    store.gate.set()
    entries = await asyncio.gather(first, *innocent)
    assert [e.event.request_id for e in entries] == [f"req-{n}" for n in range(29)]
    with pytest.raises(InternalError, match="could not be stored: OverflowError") as info:
        await bad
    assert not isinstance(info.value, VaultUnavailable), "waiting for the vault cannot help it"
    assert (await verify_log(store)).seq == 29
    await log.close()


async def test_an_unavailable_store_fails_the_batch_without_retrying_each_entry() -> None:
    store = _ListStore()
    log = AuditLog(store)
    store.fail_with = VaultUnavailable("down")
    results = await asyncio.gather(
        *(log.record(event(n)) for n in range(5)), return_exceptions=True
    )
    assert all(isinstance(result, VaultUnavailable) for result in results)
    await log.close()


def test_an_audit_version_must_fit_every_store() -> None:
    assert AuditEvent(at=T0, principal=None, operation="sign", outcome="ok", version=2**63 - 1)
    for bad in (2**63, -1):
        with pytest.raises(ValueError, match="signed 64-bit"):
            AuditEvent(at=T0, principal=None, operation="sign", outcome="ok", version=bad)


async def test_on_real_sqlite_a_group_commit_keeps_every_innocent_entry(tmp_path: Path) -> None:
    # A lone surrogate cannot be encoded, so its batch fails inside the store's transaction.
    store = await SqliteStore.open(str(tmp_path / "vault.db"))
    try:
        log = AuditLog(store)
        unstorable = dataclasses.replace(event(99), principal="\udc80")
        results = await asyncio.gather(
            *(log.record(event(n)) for n in range(1, 29)),
            log.record(unstorable),
            *(log.record(event(n)) for n in range(29, 40)),
            return_exceptions=True,
        )
        assert isinstance(results[28], InternalError)
        stored = [r for r in results if isinstance(r, AuditEntry)]
        assert len(stored) == 39
        assert (await verify_log(store)).seq == 39
        recorded = {e.event.request_id for e in await store.read_audit(AuditQuery())}
        assert recorded == {f"req-{n}" for n in range(1, 40)}
        await log.close()
    finally:
        await store.close()


# --- issue 19: a lone request's entry written without a thread handoff --------------------


async def _alone(log: AuditLog, entry: AuditEvent) -> AuditEntry:
    token = serving_alone.set(True)
    try:
        return await log.record(entry)
    finally:
        serving_alone.reset(token)


async def test_a_lone_requests_entry_is_written_at_once_when_the_store_can() -> None:
    store = _ListStore()
    store.now_ok = True
    log = AuditLog(store)
    first = await _alone(log, event(1))
    second = await _alone(log, event(2))
    assert (first.seq, second.seq) == (1, 2)
    assert second.prev_hash == first.entry_hash
    assert store.now_batches == [1, 1]
    assert store.batches == [], "no batch writer was needed"
    await log.close()


async def test_a_lone_entry_goes_to_the_batch_writer_when_the_store_cannot_now() -> None:
    store = _ListStore()  # now_ok False: e.g. another worker holds the write lock
    log = AuditLog(store)
    assert (await _alone(log, event(1))).seq == 1
    assert store.now_calls == 1
    assert store.batches == [1]
    await log.close()


async def test_entries_of_a_busy_worker_are_never_written_on_the_loop() -> None:
    store = _ListStore()
    store.now_ok = True
    log = AuditLog(store)
    entries = await asyncio.gather(*(log.record(event(n)) for n in range(5)))
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert store.now_calls == 0, "serving_alone unset: the group commit writes them"
    await log.close()


async def test_a_lone_entry_waits_behind_a_batch_being_written() -> None:
    store = _ListStore()
    store.now_ok = True
    log = AuditLog(store)
    store.gate.clear()
    earlier = asyncio.create_task(log.record(event(1)))
    await asyncio.sleep(0)
    lone = asyncio.create_task(_alone(log, event(2)))
    await asyncio.sleep(0)
    store.gate.set()
    assert [(await earlier).seq, (await lone).seq] == [1, 2], "order kept: no overtaking"
    assert store.now_calls == 0
    await log.close()


async def test_a_lone_entry_that_fails_fails_as_the_batch_writer_would() -> None:
    store = _ListStore()
    store.now_ok = True
    store.fail_with = VaultUnavailable("SQLite vault /v.db failed: SQLITE_IOERR")
    log = AuditLog(store)
    with pytest.raises(VaultUnavailable) as raised:
        await _alone(log, event(1))
    assert str(raised.value) == (
        "the audit entry could not be written: SQLite vault /v.db failed: SQLITE_IOERR"
    )
    store.fail_with = OverflowError("Python int too large to convert to SQLite INTEGER")
    with pytest.raises(InternalError):
        await _alone(log, event(1))
    store.fail_with = None
    assert (await _alone(log, event(1))).seq == 1
    await log.close()
