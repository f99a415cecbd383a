"""Log lines that say which request they are about: request id and trace id on every line.

The runtime binds the request id with :func:`bound_request` around the handling of one
delivery; the trace id comes from the OpenTelemetry span current at the time of the log call.
Both live in context variables, so concurrent requests in one event loop never mix them up.

The JSON formatter writes a fixed set of fields: whatever a caller passes in ``extra`` is not
copied, so a payload can only reach the log if a message string puts it there, and none does.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Literal

from opentelemetry import trace

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"

_request_id: ContextVar[str | None] = ContextVar("zandd_request_id", default=None)


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
    """The classic one-line format, with ``request_id=… trace_id=…`` appended when known."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        """One line (plus a traceback when the record has one)."""
        line = super().format(record)
        tags = [
            f"{name}={value}"
            for name in ("request_id", "trace_id")
            if (value := getattr(record, name, None))
        ]
        if not tags:
            return line
        head, newline, rest = line.partition("\n")
        return f"{head} {' '.join(tags)}{newline}{rest}"


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
        return json.dumps(entry, ensure_ascii=False)


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
