"""The keyed audit chain: HMAC links under a ring-derived key, legacy prefixes, known heads,
head publication — on a real SQLite vault where a store is involved."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from contracts.errors import BrokerUnavailable, ConfigurationError
from contracts.models import AuditHeadEvent
from tests.support.audit import T0, append_keyed, event, vault_db
from vault.audit import (
    GENESIS,
    AuditBroken,
    AuditQuery,
    ChainHead,
    canonical_bytes,
    check_log,
    entry_hash,
    link,
)
from vault.audit_chain import AUDIT_KEY_INFO, ChainKey, ChainKeys, derive_chain_key, link_kek_id
from vault.kek import Kek, KekRing
from vault.migrate import migrate_vault
from vault.store import VaultStore, open_store
from workers.audit.audit_head import AuditHeadPublisher
from workers.commands.audit import parse_head
from workers.observability.metrics import Metrics


def test_the_audit_key_is_hkdf_of_the_kek_under_its_own_label() -> None:
    kek = Kek(kek_id="kek-test", key=bytes(range(32)))
    expected = HKDF(hashes.SHA256(), 32, salt=None, info=b"zandd-audit-chain/1").derive(kek.key)
    key = derive_chain_key(kek)
    assert AUDIT_KEY_INFO == b"zandd-audit-chain/1"
    assert (key.kek_id, key.key) == ("kek-test", expected)
    assert key.key != kek.key
    assert "redacted" in repr(key)
    assert expected.hex() not in repr(key)
    data = canonical_bytes(1, event(1), GENESIS.entry_hash, "kek-test")
    assert b'"format":"zandd-audit/2"' in data
    assert b'"kek_id":"kek-test"' in data
    mac = hmac.new(expected, data, hashlib.sha256).hexdigest()
    assert entry_hash(1, event(1), GENESIS.entry_hash, key) == f"hmac-sha256/kek-test/{mac}"
    assert link_kek_id(f"hmac-sha256/kek-test/{mac}") == "kek-test"
    assert link_kek_id(mac) is None
    with pytest.raises(ValueError, match="neither"):
        link_kek_id("sha1/" + mac)


async def test_keyed_entries_verify_with_the_ring_only(store: VaultStore, ring: KekRing) -> None:
    await append_keyed(store, ring, range(1, 6))
    report = await check_log(store, ChainKeys(ring))
    assert (report.head.seq, report.legacy_entries, report.keyed_entries) == (5, 0, 5)
    assert report.kek_ids == (ring.active.kek_id,)
    with pytest.raises(ConfigurationError, match="needs the KEK ring"):
        await check_log(store)
    other_ring = KekRing(Kek.generate())
    with pytest.raises(AuditBroken, match="which the ring does not hold"):
        await check_log(store, ChainKeys(other_ring))


async def test_a_legacy_log_stays_valid_as_a_prefix_and_nowhere_else(
    store: VaultStore, ring: KekRing
) -> None:
    await store.append_audit([event(n) for n in range(1, 4)])  # as a vault of 8fa3105 holds
    report = await check_log(store, ChainKeys(ring))
    assert (report.legacy_entries, report.keyed_entries) == (3, 0)
    await append_keyed(store, ring, range(4, 7))
    report = await check_log(store, ChainKeys(ring))
    assert (report.legacy_entries, report.keyed_entries, report.head.seq) == (3, 3, 6)
    # A writer without the ring appends (or re-chains) unkeyed entries after keyed ones.
    await store.append_audit([event(7, principal="mallory")])
    with pytest.raises(AuditBroken, match="#7 is unkeyed but follows keyed entries") as broken:
        await check_log(store, ChainKeys(ring))
    assert broken.value.seq == 7


async def test_rechaining_without_the_ring_is_detected(
    store: VaultStore, ring: KekRing, tmp_path: Path
) -> None:
    await append_keyed(store, ring, range(1, 21))
    entries = await store.read_audit(AuditQuery())
    # The writer edits #8 and re-chains every later entry, with the unkeyed hash and with an
    # HMAC under a key of its own that names the real KEK: neither verifies.
    forger = ChainKey(ring.active.kek_id, b"\x01" * 32)
    for key, says in ((None, "#8 is unkeyed"), (forger, "#8 was altered")):
        head = entries[6].head
        rewritten = [dataclasses.replace(entries[7].event, principal="mallory")]
        rewritten += [e.event for e in entries[8:]]
        with sqlite3.connect(vault_db(tmp_path)) as conn:
            for forged in link(head, rewritten, key):
                conn.execute(
                    "UPDATE audit SET principal = ?, prev_hash = ?, entry_hash = ? WHERE seq = ?",
                    (forged.event.principal, forged.prev_hash, forged.entry_hash, forged.seq),
                )
        conn.close()
        with pytest.raises(AuditBroken, match=says):
            await check_log(store, ChainKeys(ring))


async def test_rotation_keeps_old_entries_checkable(
    store: VaultStore, ring: KekRing, tmp_path: Path
) -> None:
    await append_keyed(store, ring, range(1, 4))
    rotated = ring.rotate(tmp_path / "ring" / "kek-ring.json")
    await append_keyed(store, rotated, range(4, 7))
    report = await check_log(store, ChainKeys(rotated))
    assert report.kek_ids == (ring.active.kek_id, rotated.active.kek_id)
    assert report.keyed_entries == 6


async def test_a_known_head_detects_a_cut_and_a_rewrite(
    store: VaultStore, ring: KekRing, tmp_path: Path
) -> None:
    await append_keyed(store, ring, range(1, 101))
    (newest,) = await store.read_audit(AuditQuery(latest=True, limit=1))
    known = newest.head
    assert (await check_log(store, ChainKeys(ring), known)).known_head == known
    older = ChainHead(
        seq=40, entry_hash=(await store.read_audit(AuditQuery(after_seq=39)))[0].entry_hash
    )
    assert (await check_log(store, ChainKeys(ring), older)).head == known
    with pytest.raises(AuditBroken, match="is not the published head #40"):
        await check_log(store, ChainKeys(ring), dataclasses.replace(older, entry_hash="0" * 64))
    with sqlite3.connect(vault_db(tmp_path)) as conn:
        conn.execute("DELETE FROM audit WHERE seq > 50")
    conn.close()
    assert (await check_log(store, ChainKeys(ring))).head.seq == 50  # intact on its own
    with pytest.raises(AuditBroken, match="newest 50 entries were cut"):
        await check_log(store, ChainKeys(ring), ChainHead(100, ""))  # the metric's number
    with pytest.raises(AuditBroken, match=r"ends at #50 .* newest 50 entries were cut"):
        await check_log(store, ChainKeys(ring), known)


async def test_migration_copies_keyed_and_legacy_links_verbatim(
    store: VaultStore, ring: KekRing, tmp_path: Path
) -> None:
    await store.append_audit([event(n) for n in range(1, 4)])
    await append_keyed(store, ring, range(4, 8))
    rotated = ring.rotate(tmp_path / "ring" / "kek-ring.json")
    await append_keyed(store, rotated, range(8, 10))
    target = await open_store(f"sqlite://{tmp_path / 'target' / 'vault.db'}")
    try:
        await migrate_vault(store, target, rotated)
        assert await target.read_audit(AuditQuery()) == await store.read_audit(AuditQuery())
    finally:
        await target.close()


def test_heads_parse_from_what_verify_prints_and_from_events() -> None:
    link_text = "hmac-sha256/kek-1/" + "ab" * 32
    assert parse_head(f"12:{link_text}") == ChainHead(12, link_text)
    assert parse_head(f"#12 {link_text}") == ChainHead(12, link_text)
    event_json = AuditHeadEvent(seq=12, link=link_text, published_at=T0).model_dump_json()
    assert parse_head(event_json) == ChainHead(12, link_text)
    assert parse_head("12") == ChainHead(12, "")
    for bad in ("x:" + link_text, "12:nothex", '{"seq": -1}', ""):
        with pytest.raises(ConfigurationError):
            parse_head(bad)


class Published:
    """What a head publisher handed over (the broker side is covered by the fleet tests)."""

    def __init__(self) -> None:
        self.events: list[AuditHeadEvent] = []
        self.fail = False
        self.arrived = asyncio.Event()

    async def __call__(self, event: AuditHeadEvent) -> None:
        if self.fail:
            raise BrokerUnavailable("no broker")
        self.events.append(event)
        self.arrived.set()

    async def next(self) -> AuditHeadEvent:
        await asyncio.wait_for(self.arrived.wait(), 10)
        self.arrived.clear()
        return self.events[-1]


async def rounds_after(heads: AuditHeadPublisher, count: int) -> None:
    """Wait until ``heads`` has finished ``count`` more rounds than it had."""
    target = heads.rounds + count
    async with asyncio.timeout(30):
        while heads.rounds < target:  # noqa: ASYNC110 - rounds count up on the loop
            await asyncio.sleep(0.01)


async def test_the_keygen_publishes_the_vaults_head_every_n_entries_and_on_stop(
    store: VaultStore, ring: KekRing
) -> None:
    published = Published()
    # An interval of an hour: only the entry count, the first round and the stop publish.
    heads = AuditHeadPublisher(store, ChainKeys(ring), published, every_entries=10, interval_s=3600)
    stop = asyncio.Event()
    runner = asyncio.create_task(heads.run(stop))
    await append_keyed(store, ring, range(1, 6))
    first = await published.next()
    (newest,) = await store.read_audit(AuditQuery(latest=True, limit=1))
    assert (first.seq, first.link) == (5, newest.entry_hash)
    await append_keyed(store, ring, range(6, 15))  # 9 more: not yet
    await rounds_after(heads, 2)  # one round that saw them, whichever was under way
    assert [e.seq for e in published.events] == [5]
    await append_keyed(store, ring, range(15, 16))  # the 10th
    assert (await published.next()).seq == 15
    published.fail = True  # a lost broker: the head waits for the next round
    await append_keyed(store, ring, range(16, 30))
    await rounds_after(heads, 2)
    published.fail = False
    assert (await published.next()).seq == 29
    await append_keyed(store, ring, range(30, 31))
    stop.set()
    await runner
    assert [e.seq for e in published.events] == [5, 15, 29, 30]


async def test_a_head_that_went_back_or_fails_its_check_is_not_published(
    store: VaultStore, ring: KekRing, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    published = Published()
    metrics = Metrics()
    heads = AuditHeadPublisher(
        store, ChainKeys(ring), published, every_entries=1, interval_s=0.05, metrics=metrics
    )
    stop = asyncio.Event()
    runner = asyncio.create_task(heads.run(stop))
    await append_keyed(store, ring, range(1, 21))
    assert (await published.next()).seq == 20
    with sqlite3.connect(vault_db(tmp_path)) as conn:
        conn.execute("DELETE FROM audit WHERE seq > 10")
    conn.close()
    await rounds_after(heads, 4)  # several rounds
    assert heads.regressions == 1  # told once, not once per round
    assert metrics.registry.get_sample_value("zandd_audit_head_regressions_total") == 1
    assert metrics.registry.get_sample_value("zandd_audit_head_seq") == 20
    assert "went back from #20 (published) to #10" in caplog.text
    # A writer without the ring appends past #20: unkeyed, then with a key of its own.
    await store.append_audit([event(n, principal="mallory") for n in range(11, 26)])
    forger = ChainKey(ring.active.kek_id, b"\x02" * 32)
    await store.append_audit([event(26, principal="mallory")], forger)
    await rounds_after(heads, 4)
    stop.set()
    await runner
    assert [e.seq for e in published.events] == [20]
    assert caplog.text.count("#26 was altered") == 1
