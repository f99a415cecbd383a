"""Fixtures for integration tests against real services (swtpm, RabbitMQ, stores)."""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Iterator

import pytest

from workers.keygen.swtpm import start_swtpm


@pytest.fixture(scope="session")
def swtpm_tcti(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """TCTI string of a private swtpm started for this test session on free ports."""
    if shutil.which("swtpm") is None:
        pytest.skip("swtpm is not installed: apt-get install swtpm swtpm-tools")
    try:
        importlib.import_module("tpm2_pytss")
    except ImportError as exc:
        pytest.skip(f"tpm2-pytss is not usable ({exc}): pip install 'zandd-hsm[tpm]'")
    swtpm = start_swtpm(tmp_path_factory.mktemp("swtpm") / "state")
    try:
        yield swtpm.tcti
    finally:
        swtpm.stop()
