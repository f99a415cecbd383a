"""The TPM: ``zandd tpm check``."""

from __future__ import annotations

import argparse

from workers.commands.base import TPM, CommandTree
from workers.service.config import Settings


async def _cmd_tpm_check(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from workers.keygen.tpm import Tpm
    from workers.service.serve import resolve_tcti

    tcti = resolve_tcti(settings)
    with Tpm(tcti) as tpm:
        info = tpm.info()
        print(
            f"TPM at {tcti}: {info.manufacturer} {info.vendor}, firmware {info.firmware_version}, spec {info.spec}"
        )
        started = time.perf_counter()
        with tpm.create_exportable_p256() as exported:
            algorithm = exported.algorithm.name
        elapsed_ms = (time.perf_counter() - started) * 1000
        supported = tpm.supported_algorithms()
    print(f"create → export → flush round trip: OK in {elapsed_ms:.1f} ms ({algorithm})")
    for name, ok in supported.items():
        print(f"  {name}: {'supported' if ok else 'NOT supported by this TPM (TPM2_TestParms)'}")
    return 0


async def _cmd_tpm_attestation_key(args: argparse.Namespace, settings: Settings) -> int:
    from contracts.crypto import public_key_pem
    from workers.keygen.attest import attestation_public_key
    from workers.keygen.tpm import Tpm
    from workers.service.serve import resolve_tcti

    # Beside a running keygen worker: its objects are not leftovers to flush.
    with Tpm(resolve_tcti(settings), flush_leftovers=False) as tpm:
        key = tpm.with_context("deriving the attestation key", attestation_public_key)
    print(public_key_pem(key), end="")
    return 0


def register(tree: CommandTree) -> None:
    """Add the TPM commands."""
    tree.add(
        "tpm attestation-key",
        _cmd_tpm_attestation_key,
        "print the fleet attestation public key (PEM): pin it to check key attestations",
        settings=TPM,
    )
    tree.add(
        "tpm check",
        _cmd_tpm_check,
        "show the TPM and do one create-export-flush round trip",
        settings=TPM,
    )
