"""The in-process scenarios: ``crypto_limit``, ``hybrid``, ``tpm_only`` and ``tpm_protection``,
on this thread.

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
from workers.bench.algorithms import AlgorithmRuns, measure_algorithms
from workers.bench.measure import Run, Timing, drive_blocking
from workers.bench.progress import Progress
from workers.bench.tpm_path import sign_in_tpm
from workers.consumer.runtime import RequestContext
from workers.signer.signing import sign_digests

_ECDSA_PREHASHED = ec.ECDSA(Prehashed(hashes.SHA256()))
_BENCH_PRINCIPAL = "zandd-bench"


@dataclass(frozen=True, slots=True)
class InProcessResults:
    """The in-process measurements."""

    crypto_limit: Run
    hybrid: Run
    tpm_only: Run
    #: A key of protection "tpm": load its wrapped blob, TPM2_Sign, flush, verify in software
    #: (what ``sign.tpm`` does in the keygen worker, vault read and queues aside).
    tpm_protection: Run
    #: Each algorithm's keygen and sign runs (``workers.bench.algorithms``); not targets.
    algorithms: tuple[AlgorithmRuns, ...] = ()


async def measure_in_process(
    tcti: str, ring: KekRing, timing: Timing, progress: Progress, max_keys: int = 100
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
    tpm_protection = await _measure_tpm_protection(tcti, digest, timing, progress)
    progress.end(f"p50 {tpm_protection.p50_ms:.2f} ms ({tpm_protection.per_s:,.0f} ops/s)")
    algorithms = await measure_algorithms(tcti, ring, timing, progress, max_keys)
    return InProcessResults(
        crypto_limit=crypto_limit,
        hybrid=hybrid,
        tpm_only=tpm_only,
        tpm_protection=tpm_protection,
        algorithms=algorithms,
    )


async def _measure_tpm_protection(
    tcti: str, digest: bytes, timing: Timing, progress: Progress
) -> Run:
    from workers.keygen.attest import create_tpm_bound, sign_tpm_bound
    from workers.keygen.tpm import Tpm

    with Tpm(tcti) as tpm:
        key, public_key, _ = tpm.under_storage_primary(
            "bench key", lambda ectx, primary: create_tpm_bound(ectx, primary, bytes(32))
        )

        def sign_once() -> None:
            signature = tpm.under_storage_primary(
                "bench sign", lambda ectx, primary: sign_tpm_bound(ectx, primary, key, digest)
            )
            public_key.verify(signature, digest, _ECDSA_PREHASHED)

        return await _measured("tpm_protection", sign_once, timing, progress)


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
