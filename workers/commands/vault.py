"""The key vault: ``zandd vault init``."""

from __future__ import annotations

import argparse
import logging
from contextlib import ExitStack
from typing import TYPE_CHECKING

from contracts.errors import ZanddError
from workers.commands.base import CommandTree
from workers.config import Settings

if TYPE_CHECKING:
    from workers.keygen.tpm import Tpm

log = logging.getLogger("zandd.cli")


async def _cmd_vault_init(args: argparse.Namespace, settings: Settings) -> int:
    from vault.kek import KekRing
    from vault.store import open_store

    path = settings.resolved_kek_file
    if path.exists():
        print(f"KEK ring {path} exists already; kept as it is")
    else:
        with ExitStack() as stack:
            tpm = _reachable_tpm(settings)
            if tpm is None:
                ring = KekRing.create(path)
                source = "the OS RNG (no TPM reachable)"
            else:
                stack.enter_context(tpm)
                ring = KekRing.create(path, random_bytes=tpm.get_random)
                source = "the TPM's RNG mixed with the OS RNG"
        print(f"created KEK ring {path} (active KEK {ring.active.kek_id}, from {source})")
    store = await open_store(settings.resolved_vault_url)
    await store.close()
    print(f"vault ready at {settings.resolved_vault_url}")
    return 0


def _reachable_tpm(settings: Settings) -> Tpm | None:
    try:
        from workers.keygen.tpm import Tpm
        from workers.serve import resolve_tcti

        return Tpm(resolve_tcti(settings))
    except (ImportError, ZanddError) as exc:
        log.debug("no TPM for the KEK ring: %s", exc)
        return None


def register(tree: CommandTree) -> None:
    """Add the vault commands."""
    tree.add(
        "vault init", _cmd_vault_init, "create the KEK ring (from the TPM's RNG) and the vault"
    )
