"""Prometheus metrics of one worker process, served on ``--metrics-port`` (off by default).

Each worker process has its own endpoint (``zandd up`` gives each child its own port; in
compose every container listens on the same port at its own address). Metric names:

- ``zandd_requests_total{operation, outcome}`` — requests finished on their first delivery;
  ``outcome`` is ``ok`` or the error reply's code (``forbidden``, ``vault_unavailable``…).
  Never counts a request twice: summed over the fleet it counts signatures once.
- ``zandd_requests_redelivered_total{operation, outcome}`` — requests finished that the broker
  had delivered before (a worker lost its connection before acking them). Counted apart, since
  the first delivery may have been answered and counted already (its ack was lost) or not
  (its worker lost the connection mid-request: the common case, which leaves an audit entry
  but no reply). Requests served = the sum of both; distinct requests lie between the first
  and that sum.
- ``zandd_request_duration_seconds{operation}`` — end to end inside the worker, delivery to
  acknowledged reply.
- ``zandd_requests_in_flight`` — deliveries being served now.
- ``zandd_stage_duration_seconds{stage}`` — vault fetch, unseal, TPM operation, signing.
- ``zandd_cache_lookups_total{cache, result}`` — ``result`` is ``hit`` or ``miss``.
- ``zandd_dead_lettered_total{queue, reason}`` — messages this worker rejected to ``zandd.dead``.
- ``zandd_audit_write_failures_total`` — audit entries that could not be written.
- ``zandd_throttled_total{quota}`` — requests refused ``throttled``; ``quota`` is ``requests``
  or ``signatures`` (which per-second quota the principal was over; the log names who).
- ``zandd_vault_records_unreadable`` — key versions of the vault sealed with a KEK this
  worker's ring lacks (checked at start-up, where it refuses to start, and every minute).
- ``zandd_broker_blocked`` — 1 while the broker blocks this worker's request connection (a
  memory or disk alarm; RabbitMQ says so once the worker publishes during one): no new request
  starts. ``zandd_broker_blocks_total`` counts such blocks and
  ``zandd_broker_blocked_seconds_total`` their length (added as each ends).
- ``zandd_build_info{version, python, role}`` — always 1: which zandd and Python a worker runs
  (join on it to see a rollout; ``count by (version) (zandd_build_info)``).
- ``zandd_client_unmatched_replies_total`` — client side: replies no call was waiting for
  (duplicates after a redelivery, late replies after a timeout); see :class:`ClientCollector`.

Every series a worker exports carries a ``role`` label (``keygen`` or ``signer``), added at
scrape time to each sample, so one Prometheus job can tell the roles apart without relying on
target names (``sum by (role) (rate(zandd_requests_total[5m]))``). A ``Metrics`` made without a
role (tests, embedding) adds no label.

``prometheus-client`` rather than OpenTelemetry's Prometheus exporter: it is stable (the
exporter is a pre-release), names series exactly as written here (no unit/``_total`` rewriting
or scope labels) and serves its endpoint from a daemon thread with no extra machinery.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from threading import Thread
from typing import Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from contracts.errors import ConfigurationError
from contracts.operations import Operation
from workers.observability.stages import Stage

OUTCOME_OK = "ok"
ROLE_LABEL = "role"
_DISTRIBUTION = "zandd-hsm"
UNKNOWN_OPERATION_LABEL = "unknown"

# Signing takes ~100 µs, a vault read ~1 ms, a TPM key generation ~100 ms to seconds.
_STAGE_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_REQUEST_BUCKETS_S = (*_STAGE_BUCKETS_S[2:], 30.0)


def operation_label(name: str | None) -> str:
    """The ``operation`` label for a request: a known operation name, else ``unknown``.

    Producers choose the ``type`` they send; echoing it would let them grow the series count.
    """
    try:
        return Operation(name or "").value
    except ValueError:
        return UNKNOWN_OPERATION_LABEL


@dataclass(frozen=True, slots=True)
class MetricsServer:
    """A running metrics endpoint; :meth:`close` stops it."""

    server: WSGIServer
    thread: Thread

    @property
    def port(self) -> int:
        """The port it listens on (useful when started on port 0)."""
        return int(self.server.server_port)

    def close(self) -> None:
        """Stop serving and release the port."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def zandd_version() -> str:
    """The installed zandd-hsm version (``unknown`` when run from a tree never installed)."""
    try:
        return metadata.version(_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


class RoleRegistry(CollectorRegistry):
    """A registry whose every sample carries ``role=<role>``: a constant label that
    ``prometheus-client`` has no option for, added when the registry is collected (a scrape)."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def collect(self) -> Iterator[Metric]:
        """Every metric, each sample with the role label added."""
        for metric in super().collect():
            labelled = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            labelled.samples = [
                Sample(
                    s.name, {**s.labels, ROLE_LABEL: self.role}, s.value, s.timestamp, s.exemplar
                )
                for s in metric.samples
            ]
            yield labelled


class Metrics:
    """The metrics of one worker process, in a registry of its own.

    ``role`` (``keygen``, ``signer``) labels every series it exports; ``registry`` is for tests
    that bring their own (then no role label is added).
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, role: str | None = None
    ) -> None:
        if registry is None:
            registry = RoleRegistry(role) if role is not None else CollectorRegistry()
        self.registry = registry
        self.role = role
        build = Gauge(
            "zandd_build_info",
            "Always 1; its labels name the zandd version and the Python this worker runs.",
            ("version", "python"),
            registry=self.registry,
        )
        build.labels(version=zandd_version(), python=platform.python_version()).set(1)
        self._requests = Counter(
            "zandd_requests",
            "Requests finished, by operation and outcome (ok or the error code).",
            ("operation", "outcome"),
            registry=self.registry,
        )
        self._redelivered = Counter(
            "zandd_requests_redelivered",
            "Requests finished that the broker had delivered before, by operation and outcome "
            "(not in zandd_requests_total, which counts each request once).",
            ("operation", "outcome"),
            registry=self.registry,
        )
        self._request_seconds = Histogram(
            "zandd_request_duration_seconds",
            "Time from delivery to acknowledged reply inside the worker.",
            ("operation",),
            buckets=_REQUEST_BUCKETS_S,
            registry=self.registry,
        )
        self._in_flight = Gauge(
            "zandd_requests_in_flight", "Deliveries being served now.", registry=self.registry
        )
        self._stage_seconds = Histogram(
            "zandd_stage_duration_seconds",
            "Time spent in one step of a request (vault_fetch, unseal, tpm, sign).",
            ("stage",),
            buckets=_STAGE_BUCKETS_S,
            registry=self.registry,
        )
        self._cache = Counter(
            "zandd_cache_lookups",
            "Cache lookups by cache and result (hit or miss).",
            ("cache", "result"),
            registry=self.registry,
        )
        self._dead_lettered = Counter(
            "zandd_dead_lettered",
            "Messages this worker rejected to the dead-letter exchange, by queue and reason.",
            ("queue", "reason"),
            registry=self.registry,
        )
        self._audit_failures = Counter(
            "zandd_audit_write_failures",
            "Audit entries that could not be written.",
            registry=self.registry,
        )
        self._throttled = Counter(
            "zandd_throttled",
            "Requests refused as throttled, by the quota exceeded (requests or signatures).",
            ("quota",),
            registry=self.registry,
        )
        self._audit_head_regressions = Counter(
            "zandd_audit_head_regressions",
            "Times the vault's newest audit entry was older than a head already published.",
            registry=self.registry,
        )
        self._audit_head_seq = Gauge(
            "zandd_audit_head_seq",
            "Sequence number of the newest audit entry this worker wrote (its published head).",
            registry=self.registry,
        )
        self._unreadable = Gauge(
            "zandd_vault_records_unreadable",
            "Key versions of the vault sealed with a KEK that this worker's ring lacks.",
            registry=self.registry,
        )
        self._broker_blocked = Gauge(
            "zandd_broker_blocked",
            "1 while the broker blocks this worker's request connection (a resource alarm).",
            registry=self.registry,
        )
        self._broker_blocks = Counter(
            "zandd_broker_blocks",
            "Times the broker blocked this worker's request connection (a resource alarm).",
            registry=self.registry,
        )
        self._broker_blocked_seconds = Counter(
            "zandd_broker_blocked_seconds",
            "Seconds this worker's request connection was blocked (added as each block ends).",
            registry=self.registry,
        )
        # Per-request series resolved once: a ``labels()`` lookup costs three times the update.
        self._stage_series = {name: self._stage_seconds.labels(stage=name.value) for name in Stage}
        self._request_series: dict[tuple[str, str, bool], tuple[Counter, Histogram]] = {}

    def observe_request(
        self, operation: str, outcome: str, seconds: float, *, redelivered: bool = False
    ) -> None:
        """Count a finished request and its end-to-end duration.

        ``operation`` should come from :func:`operation_label`; ``outcome`` is ``ok`` or the
        error code of the reply. A ``redelivered`` request is counted in
        ``zandd_requests_redelivered_total`` instead of ``zandd_requests_total``.
        """
        series = self._request_series.get((operation, outcome, redelivered))
        if series is None:
            counter = self._redelivered if redelivered else self._requests
            series = (
                counter.labels(operation=operation, outcome=outcome),
                self._request_seconds.labels(operation=operation),
            )
            self._request_series[operation, outcome, redelivered] = series
        count, duration = series
        count.inc()
        duration.observe(seconds)

    @contextmanager
    def in_flight(self) -> Iterator[None]:
        """Count a delivery as in flight for the duration of the block."""
        self._in_flight.inc()
        try:
            yield
        finally:
            self._in_flight.dec()

    def observe_stage(self, stage: Stage, seconds: float) -> None:
        """Record the duration of one stage (``workers.observability.telemetry.stage`` does this for you)."""
        self._stage_series[stage].observe(seconds)

    def cache_lookup(self, cache: str, *, hit: bool) -> None:
        """Count one lookup in the named cache."""
        self._cache.labels(cache=cache, result="hit" if hit else "miss").inc()

    def dead_lettered(self, queue: str, reason: str) -> None:
        """Count a message rejected to the dead-letter exchange (``reason``: low cardinality)."""
        self._dead_lettered.labels(queue=queue, reason=reason).inc()

    def audit_write_failed(self) -> None:
        """Count an audit entry that could not be written."""
        self._audit_failures.inc()

    def throttled(self, quota: str) -> None:
        """Count a request refused ``throttled`` (``quota``: ``requests`` or ``signatures``)."""
        self._throttled.labels(quota=quota).inc()

    def audit_head(self, seq: int) -> None:
        """Record the sequence number of the newest audit entry this worker wrote."""
        self._audit_head_seq.set(seq)

    def audit_head_went_back(self) -> None:
        """Count the audit log found shorter than a head already published."""
        self._audit_head_regressions.inc()

    def vault_records_unreadable(self, count: int) -> None:
        """Set how many key versions the ring cannot open (0 when it opens them all)."""
        self._unreadable.set(count)

    def broker_blocked(self) -> None:
        """The broker blocked the worker's request connection."""
        self._broker_blocked.set(1)
        self._broker_blocks.inc()

    def broker_unblocked(self, seconds: float) -> None:
        """The block ended (unblocked, or the connection went) after ``seconds``."""
        self._broker_blocked.set(0)
        self._broker_blocked_seconds.inc(max(0.0, seconds))

    def serve(self, port: int, host: str = "127.0.0.1") -> MetricsServer:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread.

        Raises:
            ConfigurationError: the port cannot be bound.
        """
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
            ) from exc
        return MetricsServer(server, thread)


class UnmatchedReplies(Protocol):
    """What :class:`ClientCollector` reads: ``contracts.client.SigningClient`` has it."""

    @property
    def unmatched_replies(self) -> int:
        """Replies that arrived for no waiting call."""
        ...


class ClientCollector(Collector):
    """Exposes a client's dropped-reply counter, read at scrape time.

    For a Python producer that serves its own metrics::

        registry.register(ClientCollector(client))
    """

    def __init__(self, client: UnmatchedReplies) -> None:
        self._client = client

    def collect(self) -> Iterable[Metric]:
        """The current value of the client's counter."""
        family = CounterMetricFamily(
            "zandd_client_unmatched_replies",
            "Replies that arrived for no waiting call (duplicates or late replies), dropped.",
        )
        family.add_metric([], float(self._client.unmatched_replies))
        yield family
