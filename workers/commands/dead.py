"""The dead-letter queue: ``zandd dead list``, ``zandd dead replay``."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from contracts.errors import ConfigurationError
from contracts.text import printable
from workers.commands.base import BROKER, CommandTree
from workers.commands.jsonout import add_json_flag, dumps
from workers.commands.progress import ProgressBar
from workers.operator.dead import DeadLetter, DeadLetterQueue
from workers.service.config import Settings


async def _cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    letters = await DeadLetterQueue(settings.amqp_url).list()
    if args.json:
        print(dumps([dataclasses.asdict(letter) for letter in letters]))
        return 0
    if not letters:
        print("zandd.dead is empty")
        return 0
    print(
        f"{'message id':<34} {'operation':<12} {'reason':<15} {'count':>5}  {'first seen':<20} from"
    )
    for letter in letters:
        seen = letter.first_seen.strftime("%Y-%m-%d %H:%M:%S") if letter.first_seen else "?"
        # Every text here is a producer's or a broker's: escaped, so no ANSI escape or line
        # break of theirs reaches the terminal.
        print(
            f"{printable(letter.message_id, 255):<34} {printable(letter.operation, 255):<12} "
            f"{printable(letter.reason, 255):<15} {letter.count:>5}  {seen:<20} "
            f"{printable(letter.queue)} ({printable(letter.principal or 'no user')})"
        )
        if letter.defect is not None:
            print(f"  unreadable: {printable(letter.defect, 500)}")
    print(f"{len(letters)} dead letters")
    return 0


async def _cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    if not args.all and not args.id:
        raise ConfigurationError("say which messages: --id MESSAGE_ID (repeatable) or --all")
    wanted = set(args.id or ())

    def select(letter: DeadLetter) -> bool:
        return bool(args.all) or letter.message_id in wanted

    bar = ProgressBar(sys.stderr)
    replayed, kept = await DeadLetterQueue(settings.amqp_url).replay(
        select, progress=lambda done, total: bar.show("replay", done, total)
    )
    bar.finish()
    print(f"replayed {replayed} to zandd; {kept} left in zandd.dead")
    return 0


def register(tree: CommandTree) -> None:
    """Add the dead-letter commands."""
    listing = tree.add(
        "dead list",
        _cmd_list,
        "show what is in zandd.dead (the queue is left as it is)",
        settings=BROKER,
    )
    add_json_flag(listing)
    replay = tree.add("dead replay", _cmd_replay, "put dead letters back on zandd", settings=BROKER)
    replay.add_argument("--id", action="append", default=None, help="a message id (repeatable)")
    replay.add_argument("--all", action="store_true", help="every message in zandd.dead")
