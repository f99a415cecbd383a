"""Key versions on ``zandd.keygen`` (issue 15): ``key.rotate``, ``key.update`` and the
automatic rotation of keys with a ``rotation_period``.

A key's **primary** version — the one ``sign`` and ``sign.batch`` use when the request names
no ``version`` — is its highest version. ``key.rotate`` makes a new version in the TPM (same
algorithm, protection, owner, label, allowed signers, rotation period) and stores it above
every other one in a single insert: from that commit on every fresh read of the key answers
with the new version, and no moment has two primaries or none. Older versions keep their
state (they still verify, and sign when named); they are disabled and destroyed one by one
with the lifecycle operations. A disabled or destroyed primary is never stepped over: a
``sign`` without a version is then refused (``key_disabled``) rather than served by an
older version.

``next_rotation_at`` (when the key rotates on its own next) lives on the primary version
only; the keygen worker's due check (``rotate_due``, every ``destroy_check_interval_s``, an
indexed query: the answer costs what is due) rotates every key whose time has come —
when its primary is enabled; a key whose primary is disabled or pending destruction is not
brought back to life by a new version, its next rotation moves one period on instead. Only a
keygen worker that holds the TPM rotates (a hot standby has not opened it, as for the audit
checkpoints); other instances leave it to the active one.

Every change is written with the lifecycle's compare-and-set under its lock and announced on
``zandd.events`` (``key.state_changed``, one per version, with the record's generation) before
the reply, so signers drop the key from their cache before the caller hears of the change.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta

from contracts.attestation import attestation_reply
from contracts.crypto import load_algorithm_public_key, public_key_jwk, public_key_pem
from contracts.errors import (
    IntegrityError,
    InternalError,
    InvalidRequest,
    KeyNotFound,
    ZanddError,
)
from contracts.models import (
    KeyRotateReply,
    KeyRotateRequest,
    KeyState,
    KeyStateChangedEvent,
    KeyUpdateReply,
    KeyUpdateRequest,
    KeyVersionState,
)
from contracts.operations import Operation
from vault.audit import OUTCOME_OK, AuditEvent, AuditLog
from vault.records import KeyRecord
from vault.store import VaultStore
from workers.audit.auditing import Clock, utc_now
from workers.consumer.backoff import every
from workers.consumer.runtime import Handler, RequestContext
from workers.keygen.lifecycle import SYSTEM_PRINCIPAL, KeyLifecycle
from workers.keygen.session import TpmSession
from workers.keygen.worker import Keygen
from workers.service.events import EventPublisher
from workers.service.policy import AccessPolicy

log = logging.getLogger("zandd.keygen")

#: The audit operation of a rotation the keygen worker made because the key's period was over.
ROTATED_OPERATION = "key.rotated"
#: How a ``key.rotate`` request id is stored on the version it made: scoped to the operation
#: and to the principal that asked (an admin's and the owner's ids are theirs alone).
_ROTATE_REQUEST_ID = "key.rotate/{principal}/{request_id}"
_CAS_ATTEMPTS = 3


class KeyVersions:
    """``key.rotate``, ``key.update`` and the rotation of keys whose period is over."""

    def __init__(
        self,
        store: VaultStore,
        keygen: Keygen,
        lifecycle: KeyLifecycle,
        tpm: TpmSession,
        *,
        policy: AccessPolicy,
        events: EventPublisher,
        audit: AuditLog,
        clock: Clock = utc_now,
    ) -> None:
        self._store = store
        self._keygen = keygen
        self._lifecycle = lifecycle
        self._tpm = tpm
        self._policy = policy
        self._events = events
        self._audit = audit
        self._clock = clock

    @property
    def handlers(self) -> Mapping[Operation, Handler]:
        """Operation → handler, for the consumer runtime."""
        return {Operation.KEY_ROTATE: self.rotate, Operation.KEY_UPDATE: self.update}

    async def rotate(self, request: KeyRotateRequest, context: RequestContext) -> KeyRotateReply:
        """A new primary version of the key; idempotent on the request id (``message_id``)."""
        principal = self._policy.principal(context)
        if context.request_id is None:
            raise InvalidRequest("key.rotate needs a message_id: it is the idempotency key")
        request_id = _ROTATE_REQUEST_ID.format(principal=principal, request_id=context.request_id)
        async with self._lifecycle.lock:
            primary = self._lifecycle.checked(await self._store.get_key(request.key_id))
            self._policy.check_manage(primary, principal)
            earlier = await self._store.find_by_request_id(request_id, owner=primary.owner)
            if earlier is not None:
                made = self._lifecycle.checked(earlier)
                if made.key_id != request.key_id:
                    raise InvalidRequest(
                        f"message_id {context.request_id!r} already made a version of another "
                        "key: use a new message_id for a new rotation"
                    )
                log.info("key.rotate %s repeated: returning v%d", context.request_id, made.version)
                changed = [made]
            else:
                changed = await self._rotate_locked(primary, request_id)
                made = changed[0]
                log.info("rotated key %s to v%d for %s", made.key_id, made.version, principal)
        await self._announce(changed)
        return _rotate_reply(made)

    async def update(self, request: KeyUpdateRequest, context: RequestContext) -> KeyUpdateReply:
        """Change the key's label, allowed signers or rotation period on every version."""
        principal = self._policy.principal(context)
        async with self._lifecycle.lock:
            versions = await self._versions(request.key_id)
            primary = versions[-1]
            self._policy.check_manage(primary, principal)
            now = self._clock()
            results = [
                await self._replace(record, lambda r: _updated(r, request, primary, now))
                for record in versions
            ]
        # Announced even when nothing changed: a retry repairs an announcement that was lost.
        await self._announce(results)
        primary = results[-1]
        log.info("key.update of %s by %s: %s", primary.key_id, principal, sorted(request.changes))
        return KeyUpdateReply(
            key_id=primary.key_id,
            primary_version=primary.version,
            label=primary.label,
            allowed_signers=list(primary.allowed_signers),
            rotation_period=primary.rotation_period_s,
            next_rotation_at=primary.next_rotation_at,
            versions=[
                KeyVersionState(version=r.version, state=r.state, destroy_after=r.destroy_after)
                for r in results
            ],
        )

    async def rotate_due(self) -> list[KeyRecord]:
        """Rotate every key whose ``next_rotation_at`` has come; the versions made.

        Nothing happens in a worker that does not hold the TPM (a hot standby)."""
        if not self._tpm.opened or not await self._store.list_rotation_due(self._clock()):
            return []  # the usual answer, without taking the lock
        made: list[KeyRecord] = []
        changed: list[KeyRecord] = []
        async with self._lifecycle.lock:
            now = self._clock()
            for due in await self._store.list_rotation_due(now):
                try:
                    changed += await self._rotate_due_locked(due, now, made)
                except ZanddError as exc:
                    log.warning("rotating key %s (due) failed: %s", due.key_id, exc.message)
        try:
            await self._announce(changed)
        except ZanddError as exc:
            # The new versions are in the vault: signers reading the key get them; those
            # with the key cached use the older (enabled) primary until the cache's bound.
            log.warning("rotations unannounced: %s", exc.message)
        return made

    async def rotate_due_forever(self, stop: asyncio.Event, interval_s: float) -> None:
        """Run ``rotate_due`` every ``interval_s`` until ``stop``."""
        await every(
            self.rotate_due,
            stop=stop,
            interval_s=interval_s,
            what="looking for keys due for rotation",
            logger=log,
        )

    async def _rotate_due_locked(
        self, due: KeyRecord, now: datetime, made: list[KeyRecord]
    ) -> list[KeyRecord]:
        try:
            due = self._lifecycle.checked(due)
        except IntegrityError as exc:
            # Made due by a vault writer, perhaps: left alone (signers refuse it anyway).
            log.error("not rotating key %s v%d: %s", due.key_id, due.version, exc.message)
            return []
        primary = self._lifecycle.checked(await self._store.get_key(due.key_id))
        if primary.version != due.version:
            # A rotation that stopped between its insert and this clean-up: finish it.
            return [
                await self._replace(due, lambda r: dataclasses.replace(r, next_rotation_at=None))
            ]
        if primary.state is not KeyState.ENABLED or primary.rotation_period_s is None:
            # A disabled key stays disabled: no fresh version brings it back. Look again
            # one period on (or never, without a period).
            period = primary.rotation_period_s
            later = None if period is None else now + timedelta(seconds=period)
            return [
                await self._replace(
                    primary, lambda r: dataclasses.replace(r, next_rotation_at=later)
                )
            ]
        changed = await self._rotate_locked(primary, None)
        new = changed[0]
        await self._audit.record(
            AuditEvent(
                at=now,
                principal=SYSTEM_PRINCIPAL,
                operation=ROTATED_OPERATION,
                outcome=OUTCOME_OK,
                key_id=new.key_id,
                version=new.version,
            )
        )
        log.info("rotated key %s to v%d: its rotation period was over", new.key_id, new.version)
        made.append(new)
        return changed

    async def _rotate_locked(self, primary: KeyRecord, request_id: str | None) -> list[KeyRecord]:
        """Make and store the version above ``primary``, then take ``primary``'s next rotation
        away; the records changed, the new version first."""
        now = self._clock()
        record = await self._keygen.next_version(primary, request_id=request_id, now=now)
        try:
            stored = await self._store.create_key(record)
        except IntegrityError as exc:
            raise InternalError(
                f"key {primary.key_id} got a version {record.version} meanwhile (another "
                "keygen worker?); try again"
            ) from exc
        stored = self._lifecycle.checked(stored)
        if (stored.key_id, stored.version) != (record.key_id, record.version):
            return [stored]  # a twin request made it first
        changed = [stored]
        if primary.next_rotation_at is not None:
            changed.append(
                await self._replace(
                    primary, lambda r: dataclasses.replace(r, next_rotation_at=None)
                )
            )
        else:
            changed.append(primary)  # announced too: signers drop what they cached
        return changed

    async def _versions(self, key_id: str) -> list[KeyRecord]:
        versions = [self._lifecycle.checked(r) for r in await self._store.list_versions(key_id)]
        if not versions:
            raise KeyNotFound(f"key {key_id} not found")
        return versions

    async def _replace(
        self, record: KeyRecord, change: Callable[[KeyRecord], KeyRecord]
    ) -> KeyRecord:
        """``record`` changed by ``change`` and written (compare-and-set, read again if another
        writer came first); the record as it is then."""
        for _ in range(_CAS_ATTEMPTS):
            target = change(record)
            if target == record:
                return record
            written = await self._lifecycle.write(target, record)
            if written is not None:
                return written
            record = self._lifecycle.checked(
                await self._store.get_key(record.key_id, record.version)
            )
        raise InternalError(f"key {record.key_id} v{record.version} kept changing; try again")

    async def _announce(self, records: list[KeyRecord]) -> None:
        now = self._clock()
        for record in records:
            await self._events.publish(
                KeyStateChangedEvent(
                    key_id=record.key_id,
                    version=record.version,
                    state=record.state,
                    destroy_after=record.destroy_after,
                    changed_at=now,
                    generation=record.generation,
                )
            )


def _updated(
    record: KeyRecord, request: KeyUpdateRequest, primary: KeyRecord, now: datetime
) -> KeyRecord:
    """``record`` with what ``request`` changes; only the primary keeps a next rotation."""
    changes = request.changes
    label = request.label if "label" in changes else record.label
    signers = record.allowed_signers
    if "allowed_signers" in changes:
        given = request.allowed_signers
        signers = (record.owner,) if given is None else tuple(given)
    period = request.rotation_period if "rotation_period" in changes else record.rotation_period_s
    next_rotation = None
    if record.version == primary.version:
        if "rotation_period" in changes:
            next_rotation = None if period is None else now + timedelta(seconds=period)
        else:
            next_rotation = record.next_rotation_at
    return dataclasses.replace(
        record,
        label=label,
        allowed_signers=signers,
        rotation_period_s=period,
        next_rotation_at=next_rotation,
    )


def _rotate_reply(record: KeyRecord) -> KeyRotateReply:
    key = load_algorithm_public_key(record.public_key_der, record.algorithm)
    return KeyRotateReply(
        key_id=record.key_id,
        version=record.version,
        algorithm=record.algorithm,
        public_key_pem=public_key_pem(key),
        public_key_jwk=public_key_jwk(
            key, kid=f"{record.key_id}.v{record.version}", algorithm=record.algorithm
        ),
        created_at=record.created_at,
        attestation=attestation_reply(record.attestation),
        protection=record.protection,
        rotation_period=record.rotation_period_s,
        next_rotation_at=record.next_rotation_at,
    )
