"""Process hardening for workers that hold key material: no swap, no core dumps, no ptrace.

- ``mlockall(MCL_CURRENT | MCL_FUTURE)`` keeps every page in RAM, so an opened scalar never
  reaches swap. Tried only when the process may lock without limit (``CAP_IPC_LOCK`` or an
  unlimited ``RLIMIT_MEMLOCK``): under a finite limit ``MCL_FUTURE`` would make the worker's
  later allocations fail once it grows past the limit.
- ``RLIMIT_CORE`` 0: a crash writes no core file with the process memory in it.
- ``prctl(PR_SET_DUMPABLE, 0)``: no core dump either way, and other processes of the same
  user can no longer ptrace the worker or read its ``/proc/<pid>/mem``.

None of this is a promise about what Python leaves in memory; see ``docs/threat-model.md``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource
import sys
from dataclasses import dataclass

log = logging.getLogger("zandd.hygiene")

MCL_CURRENT = 1
MCL_FUTURE = 2
PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
_CAP_IPC_LOCK_BIT = 14


@dataclass(frozen=True, slots=True)
class Protections:
    """Which protections are active in this process, and why a missing one is missing."""

    memory_locked: bool
    core_dumps_off: bool
    not_dumpable: bool
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for the start-up log."""
        parts = [
            f"memory locked: {_yes(self.memory_locked)}",
            f"core dumps off: {_yes(self.core_dumps_off)}",
            f"not dumpable/ptraceable: {_yes(self.not_dumpable)}",
        ]
        text = "; ".join(parts)
        return f"{text} ({'; '.join(self.notes)})" if self.notes else text


def _yes(value: bool) -> str:
    return "yes" if value else "NO"


def harden_process(*, lock_memory: bool = True) -> Protections:
    """Apply every protection this process is permitted; report which are active."""
    notes: list[str] = []
    core_off = _disable_core_dumps(notes)
    not_dumpable = _set_not_dumpable(notes)
    locked = _lock_memory(notes) if lock_memory else False
    if not lock_memory:
        notes.append("memory locking switched off (ZANDD_LOCK_MEMORY=false)")
    return Protections(locked, core_off, not_dumpable, tuple(notes))


def harden_for_key_material(*, lock_memory: bool = True) -> Protections:
    """:func:`harden_process` for a process other than a worker, before it loads a KEK.

    For the ``zandd vault`` commands and ``zandd up`` creating the ring: a KEK ring holds
    every key, so a core dump or a ptrace of them would give keys away as surely as one of a
    worker. Quiet when core dumps and ptrace are stopped, a warning when not.
    """
    protections = harden_process(lock_memory=lock_memory)
    if protections.core_dumps_off and protections.not_dumpable:
        log.debug("memory protections: %s", protections.describe())
    else:
        log.warning("memory protections: %s", protections.describe())
    return protections


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _disable_core_dumps(notes: list[str]) -> bool:
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        notes.append(f"RLIMIT_CORE not lowered: {exc}")
        return False
    return True


def _set_not_dumpable(notes: list[str]) -> bool:
    libc = _libc()
    if libc is None:
        notes.append("prctl needs Linux")
        return False
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        notes.append(f"prctl(PR_SET_DUMPABLE) failed: {os.strerror(ctypes.get_errno())}")
        return False
    return bool(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0)


def _may_lock_without_limit() -> bool:
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        return True
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_IPC_LOCK_BIT & 1)
    except OSError:
        return False
    return False


def _lock_memory(notes: list[str]) -> bool:
    libc = _libc()
    if libc is None:
        notes.append("mlockall needs Linux")
        return False
    if not _may_lock_without_limit():
        soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        notes.append(
            f"not locking memory: RLIMIT_MEMLOCK is {soft // 1024} KiB and no CAP_IPC_LOCK "
            "(give the worker CAP_IPC_LOCK or LimitMEMLOCK=infinity)"
        )
        return False
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        notes.append(f"mlockall failed: {os.strerror(ctypes.get_errno())}")
        return False
    return True
