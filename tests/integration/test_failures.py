"""Issue 17, the first bad day: each failure tells the user its cause and the fix, fast.

Real worker processes (``zandd signer`` / ``keygen-worker``), the real broker (a private vhost),
a real swtpm, and the real ``zandd`` command.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest

from contracts.client import SigningClient
from contracts.errors import NoConsumer, RequestTimeout, TpmUnavailable
from contracts.topology import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_MAX_LENGTH,
    DEAD_LETTER_QUEUE,
    declare_topology,
)
from contracts.wire import Properties, Wire
from tests.support.cli import ZANDD, environment, zandd
from tests.support.net import free_port_pair
from tests.support.processes import ProcessFleet, started
from vault.kek import KekRing
from workers.keygen.swtpm import start_swtpm

pytestmark = [pytest.mark.rabbitmq, pytest.mark.tpm]


@pytest.fixture
async def processes(
    empty_amqp_url: str, swtpm_tcti: str, tmp_path: Path
) -> AsyncIterator[ProcessFleet]:
    KekRing.create(tmp_path / "kek-ring.json")
    fleet = ProcessFleet(empty_amqp_url, tmp_path, swtpm_tcti)
    try:
        yield fleet
    finally:
        await fleet.stop_all()


# -- a fleet stopped after it ran once -------------------------------------------------------


async def test_a_stopped_fleet_fails_fast_naming_the_missing_worker(
    processes: ProcessFleet,
) -> None:
    await started(processes, signers=1)
    async with await SigningClient.connect(processes.amqp_url, timeout_s=30) as client:
        key = await client.create_key(label="before the stop")
        await client.sign(key.key_id, b"served")
        await processes.stop_all()
        await processes.wait_for_consumers(signers=0, keygens=0)

        # Sent (the client saw a signer at connect): its timeout names the missing signer.
        with pytest.raises(RequestTimeout) as sent:
            await client.sign(key.key_id, b"nobody", timeout_s=3)
        assert "no signer is consuming zandd.sign" in sent.value.message
        assert "zandd up" in sent.value.message

        # Seen without a signer (and a keygen worker) meanwhile: the next calls are not sent.
        began = time.monotonic()
        with pytest.raises(NoConsumer) as unsent:
            await client.sign(key.key_id, b"nobody either")
        assert time.monotonic() - began < 2
        assert unsent.value.message.startswith(
            "no signer is consuming zandd.sign, so sign was not sent: the fleet is stopped "
            "(start it: zandd up)"
        )
        assert unsent.value.retryable
        began = time.monotonic()
        with pytest.raises(NoConsumer, match=r"no keygen worker is consuming zandd\.keygen"):
            await client.create_key(label="after the stop")
        assert time.monotonic() - began < 2
    # A client that connects to the stopped fleet knows at once.
    async with await SigningClient.connect(processes.amqp_url, timeout_s=30) as late:
        began = time.monotonic()
        with pytest.raises(NoConsumer, match=r"no signer is consuming zandd\.sign"):
            await late.sign(key.key_id, b"late")
        assert time.monotonic() - began < 2


async def test_retry_waits_for_a_consumer_and_its_timeout_names_the_missing_one(
    processes: ProcessFleet,
) -> None:
    await started(processes, signers=1)
    async with await SigningClient.connect(processes.amqp_url, retry=True) as client:
        key = await client.create_key(label="retry")
        await processes.stop_all()
        await processes.wait_for_consumers(signers=0, keygens=0)
        with pytest.raises(RequestTimeout) as timed_out:
            await client.sign(key.key_id, b"no signer", timeout_s=3)
        assert "no signer is consuming zandd.sign" in timed_out.value.message
        assert "zandd up" in timed_out.value.message

        # A signer that comes back within the deadline serves the waiting call.
        waiting = asyncio.create_task(client.sign(key.key_id, b"back in time", timeout_s=60))
        await asyncio.sleep(2)
        assert not waiting.done()
        await processes.start("signer-2")
        reply = await waiting
        assert reply.key_id == key.key_id


# -- a permanent error under zandd up ---------------------------------------------------------


async def _start_up(env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    """``zandd up`` running, once it logged that its fleet is ready."""
    process = await asyncio.create_subprocess_exec(
        *ZANDD, "up", *args, env=env, stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    async with asyncio.timeout(120):
        while b"fleet ready" not in (line := await process.stderr.readline()):
            assert line, "zandd up exited before its fleet was ready"
    return process


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def _is_signer(pid: int) -> bool:
    return b"signer" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


async def test_a_damaged_vault_stops_zandd_up_at_once_with_its_cause(
    empty_amqp_url: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "fleet"
    env = environment(
        ZANDD_AMQP_URL=empty_amqp_url,
        ZANDD_DATA_DIR=str(data_dir),
        ZANDD_SWTPM_PORT=str(free_port_pair()),
    )
    up = await _start_up(env, "--signers", "1")
    try:
        garbage = data_dir / "garbage.db"
        garbage.write_bytes(b"this is not an SQLite database, nor any vault at all" * 100)
        garbage.replace(data_dir / "vault.db")
        signer = next(pid for pid in _children(up.pid) if _is_signer(pid))
        os.kill(signer, signal.SIGKILL)  # its restart opens the damaged vault
        began = time.monotonic()
        assert up.stderr is not None
        _, err = await asyncio.wait_for(up.communicate(), 60)
        code = up.returncode
    finally:
        if up.returncode is None:
            up.kill()
            await up.wait()
    assert time.monotonic() - began < 30
    assert code == 1
    last = err.decode().strip().splitlines()[-1]
    assert last.startswith("zandd: signer-1 cannot run: SQLite vault"), last
    assert "is damaged" in last
    assert "the fleet stopped" in last
    # Restarted once after the SIGKILL (transient), never after the permanent error.
    assert err.decode().count("restarting in") == 1


# -- the swtpm port taken by something else ---------------------------------------------------


async def test_up_refuses_a_swtpm_port_that_something_else_holds(
    empty_amqp_url: str, tmp_path: Path
) -> None:
    port = free_port_pair()
    env = environment(
        ZANDD_AMQP_URL=empty_amqp_url,
        ZANDD_DATA_DIR=str(tmp_path / "fleet"),
        ZANDD_SWTPM_PORT=str(port),
    )
    with socket.create_server(("127.0.0.1", port)):  # not a swtpm, not this fleet's
        code, _, err = await zandd("up", "--signers", "1", env=env, timeout_s=60)
    assert code == 1
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(f"zandd: port {port} is taken by something other than this fleet's swtpm")
    )
    assert not (tmp_path / "fleet" / "kek-ring.json").exists()


async def test_up_reuses_its_own_swtpm_but_not_another_fleets(
    empty_amqp_url: str, tmp_path: Path
) -> None:
    port = free_port_pair()
    other = start_swtpm(tmp_path / "other-fleet-swtpm", port=port)
    try:
        env = environment(
            ZANDD_AMQP_URL=empty_amqp_url,
            ZANDD_DATA_DIR=str(tmp_path / "fleet"),
            ZANDD_SWTPM_PORT=str(port),
        )
        code, _, err = await zandd("up", "--signers", "1", env=env, timeout_s=60)
        assert code == 1
        assert f"port {port} is taken by something other than this fleet's swtpm" in err
        # The fleet's own (its state dir beside the data dir) is reused.
        env["ZANDD_SWTPM_STATE_DIR"] = str(tmp_path / "other-fleet-swtpm")
        code, _, err = await zandd("up", "--demo", "--signers", "1", env=env, timeout_s=120)
        assert code == 0, err
        assert f"using this fleet's swtpm already listening on port {port}" in err
    finally:
        other.stop()


# -- zandd.dead is bounded --------------------------------------------------------------------


async def test_dead_letters_are_bounded_and_the_newest_are_kept(empty_amqp_url: str) -> None:
    connection = await aio_pika.connect(empty_amqp_url)
    async with connection:
        channel = await connection.channel()
        await declare_topology(channel)
        wire = await Wire.connect(empty_amqp_url, connection_name="zandd-test-dead")
        try:
            await wire.confirm_select()
            extra = 50
            confirms = [
                wire.publish(
                    b"{}",
                    Properties(content_type="application/json", message_id=str(n)),
                    exchange=DEAD_LETTER_EXCHANGE,
                    routing_key="",
                )
                for n in range(DEAD_LETTER_MAX_LENGTH + extra)
            ]
            assert all(await asyncio.gather(*(c for c in confirms if c is not None)))
        finally:
            await wire.close()
        dead = await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
        assert dead.declaration_result.message_count == DEAD_LETTER_MAX_LENGTH
        oldest = await dead.get(no_ack=False)
        assert oldest is not None
        assert int(oldest.message_id or "-1") >= extra  # the oldest were dropped
        await oldest.nack(requeue=True)


async def test_an_unbounded_dead_letter_queue_of_an_older_fleet_is_kept(
    empty_amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    connection = await aio_pika.connect(empty_amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(
            DEAD_LETTER_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
        )
        with caplog.at_level(logging.WARNING, logger="zandd.topology"):
            await declare_topology(channel)  # no PRECONDITION_FAILED
        assert "zandd-dead-bounds" in caplog.text


# -- the TPM unreachable while the keygen worker runs -----------------------------------------


async def test_keygen_answers_tpm_unavailable_at_once_while_its_tpm_is_down(
    empty_amqp_url: str, tmp_path: Path
) -> None:
    state = tmp_path / "swtpm"
    swtpm = start_swtpm(state)
    KekRing.create(tmp_path / "kek-ring.json")
    fleet = ProcessFleet(empty_amqp_url, tmp_path, swtpm.tcti)
    try:
        await started(fleet, signers=1)
        async with await SigningClient.connect(empty_amqp_url, timeout_s=30) as client:
            key = await client.create_key(label="before the outage")
            swtpm.stop()
            began = time.monotonic()
            with pytest.raises(TpmUnavailable) as down:
                await client.create_key(label="during the outage")
            assert time.monotonic() - began < 5
            assert down.value.message == "the keygen worker cannot reach its TPM; try again later"
            assert down.value.retryable
            # What needs no TPM is still served by the same keygen worker.
            await client.update_key(key.key_id, label="renamed during the outage")
            swtpm = start_swtpm(state, port=swtpm.port)
            created = await client.create_key(label="after the outage")  # first time
            assert created.key_id != key.key_id
    finally:
        await fleet.stop_all()
        swtpm.stop()


# -- zandd tpm check beside a running keygen worker -------------------------------------------


def _transient_handles(tcti: str) -> set[int]:
    from tpm2_pytss import ESAPI
    from tpm2_pytss.constants import TPM2_CAP, TPM2_HT

    with ESAPI(tcti) as ectx:
        _, data = ectx.get_capability(TPM2_CAP.HANDLES, TPM2_HT.TRANSIENT << 24, 64)
        return {int(handle) for handle in data.data.handles}


async def test_tpm_check_leaves_a_running_keygen_workers_objects_alone(
    processes: ProcessFleet,
) -> None:
    await started(processes, signers=1)
    async with await SigningClient.connect(processes.amqp_url, timeout_s=30) as client:
        await client.create_key(label="the keygen worker holds its storage primary now")
        held = await asyncio.to_thread(_transient_handles, processes.tcti)
        assert held, "the keygen worker holds no object: nothing to disturb"
        code, out, err = await zandd("tpm", "check", env=processes.env, timeout_s=60)
        assert code == 0, err
        assert "round trip: OK" in out
        assert held <= await asyncio.to_thread(_transient_handles, processes.tcti)
        await client.create_key(label="served at the first attempt")
