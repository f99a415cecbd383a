"""Running the fleet: ``zandd up``, ``zandd keygen-worker``, ``zandd signer``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable

from contracts.errors import PERMANENT_ERRORS
from vault.coverage import ALLOW_UNREADABLE_FLAG
from workers.commands.base import EXIT_FAILURE, EXIT_PERMANENT, SERVING, CommandTree, positive_int
from workers.service.config import Settings


async def _cmd_signer(args: argparse.Namespace, settings: Settings) -> int:
    from workers.service.serve import serve_signer

    return await _worker(serve_signer(settings, concurrency=args.concurrency))


async def _cmd_keygen(args: argparse.Namespace, settings: Settings) -> int:
    from workers.service.serve import serve_keygen

    return await _worker(serve_keygen(settings))


async def _worker(serve: Awaitable[None]) -> int:
    """Run a worker; a permanent error exits ``EXIT_PERMANENT``, its cause told to ``zandd up``."""
    from workers.operator.fleet import die_with_supervisor, report_cause

    die_with_supervisor()
    try:
        await serve
    except PERMANENT_ERRORS as exc:
        report_cause(exc.message)
        print(f"zandd: {exc.message}", file=sys.stderr)
        return EXIT_PERMANENT
    return 0


async def _cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from workers.operator.demo import run_demo
    from workers.operator.fleet import run_up

    async def demo() -> int:
        result = await run_demo(settings.amqp_url)
        print(result.line, flush=True)
        return 0 if result.verified == result.total else EXIT_FAILURE

    if args.allow_unreadable:
        settings = settings.model_copy(update={"allow_unreadable": True})
    return await run_up(settings, signers=args.signers, after_ready=demo if args.demo else None)


def register(tree: CommandTree) -> None:
    """Add the fleet commands."""
    tree.add("keygen-worker", _cmd_keygen, "run the keygen worker (owns the TPM)", settings=SERVING)
    signer = tree.add("signer", _cmd_signer, "run a signer worker", settings=SERVING)
    signer.add_argument(
        "--concurrency", type=positive_int, default=None, help="requests in flight (prefetch)"
    )
    up = tree.add("up", _cmd_up, "run the whole fleet on this machine", settings=SERVING)
    up.add_argument("--signers", type=positive_int, default=2, help="signer processes (default 2)")
    up.add_argument("--demo", action="store_true", help="prove the fleet works, then exit")
    up.add_argument(
        ALLOW_UNREADABLE_FLAG,
        action="store_true",
        help="start (and create a ring if there is none) even though the vault holds key "
        "versions the ring does not open; they stay unreadable and health fails",
    )
