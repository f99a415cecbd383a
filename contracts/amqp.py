"""Connecting to the broker: one place that turns connection failures into typed errors."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar
from urllib.parse import unquote

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractRobustConnection
from aio_pika.exceptions import (
    AMQPConnectionError,
    AuthenticationError,
    ProbableAuthenticationError,
)

from contracts.errors import BrokerUnavailable, ConfigurationError
from contracts.urls import redact_url

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/"
JSON_CONTENT_TYPE = "application/json"
#: Optional request header: the absolute deadline in Unix milliseconds. The client helper sets
#: it from the call's timeout; workers refuse to start a request whose deadline has passed.
DEADLINE_HEADER = "x-deadline-ms"

ConnectionT = TypeVar("ConnectionT", bound=AbstractConnection)


def principal_of(url: str) -> str:
    """The AMQP user a connection to ``url`` authenticates as (RabbitMQ's default: guest)."""
    _scheme, _sep, remainder = url.partition("://")
    userinfo, at, _rest = remainder.rpartition("@")
    return unquote(userinfo.partition(":")[0]) if at and userinfo else "guest"


async def connect(
    url: str, *, connection_name: str, timeout_s: float = 10.0
) -> AbstractRobustConnection:
    """A robust (self-reconnecting) connection, or a ``BrokerUnavailable`` saying why not."""
    return await _connected(
        aio_pika.connect_robust(
            url, timeout=timeout_s, client_properties={"connection_name": connection_name}
        ),
        url,
    )


async def connect_plain(
    url: str, *, connection_name: str, timeout_s: float = 10.0, heartbeat_s: int = 15
) -> AbstractConnection:
    """A plain connection for callers that run their own reconnect loop (the workers)."""
    return await _connected(
        aio_pika.connect(
            url,
            timeout=timeout_s,
            heartbeat=heartbeat_s,
            client_properties={"connection_name": connection_name},
        ),
        url,
    )


async def _connected(attempt: Awaitable[ConnectionT], url: str) -> ConnectionT:
    where = redact_url(url)
    try:
        return await attempt
    except (AuthenticationError, ProbableAuthenticationError) as exc:
        raise ConfigurationError(f"the broker at {where} refused our credentials") from exc
    except (AMQPConnectionError, OSError, TimeoutError) as exc:
        raise BrokerUnavailable(
            f"cannot reach the broker at {where}: {type(exc).__name__}"
        ) from exc
