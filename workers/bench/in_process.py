"""The in-process scenarios: ``crypto_limit``, ``hybrid`` and ``tpm_only``, on this thread.

They run before any fleet starts (or beside an attached one), one after the other, so each
has one core to itself as far as this process is concerned.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from contracts.models import KeyCreateRequest
from contracts.operations import Operation
from vault.kek import KekRing
from vault.records import KeyRecord
from vault.store import open_store
from workers.bench.measure import Run, Timing, drive_blocking
from workers.bench.progress import Progress
from workers.bench.tpm_path import sign_in_tpm
from workers.runtime import RequestContext
from workers.signer.signing import sign_digests

_ECDSA_PREHASHED = ec.ECDSA(Prehashed(hashes.SHA256()))
_BENCH_PRINCIPAL = "zandd-bench"


@dataclass(frozen=True, slots=True)
class InProcessResults:
    """The three in-process measurements."""

    crypto_limit: Run
    hybrid: Run
    tpm_only: Run


async def measure_in_process(
    tcti: str, ring: KekRing, timing: Timing, progress: Progress
) -> InProcessResults:
    """Measure the raw crypto, our per-request key path and the TPM-only path."""
    digest = os.urandom(32)
    crypto_limit = await _measured("crypto_limit", _sign_and_verify(digest), timing, progress)
    progress.end(f"{crypto_limit.per_s:,.0f} sign+verify/s on one core")

    record = await _sealed_record(tcti, ring)

    def hybrid_once() -> None:
        sign_digests(record, ring, [digest], "der")

    hybrid = await _measured("hybrid", hybrid_once, timing, progress)
    progress.end(f"p50 {hybrid.p50_ms:.3f} ms ({hybrid.per_s:,.0f}/s)")

    from workers.keygen.tpm import Tpm

    with Tpm(tcti) as tpm:
        tpm_only = await _measured("tpm_only", lambda: sign_in_tpm(tpm, digest), timing, progress)
    progress.end(f"p50 {tpm_only.p50_ms:.2f} ms ({tpm_only.per_s:,.0f} ops/s)")
    return InProcessResults(crypto_limit=crypto_limit, hybrid=hybrid, tpm_only=tpm_only)


async def _measured(
    label: str, operation: Callable[[], object], timing: Timing, progress: Progress
) -> Run:
    progress.begin(f"{label} (warm-up)")
    await drive_blocking(operation, timing.warmup(1), progress)
    progress.begin(label)
    return await drive_blocking(operation, timing.load(1), progress)


def _sign_and_verify(digest: bytes) -> Callable[[], None]:
    private_key = ec.generate_private_key(ec.SECP256R1())
    public_key = private_key.public_key()

    def operation() -> None:
        public_key.verify(private_key.sign(digest, _ECDSA_PREHASHED), digest, _ECDSA_PREHASHED)

    return operation


async def _sealed_record(tcti: str, ring: KekRing) -> KeyRecord:
    """A key made by the keygen worker's own handler: in the TPM, sealed, stored, read back."""
    from workers.keygen.session import TpmSession
    from workers.keygen.worker import Keygen

    store = await open_store("sqlite:///:memory:")
    session = TpmSession(tcti)
    try:
        context = RequestContext(
            Operation.KEY_CREATE, f"zandd-bench-{uuid.uuid4().hex}", _BENCH_PRINCIPAL
        )
        keygen = Keygen(store, ring, session)
        reply = await keygen.create_key(KeyCreateRequest(label="zandd-bench"), context)
        return await store.get_key(reply.key_id)
    finally:
        session.close()
        await store.close()
