"""``key.alias.set`` and ``key.alias.delete`` on ``zandd.keygen`` (issue 15, aliases).

The keygen worker is the only vault writer, so aliases change here: each change is a
compare-and-set of a MACed row (``vault.aliases``), audited like every request (the reply
names the key), and announced on ``zandd.events`` (``key.alias_changed``) before the reply,
so by the time the caller hears "set" every running signer has dropped its old resolution.

Who may do what (think of a hostile principal):

- point an alias at a key: the key's owner, or an admin. An unknown key and another's key
  get one error, so the answer does not tell which keys exist.
- re-point or delete an existing alias: its owner (the principal that created it), or an
  admin. A re-point keeps the alias's owner (an admin re-pointing does not take it over).
  Deleting an alias that does not exist and one that is another's give one error.
- an alias's name is a vault-wide namespace: ``key.alias.set`` of a name another owns is
  refused (which says the name is taken, as any unique name must).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from contracts.errors import Forbidden, InternalError, InvalidRequest, KeyNotFound
from contracts.models import (
    KeyAliasChangedEvent,
    KeyAliasDeleteRequest,
    KeyAliasReply,
    KeyAliasSetRequest,
    KeyState,
)
from contracts.operations import Operation
from vault.aliases import AliasRecord, authenticated_alias, verify_alias
from vault.kek import KekRing
from vault.record_mac import verify_record
from vault.store import VaultStore
from workers.audit.auditing import Clock, utc_now
from workers.consumer.runtime import Handler, RequestContext
from workers.service.aliases import no_such_alias
from workers.service.events import EventPublisher
from workers.service.policy import AccessPolicy

log = logging.getLogger("zandd.keygen")
_CAS_ATTEMPTS = 3


class KeyAliases:
    """The alias handlers of the keygen worker."""

    def __init__(
        self,
        store: VaultStore,
        ring: KekRing,
        *,
        policy: AccessPolicy,
        events: EventPublisher,
        clock: Clock = utc_now,
    ) -> None:
        self._store = store
        self._ring = ring
        self._policy = policy
        self._events = events
        self._clock = clock
        self._lock = asyncio.Lock()

    @property
    def handlers(self) -> Mapping[Operation, Handler]:
        """Operation → handler, for the consumer runtime."""
        return {
            Operation.KEY_ALIAS_SET: self.set_alias,
            Operation.KEY_ALIAS_DELETE: self.delete_alias,
        }

    async def set_alias(
        self, request: KeyAliasSetRequest, context: RequestContext
    ) -> KeyAliasReply:
        """Create the alias, or point it at another key; announced before the reply."""
        principal = self._policy.principal(context)
        async with self._lock:
            for _ in range(_CAS_ATTEMPTS):
                current = await self._current(request.alias)
                if current is not None and not self._may_change(current, principal):
                    raise Forbidden(f"{request.alias} belongs to another principal")
                await self._check_target(request.key_id, principal)
                now = self._clock()
                written = authenticated_alias(
                    AliasRecord(
                        alias=request.alias,
                        key_id=request.key_id,
                        owner=principal if current is None else current.owner,
                        created_at=now if current is None else current.created_at,
                        updated_at=now,
                    ),
                    self._ring,
                    generation=1 if current is None else current.generation + 1,
                )
                if await self._store.put_alias(written, current):
                    break
            else:
                raise InternalError(f"{request.alias} kept changing; try again")
        await self._events.publish(
            KeyAliasChangedEvent(alias=written.alias, key_id=written.key_id, changed_at=now)
        )
        previous = None if current is None else current.key_id
        log.info(
            "%s now points at %s (was %s), set by %s",
            written.alias,
            written.key_id,
            previous,
            principal,
        )
        return KeyAliasReply(
            alias=written.alias,
            key_id=written.key_id,
            previous_key_id=previous,
            owner=written.owner,
            updated_at=written.updated_at,
        )

    async def delete_alias(
        self, request: KeyAliasDeleteRequest, context: RequestContext
    ) -> KeyAliasReply:
        """Remove the alias (the key stays); announced before the reply."""
        principal = self._policy.principal(context)
        async with self._lock:
            for _ in range(_CAS_ATTEMPTS):
                current = await self._current(request.alias)
                if current is None or not self._may_change(current, principal):
                    raise no_such_alias(request.alias)
                if await self._store.delete_alias(current):
                    break
            else:
                raise InternalError(f"{request.alias} kept changing; try again")
        now = self._clock()
        await self._events.publish(
            KeyAliasChangedEvent(alias=current.alias, key_id=None, changed_at=now)
        )
        log.info("%s (pointing at %s) deleted by %s", current.alias, current.key_id, principal)
        return KeyAliasReply(
            alias=current.alias,
            key_id=None,
            previous_key_id=current.key_id,
            owner=current.owner,
            updated_at=now,
        )

    async def _current(self, alias: str) -> AliasRecord | None:
        found = await self._store.get_alias(alias)
        return None if found is None else verify_alias(found, self._ring)

    def _may_change(self, alias: AliasRecord, principal: str) -> bool:
        return principal == alias.owner or principal in self._policy.admins

    async def _check_target(self, key_id: str, principal: str) -> None:
        refused = Forbidden(
            f"{principal!r} may not point an alias at key {key_id}: no such key, or not its owner"
        )
        try:
            record = verify_record(await self._store.get_key(key_id), self._ring)
        except KeyNotFound:
            raise refused from None
        if principal != record.owner and principal not in self._policy.admins:
            raise refused
        # Only the owner (or an admin) gets this far, so the state tells nobody else anything.
        if record.state == KeyState.DESTROYED:
            raise InvalidRequest(f"key {key_id} is destroyed: an alias cannot point at it")
