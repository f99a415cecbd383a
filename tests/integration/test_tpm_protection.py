"""Keys of protection "tpm" on a real swtpm (issue 14, item 5).

Such a key never leaves the TPM: the vault keeps only its TPM-wrapped private part, the
keygen worker loads it for each ``sign.tpm`` and the TPM signs. OpenSSL verifies the
signatures; the key still signs after the keygen worker restarts and after swtpm restarts
(its state persists, so the storage primary is derived again from the same seed).
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from contracts.attestation import parts_of, verify_attestation
from contracts.client import SigningClient
from contracts.crypto import load_public_key
from contracts.errors import IntegrityError, InvalidRequest, KeyDisabled
from contracts.models import KeyCreateRequest, SignRequest
from contracts.operations import Operation
from tests.support.fleet import RunningFleet
from tests.support.net import free_port_pair
from tests.support.openssl import verify_files
from tests.support.processes import ProcessFleet, started
from tests.support.tpm import fleet_attestation_key
from vault.kek import KekRing
from vault.lifecycle import destroyed
from vault.record_mac import authenticated, verify_record
from vault.records import KeyState
from vault.rewrap import RewrapOutcome, rewrap
from vault.store import VaultStore, open_store
from workers.consumer.runtime import RequestContext
from workers.keygen.session import TpmSession
from workers.keygen.swtpm import start_swtpm
from workers.keygen.worker import Keygen

pytestmark = pytest.mark.tpm

MESSAGE = b"settle invoice 2026-117"


def openssl_verifies(directory: Path, public_key_pem: str, signature_der: bytes) -> bool:
    (directory / "public.pem").write_text(public_key_pem)
    (directory / "message.bin").write_bytes(MESSAGE)
    (directory / "signature.der").write_bytes(signature_der)
    result = verify_files(directory)
    return result.returncode == 0 and "Verified OK" in result.stdout


@pytest.mark.rabbitmq
async def test_a_tpm_key_is_attested_bound_and_signs_in_the_tpm(
    fleet: RunningFleet, swtpm_tcti: str, tmp_path: Path
) -> None:
    async with await fleet.client() as client:
        created = await client.create_key(label="bound", protection="tpm")
        served = await client.public_key(created.key_id)
        signed = await client.sign_in_tpm(created.key_id, MESSAGE)
        raw = await client.sign_in_tpm(created.key_id, MESSAGE, encoding="raw")
        # Signers have no TPM: they send the producer to sign.tpm.
        with pytest.raises(InvalidRequest, match=r"sign\.tpm"):
            await client.sign(created.key_id, MESSAGE)
        with pytest.raises(InvalidRequest, match=r"sign\.tpm"):
            await client.sign_batch(created.key_id, [MESSAGE])
        exportable = await client.create_key(label="exportable")
        with pytest.raises(InvalidRequest, match="exportable"):
            await client.sign_in_tpm(exportable.key_id, MESSAGE)
        await client.disable_key(created.key_id)
        with pytest.raises(KeyDisabled):
            await client.sign_in_tpm(created.key_id, MESSAGE)

    assert (created.protection, served.protection, signed.protection) == ("tpm",) * 3
    assert exportable.protection == "exportable"
    assert openssl_verifies(tmp_path, created.public_key_pem, signed.signature)
    assert len(raw.signature) == 64
    assert served.attestation is not None
    report = verify_attestation(
        parts_of(served.attestation),
        load_public_key(served.public_key_pem),
        fleet_attestation_key(swtpm_tcti),
        key_id=created.key_id,
        version=1,
    )
    assert report.fixed_tpm
    assert report.fixed_parent
    assert report.tpm_bound
    assert report.policy_digest == b""
    record = await fleet.store.get_key(created.key_id)
    assert record.sealed is None
    assert record.tpm_blob is not None


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[VaultStore]:
    opened = await open_store(f"sqlite:///{tmp_path / 'vault.db'}")
    yield opened
    await opened.close()


async def sign_with_a_fresh_keygen(
    store: VaultStore, ring: KekRing, tcti: str, key_id: str
) -> bytes:
    """What a restarted keygen worker does: a new TPM session, the key loaded from the vault."""
    session = TpmSession(tcti)
    try:
        keygen = Keygen(store, ring, session)
        reply = await keygen.sign_in_tpm(
            SignRequest(key_id=key_id, message=MESSAGE),
            RequestContext(Operation.SIGN_TPM, None, "alice"),
        )
    finally:
        session.close()
    return reply.signature


async def test_a_tpm_key_signs_after_a_keygen_restart_and_a_swtpm_restart(
    store: VaultStore, tmp_path: Path
) -> None:
    ring = KekRing.create(tmp_path / "kek.json")
    state = tmp_path / "swtpm"
    first = start_swtpm(state)
    try:
        session = TpmSession(first.tcti)
        try:
            created = await Keygen(store, ring, session).create_key(
                KeyCreateRequest(protection="tpm"),
                RequestContext(Operation.KEY_CREATE, "req-1", "alice"),
            )
        finally:
            session.close()
        after_keygen_restart = await sign_with_a_fresh_keygen(
            store, ring, first.tcti, created.key_id
        )
    finally:
        first.stop()
    assert openssl_verifies(tmp_path, created.public_key_pem, after_keygen_restart)

    second = start_swtpm(state)
    try:
        after_swtpm_restart = await sign_with_a_fresh_keygen(
            store, ring, second.tcti, created.key_id
        )
    finally:
        second.stop()
    assert openssl_verifies(tmp_path, created.public_key_pem, after_swtpm_restart)


async def test_another_tpm_cannot_load_the_key(store: VaultStore, tmp_path: Path) -> None:
    ring = KekRing.create(tmp_path / "kek.json")
    first, other = start_swtpm(tmp_path / "one"), start_swtpm(tmp_path / "other")
    try:
        session = TpmSession(first.tcti)
        try:
            created = await Keygen(store, ring, session).create_key(
                KeyCreateRequest(protection="tpm"),
                RequestContext(Operation.KEY_CREATE, "req-1", "alice"),
            )
        finally:
            session.close()
        with pytest.raises(IntegrityError, match="made by another TPM"):
            await sign_with_a_fresh_keygen(store, ring, other.tcti, created.key_id)
    finally:
        first.stop()
        other.stop()


async def test_destroying_a_tpm_key_erases_its_wrapped_blob(
    store: VaultStore, swtpm_tcti: str, tmp_path: Path
) -> None:
    ring = KekRing.create(tmp_path / "kek.json")
    session = TpmSession(swtpm_tcti)
    try:
        created = await Keygen(store, ring, session).create_key(
            KeyCreateRequest(protection="tpm"),
            RequestContext(Operation.KEY_CREATE, "req-1", "alice"),
        )
    finally:
        session.close()
    record = await store.get_key(created.key_id)
    pending = authenticated(
        dataclasses.replace(
            record, state=KeyState.PENDING_DESTRUCTION, destroy_after=datetime.now(UTC)
        ),
        ring,
        generation=2,
    )
    assert await store.replace_key(pending, record)
    gone = authenticated(destroyed(pending), ring, generation=3)
    assert await store.replace_key(gone, pending)
    stored = verify_record(await store.get_key(created.key_id), ring)
    assert stored.state == KeyState.DESTROYED
    assert stored.tpm_blob is None
    assert stored.attestation == record.attestation  # what the key was stays provable


@pytest.mark.rabbitmq
async def test_a_tpm_key_signs_after_keygen_and_swtpm_restarts_in_a_process_fleet(
    empty_amqp_url: str, tmp_path: Path
) -> None:
    port = free_port_pair()
    state = tmp_path / "swtpm"
    swtpm = start_swtpm(state, port=port)
    KekRing.create(tmp_path / "kek-ring.json")
    fleet = ProcessFleet(empty_amqp_url, tmp_path, swtpm.tcti)
    try:
        await started(fleet, signers=1)
        async with await SigningClient.connect(empty_amqp_url, timeout_s=60) as client:
            created = await client.create_key(label="bound", protection="tpm")
            first = await client.sign_in_tpm(created.key_id, MESSAGE)

            fleet.signal("keygen-1", signal.SIGKILL)
            await fleet.exit_code("keygen-1")
            await fleet.start("keygen-2")
            await fleet.wait_for_consumers(signers=1, keygens=1)
            after_keygen_restart = await client.sign_in_tpm(created.key_id, MESSAGE)

            swtpm.stop()
            swtpm = start_swtpm(state, port=port)
            # The keygen worker's TPM connection broke: it reopens it and serves the request.
            after_swtpm_restart = await client.sign_in_tpm(created.key_id, MESSAGE)
    finally:
        await fleet.stop_all()
        swtpm.stop()
    for number, signature in enumerate((first, after_keygen_restart, after_swtpm_restart)):
        directory = tmp_path / f"check-{number}"
        directory.mkdir()
        assert openssl_verifies(directory, created.public_key_pem, signature.signature)


async def test_a_rewrap_after_a_kek_rotation_re_macs_a_tpm_key_and_it_still_signs(
    store: VaultStore, swtpm_tcti: str, tmp_path: Path
) -> None:
    path = tmp_path / "kek.json"
    ring = KekRing.create(path)
    session = TpmSession(swtpm_tcti)
    try:
        created = await Keygen(store, ring, session).create_key(
            KeyCreateRequest(protection="tpm"),
            RequestContext(Operation.KEY_CREATE, "req-1", "alice"),
        )
        rotated = ring.rotate(path)
        steps = [step async for step in rewrap(store, rotated)]
        assert [step.outcome for step in steps] == [RewrapOutcome.REWRAPPED]
        again = [step async for step in rewrap(store, rotated)]
        assert [step.outcome for step in again] == [RewrapOutcome.CURRENT]
        record = verify_record(await store.get_key(created.key_id), rotated)
        assert record.mac is not None
        assert record.mac.kek_id == rotated.active.kek_id
        reply = await Keygen(store, rotated, session).sign_in_tpm(
            SignRequest(key_id=created.key_id, message=MESSAGE),
            RequestContext(Operation.SIGN_TPM, None, "alice"),
        )
    finally:
        session.close()
    assert openssl_verifies(tmp_path, created.public_key_pem, reply.signature)
