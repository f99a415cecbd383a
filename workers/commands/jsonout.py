"""``--json``: what a command prints for a program (``jq``, a script) instead of a person.

A command that answers once (``keys list``, ``keys show``, ``dead list``, ``health``) prints
one JSON document on one line; a log (``audit tail``) prints JSON lines, one object per entry,
oldest first. Field names and their types are stable: a field is added, never renamed or
removed, within a major version. Times are ISO 8601 UTC, absent values ``null``. Every
character outside printable ASCII is escaped (``\\u001b``): text a producer chose reaches no
terminal raw, as in the human output.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from enum import Enum

DOCUMENT = "print one JSON document instead of text (fields: docs/operations.md)"
LINES = "print JSON lines, one object per entry, instead of text (fields: docs/operations.md)"


def add_json_flag(parser: argparse.ArgumentParser, help_text: str = DOCUMENT) -> None:
    """Give ``parser`` the ``--json`` flag."""
    parser.add_argument("--json", action="store_true", help=help_text)


def dumps(value: object) -> str:
    """``value`` as one line of ASCII JSON (datetimes and enums as ``--json`` shows them)."""
    return json.dumps(value, ensure_ascii=True, default=_default)


def _default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"{type(value).__name__} is not shown as JSON")
