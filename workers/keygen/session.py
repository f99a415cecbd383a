"""The keygen worker's hold on the TPM: opened lazily, reopened after a failure, one thread.

Lazy opening is what makes a hot standby possible on a TPM that serves one client at a time
(swtpm): the standby keygen worker does not touch the TPM until the broker makes it the single
active consumer and hands it its first request. After any ``TpmUnavailable`` the connection is
dropped — a TSS context is stuck after a lost link — and the next use (or the runtime's probe)
opens a fresh one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from contracts.errors import TpmUnavailable
from workers.keygen.tpm import Tpm

T = TypeVar("T")
log = logging.getLogger("zandd.keygen")

_PROBE_BYTES = 8


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

    async def run(self, command: Callable[[Tpm], T]) -> T:
        """Run ``command(tpm)`` on the TPM thread, opening the TPM first if needed."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._run_blocking, command)

    async def probe(self) -> None:
        """Raise ``TpmUnavailable`` unless the TPM answers a harmless command."""
        await self.run(lambda tpm: tpm.get_random(_PROBE_BYTES))

    def _run_blocking(self, command: Callable[[Tpm], T]) -> T:
        if self._tpm is None:
            self._tpm = self._opener(self._tcti)
            log.info("opened the TPM at %s", self._tcti)
        try:
            return command(self._tpm)
        except TpmUnavailable:
            self._drop()
            raise

    def _drop(self) -> None:
        tpm, self._tpm = self._tpm, None
        if tpm is not None:
            tpm.close()

    def close(self) -> None:
        """Release the TPM and stop the thread."""
        self._thread.submit(self._drop).result()
        self._thread.shutdown(wait=True)
