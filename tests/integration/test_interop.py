"""A producer in another language, written from the wire contract alone, against the real fleet.

``examples/node-producer/producer.mjs`` (Node.js, amqplib) creates a key and signs a message;
OpenSSL then verifies the DER signature with the PEM public key from the ``key.create`` reply.
It also has the fleet verify (``verify``, ``verify.batch``), lists its keys page by page
(``key.list``) and describes the key (``key.describe``); then it rotates the key and signs
with the new version, which OpenSSL verifies too.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from contracts.attestation import DUPLICATE_ONLY_POLICY
from contracts.crypto import public_key_pem
from tests.support.fleet import RunningFleet
from tests.support.openssl import openssl_verify_algorithm, verify_files
from tests.support.tpm import fleet_attestation_key

pytestmark = [pytest.mark.rabbitmq, pytest.mark.tpm, pytest.mark.interop]

NODE_PRODUCER = Path(__file__).resolve().parents[2] / "examples" / "node-producer"


@pytest.fixture
def node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH: install Node.js 20 to run the interop test")
    # With node present a missing dependency is a broken set-up, not a reason to skip.
    assert (NODE_PRODUCER / "node_modules" / "amqplib").is_dir(), (
        f"{NODE_PRODUCER / 'node_modules'} is missing: run ops/test (or npm ci in {NODE_PRODUCER})"
    )
    return node


async def test_node_producer_signs_and_openssl_verifies(
    node: str, fleet: RunningFleet, tmp_path: Path, swtpm_tcti: str
) -> None:
    # The fleet keeps its vault in tmp_path: give the producer a directory of its own.
    out_dir = tmp_path / "node-producer"
    pinned = tmp_path / "attestation.pem"
    pinned.write_text(public_key_pem(fleet_attestation_key(swtpm_tcti)))
    # The producer blocks on the broker while the fleet answers from this event loop.
    result = await asyncio.to_thread(
        subprocess.run,
        [node, "producer.mjs", fleet.amqp_url, str(out_dir)],
        cwd=NODE_PRODUCER,
        env={**os.environ, "ZANDD_ATTESTATION_KEY": str(pinned)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"producer failed: {result.stderr.strip()}"
    summary = json.loads(result.stdout)
    key_id = summary["key_id"]
    assert isinstance(key_id, str)
    assert summary["signature_bytes"] == (out_dir / "signature.der").stat().st_size
    # The producer checked the key's TPM attestation against the pinned attestation key.
    assert summary["attestation"] == {
        "tpm_bound": False,
        "policy": DUPLICATE_ONLY_POLICY.hex(),
    }

    # The reads (issue 15): the fleet verified the signature and refused a tampered message;
    # key.list, a page of one key at a time, found the producer's key; key.describe its v1.
    assert summary["fleet_verify"] == {"valid": True, "tampered": False, "batch": [True, False]}
    assert summary["listed"] == [key_id]
    assert summary["described_versions"] == [1]

    verified = verify_files(out_dir)
    assert verified.returncode == 0, verified.stderr
    assert "Verified OK" in verified.stdout

    # issue 15, key writes: it rotated the key, signed with the new version, listed both.
    assert summary["rotation"] == {
        "version": 2,
        "signed_version": 2,
        "kids": [f"{key_id}.v1", f"{key_id}.v2"],
    }
    rotated = verify_files(
        out_dir,
        public_pem="public-v2.pem",
        signature_der="signature-v2.der",
        message="message-v2.bin",
    )
    assert rotated.returncode == 0, rotated.stderr
    assert "Verified OK" in rotated.stdout
    crossed = verify_files(
        out_dir, public_pem="public.pem", signature_der="signature-v2.der", message="message-v2.bin"
    )
    assert "Verified OK" not in crossed.stdout

    # issue 15, aliases: it named the key, signed through the alias (the reply named the key,
    # the signature verified with its public key), then deleted the alias.
    alias = summary["alias"]
    assert alias["alias"].startswith("alias/node-")
    assert (alias["key_id"], alias["verified"], alias["deleted_pointed_at"]) == (
        key_id,
        True,
        key_id,
    )
    assert await fleet.store.get_alias(alias["alias"]) is None

    message = bytearray((out_dir / "message.bin").read_bytes())
    message[0] ^= 0x01
    (out_dir / "message.bin").write_bytes(bytes(message))
    tampered = verify_files(out_dir)
    assert tampered.returncode != 0
    assert "Verified OK" not in tampered.stdout

    for version, pem in ((1, "public.pem"), (2, "public-v2.pem")):  # v2: it rotated the key
        record = await fleet.store.get_key(key_id, version)
        assert record.key_id == key_id
        public_key = serialization.load_pem_public_key((out_dir / pem).read_bytes())
        assert record.public_key_der == public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    # -- algorithms (issue 15): a P-384 key (raw r‖s) and an RSA-PSS key, verified by node's
    # crypto with the served JWK, then by OpenSSL; the vault holds them under that algorithm.
    others = summary["algorithms"]
    assert set(others) == {"ecdsa-p384-sha384", "rsa-pss-2048-sha256"}
    assert others["ecdsa-p384-sha384"]["jwk_alg"] == "ES384"
    assert others["ecdsa-p384-sha384"]["signature_bytes"] == 96
    assert others["rsa-pss-2048-sha256"]["jwk_alg"] == "PS256"
    assert others["rsa-pss-2048-sha256"]["signature_bytes"] == 256
    for algorithm, produced in others.items():
        assert produced["verified"] is True
        directory = out_dir / algorithm
        out = openssl_verify_algorithm(
            tmp_path,
            algorithm,
            (directory / "public.pem").read_text(),
            (directory / "message.bin").read_bytes(),
            (directory / "signature.bin").read_bytes(),
        )
        assert out == "Verified OK", out
        stored = await fleet.store.get_key(produced["key_id"])
        assert stored.algorithm == algorithm


async def test_node_producer_refuses_a_key_another_attestation_key_vouches_for(
    node: str, fleet: RunningFleet, tmp_path: Path
) -> None:
    impostor = tmp_path / "impostor.pem"
    impostor.write_text(public_key_pem(ec.generate_private_key(ec.SECP256R1()).public_key()))
    result = await asyncio.to_thread(
        subprocess.run,
        [node, "producer.mjs", fleet.amqp_url, str(tmp_path / "out")],
        cwd=NODE_PRODUCER,
        env={**os.environ, "ZANDD_ATTESTATION_KEY": str(impostor)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "attestation signature does not verify" in result.stderr
    assert not (tmp_path / "out").exists()
