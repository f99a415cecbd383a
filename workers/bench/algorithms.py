"""Per-algorithm in-process scenarios: each algorithm's sign rate and keygen p50 on the TPM.

For every algorithm of the contract (``contracts.algorithms``):

- ``keygen``: the keygen worker's own ``key.create`` handler, one key after the other, in this
  process: ``TPM2_Create`` in the TPM (swtpm for ``zandd bench``), ``TPM2_Certify``, the
  inner-wrapped ``TPM2_Duplicate``, the software unwrap and pair check, sealing, and the write
  to an in-memory SQLite vault. No queue: the figure is what the algorithm costs the keygen
  worker. At most ``max_keys`` keys per algorithm (``--max-keys``), at least a few.
- ``sign``: what a signer does per ``sign`` request with such a key, on one core: open the
  sealed record (RSA: rebuild the key from its prime), sign one digest, verify it against the
  stored public key, wipe.

Neither is a target: they say what choosing an algorithm costs, beside the P-256 figures.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from contracts.algorithms import ALGORITHMS, algorithm_spec
from contracts.models import KeyCreateRequest
from contracts.operations import Operation
from vault.kek import KekRing
from vault.records import KeyRecord
from vault.store import VaultStore, open_store
from workers.bench.measure import MIN_OPERATIONS, Load, Run, Timing, drive, drive_blocking
from workers.bench.progress import Progress
from workers.consumer.runtime import RequestContext
from workers.signer.signing import sign_digests

if TYPE_CHECKING:
    from workers.keygen.worker import Keygen

_BENCH_PRINCIPAL = "zandd-bench"


@dataclass(frozen=True, slots=True)
class AlgorithmRuns:
    """One algorithm's keygen (in the keygen handler) and sign (in process) runs."""

    algorithm: str
    keygen: Run
    sign: Run


async def measure_algorithms(
    tcti: str, ring: KekRing, timing: Timing, progress: Progress, max_keys: int
) -> tuple[AlgorithmRuns, ...]:
    """Every algorithm's keygen and sign runs, one algorithm after the other."""
    from workers.keygen.session import TpmSession
    from workers.keygen.worker import Keygen

    store = await open_store("sqlite:///:memory:")
    session = TpmSession(tcti)
    try:
        keygen = Keygen(store, ring, session)
        return tuple(
            [
                await _measure_one(keygen, store, ring, name, timing, progress, max_keys)
                for name in ALGORITHMS
            ]
        )
    finally:
        session.close()
        await store.close()


async def _measure_one(
    keygen: Keygen,
    store: VaultStore,
    ring: KekRing,
    name: str,
    timing: Timing,
    progress: Progress,
    max_keys: int,
) -> AlgorithmRuns:
    request = KeyCreateRequest.model_validate({"label": "zandd-bench", "algorithm": name})
    created: list[str] = []

    async def create() -> object:
        context = RequestContext(
            Operation.KEY_CREATE, f"zandd-bench-{uuid.uuid4().hex}", _BENCH_PRINCIPAL
        )
        reply = await keygen.create_key(request, context)
        created.append(reply.key_id)
        return reply

    progress.begin(f"keygen {name} (warm-up)")
    await drive(create, Load(concurrency=1, duration_s=0.0, min_operations=1), progress)
    progress.begin(f"keygen {name}")
    keygen_run = await drive(
        create,
        Load(
            concurrency=1,
            duration_s=timing.duration_s,
            min_operations=min(MIN_OPERATIONS, max_keys),
            max_operations=max_keys,
        ),
        progress,
    )
    progress.end(f"p50 {keygen_run.p50_ms:.1f} ms")
    record = await store.get_key(created[0])
    sign_run = await _measure_sign(record, ring, timing, progress)
    progress.end(f"{sign_run.per_s:,.0f} sign+verify/s, p50 {sign_run.p50_ms:.3f} ms")
    return AlgorithmRuns(name, keygen_run, sign_run)


async def _measure_sign(
    record: KeyRecord, ring: KekRing, timing: Timing, progress: Progress
) -> Run:
    digest = os.urandom(algorithm_spec(record.algorithm).digest_bytes)

    def sign_once() -> None:
        sign_digests(record, ring, [digest], "der")

    progress.begin(f"sign {record.algorithm} (warm-up)")
    await drive_blocking(sign_once, timing.warmup(1), progress)
    progress.begin(f"sign {record.algorithm}")
    return await drive_blocking(sign_once, timing.load(1), progress)
