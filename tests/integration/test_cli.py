"""``zandd`` as a user runs it: subprocesses against real RabbitMQ, swtpm and SQLite."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from yarl import URL

from tests.support.broker import broker_users, full_permissions
from tests.support.cli import ZANDD, environment, zandd
from tests.support.fleet import RunningFleet
from tests.support.hygiene import WATCH_KEY_MATERIAL
from tests.support.net import free_port_pair, scrape
from tests.support.openssl import verify_files


@pytest.mark.rabbitmq
@pytest.mark.tpm
async def test_keys_sign_and_verify_from_the_shell(fleet: RunningFleet, tmp_path: Path) -> None:
    env = environment(ZANDD_AMQP_URL=fleet.amqp_url, ZANDD_DATA_DIR=str(tmp_path / "cli"))
    code, out, err = await zandd("keys", "create", "--label", "shell", env=env)
    assert code == 0, err
    key_id, pem = out.split("\n", 1)
    assert pem.startswith("-----BEGIN PUBLIC KEY-----")
    document = tmp_path / "document.txt"
    document.write_bytes(b"signed from a shell\n")
    (tmp_path / "public.pem").write_text(pem)

    code, out, err = await zandd(
        "sign", "--key", key_id, str(document), "--out", str(tmp_path / "sig.der"), env=env
    )
    assert code == 0, err
    openssl = await asyncio.to_thread(
        verify_files, tmp_path, signature_der="sig.der", message="document.txt"
    )
    assert openssl.stdout.strip() == "Verified OK"

    code, out, _ = await zandd(
        "verify", "--key", key_id, str(document), str(tmp_path / "sig.der"), env=env
    )
    assert (code, out.strip()) == (0, "signature OK")
    code, signature_b64, _ = await zandd(
        "sign", "--key", key_id, str(document), "--digest", "--encoding", "raw", env=env
    )
    assert code == 0
    code, out, _ = await zandd(
        "verify",
        "--key",
        key_id,
        str(document),
        signature_b64.strip(),
        "--encoding",
        "raw",
        env=env,
    )
    assert (code, out.strip()) == (0, "signature OK")
    document.write_bytes(b"tampered\n")
    code, out, _ = await zandd(
        "verify", "--key", key_id, str(document), str(tmp_path / "sig.der"), env=env
    )
    assert (code, out.strip()) == (1, "signature INVALID")

    code, out, _ = await zandd("keys", "public", key_id, "--jwk", env=env)
    assert code == 0
    assert '"kid": "' + key_id + '.v1"' in out

    code, _, err = await zandd("sign", "--key", "zk-nope", str(document), env=env)
    assert code == 1
    assert err.strip() == "zandd: key zk-nope not found"


@pytest.mark.parametrize(
    "args",
    [
        ("keys", "create"),
        ("sign", "--key", "k", "/etc/hostname"),
        ("signer",),
        ("up", "--signers", "1"),
    ],
)
async def test_unreachable_broker_is_one_sentence(args: tuple[str, ...], tmp_path: Path) -> None:
    env = environment(
        ZANDD_AMQP_URL="amqp://guest:secret-pw@127.0.0.1:1/", ZANDD_DATA_DIR=str(tmp_path)
    )
    if args[0] == "signer":
        await zandd("vault", "init", "--plaintext", env=env)
    code, out, err = await zandd(*args, env=env)
    assert code == 1
    # One sentence; its last word names the failure (AMQPConnectionError through aio-pika,
    # ConnectionRefusedError through the lean connection of contracts/wire.py).
    [line] = err.strip().splitlines()
    assert re.fullmatch(
        r"zandd: cannot reach the broker at amqp://guest:\*\*\*@127\.0\.0\.1:1/: \w+Error", line
    ), err
    assert "Traceback" not in err
    assert "secret-pw" not in out + err


@pytest.mark.tpm
async def test_tpm_check_and_vault_init(swtpm_tcti: str, tmp_path: Path) -> None:
    env = environment(ZANDD_TPM_TCTI=swtpm_tcti, ZANDD_DATA_DIR=str(tmp_path / "data"))
    code, out, err = await zandd("tpm", "check", env=env)
    assert code == 0, err
    assert "create → export → flush round trip: OK" in out
    code, out, err = await zandd("vault", "init", env=env)
    assert code == 0, err
    assert "from the TPM's RNG mixed with the OS RNG" in out
    ring = tmp_path / "data" / "kek-ring.json"
    assert stat.S_IMODE(ring.stat().st_mode) == 0o600
    before = ring.read_bytes()
    code, out, _ = await zandd("vault", "init", env=env)
    assert code == 0
    assert "exists already" in out
    assert ring.read_bytes() == before


async def test_tpm_check_without_a_tpm_says_so(tmp_path: Path) -> None:
    env = environment(
        ZANDD_TPM_TCTI=f"swtpm:host=127.0.0.1,port={free_port_pair()}", ZANDD_DATA_DIR=str(tmp_path)
    )
    code, _, err = await zandd("tpm", "check", env=env)
    assert code == 1
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("zandd: ")


@pytest.mark.rabbitmq
@pytest.mark.tpm
async def test_up_demo_proves_the_fleet_and_exits(empty_amqp_url: str, tmp_path: Path) -> None:
    env = environment(
        ZANDD_AMQP_URL=empty_amqp_url,
        ZANDD_DATA_DIR=str(tmp_path / "fleet"),
        ZANDD_SWTPM_PORT=str(free_port_pair()),
    )
    code, out, err = await zandd("up", "--demo", "--signers", "2", env=env, timeout_s=120)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("demo: verified 200/200 signatures with key zk-")
    assert "started swtpm" in err
    assert "created the KEK ring" in err
    assert (tmp_path / "fleet" / "vault.db").exists()


@pytest.mark.rabbitmq
@pytest.mark.tpm
async def test_up_exports_traces_to_the_console_and_metrics_per_worker(
    empty_amqp_url: str, tmp_path: Path
) -> None:
    from contracts.client import SigningClient
    from workers.operator.fleet import wait_until_ready

    metrics_port = free_port_pair()  # keygen on the base port, signer-1 on the next
    env = environment(
        ZANDD_AMQP_URL=empty_amqp_url,
        ZANDD_DATA_DIR=str(tmp_path / "fleet"),
        ZANDD_SWTPM_PORT=str(free_port_pair()),
    )
    up = await asyncio.create_subprocess_exec(
        *ZANDD,
        *("up", "--signers", "1", "--traces-exporter", "console"),
        *("--metrics-port", str(metrics_port)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    # Its stderr is read all along: the console exporter writes every span there, and a full
    # pipe would stall the fleet.
    err_read = asyncio.ensure_future(up.stderr.read()) if up.stderr else None
    try:
        ready = asyncio.ensure_future(wait_until_ready(empty_amqp_url, signers=1, timeout_s=60))
        await asyncio.wait(
            {ready, asyncio.ensure_future(up.wait())}, return_when=asyncio.FIRST_COMPLETED
        )
        if not ready.done():
            ready.cancel()
            err = (await err_read).decode() if err_read else ""
            pytest.fail(
                f"zandd up exited {up.returncode} before its fleet was ready:\n{err[-4000:]}"
            )
        ready.result()
        async with await SigningClient.connect(empty_amqp_url) as client:
            key = await client.create_key()
            await client.sign(key.key_id, b"observed")
        # keygen on the base port, signer-1 on the next
        signer_metrics = await asyncio.to_thread(scrape, metrics_port + 1)
        keygen_metrics = await asyncio.to_thread(scrape, metrics_port)
    finally:
        if up.returncode is None:
            up.send_signal(signal.SIGTERM)
        await asyncio.wait_for(up.wait(), 60)
    err_bytes = await err_read if err_read else b""
    # Every series names the role of the worker that exports it (issue 17).
    signer, keygen = _samples(signer_metrics), _samples(keygen_metrics)
    assert signer["zandd_requests_total", ("sign", "ok", "signer")] == 1.0
    assert keygen["zandd_requests_total", ("key.create", "ok", "keygen")] == 1.0
    assert keygen["zandd_stage_duration_seconds_count", ("keygen", "tpm")] == 1.0
    for samples, role in ((signer, "signer"), (keygen, "keygen")):
        assert all(role in values for _name, values in samples), role
        (build,) = [values for name, values in samples if name == "zandd_build_info"]
        python, build_role, version = build  # sorted by label name
        assert python.startswith("3.")
        assert build_role == role
        assert version
    err = err_bytes.decode()
    # The console exporter writes each finished span as JSON on stderr.
    assert '"name": "process zandd:sign:zandd.sign"' in err
    assert '"name": "zandd.sign"' in err
    assert up.returncode == 0


def _samples(text: str) -> dict[tuple[str, tuple[str, ...]], float]:
    """A scrape's zandd_ samples: (name, label values in label-name order) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(value for _label, value in sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("zandd_")
    }


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat_line = (entry / "stat").read_text()
            except OSError:
                continue  # exited meanwhile
            # The command name (in parentheses) may hold spaces: the fields after it are fixed.
            if int(stat_line.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _proc(pid: int, name: str) -> bytes:
    return Path(f"/proc/{pid}/{name}").read_bytes()


_CREATE_RING_AS_UP_DOES = """
import asyncio
from workers.service.config import Settings
from workers.operator.fleet import ensure_kek_ring
asyncio.run(ensure_kek_ring(Settings(), sys.argv[1]))
print(json.dumps({"seen": seen}))
"""


@pytest.mark.tpm
async def test_up_hardens_itself_before_it_creates_the_kek_ring(
    swtpm_tcti: str, tmp_path: Path
) -> None:
    env = environment(ZANDD_DATA_DIR=str(tmp_path / "fleet"))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WATCH_KEY_MATERIAL + _CREATE_RING_AS_UP_DOES,
        swtpm_tcti,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    seen = json.loads(out.decode().splitlines()[-1])["seen"]
    assert [name for name, *_ in seen] == ["create"]
    assert [(dumpable, core) for _name, dumpable, core in seen] == [(0, [0, 0])]
    assert (tmp_path / "fleet" / "kek-ring.json").exists()


@pytest.fixture
def passworded_url(empty_amqp_url: str) -> Iterator[str]:
    """A URL of a broker user of its own with a random password (unlike guest's, findable)."""
    user = f"zt-up-{secrets.token_hex(4)}"
    with broker_users(empty_amqp_url, [user], full_permissions) as urls:
        yield urls[user]


@pytest.mark.rabbitmq
@pytest.mark.tpm
async def test_up_keeps_the_broker_password_off_command_lines_and_out_of_swtpm(
    passworded_url: str, tmp_path: Path
) -> None:
    from workers.operator.fleet import wait_until_ready

    url, password = passworded_url, URL(passworded_url).password
    assert password
    env = environment(
        ZANDD_AMQP_URL=url,
        ZANDD_DATA_DIR=str(tmp_path / "fleet"),
        ZANDD_SWTPM_PORT=str(free_port_pair()),
    )
    up = await asyncio.create_subprocess_exec(
        *ZANDD, "up", "--signers", "1", env=env, stderr=subprocess.PIPE
    )
    try:
        await wait_until_ready(url, signers=1, timeout_s=60)
        children = {pid: _proc(pid, "cmdline").split(b"\0") for pid in _children(up.pid)}
        environs = {pid: _proc(pid, "environ").split(b"\0") for pid in children}
    finally:
        up.send_signal(signal.SIGTERM)
        _out, err = await asyncio.wait_for(up.communicate(), 60)
    assert up.returncode == 0, err.decode()
    secret = password.encode()
    swtpm = [pid for pid, argv in children.items() if Path(argv[0].decode()).name == "swtpm"]
    workers = [pid for pid, argv in children.items() if b"workers.cli" in argv]
    assert len(swtpm) == 1
    assert len(workers) == 2  # keygen and signer-1
    for argv in children.values():
        assert not any(secret in arg for arg in argv), f"the password is on {argv!r}"
    # The workers get the URL through their environment (readable by the same user only)...
    for pid in workers:
        assert f"ZANDD_AMQP_URL={url}".encode() in environs[pid]
    # ...and the simulator gets none of it: only what it needs.
    (swtpm_environ,) = (environs[pid] for pid in swtpm)
    assert not any(secret in variable for variable in swtpm_environ)
    assert not any(variable.startswith(b"ZANDD_") for variable in swtpm_environ)
    assert secret not in err
