"""Aliases on the wire (issue 15): resolving ``alias/<name>`` where a key id may be one.

Every handler of an operation in ``contracts.operations.ALIAS_OPERATIONS`` is wrapped: a
request whose ``key_id`` is an alias is handed on with the real key id in its place, so the
handler checks access, state and generation exactly as for a request that named the key,
and its reply names the real key id. An unknown alias is ``key_not_found``; a caller refused
the key behind an alias hears the alias named, not the key id.

The keygen worker resolves from the vault on every request (it is the writer: the vault is
its truth); the signers resolve through an ``AliasCache``, which ``key.alias_changed`` events
invalidate at once and ``ttl_s`` bounds otherwise.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pydantic import BaseModel

from contracts.errors import Forbidden, KeyNotFound
from contracts.models import is_alias
from contracts.operations import ALIAS_OPERATIONS, Operation
from vault.aliases import verify_alias
from vault.kek import KekRing
from vault.store import VaultStore
from workers.consumer.runtime import Handler, RequestContext

Resolve = Callable[[str], Awaitable[str]]

DEFAULT_ALIAS_TTL_S = 60.0
DEFAULT_MAX_ALIASES = 10_000


def no_such_alias(alias: str) -> KeyNotFound:
    """The one error for an alias that does not exist (or is not the caller's to change)."""
    return KeyNotFound(f"{alias} not found")


async def resolve_in_vault(store: VaultStore, ring: KekRing, alias: str) -> str:
    """The key id ``alias`` points at, its row's MAC checked; KeyNotFound when there is none."""
    record = await store.get_alias(alias)
    if record is None:
        raise no_such_alias(alias)
    return verify_alias(record, ring).key_id


def resolving(handlers: Mapping[Operation, Handler], resolve: Resolve) -> dict[Operation, Handler]:
    """``handlers`` with those of ``ALIAS_OPERATIONS`` accepting an alias as ``key_id``."""
    return {
        operation: _resolving(handler, resolve) if operation in ALIAS_OPERATIONS else handler
        for operation, handler in handlers.items()
    }


def _resolving(handler: Handler, resolve: Resolve) -> Handler:
    async def resolved(request: Any, context: RequestContext) -> BaseModel:
        reference = getattr(request, "key_id", None)
        if not isinstance(reference, str) or not is_alias(reference):
            return await handler(request, context)
        key_id = await resolve(reference)
        try:
            return await handler(request.model_copy(update={"key_id": key_id}), context)
        except Forbidden:
            # The key behind the alias stays unnamed to a caller who may not use it.
            raise Forbidden(
                f"{context.operation.value} through {reference} refused: the caller may not "
                "use the key it points at"
            ) from None

    return resolved


class AliasCache:
    """A signer's alias → key id resolutions, fresh for ``ttl_s`` at most, least recently
    used out first; ``invalidate`` (an event) and ``clear`` (a gap) drop them at once.

    A vault read that an invalidation overtook is used for that one request but not cached:
    it may predate the change the event announced.
    """

    def __init__(
        self,
        store: VaultStore,
        ring: KekRing,
        *,
        ttl_s: float = DEFAULT_ALIAS_TTL_S,
        max_entries: int = DEFAULT_MAX_ALIASES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._ring = ring
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._changes = 0
        self.hits = 0
        self.misses = 0

    async def resolve(self, alias: str) -> str:
        """The key id ``alias`` points at (cached when fresh); KeyNotFound when none."""
        now = self._clock()
        cached = self._entries.get(alias)
        if cached is not None and cached[1] > now:
            self._entries.move_to_end(alias)
            self.hits += 1
            return cached[0]
        self.misses += 1
        before = self._changes
        key_id = await resolve_in_vault(self._store, self._ring, alias)
        if self._changes == before:
            self._entries[alias] = (key_id, now + self._ttl_s)
            self._entries.move_to_end(alias)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return key_id

    def invalidate(self, alias: str) -> None:
        """Forget ``alias`` (it was set, re-pointed or deleted)."""
        self._changes += 1
        self._entries.pop(alias, None)

    def clear(self) -> None:
        """Forget every alias (the event subscription may have missed changes)."""
        self._changes += 1
        self._entries.clear()
