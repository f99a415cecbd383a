"""Key lifecycle on ``zandd.keygen``: disable, enable, destroy (after a waiting period), cancel.

Only a key's owner and the configured admins may change its state. Each change is committed
to the vault with a compare-and-set, then announced on ``zandd.events`` before the reply, so
by the time the caller hears "disabled" every running signer has been told.

Destruction happens when the waiting period is over: the keygen worker looks for due
versions before every lifecycle request and every ``destroy_check_interval_s``; a due
version loses its sealed material for good (its public key and audit trail stay). Every
keygen instance, standby ones too, may do this; the compare-and-set lets only one succeed.

Every record is checked before use — its MAC (``vault.record_mac``) and that it is not older
than a generation this process has seen — and every change is written with the next
generation and a fresh MAC; the event carries that generation to the signers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import datetime

from contracts.errors import IntegrityError, InternalError, KeyNotFound, ZanddError
from contracts.models import (
    DEFAULT_PENDING_DAYS,
    KeyDestroyRequest,
    KeyState,
    KeyStateChangedEvent,
    KeyStateReply,
    KeyStateRequest,
    KeyVersionState,
)
from contracts.operations import Operation
from vault.audit import OUTCOME_OK, AuditEvent, AuditLog
from vault.kek import KekRing
from vault.lifecycle import destroyed, transition
from vault.record_mac import GenerationWatermark, authenticated, verify_record
from vault.records import KeyRecord
from vault.store import VaultStore
from workers.audit.auditing import Clock, utc_now
from workers.consumer.backoff import every
from workers.consumer.runtime import Handler, RequestContext
from workers.service.events import EventPublisher
from workers.service.policy import AccessPolicy

log = logging.getLogger("zandd.keygen")

#: The principal of changes the service makes on its own (a due destruction).
SYSTEM_PRINCIPAL = "zandd:keygen"
#: The audit operation of a destruction carried out when its waiting period was over.
DESTROYED_OPERATION = "key.destroyed"
_CAS_ATTEMPTS = 3


class KeyLifecycle:
    """The lifecycle handlers and the destruction of due versions."""

    def __init__(
        self,
        store: VaultStore,
        ring: KekRing,
        *,
        policy: AccessPolicy,
        events: EventPublisher,
        audit: AuditLog,
        clock: Clock = utc_now,
    ) -> None:
        self._store = store
        self._ring = ring
        self._policy = policy
        self._events = events
        self._audit = audit
        self._clock = clock
        # One change at a time in this process; other processes are kept out by the CAS.
        self._lock = asyncio.Lock()
        self._generations = GenerationWatermark()

    @property
    def handlers(self) -> Mapping[Operation, Handler]:
        """Operation → handler, for the consumer runtime."""
        return {
            Operation.KEY_DISABLE: self.disable,
            Operation.KEY_ENABLE: self.enable,
            Operation.KEY_DESTROY: self.destroy,
            Operation.KEY_CANCEL_DESTROY: self.cancel_destroy,
        }

    async def disable(self, request: KeyStateRequest, context: RequestContext) -> KeyStateReply:
        """Stop all signing with the key (or one version of it); reversible."""
        return await self._change(Operation.KEY_DISABLE, request, context)

    async def enable(self, request: KeyStateRequest, context: RequestContext) -> KeyStateReply:
        """Allow signing again after ``key.disable``."""
        return await self._change(Operation.KEY_ENABLE, request, context)

    async def destroy(self, request: KeyDestroyRequest, context: RequestContext) -> KeyStateReply:
        """Stop signing now and destroy the sealed material after ``pending_days``."""
        return await self._change(Operation.KEY_DESTROY, request, context, request.pending_days)

    async def cancel_destroy(
        self, request: KeyStateRequest, context: RequestContext
    ) -> KeyStateReply:
        """Call off a scheduled destruction; the key comes back disabled."""
        return await self._change(Operation.KEY_CANCEL_DESTROY, request, context)

    async def destroy_due(self) -> list[KeyRecord]:
        """Destroy every version whose waiting period is over; the versions destroyed."""
        async with self._lock:
            gone = await self._destroy_due_locked()
        await self._announce_destroyed(gone)
        return gone

    async def destroy_due_forever(self, stop: asyncio.Event, interval_s: float) -> None:
        """Run ``destroy_due`` every ``interval_s`` until ``stop``."""
        await every(
            self.destroy_due,
            stop=stop,
            interval_s=interval_s,
            what="looking for keys due for destruction",
            logger=log,
        )

    async def _change(
        self,
        operation: Operation,
        request: KeyStateRequest,
        context: RequestContext,
        pending_days: int = DEFAULT_PENDING_DAYS,
    ) -> KeyStateReply:
        principal = self._policy.principal(context)
        async with self._lock:
            swept = await self._destroy_due_locked()
            records = await self._addressed(request)
            for record in records:
                self._policy.check_manage(record, principal)
            now = self._clock()
            # Every version must allow the change before any is written.
            for record in records:
                transition(record, operation, now=now, pending_days=pending_days)
            results = [
                await self._apply(record, operation, now, pending_days) for record in records
            ]
        await self._announce_destroyed(swept)
        # Announced even when nothing changed: a retry repairs an announcement that was lost.
        for record in results:
            await self._events.publish(_event(record, now))
        if results != records:
            log.info("%s by %s: %s", operation.value, principal, _summary(results))
        return KeyStateReply(
            key_id=request.key_id,
            versions=[
                KeyVersionState(version=r.version, state=r.state, destroy_after=r.destroy_after)
                for r in results
            ],
        )

    # --- issue 15, key writes: what workers.keygen.versions shares with the lifecycle ---

    @property
    def lock(self) -> asyncio.Lock:
        """Held by every change of a key in this process (lifecycle, rotation, update)."""
        return self._lock

    def checked(self, record: KeyRecord) -> KeyRecord:
        """``record`` if its MAC holds and it is no older than what this process saw."""
        return self._checked(record)

    async def write(self, record: KeyRecord, expected: KeyRecord) -> KeyRecord | None:
        """Store ``record`` as the next generation of ``expected``; None if it changed first."""
        return await self._write(record, expected)

    # --- end issue 15, key writes ---

    def _checked(self, record: KeyRecord) -> KeyRecord:
        """``record`` if its MAC holds and it is no older than what this process saw."""
        return self._generations.check(verify_record(record, self._ring))

    async def _addressed(self, request: KeyStateRequest) -> list[KeyRecord]:
        if request.version is not None:
            return [self._checked(await self._store.get_key(request.key_id, request.version))]
        versions = [self._checked(r) for r in await self._store.list_versions(request.key_id)]
        if not versions:
            raise KeyNotFound(f"key {request.key_id} not found")
        live = [record for record in versions if record.state != KeyState.DESTROYED]
        return live or versions

    async def _write(self, record: KeyRecord, expected: KeyRecord) -> KeyRecord | None:
        """Store ``record`` as the next generation of ``expected``; None if it changed first."""
        updated = authenticated(record, self._ring, generation=expected.generation + 1)
        if not await self._store.replace_key(updated, expected):
            return None
        self._generations.saw(updated.key_id, updated.version, updated.generation)
        return updated

    async def _apply(
        self, record: KeyRecord, operation: Operation, now: datetime, pending_days: int
    ) -> KeyRecord:
        for _ in range(_CAS_ATTEMPTS):
            target = transition(record, operation, now=now, pending_days=pending_days)
            if target == record:
                return record
            written = await self._write(target, record)
            if written is not None:
                return written
            # Someone else (a re-wrap, another keygen's sweep) changed it: decide again.
            record = self._checked(await self._store.get_key(record.key_id, record.version))
        raise InternalError(
            f"key {record.key_id} v{record.version} kept changing during {operation.value}; "
            "try again"
        )

    async def _announce_destroyed(self, gone: list[KeyRecord]) -> None:
        for record in gone:
            try:
                await self._events.publish(_event(record, self._clock()))
            except ZanddError as exc:
                # It was pending, so every signer refuses it already; nobody is misled.
                log.warning("destroyed %s v%d unannounced: %s", *_ids(record), exc.message)

    async def _destroy_due_locked(self) -> list[KeyRecord]:
        now = self._clock()
        gone = []
        for record in await self._store.list_due(now):
            if not self._trusted(record):
                continue
            erased = await self._write(destroyed(record), record)
            if erased is None:
                continue  # changed meanwhile (cancelled, or another keygen got there first)
            log.info("destroyed key %s v%d: its waiting period is over", *_ids(record))
            await self._audit.record(
                AuditEvent(
                    at=now,
                    principal=SYSTEM_PRINCIPAL,
                    operation=DESTROYED_OPERATION,
                    outcome=OUTCOME_OK,
                    key_id=record.key_id,
                    version=record.version,
                )
            )
            gone.append(erased)
        return gone

    def _trusted(self, record: KeyRecord) -> bool:
        # A pending record whose MAC fails may have been made pending (or due) by a vault
        # writer: it is left alone, and every signer refuses it anyway.
        try:
            self._checked(record)
        except IntegrityError as exc:
            log.error("not destroying key %s v%d: %s", *_ids(record), exc.message)
            return False
        return True


def _ids(record: KeyRecord) -> tuple[str, int]:
    return record.key_id, record.version


def _event(record: KeyRecord, now: datetime) -> KeyStateChangedEvent:
    return KeyStateChangedEvent(
        key_id=record.key_id,
        version=record.version,
        state=record.state,
        destroy_after=record.destroy_after,
        changed_at=now,
        generation=record.generation,
    )


def _summary(records: list[KeyRecord]) -> str:
    return ", ".join(f"{r.key_id} v{r.version} {r.state.value}" for r in records)
