"""Process hardening, checked from inside fresh processes (locking the test runner's memory
would be a poor idea)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cli import environment
from tests.support.hygiene import WATCH_KEY_MATERIAL
from tests.support.net import free_port
from tests.support.records import sealed_record
from vault.kek import KekRing
from vault.store import open_store

_PROBE = """
import ctypes, ctypes.util, json, resource
from workers.service.hygiene import harden_process
protections = harden_process(lock_memory=%s)
libc = ctypes.CDLL(ctypes.util.find_library("c"))
status = dict(
    line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line
)
print(json.dumps({
    "reported": [protections.memory_locked, protections.core_dumps_off, protections.not_dumpable],
    "line": protections.describe(),
    "locked_kib": int(status["VmLck"].split()[0]),
    "core_limit": list(resource.getrlimit(resource.RLIMIT_CORE)),
    "dumpable": libc.prctl(3, 0, 0, 0, 0),
}))
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def _probe(*wrapper: str, lock_memory: bool = True) -> dict[str, object]:
    result = subprocess.run(
        [*wrapper, sys.executable, "-c", _PROBE % lock_memory],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    probe: dict[str, object] = json.loads(result.stdout)
    return probe


def test_what_is_reported_is_what_the_kernel_says() -> None:
    probe = _probe()
    locked, core_off, not_dumpable = probe["reported"]  # type: ignore[misc]
    assert core_off is True
    assert probe["core_limit"] == [0, 0]
    assert not_dumpable is True
    assert probe["dumpable"] == 0
    # Locked exactly when the kernel shows locked pages (depends on this host's rights).
    assert locked is (probe["locked_kib"] > 0)  # type: ignore[operator]
    assert f"memory locked: {'yes' if locked else 'NO'}" in str(probe["line"])


def test_no_locking_under_a_finite_limit_without_cap_ipc_lock() -> None:
    if shutil.which("setpriv") is None or shutil.which("prlimit") is None:
        pytest.skip("needs setpriv and prlimit (util-linux) to drop CAP_IPC_LOCK")
    probe = _probe("setpriv", "--bounding-set", "-ipc_lock", "prlimit", "--memlock=65536:65536")
    assert probe["reported"] == [False, True, True]
    assert probe["locked_kib"] == 0
    assert "RLIMIT_MEMLOCK is 64 KiB and no CAP_IPC_LOCK" in str(probe["line"])


def test_locking_can_be_switched_off() -> None:
    probe = _probe(lock_memory=False)
    assert probe["reported"] == [False, True, True]
    assert probe["locked_kib"] == 0
    assert "switched off (ZANDD_LOCK_MEMORY=false)" in str(probe["line"])


# Runs one ``zandd`` command so watched.
_WATCHED_COMMAND = (
    WATCH_KEY_MATERIAL
    + """
from workers.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "seen": seen}))
"""
)


@pytest.fixture
def vault_dir(tmp_path: Path) -> Path:
    """A data dir with a KEK ring and one key sealed under its previous KEK (rewrap has work)."""
    data = tmp_path / "vault"
    data.mkdir()
    ring = KekRing.create(data / "kek-ring.json")

    async def fill() -> None:
        store = await open_store(f"sqlite://{data / 'vault.db'}")
        try:
            await store.create_key(sealed_record(ring, "zk-hardened"))
        finally:
            await store.close()

    asyncio.run(fill())
    ring.rotate(data / "kek-ring.json")
    return data


@pytest.mark.parametrize(
    ("command", "holds"),
    [
        (["vault", "init", "--plaintext"], {"create"}),
        (["vault", "rotate-kek"], {"load"}),
        (["vault", "rewrap"], {"load", "open"}),
        # status reads the ring's KEK ids without opening the ring: it holds no KEK.
        (["vault", "status"], set()),
        (
            ["vault", "migrate", "--from", "sqlite://{data}/vault.db", "--to", "sqlite://{copy}"],
            {"load", "open"},
        ),
    ],
    ids=["init", "rotate-kek", "rewrap", "status", "migrate"],
)
def test_vault_commands_harden_before_they_hold_a_kek(
    vault_dir: Path, tmp_path: Path, command: list[str], holds: set[str]
) -> None:
    env = environment(
        ZANDD_DATA_DIR=str(vault_dir),
        # No TPM: `vault init` falls back to the OS RNG at once.
        ZANDD_TPM_TCTI=f"swtpm:host=127.0.0.1,port={free_port()}",
        TSS2_LOG="all+none",
    )
    if command[:2] == ["vault", "init"]:
        env["ZANDD_DATA_DIR"] = str(tmp_path / "fresh")  # a ring to create, not one to keep
    argv = [part.format(data=vault_dir, copy=tmp_path / "copy.db") for part in command]
    result = subprocess.run(
        [sys.executable, "-c", _WATCHED_COMMAND, *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.stdout, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["code"] == 0, result.stderr
    seen = report["seen"]
    assert {name for name, *_ in seen} >= holds
    for name, dumpable, core_limit in seen:
        assert (dumpable, core_limit) == (0, [0, 0]), f"{name} while dumpable={dumpable}"
