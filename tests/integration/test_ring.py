"""The KEK ring against the vault it serves: ``zandd`` as a user runs it, real SQLite, swtpm.

The attack of issue 13: ``ZANDD_KEK_FILE`` (or the data dir) pointing at the wrong ring, or at
none, on a vault that holds keys. Nothing may start on it and nothing may replace the ring.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import pytest

from contracts.errors import ConfigurationError
from contracts.topology import SIGN_QUEUE, declare_topology
from tests.support.cli import ZANDD, environment, zandd
from tests.support.net import free_port, free_port_pair, scrape
from tests.support.records import record_under
from vault import KeyRecord, KeyState, open_into, open_store, seal
from vault.kek import KekRing, ring_file_info
from workers.commands.base import EXIT_PERMANENT
from workers.keygen.swtpm import start_swtpm


async def _vault_with_keys(data: Path, kek_id: str, count: int) -> None:
    """Key versions sealed (by their KEK id; the content does not matter here) in a vault."""
    store = await open_store(f"sqlite:///{data / 'vault.db'}")
    try:
        for _ in range(count):
            await store.create_key(record_under(kek_id))
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
    code, out, err = await zandd("vault", "init", "--allow-unreadable", "--plaintext", env=env)
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
    assert code == EXIT_PERMANENT  # no restart mends it: zandd up stops the fleet (issue 17)
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


# --- the ring sealed to the TPM ------------------------------------------------------------


def _key_forms(ring: KekRing) -> list[bytes]:
    forms = []
    for kek_id in ring.kek_ids:
        key = ring.get(kek_id).key
        forms += [key, key.hex().encode(), base64.b64encode(key)]
    return forms


def _holds_no_key(directory: Path, ring: KekRing) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert not any(form in content for form in _key_forms(ring)), path


@pytest.fixture
def other_tpm(tmp_path: Path) -> Iterator[str]:
    """A second, fresh swtpm: another machine's TPM."""
    swtpm = start_swtpm(tmp_path / "other-swtpm")
    try:
        yield swtpm.tcti
    finally:
        swtpm.stop()


@pytest.mark.tpm
async def test_a_copied_data_dir_opens_no_key_on_another_tpm(
    swtpm_tcti: str, other_tpm: str, tmp_path: Path
) -> None:
    from workers.keygen.ringseal import TpmRingSealer

    data = tmp_path / "data"
    env = environment(ZANDD_DATA_DIR=str(data), ZANDD_TPM_TCTI=swtpm_tcti)
    code, out, err = await zandd("vault", "init", env=env)
    assert code == 0, err
    assert re.search(r"KEK ring .* sealed to the TPM at swtpm:.* \(no PCR policy\)", out), out
    ring = KekRing.load(data / "kek-ring.json", sealer=TpmRingSealer(swtpm_tcti))
    scalar = os.urandom(32)
    record = KeyRecord(
        key_id="zk-sealed",
        version=1,
        algorithm="ecdsa-p256-sha256",
        public_key_der=os.urandom(91),
        sealed=None,
        state=KeyState.DESTROYED,  # a placeholder until it is sealed below
        label=None,
        allowed_signers=(),
        created_at=datetime.now(UTC),
        created_by="test",
        request_id=None,
    )
    record = dataclasses.replace(
        record, state=KeyState.ENABLED, sealed=seal(scalar, record.binding, ring.active)
    )
    store = await open_store(f"sqlite:///{data / 'vault.db'}")
    try:
        await store.create_key(record)
    finally:
        await store.close()
    _holds_no_key(data, ring)

    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    with pytest.raises(ConfigurationError, match="sealed to another TPM"):
        KekRing.load(copy / "kek-ring.json", sealer=TpmRingSealer(other_tpm))
    copied_env = environment(ZANDD_DATA_DIR=str(copy), ZANDD_TPM_TCTI=other_tpm)
    for command in (("vault", "rewrap"), ("keygen-worker",), ("vault", "export-ring")):
        code, _, err = await zandd(*command, env=copied_env)
        # A worker says "permanent" (issue 17); the commands fail as any command does.
        assert code == (EXIT_PERMANENT if command == ("keygen-worker",) else 1), (command, err)
        assert "cannot unseal the KEK ring: it was sealed to another TPM" in err, (command, err)
    # Without a TPM at all the sealed file does not open either.
    code, _, err = await zandd("signer", env={**copied_env, "ZANDD_TPM_TCTI": _closed_tcti()})
    assert code == 1
    # On its own TPM the copy opens the record: the test above is about the TPM, not the copy.
    opened = bytearray(32)
    assert record.sealed is not None
    mine = KekRing.load(copy / "kek-ring.json", sealer=TpmRingSealer(swtpm_tcti))
    open_into(record.sealed, record.binding, mine, opened)
    assert bytes(opened) == scalar


@pytest.mark.tpm
async def test_seal_ring_and_export_ring_migrate_both_ways(swtpm_tcti: str, tmp_path: Path) -> None:
    from workers.keygen.ringseal import TpmRingSealer

    data = tmp_path / "data"
    env = environment(ZANDD_DATA_DIR=str(data), ZANDD_TPM_TCTI=swtpm_tcti)
    code, out, err = await zandd("vault", "init", "--plaintext", env=env)
    assert code == 0, err
    plain = KekRing.load(data / "kek-ring.json")
    code, out, _ = await zandd("vault", "status", env=env)
    assert "PLAINTEXT, not sealed to a TPM" in out
    code, out, err = await zandd("vault", "seal-ring", env=env)
    assert code == 0, err
    assert ring_file_info(data / "kek-ring.json").sealed
    _holds_no_key(data, plain)
    code, out, _ = await zandd("vault", "status", env=env)
    assert (code, "sealed to this host's TPM (no PCR policy)" in out) == (0, True), out
    code, out, err = await zandd("vault", "rotate-kek", env=env)
    assert code == 0, err
    rotated = KekRing.load(data / "kek-ring.json", sealer=TpmRingSealer(swtpm_tcti))
    assert rotated.kek_ids[0] == plain.active.kek_id
    assert len(rotated.kek_ids) == 2
    _holds_no_key(data, rotated)
    code, out, err = await zandd("vault", "export-ring", env=env)
    assert code == 0, err
    assert "WARNING: the KEK ring" in err
    assert "PLAINTEXT" in err
    exported = KekRing.load(data / "kek-ring.json")
    assert [exported.get(k).key for k in exported.kek_ids] == [
        rotated.get(k).key for k in rotated.kek_ids
    ]


@pytest.mark.tpm
def test_a_pcr_policy_opens_the_ring_only_with_the_same_pcr_values(
    swtpm_tcti: str, tmp_path: Path
) -> None:
    from tpm2_pytss import ESYS_TR, TPM2_ALG, TPML_DIGEST_VALUES, TPMT_HA

    from workers.keygen.ringseal import TpmRingSealer
    from workers.keygen.tpm import Tpm

    swtpm = start_swtpm(tmp_path / "swtpm")  # private: PCR 16 is extended below
    try:
        sealer = TpmRingSealer(swtpm.tcti, pcrs="sha256:16")
        ring = KekRing.create(tmp_path / "kek-ring.json", sealer=sealer)
        assert ring_file_info(tmp_path / "kek-ring.json").pcrs == "sha256:16"
        assert KekRing.load(tmp_path / "kek-ring.json", sealer=sealer).active == ring.active
        with Tpm(swtpm.tcti) as tpm:
            tpm.under_storage_primary(
                "extending PCR 16",
                lambda ectx, _primary: ectx.pcr_extend(
                    ESYS_TR.PCR16, TPML_DIGEST_VALUES([TPMT_HA(hashAlg=TPM2_ALG.SHA256)])
                ),
            )
        with pytest.raises(ConfigurationError, match="PCRs no longer hold the values"):
            KekRing.load(tmp_path / "kek-ring.json", sealer=sealer)
    finally:
        swtpm.stop()


def _children(pid: int) -> set[int]:
    """The worker processes ``pid`` started."""
    found = set()
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.add(int(stat_file.parent.name))
    return found


async def _until(condition: Callable[[], bool], timeout_s: float) -> None:
    """Poll ``condition`` (a look at /proc: nothing to wait on) until true or ``timeout_s``."""
    for _ in range(int(timeout_s / 0.2)):
        if condition():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"not true within {timeout_s:.0f} s")


def _environ(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


@pytest.mark.rabbitmq
@pytest.mark.tpm
async def test_up_hands_the_sealed_ring_over_a_pipe_and_a_rotation_replaces_the_workers(
    empty_amqp_url: str, swtpm_tcti: str, tmp_path: Path
) -> None:
    from contracts.client import SigningClient
    from workers.keygen.ringseal import TpmRingSealer
    from workers.operator.fleet import wait_until_ready

    data = tmp_path / "fleet"
    env = environment(
        ZANDD_AMQP_URL=empty_amqp_url, ZANDD_DATA_DIR=str(data), ZANDD_TPM_TCTI=swtpm_tcti
    )
    up = await asyncio.create_subprocess_exec(
        *ZANDD, "up", "--signers", "1", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        await wait_until_ready(empty_amqp_url, signers=1, timeout_s=60)
        path = data / "kek-ring.json"
        assert ring_file_info(path).sealed
        ring = KekRing.load(path, sealer=TpmRingSealer(swtpm_tcti))
        workers = _children(up.pid)
        assert len(workers) == 2
        for pid in workers:
            environ = _environ(pid)
            assert re.search(rb"(^|\0)ZANDD_KEK_FD=\d+\0", environ)
            assert not any(form in environ for form in _key_forms(ring))
        _holds_no_key(data, ring)  # no plaintext copy of the ring anywhere in the data dir

        async with await SigningClient.connect(empty_amqp_url) as client:
            before = await client.create_key()
            code, _, err = await zandd("vault", "rotate-kek", env=env)
            assert code == 0, err
            rotated = KekRing.load(path, sealer=TpmRingSealer(swtpm_tcti))
            await _until(
                lambda: len(now := _children(up.pid)) == 2 and not now & workers, timeout_s=60
            )
            # Consuming again: a one-signer fleet has none for a moment while it is replaced.
            await wait_until_ready(empty_amqp_url, signers=1, timeout_s=60)
            after = await client.create_key()
            await client.sign(before.key_id, b"sealed under the first KEK")
            await client.sign(after.key_id, b"sealed under the rotated KEK")
            _holds_no_key(data, rotated)
        store = await open_store(f"sqlite:///{data / 'vault.db'}")
        try:
            assert (await store.get_key(before.key_id)).kek_id == ring.active.kek_id
            assert (await store.get_key(after.key_id)).kek_id == rotated.active.kek_id
        finally:
            await store.close()
    finally:
        up.send_signal(signal.SIGTERM)
        _, err_bytes = await asyncio.wait_for(up.communicate(), 60)
    log = err_bytes.decode()
    assert re.search(r"KEK ring .* sealed to the TPM at swtpm:", log), log
    assert f"the KEK ring changed (active {rotated.active.kek_id}): replacing the workers" in log
    assert "exited with code" not in log  # replaced on purpose, not restarted after a failure
    assert up.returncode == 0


@pytest.mark.rabbitmq
@pytest.mark.tpm
async def test_a_copy_of_the_data_dir_of_zandd_up_opens_no_key_elsewhere(
    empty_amqp_url: str, other_tpm: str, tmp_path: Path
) -> None:
    data = tmp_path / "fleet"
    env = environment(
        ZANDD_AMQP_URL=empty_amqp_url,
        ZANDD_DATA_DIR=str(data),
        ZANDD_SWTPM_PORT=str(free_port_pair()),
    )
    code, _, err = await zandd("up", "--demo", "--signers", "1", env=env, timeout_s=120)
    assert code == 0, err
    assert f"started swtpm (state in {tmp_path / 'fleet-swtpm'})" in err
    assert ring_file_info(data / "kek-ring.json").sealed
    # The TPM's state is beside the data dir, not in it: a copy of the data dir lacks it.
    assert not (data / "swtpm").exists()
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    code, _, err = await zandd(
        "vault", "rewrap", env=environment(ZANDD_DATA_DIR=str(copy), ZANDD_TPM_TCTI=other_tpm)
    )
    assert code == 1
    assert "cannot unseal the KEK ring: it was sealed to another TPM" in err


@pytest.mark.rabbitmq
async def test_a_worker_allowed_to_start_on_the_wrong_ring_counts_what_it_cannot_open(
    populated: tuple[Path, KekRing], tmp_path: Path, empty_amqp_url: str
) -> None:
    data, ring = populated
    other = tmp_path / "other" / "kek-ring.json"
    KekRing.create(other)
    port = free_port()
    env = environment(
        ZANDD_AMQP_URL=empty_amqp_url,
        ZANDD_DATA_DIR=str(data),
        ZANDD_KEK_FILE=str(other),
        ZANDD_ALLOW_UNREADABLE="true",
        ZANDD_METRICS_PORT=str(port),
    )
    signer = await asyncio.create_subprocess_exec(
        *ZANDD, "signer", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        metric = "zandd_vault_records_unreadable 2.0"
        # Every series carries the worker's role label (issue 17).
        pattern = re.compile(r'^zandd_vault_records_unreadable\{role="signer"\} 2\.0$', re.M)
        for _ in range(150):  # a process start-up: nothing to wait on but the endpoint
            with contextlib.suppress(OSError):
                if pattern.search(await asyncio.to_thread(scrape, port)):
                    break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError(f"no {metric!r} on the signer's metrics endpoint")
        code, _, err = await zandd("health", "--role", "signer", env=env)
        assert code == 1
        assert ring.active.kek_id in err
    finally:
        signer.send_signal(signal.SIGTERM)
        _, err_bytes = await asyncio.wait_for(signer.communicate(), 60)
    log = err_bytes.decode()
    assert re.search(rf"ERROR .*allowed by --allow-unreadable: .*{ring.active.kek_id}", log), log
    assert "in PLAINTEXT, not sealed to a TPM" in log
