"""Log lines that say which request they are about: request id and trace id on every line.

The runtime binds the request id with :func:`bound_request` around the handling of one
delivery; the trace id comes from the OpenTelemetry span current at the time of the log call.
Both live in context variables, so concurrent requests in one event loop never mix them up.

The JSON formatter writes a fixed set of fields: whatever a caller passes in ``extra`` is not
copied, so a payload can only reach the log if a message string puts it there, and none does.

Log lines quote what producers chose (request ids, operation names, user names, labels). Both
formatters show every character Python does not consider printable as its escape (``\\n``,
``\\x1b``, ``\\u2028``), at the one place every record passes: a producer cannot end a line
early to forge the next one, nor send escape sequences to the operator's terminal. Text
tracebacks keep their lines, each indented, so no line of one can pass for a record.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Literal

from opentelemetry import trace

from contracts.text import escape_unprintable

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"

_request_id: ContextVar[str | None] = ContextVar("zandd_request_id", default=None)
_DETAIL_INDENT = "  "


def _json_escape(char: str) -> str:
    # JSON spells a character outside the BMP as a UTF-16 surrogate pair.
    code = ord(char)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


@contextmanager
def bound_request(request_id: str | None) -> Iterator[None]:
    """Tag every log line written in this block (and tasks it starts) with ``request_id``."""
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)


def current_request_id() -> str | None:
    """The request id bound in this context, if any."""
    return _request_id.get()


def current_trace_id() -> str | None:
    """The current span's trace id as 32 hex digits, if a span is current."""
    context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else None


class RequestContextFilter(logging.Filter):
    """Adds ``request_id`` and ``trace_id`` (None when unknown) to every record it sees.

    Install it on a handler: a filter on a logger does not see records from its children.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate the record; never drops it."""
        record.request_id = current_request_id()
        record.trace_id = current_trace_id()
        return True


class TextFormatter(logging.Formatter):
    """The classic one-line format, with ``request_id=… trace_id=…`` appended when known.

    The message and the tags are escaped onto that one line; a traceback or stack follows on
    lines of its own, each indented and escaped.
    """

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        """One line (plus an indented traceback when the record has one)."""
        # A copy: other handlers of the same record format it their own way.
        shown = copy.copy(record)
        shown.msg, shown.args = escape_unprintable(record.getMessage()), None
        shown.exc_info, shown.exc_text, shown.stack_info = None, None, None
        line = super().format(shown)
        tags = [
            f"{name}={escape_unprintable(str(value))}"
            for name in ("request_id", "trace_id")
            if (value := getattr(record, name, None))
        ]
        if tags:
            line = f"{line} {' '.join(tags)}"
        details = [
            self.formatException(record.exc_info) if record.exc_info else record.exc_text,
            self.formatStack(record.stack_info) if record.stack_info else None,
        ]
        for detail in details:
            if detail:
                # split("\n"), not splitlines(): other line breaks in a message are escaped.
                line += "".join(
                    f"\n{_DETAIL_INDENT}{escape_unprintable(part)}" for part in detail.split("\n")
                )
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, pid, message, request and trace ids."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a single line of JSON."""
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for name in ("request_id", "trace_id"):
            value = getattr(record, name, None)
            if value:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # json.dumps escapes the C0 controls only; the rest of what a terminal acts on (DEL,
        # C1, line separators, bidirectional overrides) and lone surrogates are escaped here.
        line = json.dumps(entry, ensure_ascii=False)
        if line.isprintable():
            return line
        return "".join(c if c.isprintable() else _json_escape(c) for c in line)


class _ZanddHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler :func:`install` added, so a second call replaces only that one."""


def build_handler(log_format: LogFormat) -> logging.Handler:
    """A stderr handler with the formatter for ``log_format`` and the request-context filter."""
    handler = _ZanddHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestContextFilter())
    return handler


def install(level: str, log_format: LogFormat) -> None:
    """Make the root logger write ``log_format`` lines at ``level`` to stderr.

    A handler from an earlier call is replaced; handlers others installed are left alone.
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ZanddHandler)]:
        root.removeHandler(old)
    root.addHandler(build_handler(log_format))
    root.setLevel(level.upper())
