"""Finished spans in memory, for tests: one SDK tracer provider per test process.

OpenTelemetry lets a process set its global tracer provider once, so every test that looks
at spans shares this one exporter (cleared around each test by the ``spans`` fixture).
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

_EXPORTER = InMemorySpanExporter()
_installed: list[TracerProvider] = []


def memory_exporter() -> InMemorySpanExporter:
    """The process-wide in-memory exporter, installed on the global SDK provider first time."""
    if not _installed:
        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):
            provider = TracerProvider()
            trace.set_tracer_provider(provider)
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        _installed.append(provider)
    return _EXPORTER


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    """The one finished span called ``name``."""
    matching = [span for span in spans if span.name == name]
    assert len(matching) == 1, f"{len(matching)} spans named {name!r} in {[s.name for s in spans]}"
    return matching[0]
