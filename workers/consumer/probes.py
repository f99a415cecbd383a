"""Dependency probes the runtime runs while it waits for an outage to end."""

from __future__ import annotations

from contracts.errors import KeyNotFound
from vault.store import VaultStore

#: A key id no record can have (the service makes ``zk-`` ids): reading it is a pure round trip.
PROBE_KEY_ID = "probe.zandd.health"


async def vault_answers(store: VaultStore) -> None:
    """Return when the vault answers a read; its ``VaultUnavailable`` propagates otherwise."""
    try:
        await store.get_key(PROBE_KEY_ID)
    except KeyNotFound:
        return
