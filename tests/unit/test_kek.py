"""The KEK ring file: creation, loading, permissions, rotation and redaction."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from contracts.errors import ConfigurationError, IntegrityError
from vault import Kek, KekRing
from vault.kek import RingFileInfo, ring_file_info


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _key_forms(key: bytes) -> list[str]:
    return [key.hex(), key.hex().upper(), base64.b64encode(key).decode(), repr(key)]


@pytest.fixture
def kek_path(tmp_path: Path) -> Path:
    return tmp_path / "secrets" / "kek.json"


def test_create_then_load_round_trip(kek_path: Path) -> None:
    created = KekRing.create(kek_path)
    loaded = KekRing.load(kek_path)
    assert loaded.active == created.active
    assert loaded.kek_ids == created.kek_ids == (created.active.kek_id,)
    assert re.fullmatch(r"kek-\d{8}-[0-9a-f]{8}", created.active.kek_id)
    assert len(created.active.key) == 32


def test_file_format(kek_path: Path) -> None:
    ring = KekRing.create(kek_path)
    document = json.loads(kek_path.read_text())
    assert document["format"] == "zandd-kek-ring/1"
    assert document["active"] == ring.active.kek_id
    entry = document["keys"][ring.active.kek_id]
    assert base64.b64decode(entry["key"]) == ring.active.key
    assert "T" in entry["created_at"]


def test_file_is_0600_and_new_parent_dir_0700(kek_path: Path) -> None:
    KekRing.create(kek_path)
    assert _mode(kek_path) == 0o600
    assert _mode(kek_path.parent) == 0o700
    assert os.listdir(kek_path.parent) == ["kek.json"]  # no temp file left behind


def test_create_refuses_to_overwrite(kek_path: Path) -> None:
    KekRing.create(kek_path)
    before = kek_path.read_bytes()
    with pytest.raises(ConfigurationError, match="already exists"):
        KekRing.create(kek_path)
    assert kek_path.read_bytes() == before


def test_missing_file_says_how_to_create_one(kek_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist: run `zandd vault init`"):
        KekRing.load(kek_path)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_refuses_a_file_open_to_group_or_other(kek_path: Path, mode: int) -> None:
    KekRing.create(kek_path)
    kek_path.chmod(mode)
    with pytest.raises(ConfigurationError, match=f"chmod 600 {re.escape(str(kek_path))}"):
        KekRing.load(kek_path)


def _entry(key: bytes) -> dict[str, str]:
    return {"key": base64.b64encode(key).decode(), "created_at": "2026-11-28T10:00:00+00:00"}


GOOD_KEY = bytes(range(32))


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        json.dumps({"format": "other/1", "active": "a", "keys": {"a": _entry(GOOD_KEY)}}).encode(),
        json.dumps({"format": "zandd-kek-ring/1", "active": "a", "keys": {}}).encode(),
        json.dumps(
            {"format": "zandd-kek-ring/1", "active": "b", "keys": {"a": _entry(GOOD_KEY)}}
        ).encode(),
        json.dumps(
            {"format": "zandd-kek-ring/1", "active": "a", "keys": {"a": _entry(GOOD_KEY[:31])}}
        ).encode(),
        json.dumps(
            {"format": "zandd-kek-ring/1", "active": "a", "keys": {"a": {"key": "!!!"}}}
        ).encode(),
        json.dumps(
            {
                "format": "zandd-kek-ring/1",
                "active": "a",
                "keys": {"a": {"key": _entry(GOOD_KEY)["key"], "created_at": "2026-11-28"}},
            }
        ).encode(),
    ],
    ids=[
        "not-json",
        "not-utf8",
        "not-object",
        "format",
        "no-keys",
        "active-missing",
        "short-key",
        "bad-base64",
        "naive-time",
    ],
)
def test_load_refuses_a_garbled_file(kek_path: Path, content: bytes) -> None:
    kek_path.parent.mkdir(mode=0o700)
    kek_path.write_bytes(content)
    kek_path.chmod(0o600)
    with pytest.raises(ConfigurationError, match=re.escape(str(kek_path))) as info:
        KekRing.load(kek_path)
    for form in _key_forms(GOOD_KEY) + _key_forms(GOOD_KEY[:31]):
        assert form not in str(info.value)


def test_rotate_adds_an_active_key_and_keeps_the_old_ones(kek_path: Path) -> None:
    first = KekRing.create(kek_path)
    second = first.rotate(kek_path)
    third = second.rotate(kek_path)
    old_ids = (first.active.kek_id, second.active.kek_id)
    assert third.kek_ids == (*old_ids, third.active.kek_id)
    assert len(set(third.kek_ids)) == 3
    assert third.get(first.active.kek_id) == first.active
    assert third.get(second.active.kek_id) == second.active
    loaded = KekRing.load(kek_path)
    assert loaded.active == third.active
    assert loaded.kek_ids == third.kek_ids
    assert _mode(kek_path) == 0o600
    assert os.listdir(kek_path.parent) == ["kek.json"]


def test_get_unknown_kek_is_an_integrity_error(kek_path: Path) -> None:
    ring = KekRing.create(kek_path)
    with pytest.raises(IntegrityError, match="record sealed with unknown KEK 'kek-nope'"):
        ring.get("kek-nope")


def test_reprs_never_show_key_material(kek_path: Path) -> None:
    ring = KekRing.create(kek_path).rotate(kek_path)
    texts = [repr(ring), str(ring)]
    for kek_id in ring.kek_ids:
        kek = ring.get(kek_id)
        texts += [repr(kek), str(kek), f"{kek}", f"{[kek]}"]
        assert repr(kek) == f"Kek(kek_id={kek_id!r}, key=<redacted>)"
        for text in texts:
            for form in _key_forms(kek.key):
                assert form not in text


def test_random_bytes_is_mixed_in(kek_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def constant(size: int) -> bytes:
        calls.append(size)
        return b"\xaa" * size

    first = KekRing.create(kek_path, random_bytes=constant)
    second = first.rotate(kek_path, random_bytes=constant)
    assert calls == [32, 32]
    assert first.active.key != second.active.key

    # With os.urandom silenced, what remains is exactly the caller's randomness.
    monkeypatch.setattr(os, "urandom", lambda size: bytes(size))
    assert Kek.generate(random_bytes=constant).key == b"\xaa" * 32


def test_short_random_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="returned 16 bytes, expected 32"):
        Kek.generate(random_bytes=lambda size: bytes(16))


@pytest.mark.parametrize("key", [b"", bytes(16), bytes(33)])
def test_kek_must_be_32_bytes(key: bytes) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Kek(kek_id="kek-x", key=key)


def test_a_running_worker_sees_a_rotation(kek_path: Path) -> None:
    KekRing.create(kek_path)
    worker = KekRing.load(kek_path)
    assert worker.refresh() is False  # nothing changed yet
    rotated = KekRing.load(kek_path).rotate(kek_path)  # `zandd vault rotate-kek` elsewhere
    # A record sealed under the new KEK: the worker re-reads the file on the unknown id.
    assert worker.get(rotated.active.kek_id) == rotated.active
    assert worker.active == rotated.active
    assert worker.kek_ids == rotated.kek_ids
    again = KekRing.load(kek_path).rotate(kek_path)
    assert worker.refresh() is True  # the keygen worker asks before sealing
    assert worker.active == again.active
    with pytest.raises(IntegrityError, match="unknown KEK 'kek-nope'"):
        worker.get("kek-nope")


def test_a_ring_built_in_memory_never_reloads(kek_path: Path) -> None:
    ring = KekRing(Kek.generate())
    assert ring.refresh() is False


def test_a_vanished_ring_file_is_a_configuration_error(kek_path: Path) -> None:
    ring = KekRing.create(kek_path)
    kek_path.unlink()
    with pytest.raises(ConfigurationError, match="cannot read KEK file"):
        ring.refresh()


def test_two_rotations_from_stale_rings_keep_both_keks(kek_path: Path) -> None:
    first = KekRing.create(kek_path)
    stale_a, stale_b = KekRing.load(kek_path), KekRing.load(kek_path)
    a = stale_a.rotate(kek_path)
    b = stale_b.rotate(kek_path)  # knew nothing of a's KEK: it is kept all the same
    on_disk = KekRing.load(kek_path)
    assert on_disk.active == b.active
    assert set(on_disk.kek_ids) == {first.active.kek_id, a.active.kek_id, b.active.kek_id}


def test_a_ring_that_contradicts_the_file_is_refused(kek_path: Path) -> None:
    ring = KekRing.create(kek_path)
    impostor = KekRing(Kek(kek_id=ring.active.kek_id, key=bytes(32)))
    with pytest.raises(ConfigurationError, match="differs from the one in memory"):
        impostor.rotate(kek_path)
    assert KekRing.load(kek_path).active == ring.active


# --- the sealed form -------------------------------------------------------------------------


class _StandInSealer:
    """Format tests only: a host secret in place of a TPM (tests/integration/test_ring.py
    seals with swtpm). Another instance is another host."""

    description = "a stand-in TPM"

    def __init__(self) -> None:
        self._secret = AESGCM(os.urandom(32))

    def seal(self, wrapping_key: bytes) -> dict[str, Any]:
        nonce = os.urandom(12)
        blob = nonce + self._secret.encrypt(nonce, wrapping_key, None)
        return {"kind": "stand-in", "blob": base64.b64encode(blob).decode()}

    def unseal(self, sealed: Mapping[str, Any]) -> bytes:
        blob = base64.b64decode(sealed["blob"])
        try:
            return self._secret.decrypt(blob[:12], blob[12:], None)
        except InvalidTag:
            raise ConfigurationError("sealed to another host") from None


def _all_key_forms(ring: KekRing) -> list[str]:
    return [form for kek_id in ring.kek_ids for form in _key_forms(ring.get(kek_id).key)]


def test_a_sealed_ring_file_holds_ids_but_no_key(kek_path: Path) -> None:
    sealer = _StandInSealer()
    ring = KekRing.create(kek_path, sealer=sealer)
    text = kek_path.read_text()
    assert json.loads(text)["format"] == "zandd-kek-ring-sealed/1"
    assert not any(form in text for form in _all_key_forms(ring))
    assert ring_file_info(kek_path) == RingFileInfo(
        sealed=True, kek_ids=ring.kek_ids, active=ring.active.kek_id
    )
    assert _mode(kek_path) == 0o600
    loaded = KekRing.load(kek_path, sealer=sealer)
    assert loaded.active == ring.active
    assert loaded.sealer is sealer


def test_a_sealed_ring_needs_its_own_sealer(kek_path: Path) -> None:
    KekRing.create(kek_path, sealer=_StandInSealer())
    with pytest.raises(ConfigurationError, match="is sealed to a TPM and this process has no TPM"):
        KekRing.load(kek_path)
    with pytest.raises(ConfigurationError, match="sealed to another host"):
        KekRing.load(kek_path, sealer=_StandInSealer())


@pytest.mark.parametrize("field", ["kek_ids", "active", "ciphertext"])
def test_an_edited_sealed_ring_does_not_open(kek_path: Path, field: str) -> None:
    sealer = _StandInSealer()
    ring = KekRing.create(kek_path, sealer=sealer).rotate(kek_path)
    document = json.loads(kek_path.read_text())
    if field == "kek_ids":
        document["kek_ids"] = [*document["kek_ids"], "kek-20200101-00000000"]
    elif field == "active":
        document["active"] = ring.kek_ids[0]
    else:
        raw = bytearray(base64.b64decode(document["ciphertext"]))
        raw[0] ^= 1
        document["ciphertext"] = base64.b64encode(bytes(raw)).decode()
    kek_path.write_text(json.dumps(document))
    with pytest.raises(IntegrityError, match="altered"):
        KekRing.load(kek_path, sealer=sealer)


def test_a_sealed_ring_stays_sealed_through_rotation_and_refresh(kek_path: Path) -> None:
    sealer = _StandInSealer()
    worker = KekRing.create(kek_path, sealer=sealer)
    rotated = KekRing.load(kek_path, sealer=sealer).rotate(kek_path)
    assert ring_file_info(kek_path).sealed
    assert not any(form in kek_path.read_text() for form in _all_key_forms(rotated))
    assert worker.get(rotated.active.kek_id) == rotated.active  # re-read with its sealer


def test_seal_ring_and_export_ring_rewrite_the_same_ring(kek_path: Path) -> None:
    plain = KekRing.create(kek_path).rotate(kek_path)
    sealer = _StandInSealer()
    sealed = KekRing.load(kek_path).rewrite(kek_path, sealer=sealer)
    assert ring_file_info(kek_path).sealed
    assert KekRing.load(kek_path, sealer=sealer).kek_ids == plain.kek_ids
    exported = KekRing.load(kek_path, sealer=sealer).rewrite(kek_path, sealer=None)
    assert not ring_file_info(kek_path).sealed
    assert exported.active == sealed.active == plain.active
    assert KekRing.load(kek_path).kek_ids == plain.kek_ids
    assert _mode(kek_path) == 0o600


def test_rewrite_refuses_a_file_that_changed_since_it_was_read(kek_path: Path) -> None:
    KekRing.create(kek_path)
    stale = KekRing.load(kek_path)
    KekRing.load(kek_path).rotate(kek_path)
    with pytest.raises(ConfigurationError, match="changed while rewriting"):
        stale.rewrite(kek_path, sealer=_StandInSealer())


def test_a_ring_passed_on_a_pipe_round_trips_and_never_reloads(kek_path: Path) -> None:
    ring = KekRing.create(kek_path).rotate(kek_path)
    read_fd, write_fd = os.pipe()
    os.write(write_fd, ring.to_json())
    os.close(write_fd)
    received = KekRing.from_fd(read_fd)
    assert received.active == ring.active
    assert received.kek_ids == ring.kek_ids
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(read_fd)  # closed after reading
    KekRing.load(kek_path).rotate(kek_path)
    assert received.refresh() is False  # zandd up replaces the process instead
