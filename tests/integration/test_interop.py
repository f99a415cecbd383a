"""A producer in another language, written from the wire contract alone, against the real fleet.

``examples/node-producer/producer.mjs`` (Node.js, amqplib) creates a key and signs a message;
OpenSSL then verifies the DER signature with the PEM public key from the ``key.create`` reply.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tests.conftest import RunningFleet

pytestmark = [pytest.mark.rabbitmq, pytest.mark.tpm, pytest.mark.interop]

NODE_PRODUCER = Path(__file__).resolve().parents[2] / "examples" / "node-producer"


def openssl_verify(out_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "openssl",
            "dgst",
            "-sha256",
            "-verify",
            "public.pem",
            "-signature",
            "signature.der",
            "message.bin",
        ],
        cwd=out_dir,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


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
    node: str, fleet: RunningFleet, tmp_path: Path
) -> None:
    # The fleet keeps its vault in tmp_path: give the producer a directory of its own.
    out_dir = tmp_path / "node-producer"
    # The producer blocks on the broker while the fleet answers from this event loop.
    result = await asyncio.to_thread(
        subprocess.run,
        [node, "producer.mjs", fleet.amqp_url, str(out_dir)],
        cwd=NODE_PRODUCER,
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

    verified = openssl_verify(out_dir)
    assert verified.returncode == 0, verified.stderr
    assert "Verified OK" in verified.stdout

    message = bytearray((out_dir / "message.bin").read_bytes())
    message[0] ^= 0x01
    (out_dir / "message.bin").write_bytes(bytes(message))
    tampered = openssl_verify(out_dir)
    assert tampered.returncode != 0
    assert "Verified OK" not in tampered.stdout

    record = await fleet.store.get_key(key_id)
    assert record.key_id == key_id
    public_key = serialization.load_pem_public_key((out_dir / "public.pem").read_bytes())
    assert record.public_key_der == public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
