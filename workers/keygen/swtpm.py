"""Start and stop a local swtpm, the TPM 2.0 simulator used in development and tests.

The TPM state lives in ``state_dir`` and survives restarts: starting again on the same
directory brings back the same simulated TPM (same seeds, same NV contents).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from contracts.errors import TpmUnavailable

_READY_POLL_S = 0.02
_PORT_PICK_ATTEMPTS = 50
_PR_SET_PDEATHSIG = 1
#: All swtpm gets of our environment. An allow-list: the parent's environment holds the
#: broker and vault URLs with their passwords, which the simulator has no use for.
SWTPM_ENVIRONMENT = (
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "LD_LIBRARY_PATH",
)


@dataclass
class SwtpmProcess:
    """A running ``swtpm socket`` process; stop it with :meth:`stop`."""

    state_dir: Path
    host: str
    port: int
    ctrl_port: int
    process: subprocess.Popen[bytes]

    @property
    def tcti(self) -> str:
        """The TCTI string that reaches this simulator (tpm2-tss ``swtpm`` TCTI)."""
        return f"swtpm:host={self.host},port={self.port}"

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate the simulator, kill it if it does not exit in ``timeout_s``; idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait()


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def serving_swtpm(state_dir: Path, port: int) -> int | None:
    """The pid of a running ``swtpm socket`` on ``state_dir`` serving ``port``, if any.

    Read from ``/proc`` (Linux): ``zandd up`` reuses a listener on its swtpm port only when it
    is such a process, never whatever else listens there.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    states = {f"dir={state_dir}".encode(), f"dir={state_dir.absolute()}".encode()}
    wanted_port = f"port={port},".encode()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone, or not ours to read
        if not argv[0].endswith(b"swtpm") or b"--server" not in argv[:-1]:
            continue
        # --server type=tcp,port=P,bindaddr=H (--ctrl names P + 1, which is not matched).
        server = argv[argv.index(b"--server") + 1] + b","
        if states.intersection(argv) and wanted_port in server:
            return int(entry.name)
    return None


def start_swtpm(
    state_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    ready_timeout_s: float = 10.0,
) -> SwtpmProcess:
    """Start ``swtpm socket --tpm2`` on ``state_dir`` and wait until it accepts connections.

    With ``port`` None two free consecutive ports are picked; the control port is always
    ``port + 1`` because the tpm2-tss ``swtpm`` TCTI derives it that way. The simulator is
    started already powered on and past ``TPM2_Startup(CLEAR)``, so a fresh state directory
    is usable at once. Its output goes to ``state_dir/swtpm.log``; of this process's
    environment it sees only :data:`SWTPM_ENVIRONMENT` (no URL, no password). On Linux it is
    also killed when the thread that started it dies (``PR_SET_PDEATHSIG``), so start it from
    a long-lived thread; otherwise call :meth:`SwtpmProcess.stop`.

    Raises:
        TpmUnavailable: swtpm is missing, a given port is taken, or it did not come up.
    """
    binary = shutil.which("swtpm")
    if binary is None:
        raise TpmUnavailable("swtpm is not installed: apt-get install swtpm swtpm-tools")
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # mkdir's mode is filtered by the umask and ignored for an existing directory.
    state_dir.chmod(0o700)
    if port is None:
        port = _free_port_pair(host)
    elif port_open(host, port) or port_open(host, port + 1):
        raise TpmUnavailable(f"cannot start swtpm: port {port} or {port + 1} on {host} is in use")
    log_path = state_dir / "swtpm.log"
    command = [
        binary,
        "socket",
        "--tpm2",
        "--tpmstate",
        f"dir={state_dir}",
        "--server",
        f"type=tcp,port={port},bindaddr={host}",
        "--ctrl",
        f"type=tcp,port={port + 1},bindaddr={host}",
        "--flags",
        "not-need-init,startup-clear",
    ]
    with log_path.open("ab") as log:
        process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=swtpm_environment(os.environ),
            preexec_fn=_parent_death_hook(),
        )
    swtpm = SwtpmProcess(state_dir, host, port, port + 1, process)
    try:
        _wait_ready(swtpm, ready_timeout_s, log_path)
    except BaseException:
        swtpm.stop()
        raise
    return swtpm


def swtpm_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of ``environ`` that swtpm may see (:data:`SWTPM_ENVIRONMENT`)."""
    return {name: environ[name] for name in SWTPM_ENVIRONMENT if name in environ}


def _wait_ready(swtpm: SwtpmProcess, ready_timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + ready_timeout_s
    while not port_open(swtpm.host, swtpm.port, timeout_s=_READY_POLL_S * 5):
        returncode = swtpm.process.poll()
        if returncode is not None:
            raise TpmUnavailable(
                f"swtpm exited with status {returncode} before it was ready; see {log_path}"
            )
        if time.monotonic() >= deadline:
            raise TpmUnavailable(
                f"swtpm did not accept connections on {swtpm.host}:{swtpm.port} "
                f"within {ready_timeout_s} s; see {log_path}"
            )
        time.sleep(_READY_POLL_S)


def _free_port_pair(host: str) -> int:
    """A port P such that P and P + 1 are both free on ``host`` right now."""
    for _ in range(_PORT_PICK_ATTEMPTS):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as first:
            first.bind((host, 0))
            candidate: int = first.getsockname()[1]
            if candidate < 65535 and _can_bind(host, candidate + 1):
                return candidate
    raise TpmUnavailable(f"cannot start swtpm: found no two consecutive free ports on {host}")


def _can_bind(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


def _parent_death_hook() -> Callable[[], None] | None:
    """A pre-exec hook asking the kernel to SIGTERM the child when its parent dies (Linux).

    ``prctl`` is looked up here, in the parent: the hook runs between fork and exec, where
    loading a library could deadlock on a lock another thread held at fork time.
    """
    if sys.platform != "linux":
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    sigterm = int(signal.SIGTERM)

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, sigterm)

    return hook
