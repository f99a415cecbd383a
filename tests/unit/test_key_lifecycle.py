"""The keygen worker's lifecycle handlers against a real (in-memory) vault, without a broker."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from contracts.errors import (
    BrokerUnavailable,
    Forbidden,
    IntegrityError,
    KeyDisabled,
    KeyNotFound,
)
from contracts.models import KeyDestroyRequest, KeyState, KeyStateChangedEvent, KeyStateRequest
from contracts.operations import Operation
from vault import Kek, KekRing, KeyRecord, RecordBinding, SealedKey, seal
from vault.audit import AuditLog, AuditQuery
from vault.record_mac import authenticated
from vault.store import VaultStore, open_store
from workers.consumer.runtime import RequestContext
from workers.keygen.lifecycle import KeyLifecycle
from workers.service.policy import AccessPolicy

T0 = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
KEK = Kek.generate()
RING = KekRing(KEK)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


class Events:
    """Records what would go to ``zandd.events``; can be told to fail like a lost broker."""

    def __init__(self) -> None:
        self.published: list[KeyStateChangedEvent] = []
        self.arrived = asyncio.Event()
        self.down = False

    async def publish(self, event: KeyStateChangedEvent) -> None:
        if self.down:
            raise BrokerUnavailable("could not publish: AMQPConnectionError")
        self.published.append(event)
        self.arrived.set()


@pytest.fixture
async def store() -> AsyncIterator[VaultStore]:
    opened = await open_store("sqlite:///:memory:")
    yield opened
    await opened.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
async def lifecycle(store: VaultStore, clock: Clock, events: Events) -> AsyncIterator[KeyLifecycle]:
    audit = AuditLog(store)
    yield KeyLifecycle(
        store,
        RING,
        policy=AccessPolicy(admins=frozenset({"ops"})),
        events=events,  # type: ignore[arg-type]
        audit=audit,
        clock=clock,
    )
    await audit.close()


async def add_key(
    store: VaultStore, key_id: str = "zk-1", version: int = 1, state: KeyState = KeyState.ENABLED
) -> KeyRecord:
    binding = RecordBinding(key_id, version, "ecdsa-p256-sha256")
    record = KeyRecord(
        key_id=key_id,
        version=version,
        algorithm="ecdsa-p256-sha256",
        public_key_der=b"public",
        sealed=None if state == KeyState.DESTROYED else seal(os.urandom(32), binding, KEK),
        state=state,
        label=None,
        allowed_signers=("svc",),
        created_at=T0,
        created_by="owner",
        request_id=None,
        destroy_after=T0 if state == KeyState.DESTROYED else None,
    )
    return await store.create_key(authenticated(record, RING, generation=1))


def as_(principal: str, operation: Operation = Operation.KEY_DISABLE) -> RequestContext:
    return RequestContext(operation, "req", principal)


async def test_owner_and_admins_only(store: VaultStore, lifecycle: KeyLifecycle) -> None:
    await add_key(store)
    with pytest.raises(Forbidden, match="'svc' may not change the state of key zk-1"):
        await lifecycle.disable(KeyStateRequest(key_id="zk-1"), as_("svc"))
    with pytest.raises(KeyNotFound, match="key zk-nope not found"):
        await lifecycle.disable(KeyStateRequest(key_id="zk-nope"), as_("owner"))
    reply = await lifecycle.disable(KeyStateRequest(key_id="zk-1"), as_("ops"))
    assert [(v.version, v.state) for v in reply.versions] == [(1, KeyState.DISABLED)]
    await lifecycle.enable(KeyStateRequest(key_id="zk-1"), as_("owner"))
    assert (await store.get_key("zk-1")).state == KeyState.ENABLED


async def test_without_a_version_every_live_version_changes(
    store: VaultStore, lifecycle: KeyLifecycle, events: Events
) -> None:
    await add_key(store, version=1, state=KeyState.DESTROYED)
    await add_key(store, version=2)
    await add_key(store, version=3, state=KeyState.DISABLED)
    reply = await lifecycle.disable(KeyStateRequest(key_id="zk-1"), as_("owner"))
    assert [(v.version, v.state) for v in reply.versions] == [
        (2, KeyState.DISABLED),
        (3, KeyState.DISABLED),
    ]
    # Announced for both, the unchanged one too: a retry repairs a lost announcement.
    assert [(e.version, e.state) for e in events.published] == [
        (2, KeyState.DISABLED),
        (3, KeyState.DISABLED),
    ]
    one = await lifecycle.enable(KeyStateRequest(key_id="zk-1", version=3), as_("owner"))
    assert [(v.version, v.state) for v in one.versions] == [(3, KeyState.ENABLED)]
    with pytest.raises(KeyDisabled, match="zk-1 v1 is destroyed"):
        await lifecycle.enable(KeyStateRequest(key_id="zk-1", version=1), as_("owner"))


async def test_one_impossible_version_changes_none(
    store: VaultStore, lifecycle: KeyLifecycle
) -> None:
    await add_key(store, version=1)
    await add_key(store, version=2)
    await lifecycle.destroy(KeyDestroyRequest(key_id="zk-1", version=2), as_("owner"))
    with pytest.raises(KeyDisabled, match="v2 is pending_destruction"):
        await lifecycle.disable(KeyStateRequest(key_id="zk-1"), as_("owner"))
    assert (await store.get_key("zk-1", 1)).state == KeyState.ENABLED


async def test_due_versions_are_destroyed_by_the_periodic_check(
    store: VaultStore, lifecycle: KeyLifecycle, clock: Clock, events: Events
) -> None:
    await add_key(store)
    reply = await lifecycle.destroy(KeyDestroyRequest(key_id="zk-1", pending_days=2), as_("owner"))
    assert reply.versions[0].destroy_after == T0 + timedelta(days=2)
    events.published.clear()
    events.arrived.clear()
    clock.now = T0 + timedelta(days=2)
    stop = asyncio.Event()
    sweeper = asyncio.create_task(lifecycle.destroy_due_forever(stop, interval_s=3600))
    await asyncio.wait_for(events.arrived.wait(), 10)
    stop.set()
    await sweeper
    gone = await store.get_key("zk-1")
    assert (gone.state, gone.sealed) == (KeyState.DESTROYED, None)
    assert [(e.key_id, e.state) for e in events.published] == [("zk-1", KeyState.DESTROYED)]
    (entry,) = await store.read_audit(AuditQuery(latest=True, limit=1))
    assert (entry.event.principal, entry.event.operation) == ("zandd:keygen", "key.destroyed")


async def test_changed_records_are_neither_changed_nor_destroyed(
    store: VaultStore, lifecycle: KeyLifecycle, clock: Clock, events: Events
) -> None:
    record = await add_key(store, key_id="zk-owned")
    # A vault writer makes itself the owner (no ring: the MAC stays the old one).
    stolen = dataclasses.replace(record, created_by="mallory", generation=2)
    assert await store.replace_key(stolen, record)
    with pytest.raises(IntegrityError, match="failed its record MAC"):
        await lifecycle.disable(KeyStateRequest(key_id="zk-owned"), as_("mallory"))
    # ...or brings a scheduled destruction forward.
    await add_key(store, key_id="zk-later")
    await lifecycle.destroy(KeyDestroyRequest(key_id="zk-later", pending_days=30), as_("owner"))
    pending = await store.get_key("zk-later")
    sooner = dataclasses.replace(pending, destroy_after=T0, generation=pending.generation + 1)
    assert await store.replace_key(sooner, pending)
    clock.now = T0 + timedelta(days=1)
    assert await lifecycle.destroy_due() == []
    assert (await store.get_key("zk-later")).state == KeyState.PENDING_DESTRUCTION
    assert [e.state for e in events.published] == [KeyState.PENDING_DESTRUCTION]


async def test_a_cancelled_destruction_is_not_carried_out(
    store: VaultStore, lifecycle: KeyLifecycle, clock: Clock
) -> None:
    await add_key(store)
    await lifecycle.destroy(KeyDestroyRequest(key_id="zk-1", pending_days=1), as_("owner"))
    await lifecycle.cancel_destroy(KeyStateRequest(key_id="zk-1"), as_("owner"))
    clock.now = T0 + timedelta(days=30)
    assert await lifecycle.destroy_due() == []
    assert (await store.get_key("zk-1")).state == KeyState.DISABLED


class _RacingStore:
    """Re-seals the record (as ``zandd vault rewrap`` would) just before the first CAS."""

    def __init__(self, store: VaultStore) -> None:
        self._store = store
        self.raced = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def replace_key(self, record: KeyRecord, expected: KeyRecord) -> bool:
        if not self.raced:
            self.raced = True
            resealed = authenticated(
                dataclasses.replace(
                    expected, sealed=SealedKey("kek-new", os.urandom(12), os.urandom(48))
                ),
                RING,
                generation=expected.generation + 1,
            )
            assert await self._store.replace_key(resealed, expected)
        return await self._store.replace_key(record, expected)


async def test_a_change_racing_a_rewrap_keeps_both(
    store: VaultStore, clock: Clock, events: Events
) -> None:
    await add_key(store)
    racing = _RacingStore(store)
    audit = AuditLog(store)
    lifecycle = KeyLifecycle(
        racing,  # type: ignore[arg-type]
        RING,
        policy=AccessPolicy(),
        events=events,  # type: ignore[arg-type]
        audit=audit,
        clock=clock,
    )
    await lifecycle.disable(KeyStateRequest(key_id="zk-1"), as_("owner"))
    after = await store.get_key("zk-1")
    assert racing.raced
    assert after.state == KeyState.DISABLED
    assert after.kek_id == "kek-new"  # the re-wrap is not undone
    await audit.close()


async def test_a_lost_announcement_fails_the_request_and_a_retry_repairs_it(
    store: VaultStore, lifecycle: KeyLifecycle, events: Events
) -> None:
    await add_key(store)
    events.down = True
    with pytest.raises(BrokerUnavailable):
        await lifecycle.disable(KeyStateRequest(key_id="zk-1"), as_("owner"))
    assert (await store.get_key("zk-1")).state == KeyState.DISABLED  # committed all the same
    events.down = False
    await lifecycle.disable(KeyStateRequest(key_id="zk-1"), as_("owner"))
    assert [(e.key_id, e.state) for e in events.published] == [("zk-1", KeyState.DISABLED)]
