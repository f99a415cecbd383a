"""Record MACs: the encoding covers every field, the key is the ring's, older copies are caught."""

from __future__ import annotations

import dataclasses
import hmac
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from hashlib import sha256
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from contracts.crypto import public_key_der
from contracts.errors import IntegrityError, KeyDisabled
from contracts.models import KeyStateChangedEvent, SignRequest
from contracts.operations import Operation
from vault import Kek, KekRing, KeyRecord, KeyState, RecordBinding, SealedKey, seal
from vault.mac_upgrade import MacOutcome, mac_records
from vault.record_mac import (
    GenerationWatermark,
    authenticated,
    compute_mac,
    record_fields,
    verify_record,
)
from vault.records import RecordMac
from vault.store import VaultStore, open_store
from workers.consumer.runtime import RequestContext
from workers.signer.cache import RecordCache
from workers.signer.worker import Signer

T0 = datetime(2026, 11, 28, 10, 0, 0, 123456, tzinfo=UTC)
KEK = Kek.generate()
RING = KekRing(KEK)


def unsigned(scalar_of: ec.EllipticCurvePrivateKey | None = None) -> KeyRecord:
    private_key = scalar_of or ec.generate_private_key(ec.SECP256R1())
    scalar = private_key.private_numbers().private_value.to_bytes(32, "big")
    binding = RecordBinding("zk-1", 1, "ecdsa-p256-sha256")
    return KeyRecord(
        key_id="zk-1",
        version=1,
        algorithm="ecdsa-p256-sha256",
        public_key_der=public_key_der(private_key.public_key()),
        sealed=seal(scalar, binding, KEK),
        state=KeyState.ENABLED,
        label="payments",
        allowed_signers=("alice", "bob"),
        created_at=T0,
        created_by="alice",
        request_id="req-1",
    )


def maced(generation: int = 1) -> KeyRecord:
    return authenticated(unsigned(), RING, generation=generation)


def other_sealed(record: KeyRecord) -> SealedKey:
    assert record.sealed is not None
    return record.sealed


# Each change a vault writer might make, one field (or part of one) at a time.
CHANGES: dict[str, Callable[[KeyRecord], KeyRecord]] = {
    "key_id": lambda r: dataclasses.replace(r, key_id="zk-2"),
    "version": lambda r: dataclasses.replace(r, version=2),
    "generation": lambda r: dataclasses.replace(r, generation=r.generation + 1),
    "algorithm": lambda r: dataclasses.replace(r, algorithm="ecdsa-p384-sha384"),
    "public_key_der": lambda r: dataclasses.replace(r, public_key_der=unsigned().public_key_der),
    "sealed.kek_id": lambda r: dataclasses.replace(
        r, sealed=dataclasses.replace(other_sealed(r), kek_id="kek-other")
    ),
    "sealed.nonce": lambda r: dataclasses.replace(
        r, sealed=dataclasses.replace(other_sealed(r), nonce=os.urandom(12))
    ),
    "sealed.ciphertext": lambda r: dataclasses.replace(
        r, sealed=dataclasses.replace(other_sealed(r), ciphertext=os.urandom(48))
    ),
    "state": lambda r: dataclasses.replace(r, state=KeyState.DISABLED),
    "destroyed": lambda r: dataclasses.replace(
        r, state=KeyState.DESTROYED, sealed=None, destroy_after=T0
    ),
    "label": lambda r: dataclasses.replace(r, label="payroll"),
    "label absent": lambda r: dataclasses.replace(r, label=None),
    "signer added": lambda r: dataclasses.replace(r, allowed_signers=(*r.allowed_signers, "eve")),
    "signers reordered": lambda r: dataclasses.replace(r, allowed_signers=("bob", "alice")),
    "signers merged": lambda r: dataclasses.replace(r, allowed_signers=("alicebob",)),
    "signers star": lambda r: dataclasses.replace(r, allowed_signers=("*",)),
    "created_at": lambda r: dataclasses.replace(r, created_at=T0 + timedelta(microseconds=1)),
    "created_by": lambda r: dataclasses.replace(r, created_by="mallory"),
    "request_id": lambda r: dataclasses.replace(r, request_id="req-2"),
    "request_id absent": lambda r: dataclasses.replace(r, request_id=None),
    "destroy_after": lambda r: dataclasses.replace(
        r, state=KeyState.PENDING_DESTRUCTION, destroy_after=T0
    ),
    "attestation added": lambda r: dataclasses.replace(r, attestation=b"\x00\x01a\x00\x00\x00\x00"),
    "rotation period added": lambda r: dataclasses.replace(r, rotation_period_s=86_400),
    "next rotation added": lambda r: dataclasses.replace(r, next_rotation_at=T0),
}


def test_the_rotation_fields_are_covered() -> None:
    rotating = dataclasses.replace(
        unsigned(), rotation_period_s=86_400, next_rotation_at=T0 + timedelta(days=1)
    )
    record = authenticated(rotating, RING, generation=1)
    verify_record(record, RING)
    for changed in (
        dataclasses.replace(record, rotation_period_s=86_401),
        dataclasses.replace(record, rotation_period_s=None),
        dataclasses.replace(record, next_rotation_at=T0 + timedelta(days=2)),
        dataclasses.replace(record, next_rotation_at=None),
        # The two tagged fields cannot stand in for each other.
        dataclasses.replace(record, rotation_period_s=None, next_rotation_at=None),
    ):
        with pytest.raises(IntegrityError, match="failed its record MAC"):
            verify_record(changed, RING)


def test_a_record_without_rotation_keeps_the_encoding_it_had() -> None:
    # MACs written before rotation periods existed must still verify: nothing is appended.
    plain = unsigned()
    assert record_fields(plain, KEK.kek_id) == record_fields(
        dataclasses.replace(plain, rotation_period_s=None, next_rotation_at=None), KEK.kek_id
    )
    rotating = dataclasses.replace(plain, rotation_period_s=86_400)
    assert record_fields(rotating, KEK.kek_id).startswith(record_fields(plain, KEK.kek_id))


@pytest.mark.parametrize("attestation", [b"", b"\x00\x02ab\x00\x01c\x00\x01d"])
def test_an_attestation_is_covered(attestation: bytes) -> None:
    record = authenticated(
        dataclasses.replace(unsigned(), attestation=attestation), RING, generation=1
    )
    verify_record(record, RING)
    for changed in (None, attestation + b"x", b"\x00" + attestation):
        with pytest.raises(IntegrityError, match="failed its record MAC"):
            verify_record(dataclasses.replace(record, attestation=changed), RING)


def test_a_record_without_attestation_keeps_the_encoding_it_had() -> None:
    # MACs written before attestation existed must still verify.
    encoded = record_fields(unsigned(), KEK.kek_id)
    tail = KEK.kek_id.encode()
    assert encoded.endswith(len(tail).to_bytes(4, "big") + tail)


def test_an_authenticated_record_verifies() -> None:
    record = maced(generation=4)
    assert record.generation == 4
    assert record.mac is not None
    assert record.mac.kek_id == KEK.kek_id
    assert verify_record(record, RING) is record


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_every_field_is_covered(change: str) -> None:
    record = maced()
    changed = CHANGES[change](record)
    assert changed != record
    assert record_fields(changed, KEK.kek_id) != record_fields(record, KEK.kek_id)
    with pytest.raises(IntegrityError, match="failed its record MAC"):
        verify_record(changed, RING)


def test_pending_destruction_time_is_covered() -> None:
    pending = authenticated(
        dataclasses.replace(unsigned(), state=KeyState.PENDING_DESTRUCTION, destroy_after=T0),
        RING,
        generation=2,
    )
    later = dataclasses.replace(pending, destroy_after=T0 + timedelta(days=3650))
    with pytest.raises(IntegrityError, match="failed its record MAC"):
        verify_record(later, RING)


def test_the_same_instant_in_another_zone_encodes_the_same() -> None:
    record = unsigned()
    paris = T0.astimezone(datetime.now().astimezone().tzinfo)
    moved = dataclasses.replace(record, created_at=paris)
    assert record_fields(moved, KEK.kek_id) == record_fields(record, KEK.kek_id)


def test_the_mac_names_its_kek_and_survives_a_rotation() -> None:
    record = maced()
    rotated = KekRing(Kek.generate(), others=[KEK])
    assert verify_record(record, rotated) is record
    with pytest.raises(IntegrityError, match="unknown KEK"):
        verify_record(record, KekRing(Kek.generate()))
    assert record.mac is not None
    relabelled = dataclasses.replace(record, mac=RecordMac("kek-other", record.mac.tag))
    other = Kek(kek_id="kek-other", key=KEK.key)  # the same key under another name
    with pytest.raises(IntegrityError, match="failed its record MAC"):
        verify_record(relabelled, KekRing(other, others=[KEK]))


def test_the_mac_key_is_derived_not_the_kek_itself() -> None:
    record = maced()
    fields = record_fields(record, KEK.kek_id)
    assert compute_mac(record, KEK) != hmac.new(KEK.key, fields, sha256).digest()
    assert len(compute_mac(record, KEK)) == 32


def test_a_record_without_a_mac_is_refused() -> None:
    with pytest.raises(IntegrityError, match="has no record MAC"):
        verify_record(unsigned(), RING)


def test_a_forged_tag_is_refused() -> None:
    record = maced()
    forged = dataclasses.replace(record, mac=RecordMac(KEK.kek_id, os.urandom(32)))
    with pytest.raises(IntegrityError, match="failed its record MAC"):
        verify_record(forged, RING)


def test_the_watermark_refuses_older_generations() -> None:
    marks = GenerationWatermark()
    assert marks.check(maced(2)).generation == 2
    with pytest.raises(IntegrityError, match="generation 1, but generation 2 was seen"):
        marks.check(maced(1))
    marks.saw("zk-1", 1, 5)
    marks.saw("zk-1", 1, 3)  # a lower report never lowers the mark
    with pytest.raises(IntegrityError, match="generation 4, but generation 5 was seen"):
        marks.check(maced(4))
    assert marks.check(maced(6)).generation == 6
    marks.saw("zk-1", 2, 9)  # another version is another mark
    assert marks.check(maced(6)).generation == 6


@pytest.fixture
async def store() -> AsyncIterator[VaultStore]:
    opened = await open_store("sqlite:///:memory:")
    yield opened
    await opened.close()


async def test_the_cache_refuses_a_changed_record_and_does_not_keep_it(store: VaultStore) -> None:
    record = maced()
    await store.create_key(dataclasses.replace(record, allowed_signers=("eve",)))
    cache = RecordCache(store, RING)
    for _ in range(2):  # refused each time: nothing was cached
        with pytest.raises(IntegrityError, match="failed its record MAC"):
            await cache.get("zk-1", None)
    assert cache.misses == 2


def _signed_by(principal: str) -> RequestContext:
    return RequestContext(Operation.SIGN, "req", principal)


async def test_a_signer_refuses_a_generation_older_than_an_event_announced(
    store: VaultStore,
) -> None:
    record = maced()
    await store.create_key(record)
    signer = Signer(store, RING)
    request = SignRequest(key_id="zk-1", message=b"x")
    await signer.sign(request, _signed_by("alice"))
    # The keygen worker re-enabled the key at generation 3; this vault still shows 1.
    signer.on_event(
        KeyStateChangedEvent(
            key_id="zk-1", version=1, state=KeyState.ENABLED, changed_at=T0, generation=3
        )
    )
    signer.forget_events()  # a gap in the subscription keeps what was learnt of generations
    with pytest.raises(IntegrityError, match="generation 1, but generation 3 was seen"):
        await signer.sign(request, _signed_by("alice"))
    # An event that says "disabled" is still answered as such.
    signer.on_event(
        KeyStateChangedEvent(
            key_id="zk-1", version=1, state=KeyState.DISABLED, changed_at=T0, generation=4
        )
    )
    with pytest.raises(KeyDisabled):
        await signer.sign(request, _signed_by("alice"))


async def test_a_signer_refuses_a_row_rolled_back_after_it_loaded_a_newer_one(
    tmp_path: Path,
) -> None:
    db = tmp_path / "vault.db"
    store = await open_store(f"sqlite://{db}")
    first = maced()
    await store.create_key(first)
    second = authenticated(dataclasses.replace(first, state=KeyState.DISABLED), RING, generation=2)
    assert await store.replace_key(second, first)
    third = authenticated(dataclasses.replace(second, state=KeyState.ENABLED), RING, generation=3)
    assert await store.replace_key(third, second)
    signer = Signer(store, RING, cache=RecordCache(store, RING, ttl_s=0.0))  # reads every time
    request = SignRequest(key_id="zk-1", message=b"x")
    await signer.sign(request, _signed_by("alice"))
    # A vault writer puts back the row as it was at generation 1 (validly MACed back then).
    assert first.mac is not None
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE keys SET generation = 1, mac = ?, state = 'enabled' WHERE key_id = 'zk-1'",
            (first.mac.tag,),
        )
        conn.execute("DELETE FROM key_heads")  # and removes the vault's own tripwire
    conn.close()
    verify_record(await store.get_key("zk-1"), RING)  # the MAC alone cannot tell
    with pytest.raises(IntegrityError, match="generation 1, but generation 3 was seen"):
        await signer.sign(request, _signed_by("alice"))
    await store.close()


async def test_the_upgrade_macs_legacy_records_but_not_a_swapped_public_key(
    store: VaultStore,
) -> None:
    good = _consistent("zk-good")
    swapped = dataclasses.replace(
        _consistent("zk-swapped"), public_key_der=_consistent("zk-x").public_key_der
    )
    destroyed = dataclasses.replace(
        _consistent("zk-gone"), state=KeyState.DESTROYED, sealed=None, destroy_after=T0
    )
    for record in (good, swapped, destroyed):
        await store.create_key(record)
    steps = {step.record.key_id: step.outcome async for step in mac_records(store, RING)}
    assert steps == {
        "zk-gone": MacOutcome.MACED,
        "zk-good": MacOutcome.MACED,
        "zk-swapped": MacOutcome.UNREADABLE,  # its public key is not its scalar's
    }
    upgraded = await store.get_key("zk-good")
    assert upgraded.generation == 2
    verify_record(upgraded, RING)
    verify_record(await store.get_key("zk-gone"), RING)
    with pytest.raises(IntegrityError, match="has no record MAC"):
        verify_record(await store.get_key("zk-swapped"), RING)
    again = {step.record.key_id: step.outcome async for step in mac_records(store, RING)}
    assert again["zk-good"] == MacOutcome.ALREADY


def _consistent(key_id: str) -> KeyRecord:
    """An unMACed record as a vault from before record MACs holds it."""
    private_key = ec.generate_private_key(ec.SECP256R1())
    scalar = private_key.private_numbers().private_value.to_bytes(32, "big")
    record = dataclasses.replace(
        unsigned(),
        key_id=key_id,
        request_id=None,
        public_key_der=public_key_der(private_key.public_key()),
    )
    return dataclasses.replace(record, sealed=seal(scalar, record.binding, KEK))


def test_a_tpm_bound_key_is_covered() -> None:
    bound = dataclasses.replace(unsigned(), sealed=None, tpm_blob=b"wrapped", attestation=b"att")
    record = authenticated(bound, RING, generation=1)
    assert record.protection == "tpm"
    verify_record(record, RING)
    for changed in (
        dataclasses.replace(record, tpm_blob=b"wrapped!"),
        dataclasses.replace(record, tpm_blob=b"att", attestation=b"wrapped"),
        dataclasses.replace(record, attestation=None),
    ):
        with pytest.raises(IntegrityError, match="failed its record MAC"):
            verify_record(changed, RING)


def test_a_record_holds_sealed_material_or_a_tpm_key_not_both() -> None:
    with pytest.raises(ValueError, match="not both"):
        dataclasses.replace(unsigned(), tpm_blob=b"wrapped")
    with pytest.raises(ValueError, match="key material exactly when"):
        dataclasses.replace(unsigned(), sealed=None, tpm_blob=b"x", state=KeyState.DESTROYED)
