"""What the commands that work on the vault directly share (``keys show``, ``audit``, ``vault``).

They run on a host that can open the vault and the KEK ring, as an operator; what they change
is audited under the principal ``local:<OS user>``. Those that hold KEKs or open keys first
harden their process as the workers do (``workers.service.hygiene.harden_for_key_material``).
"""

from __future__ import annotations

import getpass
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from contracts.text import escape_unprintable
from vault.store import VaultStore, open_store
from workers.service.config import Settings


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
    return "-" if text is None else escape_unprintable(text)


def when(moment: datetime | None) -> str:
    """A time as the CLI prints it: UTC, to the second."""
    return "-" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
