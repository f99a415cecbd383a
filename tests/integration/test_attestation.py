"""Key attestation on a real fleet, swtpm and SQLite vault (issue 14, item 1).

The keygen worker has the TPM certify each new key with the fleet attestation key; a producer
that pinned that key checks the certification of whatever public key the fleet serves: a
changed public key or changed attestation bytes fail, and the report says the key is
exportable and under which policy.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from contracts.attestation import (
    DUPLICATE_ONLY_POLICY,
    AttestationParts,
    parts_of,
    verify_attestation,
)
from contracts.crypto import load_public_key, public_key_pem
from contracts.errors import IntegrityError
from tests.support.cli import environment, zandd
from tests.support.fleet import RunningFleet
from tests.support.tpm import fleet_attestation_key
from vault.record_mac import verify_record
from workers.keygen import tpm as tpm_module

pytestmark = [pytest.mark.rabbitmq, pytest.mark.tpm]


def flip(data: bytes, at: int) -> bytes:
    changed = bytearray(data)
    changed[at] ^= 0x01
    return bytes(changed)


async def test_a_new_key_is_attested_exportable_under_the_duplication_policy(
    fleet: RunningFleet, swtpm_tcti: str
) -> None:
    attestation_key = fleet_attestation_key(swtpm_tcti)
    async with await fleet.client() as client:
        created = await client.create_key(label="attested")
        served = await client.public_key(created.key_id)
    assert created.attestation is not None
    assert served.attestation == created.attestation
    # The key that signed is named (as the vault says); the check uses the pinned one.
    assert served.attestation.attestation_key_pem == public_key_pem(attestation_key)
    report = verify_attestation(
        parts_of(served.attestation),
        load_public_key(served.public_key_pem),
        attestation_key,
        key_id=served.key_id,
        version=served.version,
    )
    assert report.sensitive_data_origin
    assert not report.fixed_tpm
    assert not report.fixed_parent
    assert report.policy_digest == DUPLICATE_ONLY_POLICY == tpm_module.DUPLICATE_ONLY_POLICY
    assert "EXPORTABLE" in report.describe()
    # The same template and seed give the same key: no state to keep between runs.
    assert fleet_attestation_key(swtpm_tcti).public_numbers() == attestation_key.public_numbers()


async def test_tampered_keys_or_attestation_bytes_fail(
    fleet: RunningFleet, swtpm_tcti: str
) -> None:
    attestation_key = fleet_attestation_key(swtpm_tcti)
    async with await fleet.client() as client:
        created = await client.create_key(label="tamper")
        other = await client.create_key(label="other")
    assert created.attestation is not None
    assert other.attestation is not None
    parts = parts_of(created.attestation)
    public_key = load_public_key(created.public_key_pem)

    def check(
        candidate: AttestationParts,
        key: ec.EllipticCurvePublicKey = public_key,
        pinned: ec.EllipticCurvePublicKey = attestation_key,
        key_id: str = created.key_id,
    ) -> None:
        verify_attestation(candidate, key, pinned, key_id=key_id, version=1)

    check(parts)  # the genuine one passes
    failures = {
        "another public key": lambda: check(parts, key=load_public_key(other.public_key_pem)),
        "a software key": lambda: check(
            parts, key=ec.generate_private_key(ec.SECP256R1()).public_key()
        ),
        "another attestation key": lambda: check(
            parts, pinned=ec.generate_private_key(ec.SECP256R1()).public_key()
        ),
        "another key id": lambda: check(parts, key_id=other.key_id),
        "another key's attestation": lambda: check(parts_of(other.attestation)),
        "a public area of another key": lambda: check(
            dataclasses.replace(parts, public_area=parts_of(other.attestation).public_area)
        ),
        "a changed public area": lambda: check(
            dataclasses.replace(parts, public_area=flip(parts.public_area, 8))
        ),
        "a changed certify info": lambda: check(
            dataclasses.replace(parts, certify_info=flip(parts.certify_info, 40))
        ),
        "a changed signature": lambda: check(
            dataclasses.replace(parts, signature=flip(parts.signature, 12))
        ),
    }
    for name, attempt in failures.items():
        try:
            attempt()
        except IntegrityError:
            continue
        pytest.fail(f"the attestation passed with {name}")


async def test_the_attestation_is_covered_by_the_record_mac(fleet: RunningFleet) -> None:
    async with await fleet.client() as client:
        created = await client.create_key(label="mac")
    assert created.attestation is not None
    with sqlite3.connect(fleet.settings.data_dir / "vault.db", timeout=10) as conn:
        (blob,) = conn.execute(
            "SELECT attestation FROM keys WHERE key_id = ?", (created.key_id,)
        ).fetchone()
        stored = AttestationParts.decode(blob)
        assert dataclasses.replace(stored, signer=b"") == parts_of(created.attestation)
        conn.execute(
            "UPDATE keys SET attestation = ? WHERE key_id = ?", (flip(blob, 30), created.key_id)
        )
    conn.close()
    record = await fleet.store.get_key(created.key_id)

    with pytest.raises(IntegrityError, match="record MAC"):
        verify_record(record, fleet.ring)


async def test_zandd_keys_attest_checks_the_served_key(
    fleet: RunningFleet, swtpm_tcti: str, tmp_path: Path
) -> None:
    env = environment(
        ZANDD_AMQP_URL=fleet.amqp_url,
        ZANDD_DATA_DIR=str(tmp_path / "cli"),
        ZANDD_TPM_TCTI=swtpm_tcti,
    )
    code, pem, err = await zandd("tpm", "attestation-key", env=env)
    assert code == 0, err
    assert pem == public_key_pem(fleet_attestation_key(swtpm_tcti))
    pinned = tmp_path / "attestation.pem"
    pinned.write_text(pem)
    async with await fleet.client() as client:
        created = await client.create_key(label="shell-attest")

    code, out, err = await zandd(
        "keys", "attest", created.key_id, "--attestation-key", str(pinned), env=env
    )
    assert code == 0, err
    assert "attestation OK" in out
    assert "EXPORTABLE" in out
    assert "PolicyCommandCode(TPM2_Duplicate)" in out

    impostor = tmp_path / "impostor.pem"
    impostor.write_text(public_key_pem(ec.generate_private_key(ec.SECP256R1()).public_key()))
    code, out, err = await zandd(
        "keys", "attest", created.key_id, "--attestation-key", str(impostor), env=env
    )
    assert code == 1
    assert "attestation FAILED" in err
    assert "attestation OK" not in out
