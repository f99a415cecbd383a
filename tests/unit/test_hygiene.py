"""Process hardening, checked from inside fresh processes (locking the test runner's memory
would be a poor idea)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

_PROBE = """
import ctypes, ctypes.util, json, resource
from workers.hygiene import harden_process
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
