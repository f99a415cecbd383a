"""Connecting to the broker: one place that turns connection failures into typed errors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractRobustConnection
from aio_pika.exceptions import (
    AMQPConnectionError,
    AuthenticationError,
    ProbableAuthenticationError,
)
from aiormq.exceptions import ConnectionClosed, InvalidFrameError

from contracts.brokers import (
    ACCESS_REFUSED,
    REFUSAL_CODES,
    BrokerURLs,
    connect_any,
    principal_of,
    refusal,
)
from contracts.errors import BrokerUnavailable, ConfigurationError
from contracts.urls import redact_url
from contracts.wire import Wire

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/"
JSON_CONTENT_TYPE = "application/json"
#: Optional request header: the absolute deadline in Unix milliseconds. The client helper sets
#: it from the call's timeout; workers refuse to start a request whose deadline has passed.
DEADLINE_HEADER = "x-deadline-ms"

ConnectionT = TypeVar("ConnectionT", bound=AbstractConnection)
#: Seconds between heartbeats asked of the broker on aio-pika's connections (topology, events,
#: quotas, the CLI): aiormq counts the broker gone after 3 x (heartbeat + 1) s of silence
#: (18 s), and the broker counts us gone after about 2 x heartbeat (10 s). A URL's
#: ``heartbeat=`` overrides it. The hot paths run on ``contracts.wire`` (see its default).
DEFAULT_HEARTBEAT_S = 5

__all__ = [
    "DEADLINE_HEADER",
    "DEFAULT_AMQP_URL",
    "DEFAULT_HEARTBEAT_S",
    "JSON_CONTENT_TYPE",
    "BrokerURLs",
    "connect",
    "connect_plain",
    "principal_of",
    "with_heartbeat",
]


async def connect(
    url: BrokerURLs, *, connection_name: str, timeout_s: float = 10.0
) -> AbstractRobustConnection:
    """A robust (self-reconnecting) connection, or a ``BrokerUnavailable`` saying why not.

    ``url`` may name several brokers (``contracts.brokers``): the first that answers, tried
    in shuffled order. aio-pika's own reconnects go back to that same broker.
    """
    return await _connect_any(
        aio_pika.connect_robust, url, connection_name, timeout_s, DEFAULT_HEARTBEAT_S
    )


async def connect_plain(
    url: BrokerURLs,
    *,
    connection_name: str,
    timeout_s: float = 10.0,
    heartbeat_s: int = DEFAULT_HEARTBEAT_S,
) -> AbstractConnection:
    """A plain connection for callers that run their own reconnect loop (the workers).

    ``url`` may name several brokers: the first that answers, tried in shuffled order. The
    URL's ``heartbeat=`` overrides ``heartbeat_s``.
    """
    return await _connect_any(aio_pika.connect, url, connection_name, timeout_s, heartbeat_s)


async def _connect_any(
    factory: Callable[..., Awaitable[ConnectionT]],
    url: BrokerURLs,
    connection_name: str,
    timeout_s: float,
    heartbeat_s: int,
) -> ConnectionT:
    """``factory`` (aio-pika's ``connect`` or ``connect_robust``) on the first broker of
    ``url`` that answers (``contracts.brokers.connect_any``), errors typed."""

    async def attempt(one: str, attempt_timeout_s: float) -> ConnectionT:
        return await _connected(
            factory(
                with_heartbeat(one, heartbeat_s),
                timeout=attempt_timeout_s,
                client_properties={"connection_name": connection_name},
            ),
            one,
        )

    return await connect_any(url, attempt, timeout_s=timeout_s)


def with_heartbeat(url: str, heartbeat_s: int) -> str:
    """``url`` with ``heartbeat=heartbeat_s`` unless it names a heartbeat of its own.

    Not aio-pika's ``heartbeat`` argument: that one would override the URL's.
    """
    if "heartbeat" in _query_names(url):
        return url
    separator = "&" if "?" in url.rpartition("@")[2] else "?"
    return f"{url}{separator}heartbeat={heartbeat_s}"


def _query_names(url: str) -> set[str]:
    # After the last "@": a password's "?" is not the query.
    rest = url.rpartition("@")[2]
    query = rest.partition("?")[2]
    return {option.partition("=")[0] for option in query.split("&") if option}


async def _connected(attempt: Awaitable[ConnectionT], url: str) -> ConnectionT:
    where = redact_url(url)
    try:
        return await attempt
    except (AuthenticationError, ProbableAuthenticationError) as exc:
        raise refusal(url, ACCESS_REFUSED) from exc
    except (ConnectionClosed, InvalidFrameError) as exc:
        if (refused := await refused_at_open(url, exc)) is not None:
            raise refused from exc
        raise BrokerUnavailable(
            f"cannot reach the broker at {where}: {type(exc).__name__}"
        ) from exc
    except (AMQPConnectionError, OSError, TimeoutError) as exc:
        raise BrokerUnavailable(
            f"cannot reach the broker at {where}: {type(exc).__name__}"
        ) from exc


async def refused_at_open(url: str, exc: BaseException) -> ConfigurationError | None:
    """The ``refusal`` an aiormq error at connect stands for, or None when it is none.

    aiormq reports a broker's ``connection.close`` during the handshake as
    ``ConnectionClosed(code, text)``, or, when it answers ``connection.open`` (the vhost is
    missing, or the user has no access to it), as an ``InvalidFrameError`` that keeps neither:
    then the lean connection, which keeps both, asks once more, so every path says the same.
    """
    if isinstance(exc, ConnectionClosed) and exc.args and isinstance(exc.args[0], int):
        code = exc.args[0]
        text = str(exc.args[1]) if len(exc.args) > 1 else ""
        return refusal(url, code, f"{code} {text}") if code in REFUSAL_CODES else None
    if not (isinstance(exc, InvalidFrameError) and "Connection.Close" in str(exc)):
        return None
    try:
        wire = await Wire.connect(url, connection_name="zandd-refused", timeout_s=5.0)
    except ConfigurationError as refused:
        return refused
    except BrokerUnavailable:
        return refusal(url, None)
    await wire.close()
    return refusal(url, None)
