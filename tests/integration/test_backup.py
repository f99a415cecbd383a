"""``zandd vault backup|restore`` end to end: a real fleet (``zandd up``), its data dir destroyed,
restored from the backup, and signing again with the restored keys."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import sqlite3
import stat
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.cli import ZANDD, environment, zandd
from tests.support.openssl import verify_files
from vault.backup import sha256_of
from vault.kek import ring_file_info

READY_TIMEOUT_S = 90.0


@contextlib.asynccontextmanager
async def running_fleet(env: dict[str, str]) -> AsyncIterator[None]:
    """``zandd up --signers 1`` until the block ends (then SIGTERM, as an operator stops it)."""
    process = await asyncio.create_subprocess_exec(
        *ZANDD, "up", "--signers", "1", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert process.stderr is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            while True:
                line = (await process.stderr.readline()).decode()
                if not line:
                    pytest.fail(f"zandd up exited before it was ready: {''.join(seen)}")
                seen.append(line)
                if "fleet ready" in line:
                    break
        drain = asyncio.create_task(process.stderr.read())
        yield
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 60)
    await drain
    assert process.returncode == 0


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.rabbitmq
@pytest.mark.tpm
async def test_backup_destroy_restore_and_sign_with_the_restored_keys(
    empty_amqp_url: str, swtpm_tcti: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    backup = tmp_path / "backup"
    env = environment(
        ZANDD_AMQP_URL=empty_amqp_url, ZANDD_DATA_DIR=str(data), ZANDD_TPM_TCTI=swtpm_tcti
    )
    document = tmp_path / "document.txt"
    document.write_bytes(b"signed before the backup\n")

    async with running_fleet(env):
        code, out, err = await zandd("keys", "create", "--label", "kept", env=env)
        assert code == 0, err
        key_id, pem = out.split("\n", 1)
        (tmp_path / "public.pem").write_text(pem)
        code, _, err = await zandd(
            "sign", "--key", key_id, str(document), "--out", str(tmp_path / "before.der"), env=env
        )
        assert code == 0, err
        # Online: the fleet keeps signing (each signature appends an audit entry) meanwhile.
        from contracts.client import SigningClient

        signed = 0
        stop = asyncio.Event()
        async with await SigningClient.connect(empty_amqp_url) as client:

            async def keep_signing() -> None:
                nonlocal signed
                while not stop.is_set():
                    await client.sign(key_id, b"during the backup %d" % signed)
                    signed += 1

            signing = asyncio.create_task(keep_signing())
            code, out, err = await zandd("vault", "backup", str(backup), env=env)
            stop.set()
            await signing
        assert code == 0, err
        assert signed > 0
        assert "verified: 1 key versions (record MACs), audit chain #1 to #" in out
        code, out, err = await zandd("keys", "create", "--label", "after-backup", env=env)
        assert code == 0, err
        later_key = out.split("\n", 1)[0]

    assert _mode(backup) == 0o700
    assert {p.name for p in backup.iterdir()} == {"vault.db", "kek-ring.json", "manifest.json"}
    assert all(_mode(p) == 0o600 for p in backup.iterdir())
    # zandd up sealed the ring to the TPM: the backup holds it sealed, as it was on disk.
    assert ring_file_info(backup / "kek-ring.json").sealed
    assert (backup / "kek-ring.json").read_bytes() == (data / "kek-ring.json").read_bytes()

    shutil.rmtree(data)
    code, out, err = await zandd("vault", "restore", str(backup), env=env)
    assert code == 0, err
    assert "restored 1 key versions to sqlite:///" in out
    assert _mode(data / "vault.db") == 0o600
    assert _mode(data / "kek-ring.json") == 0o600

    code, _, err = await zandd("vault", "restore", str(backup), env=env)
    assert code == 1
    assert "refusing to overwrite a vault or a ring" in err
    assert "pass --force" in err

    async with running_fleet(env):
        code, _, err = await zandd(
            "sign",
            "--key",
            key_id,
            str(document),
            "--out",
            str(tmp_path / "signature.der"),
            env=env,
        )
        assert code == 0, err
        code, _, err = await zandd("sign", "--key", later_key, str(document), env=env)
        assert code == 1
        assert f"key {later_key} not found" in err
    # The key signs as it did before: its public key is the one created before the backup.
    for name in ("signature.der", "before.der"):
        result = verify_files(tmp_path, signature_der=name, message="document.txt")
        assert result.stdout.strip() == "Verified OK", result.stderr

    code, out, err = await zandd("audit", "verify", env=env)
    assert code == 0, err
    assert out.startswith("audit log intact: ")
    code, out, err = await zandd("audit", "tail", "-n", "50", env=env)
    assert code == 0, err
    assert "vault.restore" in out


async def test_restore_refuses_a_backup_changed_since_and_writes_nothing(
    tmp_path: Path,
) -> None:
    env = environment(ZANDD_DATA_DIR=str(tmp_path / "data"))
    code, _, err = await zandd("vault", "init", "--plaintext", env=env)
    assert code == 0, err
    code, _, err = await zandd("vault", "backup", str(tmp_path / "backup"), env=env)
    assert code == 0, err
    assert "PLAINTEXT" in err

    target = environment(ZANDD_DATA_DIR=str(tmp_path / "restored"))
    copy = tmp_path / "backup" / "vault.db"
    damaged = bytearray(copy.read_bytes())
    damaged[-1] ^= 0xFF  # one bit-rotten byte in storage
    copy.write_bytes(bytes(damaged))
    code, _, err = await zandd("vault", "restore", str(tmp_path / "backup"), env=target)
    assert code == 1
    assert "changed since the backup was made" in err
    assert not (tmp_path / "restored").exists()


async def test_restore_checks_the_audit_chain_even_when_the_manifest_agrees(
    tmp_path: Path,
) -> None:
    env = environment(ZANDD_DATA_DIR=str(tmp_path / "data"))
    code, _, err = await zandd("vault", "init", "--plaintext", env=env)
    assert code == 0, err
    code, _, err = await zandd("vault", "rotate-kek", env=env)  # one audit entry
    assert code == 0, err
    backup = tmp_path / "backup"
    code, _, err = await zandd("vault", "backup", str(backup), env=env)
    assert code == 0, err

    with sqlite3.connect(backup / "vault.db") as conn:
        changed = conn.execute("UPDATE audit SET principal = 'local:someone-else'").rowcount
    assert changed == 1
    manifest = json.loads((backup / "manifest.json").read_text())
    manifest["files"]["vault.db"] = sha256_of(backup / "vault.db")
    (backup / "manifest.json").write_text(json.dumps(manifest))

    target = environment(ZANDD_DATA_DIR=str(tmp_path / "restored"))
    code, _, err = await zandd("vault", "restore", str(backup), env=target)
    assert code == 1
    assert "audit entry #1 was altered" in err
    assert not (tmp_path / "restored" / "vault.db").exists()


async def test_a_mongodb_vault_is_pointed_to_mongodump(tmp_path: Path) -> None:
    env = environment(
        ZANDD_DATA_DIR=str(tmp_path / "data"), ZANDD_VAULT_URL="mongodb://127.0.0.1:1/zandd"
    )
    code, _, err = await zandd("vault", "backup", str(tmp_path / "backup"), env=env)
    assert code == 1
    assert "mongodump" in err
    assert not (tmp_path / "backup").exists()


async def _vault_with_a_key(data: Path) -> str:
    """A SQLite vault in ``data`` with its ring (plaintext) and one sealed, MACed key version."""
    from tests.support.records import sealed_record
    from vault.kek import KekRing
    from vault.store import open_store

    ring = KekRing.create(data / "kek-ring.json")
    store = await open_store(f"sqlite:///{data / 'vault.db'}")
    try:
        await store.create_key(sealed_record(ring, "zk-backed-up"))
    finally:
        await store.close()
    return "zk-backed-up"


async def test_restore_refuses_a_record_whose_mac_fails(tmp_path: Path) -> None:
    key_id = await _vault_with_a_key(tmp_path / "data")
    env = environment(ZANDD_DATA_DIR=str(tmp_path / "data"))
    backup = tmp_path / "backup"
    code, out, err = await zandd("vault", "backup", str(backup), env=env)
    assert code == 0, err
    assert "verified: 1 key versions" in out

    # A vault writer without the ring widens who may sign; the manifest is made to agree.
    with sqlite3.connect(backup / "vault.db") as conn:
        conn.execute("UPDATE keys SET allowed_signers = '[\"*\"]' WHERE key_id = ?", (key_id,))
    manifest = json.loads((backup / "manifest.json").read_text())
    manifest["files"]["vault.db"] = sha256_of(backup / "vault.db")
    (backup / "manifest.json").write_text(json.dumps(manifest))

    target = environment(ZANDD_DATA_DIR=str(tmp_path / "restored"))
    code, _, err = await zandd("vault", "restore", str(backup), env=target)
    assert code == 1
    assert err.strip() == f"zandd: key {key_id} v1 failed its record MAC: its metadata was changed"
    assert not (tmp_path / "restored" / "vault.db").exists()
    assert not (tmp_path / "restored" / "kek-ring.json").exists()


async def test_restore_with_force_replaces_a_vault_and_ring_and_leaves_the_backup_as_it_was(
    tmp_path: Path,
) -> None:
    await _vault_with_a_key(tmp_path / "data")
    env = environment(ZANDD_DATA_DIR=str(tmp_path / "data"))
    backup = tmp_path / "backup"
    code, _, err = await zandd("vault", "backup", str(backup), env=env)
    assert code == 0, err
    backed_up = {p.name: p.read_bytes() for p in backup.iterdir()}
    code, _, err = await zandd("vault", "rotate-kek", env=env)  # the ring and the log change
    assert code == 0, err

    code, _, err = await zandd("vault", "restore", str(backup), env=env)
    assert code == 1
    assert "refusing to overwrite" in err
    code, out, err = await zandd("vault", "restore", "--force", str(backup), env=env)
    assert code == 0, err
    assert "restored 1 key versions" in out
    assert (tmp_path / "data" / "kek-ring.json").read_bytes() == backed_up["kek-ring.json"]
    assert _mode(tmp_path / "data" / "kek-ring.json") == 0o600
    code, out, err = await zandd("audit", "tail", env=env)
    assert code == 0, err
    # The backup's log (the backup itself was recorded only in the live log) + the restore.
    assert "vault.rotate-kek" not in out
    assert "vault.restore" in out
    assert {p.name: p.read_bytes() for p in backup.iterdir()} == backed_up
    code, out, err = await zandd("audit", "verify", env=env)
    assert code == 0, err
