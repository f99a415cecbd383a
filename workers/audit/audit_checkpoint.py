"""The keygen worker's TPM-signed audit checkpoints (``vault/audit_checkpoint.py``).

Every ``poll_s`` the checkpointer reads the vault's newest audit entry, checks its keyed link
with the ring (the TPM must not vouch for an entry a writer without the ring made), and when
``every_entries`` entries were added since the last checkpoint, or ``interval_s`` passed and
the log grew, has the TPM sign it, stores the checkpoint in the vault and publishes it on
``zandd.events`` (``audit.checkpoint``). Best effort, like the head publisher beside it: a
round that fails (vault, TPM, broker) is tried again at the next, and no reply waits for it.

Only a keygen worker that holds the TPM signs: a hot standby has not opened it (opening would
flush the active worker's objects from a TPM without a resource manager), so until its first
request it makes no checkpoint — the active worker does.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Protocol

from contracts.errors import ZanddError
from contracts.models import AuditCheckpointEvent
from vault.audit import AuditBroken, AuditEntry, AuditQuery, AuditReader, ChainHead, ChainVerifier
from vault.audit_chain import ChainKeys
from vault.audit_checkpoint import Checkpoint, CheckpointStore, signed_digest
from workers.audit.audit_head import tick_until_stopped
from workers.keygen.checkpoint_key import sign_checkpoint_digest
from workers.keygen.session import TpmSession

log = logging.getLogger("zandd.audit")

#: How long one read-sign-store-publish round may take.
ROUND_TIMEOUT_S = 10.0
#: The newest entry is read at least this often (more often with a shorter interval).
MAX_POLL_S = 1.0

PublishCheckpoint = Callable[[AuditCheckpointEvent], Awaitable[None]]


class CheckpointVault(AuditReader, CheckpointStore, Protocol):
    """The parts of a vault store the checkpointer reads and writes."""


def checkpoint_event(checkpoint: Checkpoint) -> AuditCheckpointEvent:
    """The ``audit.checkpoint`` event of a checkpoint."""
    return AuditCheckpointEvent(
        seq=checkpoint.seq,
        link=checkpoint.link,
        at=checkpoint.at,
        signature=checkpoint.signature,
    )


def event_checkpoint(event: AuditCheckpointEvent) -> Checkpoint:
    """The checkpoint an ``audit.checkpoint`` event (or an exported line) carries."""
    return Checkpoint(seq=event.seq, link=event.link, at=event.at, signature=event.signature)


class AuditCheckpointer:
    """Signs the audit head in the TPM every ``every_entries`` entries or ``interval_s``."""

    def __init__(
        self,
        store: CheckpointVault,
        keys: ChainKeys,
        tpm: TpmSession,
        publish: PublishCheckpoint,
        *,
        every_entries: int,
        interval_s: float,
    ) -> None:
        self._store = store
        self._keys = keys
        self._tpm = tpm
        self._publish = publish
        self._every_entries = every_entries
        self._interval_s = interval_s
        self._poll_s = min(interval_s, MAX_POLL_S)
        self._last: Checkpoint | None = None
        self._last_at = -math.inf
        self._loaded = False
        #: Checkpoints made by this worker.
        self.made = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Checkpoint until ``stop``, then once more if due (bounded)."""
        await tick_until_stopped(stop, self._poll_s, self._tick)

    async def _tick(self, *, final: bool) -> None:
        if not self._tpm.opened:
            return
        try:
            async with asyncio.timeout(ROUND_TIMEOUT_S):
                if not self._loaded:
                    newest = await self._store.read_checkpoints(latest=True, limit=1)
                    self._last, self._loaded = (newest[0] if newest else None), True
                entries = await self._store.read_audit(AuditQuery(latest=True, limit=1))
                if entries and self._due(entries[0], final=final):
                    await self._checkpoint(entries[0])
        except (ZanddError, TimeoutError) as exc:
            reason = exc.message if isinstance(exc, ZanddError) else "it took too long"
            log.warning("audit checkpoint not made (tried again later): %s", reason)

    def _due(self, entry: AuditEntry, *, final: bool) -> bool:
        last_seq = 0 if self._last is None else self._last.seq
        if entry.seq <= last_seq:
            return False  # nothing new (a log gone back is the head publisher's alarm)
        added = entry.seq - last_seq
        waited_s = time.monotonic() - self._last_at
        return final or added >= self._every_entries or waited_s >= self._interval_s

    async def _checkpoint(self, entry: AuditEntry) -> None:
        verifier = ChainVerifier(self._keys, head=ChainHead(entry.seq - 1, entry.prev_hash))
        try:
            verifier.feed(entry)
        except AuditBroken as exc:
            log.error("the newest audit entry fails its check, not checkpointed: %s", exc.message)
            return
        if verifier.legacy_entries:
            return  # an unkeyed (legacy) head: the next keyed entry gets the checkpoint
        at = datetime.now(UTC)
        digest = signed_digest(entry.seq, entry.entry_hash, at)
        signature = await self._tpm.run(lambda tpm: sign_checkpoint_digest(tpm, digest))
        checkpoint = Checkpoint(entry.seq, entry.entry_hash, at, signature)
        stored = await self._store.add_checkpoint(checkpoint)
        self._last, self._last_at = checkpoint, time.monotonic()
        if not stored:
            return  # another keygen worker checkpointed this entry first: its own stands
        self.made += 1
        log.info("audit checkpoint #%d signed by the TPM", entry.seq)
        await self._publish(checkpoint_event(checkpoint))
