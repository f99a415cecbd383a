"""Health for orchestrators: ``zandd health [--role keygen|signer]``."""

from __future__ import annotations

import argparse

from workers.commands.base import CommandTree
from workers.service.config import Settings


async def _cmd_health(args: argparse.Namespace, settings: Settings) -> int:
    from workers.operator.health import Role, check_health

    report = await check_health(settings, Role(args.role) if args.role else None)
    print(report.line)
    return 0


def register(tree: CommandTree) -> None:
    """Add the health command."""
    health = tree.add(
        "health",
        _cmd_health,
        "exit 0 when the broker, the role's queue consumers, the vault (and for keygen the "
        "TPM) are fine; otherwise one line says what failed",
    )
    health.add_argument(
        "--role",
        choices=("keygen", "signer"),
        default=None,
        help="the worker role to check (default: both queues, no TPM)",
    )
