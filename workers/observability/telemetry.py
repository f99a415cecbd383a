"""Tracing in the workers: the OpenTelemetry SDK set-up, the consumer span, and stage spans.

Exporters, by configuration (``ZANDD_TRACES_EXPORTER`` / ``--traces-exporter``):

- ``none`` (default): an SDK tracer provider that records nothing (sampler ALWAYS_OFF), so a
  span costs little, yet every span still has a real trace id (the producer's when the
  message carried one): log lines stay correlated with the producer's trace.
- ``console``: finished spans as JSON on stderr (stdout stays for command output).
- ``otlp``: OTLP over HTTP/protobuf, configured by the standard ``OTEL_EXPORTER_OTLP_*``
  variables; needs ``pip install 'zandd-hsm[otlp]'``.

The standard ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` variables name the process.

The consumer span uses the message's creation context (the producer span) as its parent, as
the messaging conventions allow for single-message processing, so one trace runs from the
producer through the queue into the worker; it also links to that context, as they recommend.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal, Protocol

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    TraceFlags,
)

from contracts.errors import ConfigurationError
from contracts.tracing import (
    MESSAGING_DELIVERY_TAG,
    extract,
    failing_span,
    messaging_attributes,
)
from workers.observability.stages import Stage, StageTimer

TracesExporter = Literal["none", "console", "otlp"]
DEFAULT_SERVICE_NAME = "zandd"
_UNKNOWN_SERVICE_PREFIX = "unknown_service"


class DeliveryLike(Protocol):
    """What a consumer span reads of a delivery (aio-pika's or the runtime's own view)."""

    @property
    def headers(self) -> Mapping[str, Any] | None: ...
    @property
    def exchange(self) -> str | None: ...
    @property
    def routing_key(self) -> str | None: ...
    @property
    def delivery_tag(self) -> int | None: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def correlation_id(self) -> str | None: ...


def build_span_exporter(name: TracesExporter) -> SpanExporter | None:
    """The span exporter a configuration names; None for ``none``.

    Raises:
        ConfigurationError: ``otlp`` without its package, or an unknown name.
    """
    if name == "none":
        return None
    if name == "console":
        return ConsoleSpanExporter(out=sys.stderr)
    if name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise ConfigurationError(
                "the OTLP trace exporter is not installed: pip install 'zandd-hsm[otlp]'"
            ) from exc
        return OTLPSpanExporter()
    raise ConfigurationError(f"unknown traces exporter {name!r}: use none, console or otlp")


def build_tracer_provider(
    exporter: SpanExporter | None, *, service_name: str = DEFAULT_SERVICE_NAME
) -> TracerProvider:
    """An SDK tracer provider exporting through ``exporter`` (batched); with no exporter it
    records nothing but still gives every span a trace id.

    ``service_name`` applies unless ``OTEL_SERVICE_NAME``/``OTEL_RESOURCE_ATTRIBUTES`` name one.
    With an exporter, sampling is the SDK's default (``OTEL_TRACES_SAMPLER``, else parent-based
    always-on: a request whose producer did not sample it is not recorded here either).
    """
    detected = Resource.create()
    named = str(detected.attributes.get(SERVICE_NAME, ""))
    if named.startswith(_UNKNOWN_SERVICE_PREFIX):
        detected = detected.merge(Resource({SERVICE_NAME: service_name}))
    provider = TracerProvider(resource=detected, sampler=ALWAYS_OFF if exporter is None else None)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def configure_tracing(
    name: TracesExporter, *, service_name: str = DEFAULT_SERVICE_NAME
) -> TracerProvider:
    """Install the process-wide tracer provider for ``name`` (once; later calls keep it).

    The provider flushes its spans when the process exits.
    """
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    provider = build_tracer_provider(build_span_exporter(name), service_name=service_name)
    trace.set_tracer_provider(provider)
    return provider


def consumer_destination(exchange: str, routing_key: str, queue: str) -> str:
    """``messaging.destination.name`` of a delivery: ``{exchange}:{routing key}:{queue}``,
    empties omitted and the queue left out when it equals the routing key."""
    parts = [exchange, routing_key] if routing_key == queue else [exchange, routing_key, queue]
    return ":".join(part for part in parts if part)


@contextmanager
def consumer_span(message: DeliveryLike, *, queue: str) -> Iterator[Span]:
    """The CONSUMER ("process") span of one delivery, current for the block.

    Its parent is the trace context in the message's headers (a new trace when there is
    none). A ``ZanddError`` or other exception leaving the block is recorded and re-raised;
    for a request answered with an error reply, call :func:`contracts.tracing.mark_failed`.
    """
    parent = extract(message.headers)
    parent_context = trace.get_current_span(parent).get_span_context()
    if not recording():
        # Nothing is recorded: skip the SDK's span machinery (attributes, links, sampler) and
        # make current just what the logs need, the trace id, as the SDK's dropped span would.
        with trace.use_span(_unrecorded_span(parent_context), end_on_exit=False) as span:
            yield span
        return
    links = [Link(parent_context)] if parent_context.is_valid else []
    exchange = message.exchange or ""
    routing_key = message.routing_key or ""
    destination = consumer_destination(exchange, routing_key, queue)
    attributes = messaging_attributes(
        operation_type="process",
        operation_name="process",
        destination=destination,
        routing_key=routing_key,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
    )
    if message.delivery_tag is not None:
        attributes[MESSAGING_DELIVERY_TAG] = message.delivery_tag
    with failing_span(
        f"process {destination}",
        kind=SpanKind.CONSUMER,
        attributes=attributes,
        context=parent,
        links=links,
    ) as span:
        yield span


_IDS = RandomIdGenerator()


def _unrecorded_span(parent: SpanContext) -> NonRecordingSpan:
    """What the SDK makes for a span its sampler drops: the parent's trace id (a new one
    without a parent), a span id of its own, not sampled."""
    trace_id = parent.trace_id if parent.is_valid else _IDS.generate_trace_id()
    return NonRecordingSpan(
        SpanContext(
            trace_id,
            _IDS.generate_span_id(),
            is_remote=False,
            trace_flags=TraceFlags(TraceFlags.DEFAULT),
            trace_state=parent.trace_state,
        )
    )


def recording() -> bool:
    """Whether spans are recorded (an SDK provider whose sampler is not always-off)."""
    provider = trace.get_tracer_provider()
    return isinstance(provider, TracerProvider) and provider.sampler is not ALWAYS_OFF


@contextmanager
def stage(
    name: Stage,
    metrics: StageTimer | None = None,
    *,
    attributes: Mapping[str, str | int] | None = None,
) -> Iterator[Span]:
    """A child span ``zandd.<stage>`` around one step of a request, also timed into the
    stage histogram of ``metrics`` when given. Never put key material in ``attributes``.

    With tracing off (exporter ``none``) no span is made: a stage span carries no trace id the
    logs need (the consumer span does), and it would cost more than some stages it measures.
    """
    started = time.perf_counter()
    try:
        if not recording():
            yield trace.INVALID_SPAN
            return
        with failing_span(
            f"zandd.{name.value}", kind=SpanKind.INTERNAL, attributes=attributes
        ) as span:
            yield span
    finally:
        if metrics is not None:
            metrics.observe_stage(name, time.perf_counter() - started)
