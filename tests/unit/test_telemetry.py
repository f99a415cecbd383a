"""Tracing: W3C context through AMQP headers, messaging attributes, exporters (no network)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import aio_pika
import pytest
from aiormq.abc import DeliveredMessage
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import ConsoleSpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from pamqp import commands, frame, header

from contracts.errors import ConfigurationError, KeyNotFound, VaultUnavailable
from contracts.tracing import extract, mark_failed, producer_destination, producer_span
from tests.support.spans import by_name
from workers.observability.logs import current_trace_id
from workers.observability.metrics import Metrics
from workers.observability.telemetry import (
    Stage,
    build_span_exporter,
    build_tracer_provider,
    consumer_destination,
    consumer_span,
    stage,
)


def _delivered(
    headers: dict[str, Any] | None, *, routing_key: str = "sign", message_id: str = "req-1"
) -> aio_pika.IncomingMessage:
    """An incoming message whose properties went through AMQP frame encoding and back."""
    properties = commands.Basic.Properties(
        headers=headers, message_id=message_id, correlation_id="corr-1", message_type=routing_key
    )
    wire = frame.marshal(header.ContentHeader(0, 2, properties), 1)
    _, _, decoded = frame.unmarshal(wire)
    assert isinstance(decoded, header.ContentHeader)
    deliver = commands.Basic.Deliver(
        consumer_tag="ctag", delivery_tag=7, exchange="zandd", routing_key=routing_key
    )
    return aio_pika.IncomingMessage(
        DeliveredMessage(delivery=deliver, header=decoded, body=b"{}", channel=None)  # type: ignore[arg-type]
    )


def _hex_trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.trace_id:032x}"


def test_one_trace_runs_from_the_producer_span_through_amqp_headers_into_the_worker(
    spans: InMemorySpanExporter,
) -> None:
    with producer_span(
        exchange="zandd", routing_key="sign", message_id="req-1", correlation_id="corr-1"
    ) as headers:
        message = _delivered(headers)
    with (
        consumer_span(message, queue="zandd.sign"),
        stage(Stage.VAULT_FETCH, attributes={"zandd.key.id": "zk-1"}),
    ):
        pass

    finished = spans.get_finished_spans()
    producer = by_name(finished, "publish zandd:sign")
    consumer = by_name(finished, "process zandd:sign:zandd.sign")
    fetch = by_name(finished, "zandd.vault_fetch")
    assert producer.context is not None
    assert consumer.context is not None
    assert _hex_trace(producer) == _hex_trace(consumer) == _hex_trace(fetch)
    assert headers["traceparent"].split("-")[1] == _hex_trace(producer)
    assert consumer.parent is not None
    assert consumer.parent.span_id == producer.context.span_id
    assert fetch.parent is not None
    assert fetch.parent.span_id == consumer.context.span_id
    assert [link.context.span_id for link in consumer.links] == [producer.context.span_id]

    assert producer.kind is SpanKind.PRODUCER
    assert dict(producer.attributes or {}) == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": "zandd:sign",
        "messaging.rabbitmq.destination.routing_key": "sign",
        "messaging.message.id": "req-1",
        "messaging.message.conversation_id": "corr-1",
    }
    assert consumer.kind is SpanKind.CONSUMER
    assert dict(consumer.attributes or {}) == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "zandd:sign:zandd.sign",
        "messaging.rabbitmq.destination.routing_key": "sign",
        "messaging.rabbitmq.message.delivery_tag": 7,
        "messaging.message.id": "req-1",
        "messaging.message.conversation_id": "corr-1",
    }
    assert fetch.kind is SpanKind.INTERNAL
    assert dict(fetch.attributes or {}) == {"zandd.key.id": "zk-1"}


@pytest.mark.parametrize(
    "headers",
    [None, {}, {"traceparent": "not a trace context"}, {"traceparent": bytearray(b"\xff\xfe")}],
    ids=["no-headers", "empty", "garbage", "not-ascii"],
)
def test_a_message_without_a_usable_traceparent_starts_a_new_trace(
    spans: InMemorySpanExporter, headers: dict[str, Any] | None
) -> None:
    with consumer_span(_delivered(headers), queue="zandd.sign"):
        pass
    (consumer,) = spans.get_finished_spans()
    assert consumer.parent is None
    assert consumer.links == ()
    assert consumer.context is not None
    assert consumer.context.is_valid


def test_a_traceparent_sent_as_bytes_is_still_read() -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    for value in (traceparent.encode(), bytearray(traceparent.encode())):
        context = extract({"traceparent": value})
        span_context = trace.get_current_span(context).get_span_context()
        assert f"{span_context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"


def test_errors_set_error_type_and_the_status_only_for_service_faults(
    spans: InMemorySpanExporter,
) -> None:
    with consumer_span(_delivered(None, message_id="a"), queue="zandd.sign") as span:
        mark_failed(span, KeyNotFound("no key zk-1"))
    with consumer_span(_delivered(None, message_id="b"), queue="zandd.sign") as span:
        mark_failed(span, VaultUnavailable("vault down"))
    with (
        pytest.raises(RuntimeError),
        consumer_span(_delivered(None, message_id="c"), queue="zandd.sign"),
    ):
        raise RuntimeError("boom")

    caller, fault, crash = sorted(
        spans.get_finished_spans(), key=lambda s: str((s.attributes or {})["messaging.message.id"])
    )
    assert (caller.attributes or {})["error.type"] == "key_not_found"
    assert caller.status.status_code is StatusCode.UNSET
    assert (fault.attributes or {})["error.type"] == "vault_unavailable"
    assert fault.status.status_code is StatusCode.ERROR
    assert (crash.attributes or {})["error.type"] == "RuntimeError"
    assert crash.status.status_code is StatusCode.ERROR
    assert not crash.events, "exception events could carry foreign messages: none recorded"


def test_a_failed_publish_is_recorded_on_the_producer_span(spans: InMemorySpanExporter) -> None:
    with (
        pytest.raises(VaultUnavailable),
        producer_span(exchange="zandd", routing_key="sign", message_id=None, correlation_id=None),
    ):
        raise VaultUnavailable("x")
    (producer,) = spans.get_finished_spans()
    assert (producer.attributes or {})["error.type"] == "vault_unavailable"
    assert "messaging.message.id" not in (producer.attributes or {})


def test_a_stage_is_timed_into_the_stage_histogram(spans: InMemorySpanExporter) -> None:
    metrics = Metrics()
    with stage(Stage.SIGN, metrics), stage(Stage.TPM, metrics):
        pass
    with pytest.raises(KeyNotFound), stage(Stage.VAULT_FETCH, metrics):
        raise KeyNotFound("gone")
    for name in ("sign", "tpm", "vault_fetch"):
        count = metrics.registry.get_sample_value(
            "zandd_stage_duration_seconds_count", {"stage": name}
        )
        assert count == 1, name
    assert by_name(spans.get_finished_spans(), "zandd.vault_fetch").attributes == {
        "error.type": "key_not_found"
    }


@pytest.mark.parametrize(
    ("exchange", "routing_key", "expected"),
    [
        ("zandd", "sign", "zandd:sign"),
        ("", "zandd.reply.x", "zandd.reply.x"),
        ("", "", "amq.default"),
    ],
)
def test_producer_destination_follows_the_rabbitmq_convention(
    exchange: str, routing_key: str, expected: str
) -> None:
    assert producer_destination(exchange, routing_key) == expected


@pytest.mark.parametrize(
    ("exchange", "routing_key", "queue", "expected"),
    [
        ("zandd", "key.create", "zandd.keygen", "zandd:key.create:zandd.keygen"),
        ("", "zandd.sign", "zandd.sign", "zandd.sign"),
        ("zandd.dead", "", "zandd.dead", "zandd.dead:zandd.dead"),
    ],
)
def test_consumer_destination_follows_the_rabbitmq_convention(
    exchange: str, routing_key: str, queue: str, expected: str
) -> None:
    assert consumer_destination(exchange, routing_key, queue) == expected


def test_exporters_by_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    assert build_span_exporter("none") is None
    assert isinstance(build_span_exporter("console"), ConsoleSpanExporter)
    assert isinstance(build_span_exporter("otlp"), OTLPSpanExporter)
    with pytest.raises(ConfigurationError, match="unknown traces exporter"):
        build_span_exporter("jaeger")  # type: ignore[arg-type]
    # A None entry in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'zandd-hsm\[otlp\]'"):
        build_span_exporter("otlp")


def test_the_console_exporter_writes_finished_spans_to_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    provider = build_tracer_provider(build_span_exporter("console"), service_name="zandd-test")
    with provider.get_tracer("test").start_as_current_span("console-probe"):
        pass
    provider.shutdown()
    captured = capsys.readouterr()
    assert '"name": "console-probe"' in captured.err
    assert '"service.name": "zandd-test"' in captured.err
    assert captured.out == ""


def test_otel_service_name_wins_over_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    assert build_tracer_provider(None).resource.attributes["service.name"] == "zandd"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "zandd-signer")
    assert build_tracer_provider(None).resource.attributes["service.name"] == "zandd-signer"


def test_contracts_tracing_needs_only_the_opentelemetry_api() -> None:
    code = (
        "import sys, contracts.tracing, contracts.client; "
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_without_an_exporter_nothing_is_recorded_but_trace_ids_still_flow() -> None:
    provider = build_tracer_provider(None)
    tracer = provider.get_tracer("test")
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with tracer.start_as_current_span(
        "child", context=extract({"traceparent": traceparent})
    ) as span:
        assert not span.is_recording()
        assert current_trace_id() == "0af7651916cd43dd8448eb211c80319c"
    with tracer.start_as_current_span("root") as root:
        assert not root.is_recording()
        assert root.get_span_context().is_valid


def test_with_tracing_off_the_consumer_span_carries_the_producer_trace_id_and_records_nothing(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("workers.observability.telemetry.recording", lambda: False)
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with consumer_span(_delivered({"traceparent": traceparent}), queue="zandd.sign") as span:
        assert not span.is_recording()
        assert current_trace_id() == "0af7651916cd43dd8448eb211c80319c"
        assert f"{span.get_span_context().span_id:016x}" != "b7ad6b7169203331"
    ids = set()
    for _ in range(2):
        with consumer_span(_delivered(None), queue="zandd.sign") as span:
            assert span.get_span_context().is_valid
            ids.add(current_trace_id())
    assert None not in ids
    assert len(ids) == 2  # a new trace per request without a traceparent
    assert current_trace_id() is None
    assert spans.get_finished_spans() == ()
