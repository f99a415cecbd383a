"""The keygen worker's hold on the TPM: opened lazily, reopened after a failure, one thread.

Lazy opening is what makes a hot standby possible on a TPM that serves one client at a time
(swtpm): the standby keygen worker does not touch the TPM until the broker makes it the single
active consumer and hands it its first request. After any ``TpmUnavailable`` the connection is
dropped — a TSS context is stuck after a lost link; a command that fails on a connection held
from earlier is run once more on a fresh one (a TPM restart costs no request), and a TPM that
does not answer fails at once (the keygen worker answers ``tpm_unavailable``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from contracts.errors import TpmUnavailable
from workers.keygen.tpm import Tpm

T = TypeVar("T")
log = logging.getLogger("zandd.keygen")

_PROBE_BYTES = 8


def endpoint_reachable(tcti: str, timeout_s: float = 2.0) -> None:
    """Raise ``TpmUnavailable`` unless the TCTI's device exists or its socket accepts."""
    kind, _, conf = tcti.partition(":")
    if kind == "device":
        if not os.access(conf or "/dev/tpmrm0", os.R_OK | os.W_OK):
            raise TpmUnavailable(f"the TPM device {conf} is missing or not accessible")
    elif kind in ("swtpm", "mssim"):
        options = dict(part.split("=", 1) for part in conf.split(",") if "=" in part)
        host, port = options.get("host", "127.0.0.1"), int(options.get("port", "2321"))
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
        except OSError as exc:
            raise TpmUnavailable(f"nothing answers at the TPM's address {host}:{port}") from exc


class TpmSession:
    """Runs TPM commands on one dedicated thread against a lazily opened ``Tpm``."""

    def __init__(self, tcti: str, *, opener: Callable[[str], Tpm] = Tpm) -> None:
        self._tcti = tcti
        self._opener = opener
        self._tpm: Tpm | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zandd-tpm")

    @property
    def tcti(self) -> str:
        """Where the TPM is."""
        return self._tcti

    @property
    def opened(self) -> bool:
        """Whether this session holds the TPM now (it served a request: not a hot standby)."""
        return self._tpm is not None

    async def run(self, command: Callable[[Tpm], T]) -> T:
        """Run ``command(tpm)`` on the TPM thread, opening the TPM first if needed."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._run_blocking, command)

    async def probe(self) -> None:
        """Raise ``TpmUnavailable`` unless the TPM answers a harmless command."""
        await self.run(lambda tpm: tpm.get_random(_PROBE_BYTES))

    async def heartbeat(self) -> None:
        """For ``zandd health``: the TPM answers, without opening it if it is not open yet.

        Opening is left to the first request: a hot standby that opened the TPM would flush
        the active worker's objects from a TPM without a resource manager (see ``Tpm``).
        Until then, only the TPM's endpoint is checked.
        """
        if self._tpm is None:
            await asyncio.to_thread(endpoint_reachable, self._tcti)
            return
        await self.probe()

    def _run_blocking(self, command: Callable[[Tpm], T]) -> T:
        held = self._tpm is not None
        try:
            return command(self._open())
        except TpmUnavailable:
            self._drop()
            if not held:
                raise
        # The TPM was held since an earlier request: its connection may be stale (the TPM or
        # swtpm restarted). Once more on a fresh one, so a restart costs no request; a TPM
        # that is down fails the fresh open at once (the caller gets tpm_unavailable).
        log.warning("the TPM at %s failed a command: reopening it once", self._tcti)
        try:
            return command(self._open())
        except TpmUnavailable:
            self._drop()
            raise

    def _open(self) -> Tpm:
        if self._tpm is None:
            self._tpm = self._opener(self._tcti)
            log.info("opened the TPM at %s", self._tcti)
        return self._tpm

    def _drop(self) -> None:
        tpm, self._tpm = self._tpm, None
        if tpm is not None:
            tpm.close()

    def close(self) -> None:
        """Release the TPM and stop the thread."""
        self._thread.submit(self._drop).result()
        self._thread.shutdown(wait=True)
