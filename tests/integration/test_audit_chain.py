"""The keyed audit chain against a vault writer without the ring: a real fleet, SQLite, the CLI.

The workers link every entry with an HMAC under a key derived from the KEK ring and publish
their newest head on ``zandd.events``. A writer who cuts the newest entries leaves a chain
that is intact on its own — the published head shows the cut. A writer who rewrites entries
and re-chains them with the (public) unkeyed hash fails ``zandd audit verify``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from contracts.models import AuditHeadEvent
from contracts.operations import AUDIT_HEAD_EVENT
from contracts.topology import EVENTS_EXCHANGE
from tests.support.audit import event, vault_file
from tests.support.cli import ZANDD, environment, zandd
from tests.support.fleet import RunningFleet
from vault.audit import GENESIS, AuditQuery, link
from vault.kek import KekRing
from vault.store import open_store

pytestmark = [
    pytest.mark.rabbitmq,
    pytest.mark.tpm,
    # Heads every 10 entries or 0.2 s, so the newest is out soon after the last request.
    pytest.mark.fleet_settings(audit_head_every_entries=10, audit_head_interval_s=0.2),
]
SIGNATURES = 120
CUT = 50


@dataclass
class Heads:
    """Every ``audit.head`` event the fleet published since the fixture started."""

    events: list[AuditHeadEvent] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def reaching(self, seq: int) -> AuditHeadEvent:
        """Wait for the published head numbered ``seq``."""
        async with asyncio.timeout(30):  # generous: publication is every 0.2 s here
            while True:
                self.arrived.clear()
                found = [h for h in self.events if h.seq == seq]
                if found:
                    return found[0]
                await self.arrived.wait()


@pytest.fixture
async def heads(fleet: RunningFleet) -> AsyncIterator[Heads]:
    """The fleet's published heads, as an outside keeper subscribed to ``zandd.events`` sees them."""
    kept = Heads()
    connection = await aio_pika.connect(fleet.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(EVENTS_EXCHANGE)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange)

        async def keep(message: AbstractIncomingMessage) -> None:
            if message.type == AUDIT_HEAD_EVENT:
                kept.events.append(AuditHeadEvent.model_validate_json(message.body))
                kept.arrived.set()

        await queue.consume(keep, no_ack=True)
        yield kept


async def newest_published(fleet: RunningFleet, heads: Heads) -> AuditHeadEvent:
    """Wait until a published head is the vault's newest entry; that head."""
    (newest,) = await fleet.store.read_audit(AuditQuery(latest=True, limit=1))
    head = await heads.reaching(newest.seq)
    assert head.link == newest.entry_hash
    return head


async def sign_many(fleet: RunningFleet, count: int) -> None:
    async with await fleet.client() as client:
        key = await client.create_key(label="audited")
        await asyncio.gather(*(client.sign(key.key_id, f"m{i}".encode()) for i in range(count)))


async def test_cutting_the_newest_entries_is_detected_against_the_published_head(
    fleet: RunningFleet, heads: Heads, tmp_path: Path
) -> None:
    await sign_many(fleet, SIGNATURES)
    head = await newest_published(fleet, heads)
    assert head.seq >= SIGNATURES + 1
    assert head.link.startswith(f"hmac-sha256/{fleet.ring.active.kek_id}/")
    env = environment(ZANDD_DATA_DIR=str(fleet.settings.data_dir))
    known = f"{head.seq}:{head.link}"
    code, out, err = await zandd("audit", "verify", "--head", known, env=env)
    assert code == 0, err
    assert f"keyed links (HMAC-SHA256 under the ring's audit key): #1 to #{head.seq}" in out
    assert "legacy unkeyed links: none" in out
    assert f"head: the log reaches the known head #{head.seq} and matches" in out

    with sqlite3.connect(vault_file(fleet), timeout=10) as conn:
        conn.execute("DELETE FROM audit WHERE seq > ?", (head.seq - CUT,))
    conn.close()
    # On its own the shortened chain is intact, and verify says it did not check a head...
    code, out, err = await zandd("audit", "verify", env=env)
    assert code == 0, err
    assert "head: not checked" in out
    # ...against the published head the cut shows, from the command line or a file of heads.
    code, _, err = await zandd("audit", "verify", "--head", known, env=env)
    assert code == 1
    assert f"ends at #{head.seq - CUT} but a published head is #{head.seq}" in err
    assert f"its newest {CUT} entries were cut" in err
    head_file = tmp_path / "heads.jsonl"
    head_file.write_text("\n".join(h.model_dump_json() for h in heads.events) + "\n")
    code, _, err = await zandd("audit", "verify", "--head-file", str(head_file), env=env)
    assert code == 1
    assert f"its newest {CUT} entries were cut" in err


async def test_rewriting_and_rechaining_without_the_ring_fails_audit_verify(
    fleet: RunningFleet,
) -> None:
    await sign_many(fleet, 30)
    env = environment(ZANDD_DATA_DIR=str(fleet.settings.data_dir))
    code, _, err = await zandd("audit", "verify", env=env)
    assert code == 0, err
    entries = await fleet.store.read_audit(AuditQuery())

    def rechain_from(first: int) -> None:
        """The attack of issue 13: edit entries from ``first`` on and re-chain them with the
        unkeyed hash, which anyone can compute."""
        head = GENESIS if first == 1 else entries[first - 2].head
        edited = [dataclasses.replace(e.event, principal="mallory") for e in entries[first - 1 :]]
        with sqlite3.connect(vault_file(fleet), timeout=10) as conn:
            for forged in link(head, edited):
                conn.execute(
                    "UPDATE audit SET principal = ?, prev_hash = ?, entry_hash = ? WHERE seq = ?",
                    (forged.event.principal, forged.prev_hash, forged.entry_hash, forged.seq),
                )
        conn.close()

    rechain_from(10)
    code, _, err = await zandd("audit", "verify", env=env)
    assert (code, err.strip()) == (
        1,
        "zandd: audit entry #10 is unkeyed but follows keyed entries: it was written or "
        "re-chained without the KEK ring",
    )
    rechain_from(1)  # the whole log, so that no keyed entry is left to follow
    code, _, err = await zandd("audit", "verify", env=env)
    assert code == 1
    assert f"no audit entry is keyed (all {len(entries)} are legacy, unkeyed)" in err


async def test_a_legacy_log_verifies_as_legacy(tmp_path: Path) -> None:
    """A vault written before keyed links (the unkeyed chain of 8fa3105), no worker since."""
    KekRing.create(tmp_path / "kek-ring.json")
    store = await open_store(f"sqlite://{tmp_path / 'vault.db'}")
    try:
        await store.append_audit([event(n) for n in range(1, 8)])
    finally:
        await store.close()
    env = environment(ZANDD_DATA_DIR=str(tmp_path))
    code, _, err = await zandd("audit", "verify", env=env)
    assert code == 1
    assert "no audit entry is keyed (all 7 are legacy, unkeyed)" in err
    assert "pass --legacy to accept it" in err
    code, out, err = await zandd("audit", "verify", "--legacy", env=env)
    assert code == 0, err
    assert out.startswith("audit log intact: 7 entries, head #7 ")
    assert "legacy unkeyed links (SHA-256, before the first keyed entry): #1 to #7" in out
    assert "keyed links: none" in out


async def test_a_legacy_prefix_stays_valid_once_workers_write_keyed_entries(
    fleet: RunningFleet,
) -> None:
    await fleet.store.append_audit([event(n) for n in range(1, 6)])  # the old, unkeyed chain
    await sign_many(fleet, 3)
    env = environment(ZANDD_DATA_DIR=str(fleet.settings.data_dir))
    code, out, err = await zandd("audit", "verify", env=env)
    assert code == 0, err
    assert "legacy unkeyed links (SHA-256, before the first keyed entry): #1 to #5" in out
    assert "keyed links (HMAC-SHA256 under the ring's audit key): #6 to #9" in out


async def test_zandd_audit_keep_heads_keeps_what_audit_verify_checks(
    fleet: RunningFleet, tmp_path: Path
) -> None:
    env = environment(ZANDD_AMQP_URL=fleet.amqp_url, ZANDD_DATA_DIR=str(fleet.settings.data_dir))
    head_file = tmp_path / "elsewhere" / "heads.jsonl"
    head_file.parent.mkdir()
    keeper = await asyncio.create_subprocess_exec(
        *ZANDD,
        *("audit", "keep-heads", str(head_file), "--count", "2"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert keeper.stdout is not None
    started = await asyncio.wait_for(keeper.stdout.readline(), 60)
    assert started.decode().startswith("keeping audit heads from zandd.events")
    await sign_many(fleet, 30)
    first = await asyncio.wait_for(keeper.stdout.readline(), 60)
    assert first.decode().startswith("kept audit head #")
    await sign_many(fleet, 30)  # a newer head, the keeper's second
    out, err = await asyncio.wait_for(keeper.communicate(), 60)
    assert keeper.returncode == 0, err.decode()
    assert out.decode().count("kept audit head #") == 1
    kept = [AuditHeadEvent.model_validate_json(line) for line in head_file.read_text().splitlines()]
    newest = max(kept, key=lambda head: head.seq)
    code, out_text, err_text = await zandd(
        "audit", "verify", "--head-file", str(head_file), env=env
    )
    assert code == 0, err_text
    assert f"head: the log reaches the known head #{newest.seq} and matches" in out_text
    with sqlite3.connect(vault_file(fleet), timeout=10) as conn:
        conn.execute("DELETE FROM audit WHERE seq >= ?", (newest.seq,))
    conn.close()
    code, _, err_text = await zandd("audit", "verify", "--head-file", str(head_file), env=env)
    assert code == 1
    assert "entries were cut" in err_text
