"""Moving a vault to another backend: ``zandd vault migrate --from URL --to URL``."""

from __future__ import annotations

import argparse
import sys
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

from contracts.errors import ConfigurationError, IntegrityError
from workers.commands.base import EXIT_OK, VAULT, CommandTree
from workers.commands.progress import ProgressBar
from workers.service.config import Settings
from workers.service.hygiene import harden_for_key_material

if TYPE_CHECKING:
    from vault.migrate import MigrationReport

_SHOWN_NOT_COPIED = 3


async def _cmd_vault_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from contracts.urls import redact_url
    from vault.migrate import migrate_vault
    from vault.store import open_store

    if args.source == args.target:
        raise ConfigurationError("--from and --to name the same vault")
    from workers.service.ringsetup import load_ring

    harden_for_key_material(lock_memory=settings.lock_memory)
    ring = load_ring(settings)
    bar = ProgressBar(sys.stderr)
    async with AsyncExitStack() as stack:
        source = await open_store(args.source)
        stack.push_async_callback(source.close)
        target = await open_store(args.target)
        stack.push_async_callback(target.close)
        try:
            report = await migrate_vault(source, target, ring, on_progress=bar.update)
        finally:
            bar.finish()
    print(_summary(report, redact_url(args.source), redact_url(args.target)))
    if report.not_copied:
        shown = "; ".join(report.not_copied[:_SHOWN_NOT_COPIED])
        more = len(report.not_copied) - _SHOWN_NOT_COPIED
        raise IntegrityError(
            f"{len(report.not_copied)} key versions were not copied: {shown}"
            + (f"; and {more} more" if more > 0 else "")
        )
    return EXIT_OK


def _summary(report: MigrationReport, source: str, target: str) -> str:
    return (
        f"migrated {source} → {target}: {report.copied} key versions copied, "
        f"{report.already_there} already there; all {report.verified} open with the KEK ring "
        f"and match their public keys. Audit log: {report.audit_copied} entries copied, "
        f"{report.audit_already_there} already there, chain verified."
    )


def register(tree: CommandTree) -> None:
    """Add ``vault migrate``."""
    migrate = tree.add(
        "vault migrate",
        _cmd_vault_migrate,
        "copy every key version and the audit log to another vault, verified (safe to re-run)",
        settings=VAULT,
    )
    migrate.add_argument(
        "--from", dest="source", required=True, help="the vault to copy, e.g. sqlite:///path.db"
    )
    migrate.add_argument(
        "--to", dest="target", required=True, help="the vault to fill, e.g. mongodb://host/zandd"
    )
