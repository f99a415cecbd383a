"""Verification the vault cannot fool: a swapped public key, on a real fleet and SQLite vault.

A vault writer without the KEK ring replaces a key's stored public key with its own and forges
a signature with its own private key. Whoever checks against the public key the fleet serves
(``key.public``, as the vault says) is fooled; whoever pinned the key from ``key.create`` is
not — in Python (``SigningClient.verify``) and from a shell (``zandd verify --public-key``,
which asks no broker at all).
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from contracts.crypto import load_public_key, public_key_jwk
from contracts.errors import InvalidRequest
from contracts.pinning import PinnedKey
from tests.support.cli import environment, zandd
from tests.support.fleet import RunningFleet
from tests.support.net import free_port_pair

pytestmark = [pytest.mark.rabbitmq, pytest.mark.tpm]

MESSAGE = b"pay 100 EUR to Alice"
FORGED_MESSAGE = b"pay 9000 EUR to Mallory"


def swap_public_key(fleet: RunningFleet, key_id: str) -> ec.EllipticCurvePrivateKey:
    """The vault writer's attack: its own public key in the key's row; returns its private key."""
    attacker = ec.generate_private_key(ec.SECP256R1())
    der = attacker.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with sqlite3.connect(fleet.settings.data_dir / "vault.db", timeout=10) as conn:
        changed = conn.execute(
            "UPDATE keys SET public_key_der = ? WHERE key_id = ?", (der, key_id)
        ).rowcount
    conn.close()
    assert changed == 1
    return attacker


async def test_a_swapped_public_key_cannot_pass_a_pinned_verify(fleet: RunningFleet) -> None:
    async with await fleet.client() as client:
        key = await client.create_key(label="pinned")
        genuine = await client.sign(key.key_id, MESSAGE)
        # Before the attack the fleet's word and the pin agree.
        assert await client.verify_trusting_fleet(key.key_id, genuine.signature, message=MESSAGE)
        attacker = swap_public_key(fleet, key.key_id)
        forged = attacker.sign(FORGED_MESSAGE, ec.ECDSA(hashes.SHA256()))

        for pin in (
            key,  # the key.create reply
            PinnedKey.of(key),
            key.public_key_pem,
            key.public_key_pem.encode(),
            PinnedKey.of(key).public_key,
            public_key_jwk(
                load_public_key(key.public_key_pem), kid=f"{key.key_id}.v1"
            ).model_dump(),
        ):
            assert not await client.verify(pin, forged, message=FORGED_MESSAGE)
            assert await client.verify(pin, genuine.signature, message=MESSAGE)
        # A key id is not a pin: the old call shape fails loudly instead of trusting the fleet.
        with pytest.raises(InvalidRequest, match="verify_trusting_fleet"):
            await client.verify(key.key_id, forged, message=FORGED_MESSAGE)  # type: ignore[arg-type]


async def test_zandd_verify_with_a_pinned_key_works_offline_and_rejects_a_forgery(
    fleet: RunningFleet, tmp_path: Path
) -> None:
    online = environment(ZANDD_AMQP_URL=fleet.amqp_url, ZANDD_DATA_DIR=str(tmp_path / "cli"))
    code, out, err = await zandd("keys", "create", "--label", "pinned-shell", env=online)
    assert code == 0, err
    key_id, pem = out.split("\n", 1)
    (tmp_path / "pinned.pem").write_text(pem)
    code, jwk, err = await zandd("keys", "public", key_id, "--jwk", env=online)
    assert code == 0, err
    (tmp_path / "pinned.jwk").write_text(jwk)
    document = tmp_path / "invoice.txt"
    document.write_bytes(MESSAGE)
    code, _, err = await zandd(
        "sign", "--key", key_id, str(document), "--out", str(tmp_path / "genuine.sig"), env=online
    )
    assert code == 0, err
    # The fleet's word (key id only) is named for what it trusts.
    code, out, err = await zandd(
        "verify", "--key", key_id, str(document), str(tmp_path / "genuine.sig"), env=online
    )
    assert (code, out.strip()) == (0, "signature OK"), err
    assert "as the vault says" in err
    assert "--public-key" in err

    attacker = swap_public_key(fleet, key_id)
    (tmp_path / "forged.sig").write_bytes(attacker.sign(MESSAGE, ec.ECDSA(hashes.SHA256())))
    # No broker listens here: a pinned verify must not need one.
    offline = environment(
        ZANDD_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{free_port_pair()}/",
        ZANDD_DATA_DIR=str(tmp_path / "offline"),
    )
    for pin in ("pinned.pem", "pinned.jwk"):
        pinned = ("--public-key", str(tmp_path / pin))
        code, out, err = await zandd(
            "verify", *pinned, str(document), str(tmp_path / "genuine.sig"), env=offline
        )
        assert (code, out.strip()) == (0, "signature OK"), err
        code, out, _ = await zandd(
            "verify", *pinned, str(document), str(tmp_path / "forged.sig"), env=offline
        )
        assert (code, out.strip()) == (1, "signature INVALID")


async def test_the_readme_example_runs_and_pins(fleet: RunningFleet, tmp_path: Path) -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert "client.verify(key, " in example  # the pinned form, not a key id
    script = tmp_path / "example.py"
    script.write_text(example.replace("amqp://app:secret@mq:5672/", fleet.amqp_url))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        cwd=tmp_path,
        env={**environment(), "PYTHONPATH": str(Path(__file__).parents[2])},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    key_id = out.decode().split()[0]
    pinned = PinnedKey.from_file(tmp_path / "invoices.pem")
    async with await fleet.client() as client:
        assert pinned.pem == (await client.public_key(key_id)).public_key_pem
