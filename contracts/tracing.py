"""W3C trace context in AMQP headers, and the producer span of a request.

Only the OpenTelemetry *API* is used here, never the SDK: a producer that has not configured
OpenTelemetry gets no-op spans and ``inject`` writes nothing, so tracing costs it nothing.
Once its application installs an SDK tracer provider, every request carries a ``traceparent``
header and the worker's spans join the producer's trace.

Span attributes follow the current OpenTelemetry messaging conventions for RabbitMQ
(``messaging.operation.type`` ``send``/``process``, ``messaging.destination.name`` as
``{exchange}:{routing key}`` on the producer side).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from contracts.errors import ErrorCode, ZanddError

TRACER_NAME = "zandd"
#: Fetched once: ``get_tracer`` per span costs more than the span (a proxy until a provider is
#: installed, after which it delegates to the real tracer).
TRACER = trace.get_tracer(TRACER_NAME)

MESSAGING_SYSTEM = "messaging.system"
MESSAGING_OPERATION_TYPE = "messaging.operation.type"
MESSAGING_OPERATION_NAME = "messaging.operation.name"
MESSAGING_DESTINATION_NAME = "messaging.destination.name"
MESSAGING_MESSAGE_ID = "messaging.message.id"
MESSAGING_CONVERSATION_ID = "messaging.message.conversation_id"
MESSAGING_ROUTING_KEY = "messaging.rabbitmq.destination.routing_key"
MESSAGING_DELIVERY_TAG = "messaging.rabbitmq.message.delivery_tag"
ERROR_TYPE = "error.type"
RABBITMQ = "rabbitmq"

#: Error codes that describe the caller's request, not a fault of the service: a span that
#: ends with one keeps an unset status (like an HTTP 4xx on a server span) but names it in
#: ``error.type``.
CALLER_ERROR_CODES: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.INVALID_REQUEST,
        ErrorCode.UNKNOWN_OPERATION,
        ErrorCode.KEY_NOT_FOUND,
        ErrorCode.KEY_DISABLED,
        ErrorCode.FORBIDDEN,
        # Like HTTP 429: the caller's rate, not a fault of the service.
        ErrorCode.THROTTLED,
    }
)


class _AmqpHeaderGetter(Getter[Mapping[str, Any]]):
    """Reads propagation fields from AMQP headers: a long string that is not UTF-8 arrives
    as ``bytes``, an AMQP byte array as ``bytearray``."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if isinstance(value, bytes | bytearray):
            try:
                return [bytes(value).decode("ascii")]
            except UnicodeDecodeError:
                return None
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return list(carrier)


_GETTER = _AmqpHeaderGetter()


def inject(headers: MutableMapping[str, Any]) -> None:
    """Write the current trace context (``traceparent``, ``tracestate``) into AMQP headers."""
    propagate.inject(headers)


def extract(headers: Mapping[str, Any] | None) -> Context:
    """The trace context carried by AMQP headers (an empty context when there is none)."""
    return propagate.extract(headers or {}, getter=_GETTER)


def mark_failed(span: Span, error: BaseException) -> None:
    """Record on ``span`` that its operation ended with ``error``.

    ``error.type`` is the wire code for our errors (low cardinality, as the conventions ask)
    and the class name otherwise. The status becomes ERROR unless the caller was at fault.
    """
    if isinstance(error, ZanddError):
        span.set_attribute(ERROR_TYPE, error.code.value)
        if error.code in CALLER_ERROR_CODES:
            return
        span.set_status(Status(StatusCode.ERROR, error.code.value))
        return
    span.set_attribute(ERROR_TYPE, type(error).__qualname__)
    span.set_status(Status(StatusCode.ERROR, type(error).__qualname__))


def producer_destination(exchange: str, routing_key: str) -> str:
    """``messaging.destination.name`` of a publish: ``{exchange}:{routing key}``, empties
    omitted, ``amq.default`` when both are empty."""
    return ":".join(part for part in (exchange, routing_key) if part) or "amq.default"


def messaging_attributes(
    *,
    operation_type: str,
    operation_name: str,
    destination: str,
    routing_key: str | None,
    message_id: str | None,
    correlation_id: str | None,
) -> dict[str, str | int]:
    """The messaging semantic-convention attributes a RabbitMQ span carries (empties left out)."""
    attributes: dict[str, str | int] = {
        MESSAGING_SYSTEM: RABBITMQ,
        MESSAGING_OPERATION_TYPE: operation_type,
        MESSAGING_OPERATION_NAME: operation_name,
        MESSAGING_DESTINATION_NAME: destination,
    }
    for name, value in (
        (MESSAGING_ROUTING_KEY, routing_key),
        (MESSAGING_MESSAGE_ID, message_id),
        (MESSAGING_CONVERSATION_ID, correlation_id),
    ):
        if value:
            attributes[name] = value
    return attributes


@contextmanager
def producer_span(
    *, exchange: str, routing_key: str, message_id: str | None, correlation_id: str | None
) -> Iterator[dict[str, Any]]:
    """A PRODUCER ("send") span around one publish; yields the headers to publish with.

    The yielded dict already holds this span's ``traceparent``: pass it as the message's
    ``headers`` so the worker's span becomes a child of this one. An exception leaving the
    block is recorded on the span and re-raised.
    """
    destination = producer_destination(exchange, routing_key)
    attributes = messaging_attributes(
        operation_type="send",
        operation_name="publish",
        destination=destination,
        routing_key=routing_key,
        message_id=message_id,
        correlation_id=correlation_id,
    )
    with failing_span(f"publish {destination}", kind=SpanKind.PRODUCER, attributes=attributes):
        headers: dict[str, Any] = {}
        inject(headers)
        yield headers


@contextmanager
def failing_span(
    name: str,
    *,
    kind: SpanKind,
    attributes: Mapping[str, Any] | None = None,
    context: Context | None = None,
    links: Sequence[Link] | None = None,
) -> Iterator[Span]:
    """A current span of ours; an exception leaving the block marks it failed
    (:func:`mark_failed`: our error code, never the exception's text) and is re-raised."""
    with TRACER.start_as_current_span(
        name,
        context=context,
        kind=kind,
        attributes=attributes,
        links=links,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except BaseException as exc:
            mark_failed(span, exc)
            raise
