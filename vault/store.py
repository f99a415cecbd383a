"""The async store interface every vault backend implements, and the URL-based opener."""

from __future__ import annotations

from typing import Protocol

from contracts.errors import ConfigurationError
from vault.records import KeyRecord
from vault.sqlite import SqliteStore

_SQLITE_PREFIX = "sqlite://"
_MEMORY_PATH = "/:memory:"


class VaultStore(Protocol):
    """Sealed key records behind a small async interface (SQLite now, MongoDB later)."""

    async def create_key(self, record: KeyRecord) -> KeyRecord:
        """Insert ``record``, idempotently on its request id.

        If a record with the same non-null ``request_id`` exists, nothing is inserted and that
        existing record is returned (the caller compares ``key_id``); safe against concurrent
        creators in several processes. A duplicate (key_id, version) raises IntegrityError.
        """
        ...

    async def get_key(self, key_id: str, version: int | None = None) -> KeyRecord:
        """The given version of a key, or its latest when ``version`` is None; else KeyNotFound."""
        ...

    async def find_by_request_id(self, request_id: str) -> KeyRecord | None:
        """The record created by request ``request_id``, if any."""
        ...

    async def list_keys(self) -> list[KeyRecord]:
        """The latest version of every key, ordered by that version's ``created_at``."""
        ...

    async def close(self) -> None:
        """Release the backend's connections; the store is unusable afterwards."""
        ...


async def open_store(url: str) -> VaultStore:
    """Open the backend a vault URL names: ``sqlite:///abs/path.db`` or ``sqlite:///:memory:``."""
    if url.startswith(_SQLITE_PREFIX):
        path = url.removeprefix(_SQLITE_PREFIX)
        if path == _MEMORY_PATH:
            return await SqliteStore.open(":memory:")
        if not path.startswith("/"):
            raise ConfigurationError(
                "a SQLite vault URL needs an absolute path: sqlite:///abs/path.db"
            )
        # sqlite:////abs/path.db (the SQLAlchemy spelling) names the same file.
        return await SqliteStore.open("/" + path.lstrip("/"))
    if url.startswith(("mongodb://", "mongodb+srv://")):
        raise ConfigurationError("the MongoDB vault backend is not available yet")
    raise ConfigurationError(
        "unsupported vault URL scheme: use sqlite:///abs/path.db, mongodb:// or mongodb+srv://"
    )
