"""The key vault: sealing (AES-256-GCM + AAD), the KEK ring, key records and store backends."""

from __future__ import annotations

from vault.kek import Kek, KekRing
from vault.records import KeyRecord, KeyState
from vault.sealing import RecordBinding, SealedKey, associated_data, open_into, seal
from vault.sqlite import SqliteStore
from vault.store import VaultStore, open_store

__all__ = [
    "Kek",
    "KekRing",
    "KeyRecord",
    "KeyState",
    "RecordBinding",
    "SealedKey",
    "SqliteStore",
    "VaultStore",
    "associated_data",
    "open_into",
    "open_store",
    "seal",
]
