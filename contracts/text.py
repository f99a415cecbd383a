"""Producer-chosen text made safe to show: one escape for logs, terminals and error messages.

A ``message_id``, ``type``, user name or header is whatever a producer sent. Shown raw, a line
break forges a log line and an ANSI escape rewrites the operator's terminal. Every character
Python does not consider printable (``str.isprintable``: control characters, DEL, C1, line and
paragraph separators, bidirectional overrides, lone surrogates) is shown as its escape.
"""

from __future__ import annotations

_MAX_SHOWN_CHARS = 80


def escape_unprintable(text: str) -> str:
    """``text`` on one line and inert on a terminal: each unprintable character as its escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else escape_char(c) for c in text)


def escape_char(char: str) -> str:
    """One character as Python spells it in a string literal (``\\n``, ``\\x1b``, ``\\u2028``)."""
    return char.encode("unicode_escape").decode("ascii")


def printable(value: str | bytes | None, max_chars: int = _MAX_SHOWN_CHARS) -> str:
    """``value`` safe for a log line or a terminal, cut at ``max_chars`` ("-" for None).

    Bytes that are not UTF-8 are shown as ``\\xNN``.
    """
    if value is None:
        return "-"
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="backslashreplace")
    if len(value) > max_chars:
        value = value[:max_chars] + "…"
    return escape_unprintable(value)
