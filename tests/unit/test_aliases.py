"""Aliases (issue 15): the wire grammar, the MAC of an alias row, the signers' alias cache
and the resolution wrapper — without a broker."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from contracts.errors import Forbidden, IntegrityError, InvalidRequest, KeyNotFound
from contracts.models import SignReply, parse_request
from contracts.operations import ALIAS_OPERATIONS, KEYGEN_OPERATIONS, Operation
from vault import SqliteStore
from vault.aliases import AliasRecord, authenticated_alias, rewrap_aliases, verify_alias
from vault.kek import Kek, KekRing
from workers.consumer.runtime import RequestContext
from workers.service.aliases import AliasCache, resolving

T0 = datetime(2026, 11, 30, tzinfo=UTC)


def alias_row(ring: KekRing, key_id: str = "zk-1", generation: int = 1) -> AliasRecord:
    row = AliasRecord("alias/inv", key_id, "alice", T0, T0 + timedelta(seconds=generation))
    return authenticated_alias(row, ring, generation=generation)


@pytest.mark.parametrize(
    "key_id", ["alias/invoices", "alias/a", "alias/A.b_c-9", "alias/" + "x" * 128, "zk-0a"]
)
def test_a_key_ref_is_a_key_id_or_an_alias(key_id: str) -> None:
    body = f'{{"key_id": "{key_id}", "message": "eA=="}}'.encode()
    assert parse_request(Operation.SIGN, body).key_id == key_id  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "key_id", ["alias/", "alias/" + "x" * 129, "alias/a/b", "alias/a b", "Alias/x", "/x", "alias"]
)
def test_anything_else_is_refused(key_id: str) -> None:
    body = f'{{"key_id": "{key_id}", "message": "eA=="}}'.encode()
    if key_id == "alias":  # a plain word is a (possible) key id, never an alias
        parse_request(Operation.SIGN, body)
        return
    with pytest.raises(InvalidRequest, match="key_id"):
        parse_request(Operation.SIGN, body)


def test_lifecycle_operations_take_key_ids_only() -> None:
    body = b'{"key_id": "alias/invoices"}'
    for operation in (Operation.KEY_DISABLE, Operation.KEY_ENABLE, Operation.KEY_DESTROY):
        assert operation not in ALIAS_OPERATIONS
        with pytest.raises(InvalidRequest, match="key_id"):
            parse_request(operation, body)
    assert Operation.KEY_ALIAS_SET in KEYGEN_OPERATIONS
    assert Operation.KEY_ALIAS_DELETE in KEYGEN_OPERATIONS


def test_an_alias_row_is_maced_over_every_field() -> None:
    ring = KekRing(Kek.generate())
    row = alias_row(ring)
    assert verify_alias(row, ring) == row
    for change in (
        {"key_id": "zk-2"},
        {"owner": "mallory"},
        {"generation": 2},
        {"alias": "alias/other"},
        {"updated_at": T0},
    ):
        with pytest.raises(IntegrityError, match="failed its MAC"):
            verify_alias(dataclasses.replace(row, **change), ring)
    with pytest.raises(IntegrityError, match="no MAC"):
        verify_alias(dataclasses.replace(row, mac=None), ring)
    with pytest.raises(IntegrityError):
        verify_alias(row, KekRing(Kek(kek_id=ring.active.kek_id, key=bytes(32))))


async def test_the_alias_cache_is_invalidated_by_events_and_bounded_by_its_ttl() -> None:
    ring = KekRing(Kek.generate())
    store = await SqliteStore.open(":memory:")
    now = [0.0]
    cache = AliasCache(store, ring, ttl_s=60.0, clock=lambda: now[0])
    try:
        first = alias_row(ring, "zk-1")
        assert await store.put_alias(first, None)
        assert await cache.resolve("alias/inv") == "zk-1"
        second = alias_row(ring, "zk-2", generation=2)
        assert await store.put_alias(second, first)
        assert await cache.resolve("alias/inv") == "zk-1"  # cached, no event yet
        cache.invalidate("alias/inv")
        assert await cache.resolve("alias/inv") == "zk-2"  # the event: at once
        third = alias_row(ring, "zk-3", generation=3)
        assert await store.put_alias(third, second)
        now[0] = 59.9
        assert await cache.resolve("alias/inv") == "zk-2"
        now[0] = 60.1
        assert await cache.resolve("alias/inv") == "zk-3"  # the TTL: at the latest
        assert await store.delete_alias(third)
        cache.clear()
        with pytest.raises(KeyNotFound, match="alias/inv not found"):
            await cache.resolve("alias/inv")
    finally:
        await store.close()


async def test_resolving_hands_the_real_key_id_on_and_hides_it_from_a_refused_caller() -> None:
    seen: list[str] = []

    async def sign(request: Any, context: RequestContext) -> BaseModel:
        seen.append(request.key_id)
        if context.principal == "mallory":
            raise Forbidden(f"'mallory' may not sign with key {request.key_id}")
        return SignReply(
            key_id=request.key_id,
            version=1,
            algorithm="ecdsa-p256-sha256",
            encoding="der",
            signature=b"s",
        )

    async def resolve(alias: str) -> str:
        return {"alias/inv": "zk-secret"}[alias]

    handlers = resolving({Operation.SIGN: sign, Operation.KEY_DISABLE: sign}, resolve)
    request = parse_request(Operation.SIGN, b'{"key_id": "alias/inv", "message": "eA=="}')
    alice = RequestContext(operation=Operation.SIGN, request_id=None, principal="alice")
    reply = await handlers[Operation.SIGN](request, alice)
    assert reply.key_id == "zk-secret"  # type: ignore[attr-defined]
    mallory = RequestContext(operation=Operation.SIGN, request_id=None, principal="mallory")
    with pytest.raises(Forbidden) as refused:
        await handlers[Operation.SIGN](request, mallory)
    assert "zk-secret" not in refused.value.message
    assert "alias/inv" in refused.value.message
    # Not an alias operation: the handler is the same object.
    assert handlers[Operation.KEY_DISABLE] is sign
    assert seen == ["zk-secret", "zk-secret"]


async def test_rewrap_moves_alias_macs_to_the_active_kek() -> None:
    old = Kek.generate()
    ring = KekRing(old)
    store = await SqliteStore.open(":memory:")
    try:
        row = alias_row(ring, "zk-1")
        assert await store.put_alias(row, None)
        tampered = dataclasses.replace(alias_row(ring, "zk-2"), alias="alias/other")
        assert await store.put_alias(tampered, None)
        new = Kek.generate()
        rotated = KekRing(new, others=[old])
        outcomes = await rewrap_aliases(store, rotated)
        assert outcomes == {"rewrapped": 1, "integrity_error": 1}
        moved = await store.get_alias("alias/inv")
        assert moved is not None
        assert (moved.key_id, moved.generation, moved.mac.kek_id) == ("zk-1", 2, new.kek_id)  # type: ignore[union-attr]
        assert verify_alias(moved, KekRing(new)) == moved  # the old KEK may now go
        assert await rewrap_aliases(store, rotated) == {"current": 1, "integrity_error": 1}
    finally:
        await store.close()
