"""What every ``zandd`` subcommand shares: the command tree, settings flags, exit codes."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from contracts.urls import redact_url, url_secrets
from workers.service.config import Settings

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
#: A worker that cannot start for a reason no restart mends (a corrupt or unreadable vault, a
#: wrong schema, a ring that does not open it, bad configuration): ``zandd up`` stops the fleet.
EXIT_PERMANENT = 3
EXIT_INTERRUPTED = 130
#: 128 + SIGTERM, as a shell reports a process SIGTERM ended.
EXIT_TERMINATED = 143

Command = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]

SETTING_FLAGS = {
    "amqp_url": "AMQP URL of the broker",
    "data_dir": "directory for the SQLite vault, the KEK ring and swtpm state",
    "vault_url": "vault URL (sqlite:///path.db or mongodb://host/zandd)",
    "kek_file": "KEK ring file",
    "tpm_tcti": "TPM TCTI, e.g. device:/dev/tpmrm0 or swtpm:host=127.0.0.1,port=2321",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "log_format": "text (default) or json (one object per line)",
    "metrics_port": "serve Prometheus metrics on this port (default: none)",
    "metrics_host": "address the metrics endpoint binds (default 127.0.0.1)",
    "traces_exporter": "none (default), console (stderr) or otlp (OTEL_EXPORTER_OTLP_*)",
    "sign_shards": "quorum queues sign requests spread over (default 1; > 1 needs the "
    "rabbitmq_consistent_hash_exchange plugin)",
    "quota_requests_per_s": "requests/s each principal may send, fleet-wide (default: no limit)",
    "quota_signatures_per_s": "signatures/s each principal may ask for (default: no limit)",
    "quota_overrides": 'per-principal quotas, JSON: {"alice": {"requests_per_s": 100}, '
    '"ops": "unlimited"}',
}


# Which settings a command takes as flags: only those it uses (``zandd <cmd> --help`` lists
# them); every setting is still read from the environment by every command.
#: How it logs: every command.
LOGGING = ("log_level", "log_format")
#: The broker (``client=True`` gives it, with ``traces_exporter``, to calls to the fleet).
BROKER = ("amqp_url",)
#: The vault and its KEK ring (a ring sealed to the TPM is opened with it).
VAULT = ("data_dir", "vault_url", "kek_file", "tpm_tcti")
#: The TPM (swtpm's state lives in the data directory).
TPM = ("data_dir", "tpm_tcti")
#: A worker, the whole fleet, the bench: every setting.
SERVING = tuple(SETTING_FLAGS)
_CLIENT = ("amqp_url", "traces_exporter")


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is less than 1")
    return value


def secrets_in(argv: Sequence[str]) -> list[str]:
    """The arguments that carry a URL password or credential option, as shown redacted.

    A command line is world-readable (``ps``, ``/proc/<pid>/cmdline``) for as long as the
    process runs; its environment only to the same user and root.
    """
    return [redact_url(arg) for arg in argv if "://" in arg and url_secrets(arg)]


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the flags given on the command line."""
    overrides = {name: getattr(args, name) for name in SETTING_FLAGS if getattr(args, name, None)}
    return Settings(**overrides)


class CommandTree:
    """Subcommands by path (``"keys create"``); groups like ``keys`` are made on first use."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self._root = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
        self._groups: dict[str, Any] = {}

    def _group(self, name: str) -> Any:
        if name not in self._groups:
            parser = self._root.add_parser(name, help=f"{name} commands")
            self._groups[name] = parser.add_subparsers(
                title=f"{name} commands", required=True, metavar="COMMAND"
            )
        return self._groups[name]

    def add(
        self,
        path: str,
        command: Command,
        help_text: str,
        *,
        client: bool = False,
        settings: Sequence[str] = (),
    ) -> argparse.ArgumentParser:
        """Add a subcommand with the setting flags it uses (``settings``, and ``LOGGING``);
        ``client=True`` gives it ``--timeout`` and the broker's flags for calls to the fleet."""
        *groups, name = path.split()
        subparsers = self._group(groups[0]) if groups else self._root
        parser: argparse.ArgumentParser = subparsers.add_parser(
            name, help=help_text, description=help_text
        )
        parser.set_defaults(command=command)
        flags = parser.add_argument_group(
            "configuration (each also ZANDD_<NAME> in the environment)"
        )
        taken = {*LOGGING, *(_CLIENT if client else ()), *settings}
        for setting in (name for name in SETTING_FLAGS if name in taken):
            flags.add_argument(
                "--" + setting.replace("_", "-"),
                dest=setting,
                default=None,
                help=SETTING_FLAGS[setting],
            )
        if client:
            parser.add_argument(
                "--timeout", type=float, default=30.0, help="seconds to wait for each reply"
            )
        return parser
