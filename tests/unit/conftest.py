"""Fixtures shared by unit test modules (a module's own fixture of the same name wins)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from vault.kek import KekRing
from vault.store import VaultStore, open_store


@pytest.fixture
def ring(tmp_path: Path) -> KekRing:
    """A new KEK ring in a file under ``tmp_path``."""
    return KekRing.create(tmp_path / "ring" / "kek-ring.json")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[VaultStore]:
    """A SQLite vault under ``tmp_path`` (at ``tests.support.audit.vault_db``)."""
    opened = await open_store(f"sqlite://{tmp_path / 'vault' / 'vault.db'}")
    yield opened
    await opened.close()
