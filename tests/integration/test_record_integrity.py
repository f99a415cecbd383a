"""A vault writer without the KEK ring, tried the way issue 13 reproduced it: real RabbitMQ
users, swtpm, a SQLite vault written to directly, and signers restarted in between.

Every attack changes the SQLite row as a database user would; every one is refused with
``integrity_error`` and audited as such, and the vault keeps the row the attacker wrote (the
workers refuse it, they do not repair it).
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel

from contracts.client import SigningClient
from contracts.crypto import public_key_der
from contracts.errors import IntegrityError
from contracts.models import SPECS, KeyPublicRequest, KeyState, KeyStateRequest, SignRequest
from contracts.operations import Operation
from tests.support.audit import audit_outcomes, vault_file
from tests.support.cli import environment, zandd
from tests.support.fleet import RunningFleet
from tests.support.principals import ALICE, BOB
from vault.record_mac import verify_record
from workers.consumer.runtime import ConsumerRuntime
from workers.service.serve import signer_worker

pytestmark = [pytest.mark.rabbitmq, pytest.mark.tpm]


def write_row(fleet: RunningFleet, sql: str, *params: object) -> None:
    """Change the vault as a database user would: no KEK ring, no worker involved."""
    with sqlite3.connect(vault_file(fleet), timeout=10) as conn:
        conn.execute(sql, params)
    conn.close()


def read_row(fleet: RunningFleet, key_id: str) -> dict[str, Any]:
    with sqlite3.connect(vault_file(fleet), timeout=10) as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM keys WHERE key_id = ?", (key_id,)).fetchone()
    conn.close()
    return dict(row)


def put_back(fleet: RunningFleet, row: dict[str, Any]) -> None:
    """Restore a whole row from an older copy (a backup, a snapshot) over the current one."""
    columns = ", ".join(row)
    marks = ", ".join("?" * len(row))
    write_row(fleet, f"INSERT OR REPLACE INTO keys ({columns}) VALUES ({marks})", *row.values())  # noqa: S608


@asynccontextmanager
async def signer_running(fleet: RunningFleet) -> AsyncIterator[None]:
    """A signer process of its own, started now: it has heard no event and cached nothing."""
    stop = asyncio.Event()
    async with AsyncExitStack() as stack:
        worker = await signer_worker(fleet.settings, fleet.store, fleet.ring, stack)
        runtime = ConsumerRuntime(
            amqp_url=fleet.amqp_url,
            queue=worker.queue,
            handlers=worker.handlers,
            prefetch=fleet.settings.signer_concurrency,
            limits=fleet.settings.limits,
            drain_timeout_s=fleet.settings.drain_timeout_s,
            name=f"test-fresh-signer-{uuid.uuid4().hex[:6]}",
            audit=worker.audit,
        )
        task = asyncio.create_task(runtime.run(stop))
        try:
            await asyncio.wait_for(runtime.ready.wait(), 30)
            yield
        finally:
            stop.set()
            await task


async def refused_and_audited(
    client: SigningClient, fleet: RunningFleet, operation: Operation, request: BaseModel
) -> IntegrityError:
    """Send ``request``; it must fail with integrity_error, and be audited so."""
    request_id = f"attack-{uuid.uuid4().hex}"
    with pytest.raises(IntegrityError) as refused:
        await client.call(
            operation,
            request,
            SPECS[operation].reply,  # type: ignore[arg-type]
            message_id=request_id,
        )
    assert (await audit_outcomes(fleet))[request_id] == ["integrity_error"]
    return refused.value


async def test_an_owner_changed_in_the_vault_cannot_manage_the_key(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    alice, bob = clients[ALICE], clients[BOB]
    key = await alice.create_key()
    write_row(fleet, "UPDATE keys SET created_by = ? WHERE key_id = ?", BOB, key.key_id)
    error = await refused_and_audited(
        bob, fleet, Operation.KEY_DISABLE, KeyStateRequest(key_id=key.key_id)
    )
    assert "failed its record MAC" in error.message
    # Nobody manages a record nothing vouches for, its real owner included.
    await refused_and_audited(
        alice, fleet, Operation.KEY_DISABLE, KeyStateRequest(key_id=key.key_id)
    )
    assert read_row(fleet, key.key_id)["state"] == "enabled"


async def test_a_signer_added_in_the_vault_cannot_sign(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    alice, bob = clients[ALICE], clients[BOB]
    key = await alice.create_key()
    fine = await alice.create_key()
    signers = f'["{ALICE}", "{BOB}"]'
    write_row(fleet, "UPDATE keys SET allowed_signers = ? WHERE key_id = ?", signers, key.key_id)
    request = SignRequest(key_id=key.key_id, message=b"pay Bob")
    await refused_and_audited(bob, fleet, Operation.SIGN, request)
    await refused_and_audited(alice, fleet, Operation.SIGN, request)
    # Every change the keygen worker makes is MACed as the next generation.
    await alice.disable_key(fine.key_id)
    changed = await fleet.store.get_key(fine.key_id)
    assert (changed.state, changed.generation) == (KeyState.DISABLED, 2)
    verify_record(changed, fleet.ring)


@pytest.mark.signers(0)
async def test_a_key_re_enabled_in_the_vault_stays_refused_after_a_signer_restart(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    alice = clients[ALICE]
    key = await alice.create_key()
    async with signer_running(fleet):
        await alice.sign(key.key_id, b"while enabled")
        await alice.disable_key(key.key_id)
    write_row(fleet, "UPDATE keys SET state = 'enabled' WHERE key_id = ?", key.key_id)
    async with signer_running(fleet):  # knows nothing of the disable
        request = SignRequest(key_id=key.key_id, message=b"after the restart")
        error = await refused_and_audited(alice, fleet, Operation.SIGN, request)
    assert "failed its record MAC" in error.message


@pytest.mark.signers(0)
async def test_a_destroyed_key_restored_from_an_older_copy_stays_refused_after_a_restart(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    alice = clients[ALICE]
    key = await alice.create_key()
    other = await alice.create_key()
    async with signer_running(fleet):
        await alice.sign(key.key_id, b"before the backup")
    backup = read_row(fleet, key.key_id)  # enabled, sealed, validly MACed: generation 1
    await alice.destroy_key(key.key_id, pending_days=1)
    fleet.clock.advance(timedelta(days=2))
    await alice.disable_key(other.key_id)  # every lifecycle request destroys what is due
    gone = await fleet.store.get_key(key.key_id)
    assert (gone.state, gone.generation) == (KeyState.DESTROYED, 3)

    put_back(fleet, backup)
    assert read_row(fleet, key.key_id) == backup
    async with signer_running(fleet):  # heard no event: the vault's key head catches it
        request = SignRequest(key_id=key.key_id, message=b"after the restore")
        error = await refused_and_audited(alice, fleet, Operation.SIGN, request)
        assert "an older copy of the record was put back" in error.message
        await refused_and_audited(
            alice, fleet, Operation.KEY_PUBLIC, KeyPublicRequest(key_id=key.key_id)
        )
    await refused_and_audited(
        alice, fleet, Operation.KEY_ENABLE, KeyStateRequest(key_id=key.key_id)
    )


async def test_a_public_key_swapped_in_the_vault_is_refused_by_key_public_and_sign(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    alice, bob = clients[ALICE], clients[BOB]
    key = await alice.create_key()
    attacker = ec.generate_private_key(ec.SECP256R1())
    write_row(
        fleet,
        "UPDATE keys SET public_key_der = ? WHERE key_id = ?",
        public_key_der(attacker.public_key()),
        key.key_id,
    )
    error = await refused_and_audited(
        bob, fleet, Operation.KEY_PUBLIC, KeyPublicRequest(key_id=key.key_id)
    )
    assert "failed its record MAC" in error.message
    await refused_and_audited(
        alice, fleet, Operation.SIGN, SignRequest(key_id=key.key_id, message=b"x")
    )


async def test_a_vault_from_before_record_macs_is_upgraded_once(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    alice, bob = clients[ALICE], clients[BOB]
    keys = [await alice.create_key() for _ in range(3)]
    # The vault as the previous version left it (after the schema step): no MACs, no heads.
    write_row(fleet, "UPDATE keys SET mac = NULL, mac_kek_id = NULL, generation = 1")
    write_row(fleet, "DELETE FROM key_heads")
    env = environment(ZANDD_DATA_DIR=str(fleet.settings.data_dir))
    code, out, _ = await zandd("vault", "status", env=env)
    assert "without a record MAC (refused): 3 key versions" in out
    code, out, _ = await zandd("keys", "show", keys[0].key_id, env=env)
    assert "REFUSED BY THE WORKERS" in out
    assert "has no record MAC" in out
    sign_first = SignRequest(key_id=keys[0].key_id, message=b"before the upgrade")
    await refused_and_audited(alice, fleet, Operation.SIGN, sign_first)

    code, out, err = await zandd("vault", "mac-records", env=env)
    assert code == 0, err
    assert out.strip().endswith(": 3 maced")
    await alice.sign(keys[0].key_id, b"after the upgrade")
    code, out, _ = await zandd("keys", "show", keys[0].key_id, env=env)
    assert "REFUSED" not in out

    # From now on a record without a MAC was written without the ring: never vouched for.
    write_row(
        fleet,
        "UPDATE keys SET mac = NULL, allowed_signers = ? WHERE key_id = ?",
        f'["{BOB}"]',
        keys[1].key_id,
    )
    code, _, err = await zandd("vault", "mac-records", env=env)
    assert code == 1
    assert "1 key versions have no MAC in a vault where 2 have one" in err
    sign_second = SignRequest(key_id=keys[1].key_id, message=b"pay Bob")
    await refused_and_audited(bob, fleet, Operation.SIGN, sign_second)
