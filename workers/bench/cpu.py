"""CPU time per request, by role: the client (this process), the worker, the broker.

Issue 19 item 5: the bench reports what one request costs in CPU on each side, so a check
added to the signer shows up as microseconds, not as a rate that moved with the machine. It
reads each process's ``utime + stime`` from ``/proc/<pid>/stat`` (every thread, exited ones
included) before and after each measured slice; the client's own time comes from
``time.process_time()`` (every thread of this process, in nanoseconds).

``/proc`` counts in clock ticks (10 ms here): a role's total over a run of several seconds
and thousands of requests is exact to a few percent, a single request's never, and the figure
is a mean (µs of CPU per completed request), not a latency. A role whose processes this run
cannot see (``--attach``: the signers run elsewhere; a broker on another machine) is
reported as ``None``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from contracts.brokers import brokers

#: The roles, in report order: the bench's own process, the worker processes, the broker.
CLIENT, WORKER, BROKER = "client", "worker", "broker"
_PROC = Path("/proc")
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
_LISTEN = "0A"


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (all its threads); None once it is gone."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    # Fields 14 and 15 of proc(5) are utime and stime; fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) * _TICK_S


@dataclass(frozen=True, slots=True)
class CpuMeter:
    """The processes of each role of one scenario; ``snapshot`` reads their CPU seconds.

    ``client`` is always this process. A role with no pids is not measured.
    """

    workers: tuple[int, ...] = ()
    broker: int | None = None

    def snapshot(self) -> dict[str, float | None]:
        """CPU seconds so far per role (None: not measured, or a process vanished)."""
        return {
            CLIENT: time.process_time(),
            WORKER: _total(self.workers) if self.workers else None,
            BROKER: process_cpu_s(self.broker) if self.broker is not None else None,
        }


def _total(pids: Iterable[int]) -> float | None:
    total = 0.0
    for pid in pids:
        seconds = process_cpu_s(pid)
        if seconds is None:
            return None
        total += seconds
    return total


def spent(
    before: Mapping[str, float | None], after: Mapping[str, float | None]
) -> dict[str, float]:
    """CPU seconds per role between two snapshots; roles not measured in both are left out."""
    out: dict[str, float] = {}
    for role, start in before.items():
        end = after.get(role)
        if start is not None and end is not None:
            out[role] = max(0.0, end - start)
    return out


def added(parts: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The CPU seconds of several slices, per role measured in every one of them."""
    if not parts:
        return {}
    roles = set(parts[0]).intersection(*parts[1:])
    return {role: sum(part[role] for part in parts) for role in sorted(roles)}


def per_request_us(cpu_s: Mapping[str, float], operations: int) -> dict[str, float | None]:
    """Microseconds of CPU per completed operation for each role (None: not measured)."""
    return {
        role: (round(cpu_s[role] / operations * 1e6, 1) if role in cpu_s and operations else None)
        for role in (CLIENT, WORKER, BROKER)
    }


def local_broker_pid(amqp_url: str) -> int | None:
    """The pid of the process listening on the broker's port, when the broker is this machine's.

    Found through ``/proc/net/tcp{,6}`` (the listening socket's inode) and ``/proc/*/fd``; None
    when the broker is elsewhere, several brokers are named, or this process may not look.
    """
    found = brokers(amqp_url)
    if len(found) != 1 or found[0].host not in _LOOPBACK:
        return None
    inodes = _listening_inodes(found[0].port)
    if not inodes:
        return None
    for proc in _PROC.iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return int(proc.name)
        except OSError:
            continue
    return None


def _listening_inodes(port: int) -> set[str]:
    wanted = f"{port:04X}"
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (_PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEXIP:HEXPORT; st is field 4; inode field 10.
            if len(fields) > 9 and fields[3] == _LISTEN and fields[1].endswith(":" + wanted):
                inodes.add(fields[9])
    return inodes
