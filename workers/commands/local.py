"""What the commands that work on the vault directly share (``keys show``, ``audit``, ``vault``).

They run on a host that can open the vault and the KEK ring, as an operator; what they change
is audited under the principal ``local:<OS user>``. Those that hold KEKs or open keys first
harden their process as the workers do (:func:`harden_for_key_material`).
"""

from __future__ import annotations

import getpass
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from vault.store import VaultStore, open_store
from workers.config import Settings
from workers.hygiene import harden_process
from workers.logs import escape_controls

log = logging.getLogger("zandd.cli")


def harden_for_key_material(settings: Settings) -> None:
    """The workers' process hardening, before this command loads a KEK or opens a key.

    A KEK ring holds every key; a core dump or a ptrace of ``zandd vault rewrap`` would give
    them away as surely as one of a worker.
    """
    protections = harden_process(lock_memory=settings.lock_memory)
    if protections.core_dumps_off and protections.not_dumpable:
        log.debug("memory protections: %s", protections.describe())
    else:
        log.warning("memory protections: %s", protections.describe())


@asynccontextmanager
async def opened_store(settings: Settings) -> AsyncIterator[VaultStore]:
    """The configured vault, closed afterwards."""
    store = await open_store(settings.resolved_vault_url)
    try:
        yield store
    finally:
        await store.close()


def local_principal() -> str:
    """The audit principal of an operator at this host's shell."""
    return f"local:{getpass.getuser()}"


def printable(text: str | None) -> str:
    """``text`` safe for a terminal: control characters (from callers' input) escaped."""
    return "-" if text is None else escape_controls(text)


def when(moment: datetime | None) -> str:
    """A time as the CLI prints it: UTC, to the second."""
    return "-" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
