"""TPM-signed audit checkpoints on a real fleet (RabbitMQ, swtpm, SQLite) and the real CLI.

The keygen worker has the TPM sign the audit head every 10 entries here. A writer who holds
the KEK ring can cut the newest entries and link new ones in their place — every keyed link
checks — but not make the TPM's checkpoint key sign for them: ``zandd audit verify
--checkpoint-key`` finds the cut back to the last checkpoint, offline, from the exported key.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from contracts.models import AuditCheckpointEvent
from contracts.operations import AUDIT_CHECKPOINT_EVENT
from contracts.topology import EVENTS_EXCHANGE
from tests.support.audit import event, vault_file
from tests.support.cli import environment, zandd
from tests.support.fleet import RunningFleet
from vault.audit import AuditQuery
from vault.audit_chain import ChainKeys
from vault.audit_checkpoint import Checkpoint, signed_digest, verify_checkpoint
from workers.audit.audit_checkpoint import event_checkpoint

EVERY = 10
pytestmark = [
    pytest.mark.rabbitmq,
    pytest.mark.tpm,
    # Every 10 entries; the interval is long, so no checkpoint comes from the clock.
    pytest.mark.fleet_settings(
        audit_checkpoint_every_entries=EVERY, audit_checkpoint_interval_s=3600.0
    ),
]


def env_of(fleet: RunningFleet) -> dict[str, str]:
    return environment(
        ZANDD_DATA_DIR=str(fleet.settings.data_dir), ZANDD_TPM_TCTI=fleet.settings.tpm_tcti or ""
    )


async def sign(fleet: RunningFleet, key_id: str, count: int) -> None:
    async with await fleet.client() as client:
        await asyncio.gather(*(client.sign(key_id, f"m{i}".encode()) for i in range(count)))


async def create_key(fleet: RunningFleet) -> str:
    async with await fleet.client() as client:
        return (await client.create_key(label="checkpointed")).key_id


async def checkpoint_at(fleet: RunningFleet, seq: int) -> Checkpoint:
    """Wait for the checkpoint of entry ``seq`` (the worker looks once a second)."""
    async with asyncio.timeout(30):  # generous: a round is due within about a second
        while True:
            found = [c for c in await fleet.store.read_checkpoints() if c.seq == seq]
            if found:
                return found[0]
            await asyncio.sleep(0.1)


async def newest_seq(fleet: RunningFleet) -> int:
    (newest,) = await fleet.store.read_audit(AuditQuery(latest=True, limit=1))
    return newest.seq


async def exported_key(
    fleet: RunningFleet, tmp_path: Path
) -> tuple[Path, ec.EllipticCurvePublicKey]:
    code, pem, err = await zandd("tpm", "checkpoint-key", env=env_of(fleet))
    assert code == 0, err
    path = tmp_path / "checkpoint-key.pem"
    path.write_text(pem)
    key = serialization.load_pem_public_key(pem.encode())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return path, key


async def verify(fleet: RunningFleet, *args: str) -> tuple[int, str, str]:
    return await zandd("audit", "verify", *args, env=env_of(fleet))


async def test_checkpoints_are_made_every_n_entries_signed_published_and_verify_offline(
    fleet: RunningFleet, tmp_path: Path
) -> None:
    published: list[AuditCheckpointEvent] = []
    both = asyncio.Event()
    connection = await aio_pika.connect(fleet.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(await channel.get_exchange(EVENTS_EXCHANGE))

        async def keep(message: AbstractIncomingMessage) -> None:
            if message.type == AUDIT_CHECKPOINT_EVENT:
                published.append(AuditCheckpointEvent.model_validate_json(message.body))
                if len(published) == 2:
                    both.set()

        await queue.consume(keep, no_ack=True)
        key_id = await create_key(fleet)
        await sign(fleet, key_id, EVERY + 5)
        first = await checkpoint_at(fleet, await newest_seq(fleet))
        await sign(fleet, key_id, EVERY)
        second = await checkpoint_at(fleet, await newest_seq(fleet))
        await asyncio.wait_for(both.wait(), 30)
    assert first.seq >= EVERY
    assert second.seq == first.seq + EVERY
    assert [event_checkpoint(e) for e in published] == [first, second]
    (entry,) = await fleet.store.read_audit(AuditQuery(after_seq=second.seq - 1, limit=1))
    assert second.link == entry.entry_hash

    key_file, key = await exported_key(fleet, tmp_path)
    for checkpoint in (first, second):
        verify_checkpoint(checkpoint, key)  # offline: the exported PEM and the published event
    code, out, err = await verify(fleet, "--checkpoint-key", str(key_file))
    assert code == 0, err
    assert (
        f"checkpoints: 2 TPM-signed checkpoints verified; the log reaches the newest, "
        f"#{second.seq}, and matches it" in out
    )
    code, listing, err = await zandd("audit", "checkpoints", env=env_of(fleet))
    assert code == 0, err
    assert [line.split()[0] for line in listing.splitlines()] == [f"#{first.seq}", f"#{second.seq}"]


async def test_a_ring_holders_cut_past_the_last_checkpoint_is_detected(
    fleet: RunningFleet, tmp_path: Path
) -> None:
    key_id = await create_key(fleet)
    await sign(fleet, key_id, 2 * EVERY)
    checkpoint = await checkpoint_at(fleet, await newest_seq(fleet))
    key_file, _ = await exported_key(fleet, tmp_path)
    code, jsonl, err = await zandd("audit", "checkpoints", "--jsonl", env=env_of(fleet))
    assert code == 0, err
    shipped = tmp_path / "elsewhere.jsonl"
    shipped.write_text(jsonl)

    # The writer holds the ring: cuts the newest entries and links new ones in their place.
    cut_from = checkpoint.seq - 5
    with sqlite3.connect(vault_file(fleet), timeout=10) as conn:
        conn.execute("DELETE FROM audit WHERE seq >= ?", (cut_from,))
    conn.close()
    keyed = ChainKeys(fleet.ring).active()
    await fleet.store.append_audit([event(n, "mallory") for n in range(40)], keyed)
    code, out, err = await verify(fleet)
    assert code == 0, err  # every keyed link checks: the ring alone cannot tell
    assert "checkpoints not checked" in out
    code, _, err = await verify(fleet, "--checkpoint-key", str(key_file))
    assert code == 1
    assert (
        f"audit entry #{checkpoint.seq} is not the entry the TPM-signed checkpoint "
        f"#{checkpoint.seq} vouches for" in err
    )
    # The writer also removes the checkpoints from the vault: the shipped copy still has them.
    with sqlite3.connect(vault_file(fleet), timeout=10) as conn:
        conn.execute("DELETE FROM audit_checkpoints")
        conn.execute("DELETE FROM audit WHERE seq >= ?", (cut_from,))
    conn.close()
    code, out, err = await verify(fleet, "--checkpoint-key", str(key_file))
    assert code == 0, err  # the vault alone no longer shows it, and verify says why
    assert "checkpoints: none in the vault or given: nothing vouches against a cut" in out
    code, _, err = await verify(
        fleet, "--checkpoint-key", str(key_file), "--checkpoints", str(shipped)
    )
    assert code == 1
    assert f"ends at #{cut_from - 1} but the TPM signed a checkpoint at #{checkpoint.seq}" in err


async def test_a_cut_that_keeps_every_checkpointed_entry_is_reported_as_such(
    fleet: RunningFleet, tmp_path: Path
) -> None:
    key_id = await create_key(fleet)
    await sign(fleet, key_id, EVERY)
    checkpoint = await checkpoint_at(fleet, await newest_seq(fleet))
    await sign(fleet, key_id, 3)  # fewer than EVERY: no checkpoint covers them
    key_file, _ = await exported_key(fleet, tmp_path)
    code, out, err = await verify(fleet, "--checkpoint-key", str(key_file))
    assert code == 0, err
    assert (
        f"after the newest checkpoint: 3 entries (#{checkpoint.seq + 1} to "
        f"#{checkpoint.seq + 3}) no checkpoint vouches for yet: a cut of them would not show" in out
    )
    with sqlite3.connect(vault_file(fleet), timeout=10) as conn:
        conn.execute("DELETE FROM audit WHERE seq > ?", (checkpoint.seq,))
    conn.close()
    code, out, err = await verify(fleet, "--checkpoint-key", str(key_file))
    assert code == 0, err
    assert f"audit log intact: {checkpoint.seq} entries" in out
    assert f"the log reaches the newest, #{checkpoint.seq}, and matches it" in out
    assert "after the newest checkpoint" not in out


async def test_a_forged_checkpoint_is_refused(fleet: RunningFleet, tmp_path: Path) -> None:
    key_id = await create_key(fleet)
    await sign(fleet, key_id, EVERY)
    checkpoint = await checkpoint_at(fleet, await newest_seq(fleet))
    key_file, _ = await exported_key(fleet, tmp_path)
    # A checkpoint "signed" by a key of the forger's own, at a later (invented) entry.
    forger = ec.generate_private_key(ec.SECP256R1())
    forged = Checkpoint(checkpoint.seq + 100, checkpoint.link, checkpoint.at, b"")
    signature = forger.sign(
        signed_digest(forged.seq, forged.link, forged.at), ec.ECDSA(Prehashed(hashes.SHA256()))
    )
    assert await fleet.store.add_checkpoint(
        Checkpoint(forged.seq, forged.link, forged.at, signature)
    )
    code, _, err = await verify(fleet, "--checkpoint-key", str(key_file))
    assert code == 1
    assert f"audit checkpoint #{forged.seq} has a bad signature" in err


@pytest.mark.fleet_settings(audit_checkpoint_every_entries=1000, audit_checkpoint_interval_s=0.3)
async def test_a_checkpoint_comes_after_the_interval_too(
    fleet: RunningFleet, tmp_path: Path
) -> None:
    key_id = await create_key(fleet)
    await sign(fleet, key_id, 3)  # far fewer than 1000 entries
    checkpoint = await checkpoint_at(fleet, await newest_seq(fleet))
    _, key = await exported_key(fleet, tmp_path)
    verify_checkpoint(checkpoint, key)
