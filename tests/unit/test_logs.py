"""Log lines carry the request id and trace id of the request they are about, and nothing else."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from contracts.tracing import producer_span
from tests.support.spans import memory_exporter
from workers.observability.logs import (
    JsonFormatter,
    RequestContextFilter,
    TextFormatter,
    bound_request,
    current_trace_id,
    install,
)


@pytest.fixture
def stream_logger() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    memory_exporter()  # an SDK tracer provider, so spans have real trace ids
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestContextFilter())
    logger = logging.getLogger("zandd.test.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield logger, stream, handler
    finally:
        logger.removeHandler(handler)


def test_json_lines_carry_request_and_trace_ids(
    stream_logger: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, handler = stream_logger
    handler.setFormatter(JsonFormatter())
    logger.info("before any request")
    with (
        producer_span(exchange="zandd", routing_key="sign", message_id="r", correlation_id=None),
        bound_request("req-42"),
    ):
        trace_id = current_trace_id()
        logger.info("serving %s", "sign", extra={"payload": "c2VjcmV0"})
    logger.info("after")

    before, during, after = (json.loads(line) for line in stream.getvalue().splitlines())
    assert set(before) == {"time", "level", "logger", "pid", "message"}
    assert trace_id is not None
    assert len(trace_id) == 32
    assert during["request_id"] == "req-42"
    assert during["trace_id"] == trace_id
    assert during["message"] == "serving sign"
    assert during["level"] == "INFO"
    assert during["logger"] == "zandd.test.logs"
    assert "payload" not in during, "extra fields are never copied into the line"
    assert "request_id" not in after
    assert "trace_id" not in after


def test_json_keeps_a_traceback_inside_the_one_line(
    stream_logger: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, handler = stream_logger
    handler.setFormatter(JsonFormatter())
    try:
        raise ValueError("bad")
    except ValueError:
        logger.exception("failed")
    (line,) = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "ERROR"
    assert "ValueError: bad" in entry["exception"]


def test_text_lines_append_the_ids_when_known(
    stream_logger: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, handler = stream_logger
    handler.setFormatter(TextFormatter())
    logger.info("idle")
    with bound_request("req-7"):
        logger.info("busy")
    idle, busy = stream.getvalue().splitlines()
    assert idle.endswith(" idle")
    assert "request_id" not in idle
    assert "trace_id" not in idle
    assert busy.endswith("busy request_id=req-7")


async def test_concurrent_requests_keep_their_own_ids(
    stream_logger: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, handler = stream_logger
    handler.setFormatter(JsonFormatter())
    both_bound = asyncio.Barrier(2)

    async def serve(request_id: str) -> None:
        with bound_request(request_id):
            await both_bound.wait()
            logger.info("serving")

    await asyncio.gather(serve("a"), serve("b"))
    ids = sorted(json.loads(line)["request_id"] for line in stream.getvalue().splitlines())
    assert ids == ["a", "b"]


def test_install_replaces_its_own_handler_and_keeps_others() -> None:
    root = logging.getLogger()
    foreign = logging.NullHandler()
    root.addHandler(foreign)
    level = root.level
    try:
        install("INFO", "text")
        install("WARNING", "json")
        ours = [h for h in root.handlers if isinstance(h.formatter, JsonFormatter | TextFormatter)]
        assert len(ours) == 1
        assert isinstance(ours[0].formatter, JsonFormatter)
        assert foreign in root.handlers
        assert root.level == logging.WARNING
    finally:
        for handler in [h for h in root.handlers if h is not foreign and h.formatter is not None]:
            if isinstance(handler.formatter, JsonFormatter | TextFormatter):
                root.removeHandler(handler)
        root.removeHandler(foreign)
        root.setLevel(level)


FORGED_ID = "r-1\n2026-01-01 00:00:00,000 INFO zandd.keygen[1] forged\x1b[31m"


def test_text_lines_escape_what_a_producer_chose(
    stream_logger: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    # A request id (or operation, user name, label) with a newline would forge a second
    # record, and an ANSI escape would reach the operator's terminal.
    logger, stream, handler = stream_logger
    handler.setFormatter(TextFormatter())
    with bound_request(FORGED_ID):
        logger.warning("request %s refused: %s", FORGED_ID, "forbidden\u2028\x9b2J\u202e")
    output = stream.getvalue()
    (line,) = output.splitlines()
    assert "\x1b" not in output
    assert "\x9b" not in output
    assert "\u202e" not in output
    escaped = r"r-1\n2026-01-01 00:00:00,000 INFO zandd.keygen[1] forged\x1b[31m"
    assert f"request {escaped} refused: forbidden\\u2028\\x9b2J\\u202e" in line
    assert line.endswith(f" request_id={escaped}")


def test_text_tracebacks_are_indented_and_escaped(
    stream_logger: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, handler = stream_logger
    handler.setFormatter(TextFormatter())
    try:
        raise ValueError(f"bad id {FORGED_ID}")
    except ValueError:
        logger.exception("request %s failed", "r-2")
    head, *details = stream.getvalue().rstrip("\n").split("\n")
    assert head.endswith(" request r-2 failed")
    assert details[0] == "  Traceback (most recent call last):"
    assert all(line.startswith("  ") for line in details)
    assert details[-2] == "  ValueError: bad id r-1"
    assert details[-1] == r"  2026-01-01 00:00:00,000 INFO zandd.keygen[1] forged\x1b[31m"


def test_json_lines_escape_what_a_terminal_acts_on(
    stream_logger: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, handler = stream_logger
    handler.setFormatter(JsonFormatter())
    hostile = FORGED_ID + "\x7f\x85\x9b\u2028\u2029\u202e\U000e0001\udcff label ✓"
    with bound_request(hostile):
        logger.info("serving %s", hostile)
    output = stream.getvalue()
    (line,) = output.splitlines()
    assert line.isprintable(), "nothing unprintable reaches the terminal"
    assert "✓" in line, "printable text stays readable"
    entry = json.loads(line)
    assert entry["message"] == f"serving {hostile}"
    assert entry["request_id"] == hostile
