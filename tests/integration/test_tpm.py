"""The TPM layer of the keygen worker against a real swtpm (no mocks)."""

from __future__ import annotations

import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("tpm2_pytss", reason="tpm2-pytss is not installed", exc_type=ImportError)

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss import (
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_CC,
    TPM2_HT,
    TPM2_SE,
    TPM2B_PUBLIC,
    TPMA_OBJECT,
    TPMT_SYM_DEF,
)

from contracts.errors import TpmUnavailable
from workers.keygen.swtpm import start_swtpm
from workers.keygen.tpm import DUPLICATE_ONLY_POLICY, Tpm, default_tcti

pytestmark = pytest.mark.tpm

MESSAGE = b"zandd integration test"


@pytest.fixture
def tpm(swtpm_tcti: str) -> Iterator[Tpm]:
    with Tpm(swtpm_tcti) as opened:
        yield opened


def loaded_handles(tcti: str, handle_type: TPM2_HT) -> list[int]:
    """Handles of one type the TPM holds, read over a second connection."""
    with ESAPI(tcti) as ectx:
        _, data = ectx.get_capability(TPM2_CAP.HANDLES, handle_type << 24, 256)
        return [int(handle) for handle in data.data.handles]


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_info_reports_the_tpm(tpm: Tpm) -> None:
    info = tpm.info()
    assert info.manufacturer
    assert info.firmware_version
    assert info.spec.startswith("2.0 rev ")


def test_get_random_returns_the_requested_bytes(tpm: Tpm) -> None:
    first, second = tpm.get_random(100), tpm.get_random(100)
    assert len(first) == len(second) == 100
    assert first != second
    assert tpm.get_random(0) == b""


def test_exported_key_signs_and_verifies(tpm: Tpm) -> None:
    with tpm.create_exportable_p256() as key:
        private = ec.derive_private_key(int.from_bytes(key.private_scalar, "big"), ec.SECP256R1())
        signature = private.sign(MESSAGE, ec.ECDSA(hashes.SHA256()))
        key.public_key().verify(signature, MESSAGE, ec.ECDSA(hashes.SHA256()))


def test_two_keys_differ(tpm: Tpm) -> None:
    with tpm.create_exportable_p256() as first, tpm.create_exportable_p256() as second:
        assert first.private_scalar != second.private_scalar
        assert (first.public_x, first.public_y) != (second.public_x, second.public_y)


def test_wipe_zeroes_the_scalar_and_repr_hides_it(tpm: Tpm) -> None:
    key = tpm.create_exportable_p256()
    scalar_hex = key.private_scalar.hex()
    assert any(key.private_scalar)
    assert scalar_hex not in repr(key)
    assert scalar_hex not in str(key)
    assert "redacted" in repr(key)
    key.wipe()
    assert key.private_scalar == bytearray(32)

    with tpm.create_exportable_p256() as key:
        scalar = key.private_scalar
    assert scalar == bytearray(32)


def test_duplicate_only_policy_matches_a_trial_session(swtpm_tcti: str) -> None:
    with ESAPI(swtpm_tcti) as ectx:
        session = ectx.start_auth_session(
            ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.TRIAL, None, TPM2_ALG.SHA256
        )
        try:
            ectx.policy_command_code(session, TPM2_CC.Duplicate)
            digest = bytes(ectx.policy_get_digest(session))
        finally:
            ectx.flush_context(session)
    assert digest == DUPLICATE_ONLY_POLICY


def test_no_tpm_objects_or_sessions_leak(swtpm_tcti: str) -> None:
    with Tpm(swtpm_tcti) as tpm:
        for _ in range(50):
            tpm.create_exportable_p256().wipe()
        assert len(loaded_handles(swtpm_tcti, TPM2_HT.TRANSIENT)) == 1  # the storage primary
        assert loaded_handles(swtpm_tcti, TPM2_HT.LOADED_SESSION) == []
        assert loaded_handles(swtpm_tcti, TPM2_HT.SAVED_SESSION) == []
    assert loaded_handles(swtpm_tcti, TPM2_HT.TRANSIENT) == []


def test_closed_port_raises_tpm_unavailable() -> None:
    with pytest.raises(TpmUnavailable) as raised:
        Tpm(f"swtpm:host=127.0.0.1,port={closed_port()}")
    assert "\n" not in raised.value.message
    assert raised.value.__cause__ is not None


def test_close_is_idempotent_and_final(swtpm_tcti: str) -> None:
    tpm = Tpm(swtpm_tcti)
    tpm.create_exportable_p256().wipe()
    tpm.close()
    tpm.close()
    with pytest.raises(TpmUnavailable):
        tpm.get_random(8)


def test_default_tcti_names_a_device_or_nothing() -> None:
    tcti = default_tcti()
    assert tcti is None or tcti in ("device:/dev/tpmrm0", "device:/dev/tpm0")


def primary_public_point(tcti: str) -> tuple[bytes, bytes]:
    """The public point of a fixed-template primary: it depends only on the TPM's seed."""
    template = TPM2B_PUBLIC.parse(
        "ecc256:aes128cfb",
        objectAttributes=TPMA_OBJECT.RESTRICTED
        | TPMA_OBJECT.DECRYPT
        | TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH,
    )
    with ESAPI(tcti) as ectx:
        handle, public, _, _, _ = ectx.create_primary(None, template)
        ectx.flush_context(handle)
    point = public.publicArea.unique.ecc
    return bytes(point.x), bytes(point.y)


def test_swtpm_state_survives_a_restart(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    first = start_swtpm(state_dir)
    try:
        assert first.ctrl_port == first.port + 1
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
        before = primary_public_point(first.tcti)
    finally:
        first.stop()
    first.stop()
    second = start_swtpm(state_dir)
    try:
        assert primary_public_point(second.tcti) == before
    finally:
        second.stop()


def test_start_swtpm_without_the_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TpmUnavailable, match="swtpm is not installed"):
        start_swtpm(tmp_path / "state")


def test_measure_ms_per_exported_key(tpm: Tpm, capsys: pytest.CaptureFixture[str]) -> None:
    tpm.create_exportable_p256().wipe()  # the storage primary is created here, not timed
    keys = 30
    started = time.perf_counter()
    for _ in range(keys):
        tpm.create_exportable_p256().wipe()
    mean_ms = (time.perf_counter() - started) * 1000 / keys
    with capsys.disabled():
        print(f"\ncreate_exportable_p256 on swtpm: {mean_ms:.1f} ms per key (mean of {keys})")


def test_opening_flushes_what_a_killed_predecessor_left(swtpm_tcti: str) -> None:
    # A process that dies without flushing (SIGKILL) leaves its objects in a TPM without a
    # resource manager; swtpm has three object slots.
    leaker = ESAPI(swtpm_tcti)
    leaker.create_primary(None, "ecc256:aes128cfb", ESYS_TR.OWNER)
    leaker.start_auth_session(
        ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, TPMT_SYM_DEF.parse("null"), TPM2_ALG.SHA256
    )
    leaker.close()
    assert loaded_handles(swtpm_tcti, TPM2_HT.TRANSIENT) != []
    with Tpm(swtpm_tcti) as tpm, tpm.create_exportable_p256() as exported:
        assert exported.public_key()
    assert loaded_handles(swtpm_tcti, TPM2_HT.TRANSIENT) == []
    assert loaded_handles(swtpm_tcti, TPM2_HT.POLICY_SESSION) == []
