"""``zandd``: run the fleet, its workers, and talk to it from a shell.

Every failure the user can do something about ends in one sentence on stderr and a non-zero
exit code, never a traceback (``--log-level DEBUG`` shows the details). The subcommands live in
``workers.commands``, one module per area.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from importlib import metadata
from typing import Any

from pydantic import ValidationError

from contracts.errors import ZanddError
from contracts.models import describe_errors
from workers.commands import (
    aliases,
    audit,
    backup,
    bench,
    checkpoints,
    client,
    dead,
    fleet,
    health,
    keys,
    migrate,
    topology,
    tpm,
    vault,
    versions,
)
from workers.commands.base import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    Command,
    CommandTree,
    secrets_in,
    settings_from,
)
from workers.observability.logs import LogFormat
from workers.observability.logs import install as install_log_handler
from workers.observability.telemetry import configure_tracing

log = logging.getLogger("zandd.cli")
#: The distribution ``zandd`` is installed from (pyproject.toml's ``[project] name``).
DISTRIBUTION = "zandd-hsm"

COMMAND_MODULES = (
    fleet,
    client,
    keys,
    vault,
    audit,
    checkpoints,
    migrate,
    tpm,
    dead,
    bench,
    health,
    topology,
    versions,  # issue 15, key writes
    aliases,  # issue 15, aliases
    backup,  # issue 17, vault backup/restore
)


def _configure_logging(level: str, log_format: LogFormat) -> None:
    install_log_handler(level, log_format)
    if logging.getLogger().level > logging.DEBUG:
        # aio-pika/aiormq log every failed connection attempt with its own words and the TSS
        # C library prints to stderr; our one sentence says it. DEBUG shows them all.
        logging.getLogger("aiormq").setLevel(logging.CRITICAL)
        logging.getLogger("aio_pika").setLevel(logging.CRITICAL)
        os.environ.setdefault("TSS2_LOG", "all+none")


def _run(main: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where it is installed: the per-message event-loop work is a large part of
    a request's cost (docs/performance.md)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_stopped_by_sigterm(main))
    return uvloop.run(_stopped_by_sigterm(main))


async def _stopped_by_sigterm(main: Coroutine[Any, Any, int]) -> int:
    """``main``, cancelled by the first SIGTERM as by Ctrl-C, so its cleanup runs (``zandd
    bench`` removes its vhost and temporary KEK ring and vault) instead of the process dying
    where it stands. A command that stops on SIGTERM its own way (``up``, the workers) puts
    its own handler in place of this one."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def cancel_once() -> None:
        loop.remove_signal_handler(signal.SIGTERM)
        task.cancel("SIGTERM")

    loop.add_signal_handler(signal.SIGTERM, cancel_once)
    try:
        return await main
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def _version() -> str:
    """This installation's version, from the package metadata (pyproject.toml's)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "(not installed: run `pip install -e .` or ops/up)"


def _discard_stdout() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def build_parser() -> argparse.ArgumentParser:
    """The ``zandd`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="zandd",
        description="ZANDD HSM: TPM-born keys, sealed at rest, signing over RabbitMQ.",
    )
    parser.add_argument("--version", action="version", version=f"zandd {_version()}")
    tree = CommandTree(parser)
    for module in COMMAND_MODULES:
        module.register(tree)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zandd`` console script."""
    try:
        code = _main(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()  # here, not at exit: a reader gone by now is a BrokenPipeError below
    except BrokenPipeError:
        # The reader stopped reading (`zandd keys list | head`): it had what it wanted. Quiet,
        # as other Unix tools are; stdout goes nowhere so the flush at exit raises nothing.
        _discard_stdout()
        return EXIT_OK
    return code


def _main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args)
    except ValidationError as exc:
        print(f"zandd: invalid configuration: {describe_errors(exc)}", file=sys.stderr)
        return EXIT_USAGE
    _configure_logging(settings.log_level, settings.log_format)
    for shown in secrets_in(argv):
        log.warning(
            "a password on the command line (%s) is visible to every local user (ps) while "
            "zandd runs: pass the URL in the environment instead (ZANDD_AMQP_URL, "
            "ZANDD_VAULT_URL; docs/operations.md)",
            shown,
        )
    command: Command = args.command
    try:
        configure_tracing(settings.traces_exporter)
        return _run(command(args, settings))
    except ZanddError as exc:
        log.debug("failed", exc_info=True)
        print(f"zandd: {exc.message}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except asyncio.CancelledError:  # SIGTERM (``_stopped_by_sigterm``), after the cleanup
        return EXIT_TERMINATED
    except BrokenPipeError:
        raise  # main's: not a failure
    except OSError as exc:
        print(f"zandd: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
