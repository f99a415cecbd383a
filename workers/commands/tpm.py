"""The TPM: ``zandd tpm check``."""

from __future__ import annotations

import argparse

from workers.commands.base import CommandTree
from workers.config import Settings


async def _cmd_tpm_check(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from workers.keygen.tpm import Tpm
    from workers.serve import resolve_tcti

    tcti = resolve_tcti(settings)
    with Tpm(tcti) as tpm:
        info = tpm.info()
        print(
            f"TPM at {tcti}: {info.manufacturer} {info.vendor}, firmware {info.firmware_version}, spec {info.spec}"
        )
        started = time.perf_counter()
        with tpm.create_exportable_p256() as exported:
            public_key = exported.public_key()
        elapsed_ms = (time.perf_counter() - started) * 1000
    print(
        f"create → export → flush round trip: OK in {elapsed_ms:.1f} ms (public key on {public_key.curve.name})"
    )
    return 0


def register(tree: CommandTree) -> None:
    """Add the TPM commands."""
    tree.add("tpm check", _cmd_tpm_check, "show the TPM and do one create-export-flush round trip")
