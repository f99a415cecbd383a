"""The KEK ring against the vault it serves: ``zandd`` as a user runs it, real SQLite, swtpm.

The attack of issue 13: ``ZANDD_KEK_FILE`` (or the data dir) pointing at the wrong ring, or at
none, on a vault that holds keys. Nothing may start on it and nothing may replace the ring.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import pytest

from contracts.topology import SIGN_QUEUE, declare_topology
from tests.integration.test_cli import environment, free_port_pair, zandd
from vault import KeyRecord, KeyState, SealedKey, open_store
from vault.kek import KekRing


async def _vault_with_keys(data: Path, kek_id: str, count: int) -> None:
    """Key versions sealed (by their KEK id; the content does not matter here) in a vault."""
    store = await open_store(f"sqlite:///{data / 'vault.db'}")
    try:
        for _ in range(count):
            await store.create_key(
                KeyRecord(
                    key_id=f"zk-{uuid.uuid4().hex}",
                    version=1,
                    algorithm="ecdsa-p256-sha256",
                    public_key_der=os.urandom(91),
                    sealed=SealedKey(kek_id, os.urandom(12), os.urandom(48)),
                    state=KeyState.ENABLED,
                    label=None,
                    allowed_signers=(),
                    created_at=datetime.now(UTC),
                    created_by="test",
                    request_id=None,
                )
            )
    finally:
        await store.close()


def _refusal(err: str, ring: Path, kek_id: str) -> None:
    """One sentence on stderr (log lines aside) that names the ring path and the missing KEK id."""
    [line] = [line for line in err.strip().splitlines() if line.startswith("zandd: ")]
    assert line.startswith("zandd: the KEK ring "), err
    assert str(ring) in line
    assert kek_id in line
    assert "2 key versions" in line
    assert "Traceback" not in err


@pytest.fixture
def populated(tmp_path: Path) -> tuple[Path, KekRing]:
    """A data dir with its ring and a vault of two keys sealed under it."""
    data = tmp_path / "data"
    ring = KekRing.create(data / "kek-ring.json")
    asyncio.run(_vault_with_keys(data, ring.active.kek_id, 2))
    return data, ring


def _closed_tcti() -> str:
    return f"swtpm:host=127.0.0.1,port={free_port_pair()}"


async def test_vault_init_on_a_wrong_ring_path_refuses_and_creates_nothing(
    populated: tuple[Path, KekRing], tmp_path: Path
) -> None:
    data, ring = populated
    wrong = tmp_path / "elsewhere" / "kek-ring.json"
    env = environment(
        ZANDD_DATA_DIR=str(data), ZANDD_KEK_FILE=str(wrong), ZANDD_TPM_TCTI=_closed_tcti()
    )
    code, out, err = await zandd("vault", "init", env=env)
    assert code == 1
    _refusal(err, wrong, ring.active.kek_id)
    assert "--allow-unreadable" in err
    assert not wrong.exists()

    # The right ring is kept; the explicit flag creates the new ring and says what it leaves.
    code, out, err = await zandd("vault", "init", env=environment(ZANDD_DATA_DIR=str(data)))
    assert (code, "exists already" in out) == (0, True), err
    code, out, err = await zandd("vault", "init", "--allow-unreadable", env=env)
    assert code == 0, err
    assert wrong.exists()
    assert re.search(rf"allowed by --allow-unreadable: .*{ring.active.kek_id}", err), err


async def test_vault_init_on_another_ring_refuses(
    populated: tuple[Path, KekRing], tmp_path: Path
) -> None:
    data, ring = populated
    other = tmp_path / "other" / "kek-ring.json"
    KekRing.create(other)
    before = other.read_bytes()
    env = environment(ZANDD_DATA_DIR=str(data), ZANDD_KEK_FILE=str(other))
    code, _, err = await zandd("vault", "init", env=env)
    assert code == 1
    _refusal(err, other, ring.active.kek_id)
    assert other.read_bytes() == before


@pytest.mark.parametrize("role", ["signer", "keygen-worker"])
async def test_a_worker_on_the_wrong_ring_refuses_to_start(
    populated: tuple[Path, KekRing], tmp_path: Path, role: str
) -> None:
    data, ring = populated
    other = tmp_path / "other" / "kek-ring.json"
    KekRing.create(other)
    env = environment(
        ZANDD_DATA_DIR=str(data),
        ZANDD_KEK_FILE=str(other),
        ZANDD_TPM_TCTI=_closed_tcti(),
        # The check comes before the broker: a closed port proves it.
        ZANDD_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{free_port_pair()}/",
    )
    code, _, err = await zandd(role, env=env)
    assert code == 1
    _refusal(err, other, ring.active.kek_id)


@pytest.mark.rabbitmq
@pytest.mark.tpm
@pytest.mark.parametrize("ring_there", [False, True], ids=["no-ring", "another-ring"])
async def test_up_on_the_wrong_ring_refuses(
    populated: tuple[Path, KekRing],
    tmp_path: Path,
    empty_amqp_url: str,
    swtpm_tcti: str,
    ring_there: bool,
) -> None:
    data, ring = populated
    wrong = tmp_path / "wrong" / "kek-ring.json"
    if ring_there:
        KekRing.create(wrong)
    env = environment(
        ZANDD_AMQP_URL=empty_amqp_url,
        ZANDD_DATA_DIR=str(data),
        ZANDD_KEK_FILE=str(wrong),
        ZANDD_TPM_TCTI=swtpm_tcti,
    )
    code, out, err = await zandd("up", "--demo", "--signers", "1", env=env, timeout_s=120)
    assert code == 1, out + err
    _refusal(err, wrong, ring.active.kek_id)
    assert "fleet ready" not in err
    assert wrong.exists() is ring_there


@pytest.mark.rabbitmq
async def test_health_fails_on_the_wrong_ring(
    populated: tuple[Path, KekRing], tmp_path: Path, empty_amqp_url: str
) -> None:
    data, ring = populated
    connection = await aio_pika.connect(empty_amqp_url)
    async with connection:
        channel = await connection.channel()
        await declare_topology(channel)
        await (await channel.get_queue(SIGN_QUEUE)).consume(_never)
        base = {"ZANDD_AMQP_URL": empty_amqp_url, "ZANDD_DATA_DIR": str(data)}
        code, out, err = await zandd("health", "--role", "signer", env=environment(**base))
        assert (code, out) == (0, "healthy: broker, zandd.sign (1 consumer), vault\n"), err
        for wrong in (tmp_path / "none.json", tmp_path / "other" / "kek-ring.json"):
            if wrong.parent.name == "other":
                KekRing.create(wrong)
            env = environment(**base, ZANDD_KEK_FILE=str(wrong))
            code, out, err = await zandd("health", "--role", "signer", env=env)
            assert code == 1
            assert out == ""
            [line] = err.strip().splitlines()
            assert str(wrong) in line
            assert ring.active.kek_id in line


async def _never(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    """Holds the consumer slot; nothing is published."""
