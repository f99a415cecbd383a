"""Receipts: every sign and sign.batch reply names its audit entry (sequence number and link),
and ``zandd audit show SEQ`` finds that entry, whose data digest is the request's.

A real fleet (RabbitMQ, swtpm, SQLite) and the real CLI.
"""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from tests.support.cli import environment, zandd
from tests.support.fleet import RunningFleet
from vault.audit import AuditQuery

pytestmark = [pytest.mark.rabbitmq, pytest.mark.tpm]


async def show(fleet: RunningFleet, seq: int) -> tuple[int, str, str]:
    return await zandd(
        "audit", "show", str(seq), env=environment(ZANDD_DATA_DIR=str(fleet.settings.data_dir))
    )


async def test_a_sign_receipt_finds_its_entry_and_the_entry_holds_the_data_digest(
    fleet: RunningFleet,
) -> None:
    async with await fleet.client() as client:
        key = await client.create_key(label="receipts")
        messages = [f"invoice {n}".encode() for n in range(20)]
        replies = await asyncio.gather(*(client.sign(key.key_id, m) for m in messages))
    receipts = [reply.receipt for reply in replies]
    assert all(receipt is not None for receipt in receipts)
    seqs = [receipt.seq for receipt in receipts if receipt is not None]
    assert len(set(seqs)) == len(seqs)  # one entry each, even when committed as one group
    stored = {e.seq: e for e in await fleet.store.read_audit(AuditQuery())}
    for message, receipt in zip(messages, receipts, strict=True):
        assert receipt is not None
        entry = stored[receipt.seq]
        assert entry.entry_hash == receipt.link
        assert entry.event.data_sha256 == hashlib.sha256(message).hexdigest()
        assert entry.event.operation == "sign"
    message, receipt = messages[7], receipts[7]
    assert receipt is not None
    code, out, err = await show(fleet, receipt.seq)
    assert code == 0, err
    assert out.startswith(f"#{receipt.seq} ")
    assert f" sign {key.key_id} v1 ok " in out
    assert f"sha256={hashlib.sha256(message).hexdigest()}" in out
    assert f"link {receipt.link}\n" in out


async def test_a_sign_batch_receipt_finds_its_one_entry(fleet: RunningFleet) -> None:
    items = [b"one", b"two", b"three"]
    async with await fleet.client() as client:
        key = await client.create_key(label="batch receipts")
        reply = await client.sign_batch(key.key_id, items)
    assert reply.receipt is not None
    batch_digest = hashlib.sha256(b"".join(hashlib.sha256(i).digest() for i in items))
    code, out, err = await show(fleet, reply.receipt.seq)
    assert code == 0, err
    assert f" sign.batch {key.key_id} v1 ok " in out
    assert f"sha256={batch_digest.hexdigest()}" in out
    assert f"link {reply.receipt.link}\n" in out


async def test_audit_show_of_a_missing_entry_says_so(fleet: RunningFleet) -> None:
    code, _, err = await show(fleet, 99999)
    assert code == 1
    assert err.strip() == "zandd: the audit log has no entry #99999"
