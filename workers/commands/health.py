"""Health for orchestrators: ``zandd health [--role keygen|signer]``."""

from __future__ import annotations

import argparse

from workers.commands.base import BROKER, EXIT_FAILURE, VAULT, CommandTree
from workers.commands.jsonout import add_json_flag, dumps
from workers.service.config import Settings


async def _cmd_health(args: argparse.Namespace, settings: Settings) -> int:
    from workers.operator.health import Role, Unhealthy, check_health

    try:
        report = await check_health(settings, Role(args.role) if args.role else None)
    except Unhealthy as exc:
        if not args.json:
            raise
        print(dumps({"healthy": False, "passed": None, "failed": exc.message}))
        return EXIT_FAILURE
    print(
        dumps({"healthy": True, "passed": list(report.passed), "failed": None})
        if args.json
        else report.line
    )
    return 0


def register(tree: CommandTree) -> None:
    """Add the health command."""
    health = tree.add(
        "health",
        _cmd_health,
        "exit 0 when the broker, the role's queue consumers, the vault (and for keygen the "
        "TPM) are fine; otherwise one line says what failed",
        settings=(*BROKER, *VAULT),
    )
    health.add_argument(
        "--role",
        choices=("keygen", "signer"),
        default=None,
        help="the worker role to check (default: both queues, no TPM)",
    )
    add_json_flag(health)
