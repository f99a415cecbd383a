"""Connecting to the broker: one place that turns connection failures into typed errors."""

from __future__ import annotations

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import (
    AMQPConnectionError,
    AuthenticationError,
    ProbableAuthenticationError,
)
from yarl import URL

from contracts.errors import BrokerUnavailable, ConfigurationError

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/"
JSON_CONTENT_TYPE = "application/json"


def redact_url(url: str) -> str:
    """The URL without its password, fit for a log line or an error message."""
    try:
        parsed = URL(url)
    except ValueError:
        return "<unparseable URL>"
    return str(parsed.with_password(None)) if parsed.password is not None else str(parsed)


def principal_of(url: str) -> str:
    """The AMQP user a connection to ``url`` authenticates as (RabbitMQ's default: guest)."""
    return URL(url).user or "guest"


async def connect(
    url: str, *, connection_name: str, timeout_s: float = 10.0
) -> AbstractRobustConnection:
    """A robust (self-reconnecting) connection, or a ``BrokerUnavailable`` saying why not."""
    where = redact_url(url)
    try:
        return await aio_pika.connect_robust(
            url,
            timeout=timeout_s,
            client_properties={"connection_name": connection_name},
        )
    except (AuthenticationError, ProbableAuthenticationError) as exc:
        raise ConfigurationError(f"the broker at {where} refused our credentials") from exc
    except (AMQPConnectionError, OSError, TimeoutError) as exc:
        raise BrokerUnavailable(
            f"cannot reach the broker at {where}: {type(exc).__name__}"
        ) from exc
