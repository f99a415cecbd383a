"""Key states, access rules and re-wrapping, without a broker."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from contracts.errors import Forbidden, KeyDisabled
from contracts.models import KeyState
from contracts.operations import Operation
from vault import Kek, KekRing, KeyRecord, RecordBinding, open_into, seal
from vault.lifecycle import destroyed, is_due, transition
from vault.record_mac import authenticated, verify_record
from vault.rewrap import RewrapOutcome, resealed, rewrap
from vault.store import VaultStore, open_store
from workers.consumer.runtime import RequestContext
from workers.service.policy import ANONYMOUS_PRINCIPAL, AccessPolicy

NOW = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
OLD = Kek.generate()
RING = KekRing(OLD)
E, D, P, X = (
    KeyState.ENABLED,
    KeyState.DISABLED,
    KeyState.PENDING_DESTRUCTION,
    KeyState.DESTROYED,
)
DISABLE, ENABLE = Operation.KEY_DISABLE, Operation.KEY_ENABLE
DESTROY, CANCEL = Operation.KEY_DESTROY, Operation.KEY_CANCEL_DESTROY


def record(
    state: KeyState = E,
    *,
    key_id: str = "zk-1",
    version: int = 1,
    kek: Kek = OLD,
    scalar: bytes | None = None,
) -> KeyRecord:
    binding = RecordBinding(key_id, version, "ecdsa-p256-sha256")
    unsigned = KeyRecord(
        key_id=key_id,
        version=version,
        algorithm="ecdsa-p256-sha256",
        public_key_der=b"public",
        sealed=None if state == X else seal(scalar or os.urandom(32), binding, kek),
        state=state,
        label=None,
        allowed_signers=("svc-a", "svc-b"),
        created_at=NOW,
        created_by="owner",
        request_id=None,
        destroy_after=NOW if state in (P, X) else None,
    )
    return authenticated(unsigned, KekRing(kek), generation=1)


# --- transitions ------------------------------------------------------------------------------

ALLOWED = [
    (DISABLE, E, D),
    (DISABLE, D, D),
    (ENABLE, D, E),
    (ENABLE, E, E),
    (DESTROY, E, P),
    (DESTROY, D, P),
    (DESTROY, P, P),
    (DESTROY, X, X),
    (CANCEL, P, D),
    (CANCEL, D, D),
    (CANCEL, E, E),
]
REFUSED = [
    (DISABLE, P, "cancel its destruction first"),
    (DISABLE, X, "a destroyed key cannot come back"),
    (ENABLE, P, "cancel its destruction first"),
    (ENABLE, X, "a destroyed key cannot come back"),
    (CANCEL, X, "a destroyed key cannot come back"),
]


@pytest.mark.parametrize(("operation", "start", "end"), ALLOWED)
def test_allowed_transitions(operation: Operation, start: KeyState, end: KeyState) -> None:
    before = record(start)
    after = transition(before, operation, now=NOW + timedelta(hours=1), pending_days=7)
    assert after.state == end
    assert after.sealed == before.sealed  # a state change never touches the sealed key
    if start == end:
        assert after is before  # nothing to write: a retry is harmless


@pytest.mark.parametrize(("operation", "start", "why"), REFUSED)
def test_refused_transitions(operation: Operation, start: KeyState, why: str) -> None:
    with pytest.raises(KeyDisabled, match=f"zk-1 v1 is {start.value}: .*{why}"):
        transition(record(start), operation, now=NOW, pending_days=7)


def test_every_state_and_operation_is_decided() -> None:
    decided = {(op, start) for op, start, _ in ALLOWED} | {(op, start) for op, start, _ in REFUSED}
    operations = (DISABLE, ENABLE, DESTROY, CANCEL)
    assert decided == {(op, state) for op in operations for state in KeyState}


def test_destroy_schedules_and_a_second_destroy_keeps_the_date() -> None:
    pending = transition(record(D), DESTROY, now=NOW, pending_days=3)
    assert pending.destroy_after == NOW + timedelta(days=3)
    again = transition(pending, DESTROY, now=NOW + timedelta(days=1), pending_days=30)
    assert again.destroy_after == NOW + timedelta(days=3)
    cancelled = transition(pending, CANCEL, now=NOW, pending_days=7)
    assert (cancelled.state, cancelled.destroy_after) == (D, None)


def test_due_and_destroyed() -> None:
    pending = transition(record(), DESTROY, now=NOW, pending_days=7)
    assert not is_due(pending, NOW + timedelta(days=7) - timedelta(microseconds=1))
    assert is_due(pending, NOW + timedelta(days=7))
    assert not is_due(record(D), NOW + timedelta(days=700))
    gone = destroyed(pending)
    assert (gone.state, gone.sealed, gone.destroy_after) == (X, None, pending.destroy_after)
    assert gone.public_key_der == pending.public_key_der
    with pytest.raises(ValueError, match="pending destruction"):
        destroyed(record(D))


# --- access -------------------------------------------------------------------------------------


def context(principal: str | None) -> RequestContext:
    return RequestContext(Operation.SIGN, "req-1", principal)


def test_a_request_without_user_id_is_forbidden_unless_allowed() -> None:
    with pytest.raises(Forbidden, match="sign refused: the request has no user_id"):
        AccessPolicy().principal(context(None))
    with pytest.raises(Forbidden):
        AccessPolicy().principal(context(""))
    assert AccessPolicy(allow_anonymous=True).principal(context(None)) == ANONYMOUS_PRINCIPAL
    assert AccessPolicy().principal(context("svc-a")) == "svc-a"


def test_the_anyone_name_and_overlong_names_are_not_principals() -> None:
    # A user named '*' would own keys anyone can sign with; two names sharing 128 characters
    # would be one principal in the audit (issue 12, finding 6).
    with pytest.raises(Forbidden, match="'\\*' is reserved"):
        AccessPolicy().principal(context("*"))
    with pytest.raises(Forbidden, match="longer than 128 characters"):
        AccessPolicy(allow_anonymous=True).principal(context("p" * 129))
    assert AccessPolicy().principal(context("p" * 128)) == "p" * 128
    assert AccessPolicy().principal(context("**")) == "**"


def test_signers_owner_and_admins() -> None:
    policy = AccessPolicy(admins=frozenset({"root-ops"}))
    key = record()
    policy.check_sign(key, "svc-b")
    for outsider in ("owner", "root-ops", "svc-c", "*"):
        with pytest.raises(Forbidden, match=f"'{outsider}' may not sign with key zk-1"):
            policy.check_sign(key, outsider)
    policy.check_sign(dataclasses.replace(key, allowed_signers=("*",)), "svc-c")
    policy.check_manage(key, "owner")
    policy.check_manage(key, "root-ops")
    with pytest.raises(Forbidden, match="'svc-a' may not change the state of key zk-1"):
        policy.check_manage(key, "svc-a")


def test_key_creators() -> None:
    AccessPolicy().check_create("anyone")
    only = AccessPolicy(key_creators=frozenset({"provisioner"}))
    only.check_create("provisioner")
    with pytest.raises(Forbidden, match="'svc-a' may not create keys"):
        only.check_create("svc-a")


# --- re-wrapping --------------------------------------------------------------------------------


@pytest.fixture
async def store() -> AsyncIterator[VaultStore]:
    opened = await open_store("sqlite:///:memory:")
    yield opened
    await opened.close()


def opened(rec: KeyRecord, ring: KekRing) -> bytes:
    assert rec.sealed is not None
    out = bytearray(32)
    open_into(rec.sealed, rec.binding, ring, out)
    return bytes(out)


def test_resealed_keeps_the_scalar_under_the_new_kek() -> None:
    new = Kek.generate()
    ring = KekRing(new, others=[OLD])
    before = record(scalar=b"\x07" * 32)
    after = resealed(before, ring)
    assert after.sealed is not None
    assert after.sealed.kek_id == new.kek_id
    assert opened(after, KekRing(new)) == b"\x07" * 32
    assert after.generation == 2
    assert after.mac is not None
    assert after.mac.kek_id == new.kek_id
    verify_record(after, KekRing(new))
    assert dataclasses.replace(after, sealed=before.sealed, generation=1, mac=before.mac) == before


async def test_rewrap_interrupted_then_run_again(store: VaultStore) -> None:
    scalars = {f"zk-{n}": os.urandom(32) for n in range(10)}
    for key_id, scalar in scalars.items():
        await store.create_key(record(key_id=key_id, scalar=scalar))
    await store.create_key(record(X, key_id="zk-gone"))
    ring = KekRing(Kek.generate(), others=[OLD])

    async for step in rewrap(store, ring):
        if step.done == 4:
            break  # the operator's Ctrl-C
    halfway = await store.list_versions()
    assert sum(r.kek_id == ring.active.kek_id for r in halfway) == 4
    for rec in halfway:  # every version opens, under whichever KEK it has now
        if rec.sealed is not None:
            assert opened(rec, ring) == scalars[rec.key_id]

    outcomes = [step.outcome async for step in rewrap(store, ring)]
    assert outcomes.count(RewrapOutcome.CURRENT) == 4
    # The destroyed version too: nothing sealed, but its MAC moves to the active KEK.
    assert outcomes.count(RewrapOutcome.REWRAPPED) == 7
    outcomes = [step.outcome async for step in rewrap(store, ring)]
    assert outcomes.count(RewrapOutcome.CURRENT) == 10
    assert outcomes.count(RewrapOutcome.DESTROYED) == 1
    for rec in await store.list_versions():
        verify_record(rec, KekRing(ring.active))  # retiring the old KEK keeps it verifiable
        if rec.sealed is not None:
            assert rec.sealed.kek_id == ring.active.kek_id
            assert opened(rec, KekRing(ring.active)) == scalars[rec.key_id]


async def test_rewrap_leaves_what_changed_meanwhile_and_what_does_not_open(
    store: VaultStore,
) -> None:
    await store.create_key(record(key_id="zk-racy"))
    tampered = record(key_id="zk-bad")
    assert tampered.sealed is not None
    await store.create_key(
        dataclasses.replace(
            tampered,
            sealed=dataclasses.replace(tampered.sealed, ciphertext=bytes(48)),
        )
    )
    ring = KekRing(Kek.generate(), others=[OLD])
    steps = rewrap(store, ring)
    first = await anext(steps)
    assert (first.record.key_id, first.outcome) == ("zk-bad", RewrapOutcome.UNREADABLE)
    racy = await store.get_key("zk-racy")
    disabled = dataclasses.replace(racy, state=D, generation=2)
    await store.replace_key(disabled, racy)  # disabled meanwhile
    second = await anext(steps)
    assert (second.record.key_id, second.outcome) == ("zk-racy", RewrapOutcome.CHANGED)
    after = await store.get_key("zk-racy")
    assert after.state == D
    assert after.kek_id == OLD.kek_id
