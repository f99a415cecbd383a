"""Measuring: ``zandd bench``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from contracts.errors import ConfigurationError
from workers.commands.base import SERVING, CommandTree
from workers.service.config import Settings

DEFAULT_SIGNERS = (2,)
DEFAULT_DURATION_S = 5.0
DEFAULT_WARMUP_S = 1.0
DEFAULT_MAX_KEYS = 100
#: Keys of ``sign_many_keys`` (issue 15: the seed's sizing).
DEFAULT_MANY_KEYS = 10_000


def _signer_counts(value: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected signer counts like 2 or 1,2,4, got {value!r}"
        ) from None
    if any(count < 1 for count in counts):
        raise argparse.ArgumentTypeError("every signer count must be at least 1")
    return counts


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {value!r}") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return seconds


def _positive_count(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return count


def _count(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if count < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return count


async def _cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from workers.bench.measure import Timing
    from workers.bench.progress import Progress
    from workers.bench.report import render_table
    from workers.bench.runner import BenchOptions, run_bench

    if args.attach and args.signers is not None:
        raise ConfigurationError(
            "--signers starts a fleet of that size, --attach measures the running one: "
            "give one of them"
        )
    if logging.getLogger().level > logging.DEBUG:
        # The in-process keygen and KEK ring set-up log at INFO; the progress lines say it.
        logging.getLogger("zandd").setLevel(logging.WARNING)
    options = BenchOptions(
        signer_counts=args.signers or DEFAULT_SIGNERS,
        attach=args.attach,
        timing=Timing(duration_s=args.duration_s, warmup_s=args.warmup_s),
        max_keys=args.max_keys,
        many_keys=args.many_keys,
        repeat=args.repeat,
    )
    report = await run_bench(settings, options, Progress(sys.stderr))
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(render_table(report))
    return 0


def register(tree: CommandTree) -> None:
    """Add the benchmark command."""
    bench = tree.add(
        "bench",
        _cmd_bench,
        "measure the fleet beside a plain aio-pika echo, the TPM and the raw crypto",
        settings=SERVING,
    )
    bench.add_argument(
        "--signers",
        type=_signer_counts,
        default=None,
        help="signer processes of the fleet it starts; 1,2,4 measures each size (default 2)",
    )
    bench.add_argument(
        "--attach",
        action="store_true",
        help="measure the fleet running at the AMQP URL instead of starting one",
    )
    bench.add_argument(
        "--duration-s",
        type=_positive_seconds,
        default=DEFAULT_DURATION_S,
        help=f"measured seconds per scenario (default {DEFAULT_DURATION_S:g})",
    )
    bench.add_argument(
        "--warmup-s",
        type=_positive_seconds,
        default=DEFAULT_WARMUP_S,
        help=f"warm-up seconds before each scenario (default {DEFAULT_WARMUP_S:g})",
    )
    bench.add_argument(
        "--max-keys",
        type=_positive_count,
        default=DEFAULT_MAX_KEYS,
        help=f"keys the keygen scenario creates at most (default {DEFAULT_MAX_KEYS}); "
        "with --attach they stay in that fleet's vault",
    )
    bench.add_argument(
        "--many-keys",
        type=_count,
        default=DEFAULT_MANY_KEYS,
        help=f"keys of the sign_many_keys scenario (default {DEFAULT_MANY_KEYS:,}; 0 skips it): "
        "created through the keygen worker (~keygen p50 each), with --attach found again by "
        "their label and only the missing ones created",
    )
    bench.add_argument(
        "--repeat",
        type=_positive_count,
        default=1,
        metavar="N",
        help="run the compared pairs (echo/sign, echo_serial/sign_serial, sign_many_keys) N "
        "times and judge their ratios on the median, with min and max shown (default 1)",
    )
    bench.add_argument("--json", action="store_true", help="print one JSON object")
