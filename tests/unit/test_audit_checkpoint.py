"""Audit checkpoints without a TPM: the signed bytes, the signature check, and ``check_log``
against the links they vouch for (a ring holder's cut and re-link is what they catch).

The signatures here come from a software P-256 key; tests/integration/test_audit_checkpoints.py
has the TPM's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from contracts.errors import IntegrityError, TpmUnavailable
from contracts.models import AuditCheckpointEvent
from tests.support.audit import append_keyed, vault_db
from vault.audit import AuditBroken, AuditQuery, check_log
from vault.audit_chain import ChainKeys
from vault.audit_checkpoint import (
    Checkpoint,
    CheckpointForged,
    check_signatures,
    signed_bytes,
    signed_digest,
    verify_checkpoint,
)
from vault.kek import KekRing
from vault.store import VaultStore
from workers.audit.audit_checkpoint import AuditCheckpointer, checkpoint_event, event_checkpoint
from workers.keygen.session import TpmSession
from workers.keygen.tpm import Tpm

AT = datetime(2026, 11, 29, 21, 0, 0, 123456, tzinfo=UTC)
TPM_KEY = ec.generate_private_key(ec.SECP256R1())


def signed(seq: int, link: str, key: ec.EllipticCurvePrivateKey = TPM_KEY) -> Checkpoint:
    digest = signed_digest(seq, link, AT)
    signature = key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    return Checkpoint(seq, link, AT, signature)


def test_the_signed_bytes_are_a_tagged_canonical_document() -> None:
    document = signed_bytes(7, "hmac-sha256/k1/" + "a" * 64, AT)
    assert document == (
        b'{"at":"2026-11-29T21:00:00.123+00:00","format":"zandd-audit-checkpoint/1",'
        b'"link":"hmac-sha256/k1/' + b"a" * 64 + b'","seq":7}'
    )
    assert json.loads(document)["format"] == "zandd-audit-checkpoint/1"
    assert signed_digest(7, "hmac-sha256/k1/" + "a" * 64, AT) == hashlib.sha256(document).digest()


def test_a_checkpoint_verifies_and_any_change_to_it_does_not() -> None:
    good = signed(7, "hmac-sha256/k1/" + "a" * 64)
    verify_checkpoint(good, TPM_KEY.public_key())
    for forged in (
        dataclasses.replace(good, seq=8),
        dataclasses.replace(good, link="hmac-sha256/k1/" + "b" * 64),
        dataclasses.replace(good, at=AT + timedelta(seconds=1)),
        dataclasses.replace(good, signature=good.signature[:-1] + bytes([good.signature[-1] ^ 1])),
        dataclasses.replace(good, signature=b""),
        signed(7, good.link, ec.generate_private_key(ec.SECP256R1())),  # another key
    ):
        with pytest.raises(CheckpointForged, match=r"#[78] has a bad signature"):
            verify_checkpoint(forged, TPM_KEY.public_key())


def test_two_signed_checkpoints_of_one_entry_with_different_links_are_refused() -> None:
    first, second = signed(7, "hmac-sha256/k1/" + "a" * 64), signed(7, "hmac-sha256/k1/" + "b" * 64)
    with pytest.raises(IntegrityError, match="two audit checkpoints #7 name different entries"):
        check_signatures([first, second], TPM_KEY.public_key())


async def test_a_ring_holders_cut_and_relink_fails_against_a_checkpoint(
    store: VaultStore, ring: KekRing, tmp_path: Path
) -> None:
    await append_keyed(store, ring, range(1, 31))
    entries = await store.read_audit(AuditQuery())
    vouched = {20: entries[19].entry_hash}
    report = await check_log(store, ChainKeys(ring), vouched=vouched)
    assert (report.head.seq, report.checkpoint, report.checkpoints) == (30, entries[19].head, 1)
    # The ring holder cuts from #16 and links new entries in their place: every link checks...
    with sqlite3.connect(vault_db(tmp_path)) as conn:
        conn.execute("DELETE FROM audit WHERE seq >= 16")
    conn.close()
    await append_keyed(store, ring, range(100, 120))
    assert (await check_log(store, ChainKeys(ring))).head.seq == 35
    # ...but entry #20 is no longer the one the checkpoint vouches for.
    with pytest.raises(AuditBroken, match="#20 is not the entry the TPM-signed checkpoint #20"):
        await check_log(store, ChainKeys(ring), vouched=vouched)


async def test_a_cut_below_the_newest_checkpoint_fails_and_one_above_it_does_not(
    store: VaultStore, ring: KekRing, tmp_path: Path
) -> None:
    await append_keyed(store, ring, range(1, 31))
    entries = await store.read_audit(AuditQuery())
    vouched = {10: entries[9].entry_hash, 20: entries[19].entry_hash}
    with sqlite3.connect(vault_db(tmp_path)) as conn:
        conn.execute("DELETE FROM audit WHERE seq > 20")
    conn.close()
    report = await check_log(store, ChainKeys(ring), vouched=vouched)
    assert (report.head.seq, report.checkpoint) == (20, entries[19].head)
    with sqlite3.connect(vault_db(tmp_path)) as conn:
        conn.execute("DELETE FROM audit WHERE seq > 17")
    conn.close()
    with pytest.raises(AuditBroken, match="ends at #17 but the TPM signed a checkpoint at #20"):
        await check_log(store, ChainKeys(ring), vouched=vouched)


def test_event_round_trip_keeps_what_was_signed() -> None:
    good = signed(7, "hmac-sha256/k1/" + "a" * 64)
    line = checkpoint_event(good).model_dump_json()
    back = event_checkpoint(AuditCheckpointEvent.model_validate_json(line))
    assert back == good
    verify_checkpoint(back, TPM_KEY.public_key())


async def test_a_keygen_worker_that_does_not_hold_the_tpm_makes_no_checkpoint(
    store: VaultStore, ring: KekRing
) -> None:
    """A hot standby: its TPM session was never opened, so it neither opens it nor signs."""
    await append_keyed(store, ring, range(1, 5))
    published: list[AuditCheckpointEvent] = []

    async def publish(event: AuditCheckpointEvent) -> None:
        published.append(event)

    opened: list[str] = []

    def opener(tcti: str) -> Tpm:
        opened.append(tcti)
        raise TpmUnavailable("a standby must not open the TPM")

    session = TpmSession("swtpm:host=127.0.0.1,port=1", opener=opener)
    try:
        checkpointer = AuditCheckpointer(
            store, ChainKeys(ring), session, publish, every_entries=1, interval_s=0.01
        )
        stop = asyncio.Event()
        running = asyncio.create_task(checkpointer.run(stop))
        await asyncio.sleep(0.1)  # about ten rounds, each one due
        stop.set()
        await running
    finally:
        session.close()
    assert opened == []
    assert (await store.read_checkpoints(), published, checkpointer.made) == ([], [], 0)
