"""Prometheus metrics: recorded values reach the HTTP endpoint a scraper reads (loopback only)."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from contracts.errors import ConfigurationError
from tests.support.net import free_port
from workers.observability.metrics import ClientCollector, Metrics, MetricsServer, operation_label
from workers.observability.stages import Stage


@pytest.fixture
def metrics() -> Iterator[tuple[Metrics, MetricsServer]]:
    metrics = Metrics()
    server = metrics.serve(free_port())
    try:
        yield metrics, server
    finally:
        server.close()


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_recorded_values_are_scraped_over_http(metrics: tuple[Metrics, MetricsServer]) -> None:
    recorder, server = metrics
    recorder.observe_request("sign", "ok", 0.002)
    recorder.observe_request("sign", "ok", 0.004)
    recorder.observe_request("sign", "forbidden", 0.001)
    recorder.observe_request("key.create", "ok", 0.3)
    recorder.observe_request("sign", "ok", 0.003, redelivered=True)
    recorder.observe_stage(Stage.VAULT_FETCH, 0.0007)
    recorder.observe_stage(Stage.TPM, 0.25)
    recorder.cache_lookup("keys", hit=True)
    recorder.cache_lookup("keys", hit=True)
    recorder.cache_lookup("keys", hit=False)
    recorder.dead_lettered("zandd.sign", "rejected")
    recorder.audit_write_failed()
    with recorder.in_flight(), recorder.in_flight():
        during = _scrape(server.port)
    after = _scrape(server.port)

    assert during[("zandd_requests_in_flight", ())] == 2
    assert after[("zandd_requests_in_flight", ())] == 0
    assert after[("zandd_requests_total", (("operation", "sign"), ("outcome", "ok")))] == 2
    assert after[("zandd_requests_total", (("operation", "sign"), ("outcome", "forbidden")))] == 1
    # A redelivered request is counted apart, never twice in zandd_requests_total.
    redelivered = ("zandd_requests_redelivered_total", (("operation", "sign"), ("outcome", "ok")))
    assert after[redelivered] == 1
    assert after[("zandd_request_duration_seconds_count", (("operation", "sign"),))] == 4
    assert after[("zandd_request_duration_seconds_sum", (("operation", "sign"),))] == pytest.approx(
        0.010
    )
    assert after[("zandd_request_duration_seconds_count", (("operation", "key.create"),))] == 1
    # 0.3 s lands above the 0.25 s bucket and within the 0.5 s one.
    key_create_bucket = (
        "zandd_request_duration_seconds_bucket",
        (("le", "0.25"), ("operation", "key.create")),
    )
    assert after[key_create_bucket] == 0
    assert after[(key_create_bucket[0], (("le", "0.5"), ("operation", "key.create")))] == 1
    assert after[("zandd_stage_duration_seconds_count", (("stage", "vault_fetch"),))] == 1
    assert after[("zandd_stage_duration_seconds_count", (("stage", "tpm"),))] == 1
    assert after[("zandd_cache_lookups_total", (("cache", "keys"), ("result", "hit")))] == 2
    assert after[("zandd_cache_lookups_total", (("cache", "keys"), ("result", "miss")))] == 1
    assert (
        after[("zandd_dead_lettered_total", (("queue", "zandd.sign"), ("reason", "rejected")))] == 1
    )
    assert after[("zandd_audit_write_failures_total", ())] == 1


def test_the_client_collector_reads_the_client_counter_at_scrape_time() -> None:
    class FakeClient:
        unmatched_replies = 0

    client = FakeClient()
    registry = CollectorRegistry()
    registry.register(ClientCollector(client))
    assert registry.get_sample_value("zandd_client_unmatched_replies_total") == 0
    client.unmatched_replies = 3
    assert registry.get_sample_value("zandd_client_unmatched_replies_total") == 3


def test_two_workers_in_one_process_keep_separate_registries() -> None:
    first, second = Metrics(), Metrics()
    first.observe_request("sign", "ok", 0.001)
    assert (
        first.registry.get_sample_value(
            "zandd_requests_total", {"operation": "sign", "outcome": "ok"}
        )
        == 1
    )
    assert (
        second.registry.get_sample_value(
            "zandd_requests_total", {"operation": "sign", "outcome": "ok"}
        )
        is None
    )


def test_a_port_in_use_is_a_configuration_error(metrics: tuple[Metrics, MetricsServer]) -> None:
    _, server = metrics
    with pytest.raises(
        ConfigurationError, match=f"cannot serve metrics on 127.0.0.1:{server.port}"
    ):
        Metrics().serve(server.port)


def test_operation_labels_are_bounded() -> None:
    assert operation_label("sign.batch") == "sign.batch"
    assert operation_label("drop table keys") == "unknown"
    assert operation_label(None) == "unknown"


def test_a_role_labels_every_series_and_build_info_names_the_versions() -> None:
    import platform

    from prometheus_client import generate_latest

    from workers.observability.metrics import zandd_version

    recorder = Metrics(role="signer")
    recorder.observe_request("sign", "ok", 0.01)
    recorder.cache_lookup("records", hit=True)
    recorder.broker_blocked()
    text = generate_latest(recorder.registry).decode()
    samples = [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("zandd_")
    ]
    assert len(samples) > 20
    assert all(sample.labels.get("role") == "signer" for sample in samples)
    (build,) = [sample for sample in samples if sample.name == "zandd_build_info"]
    assert build.labels == {
        "version": zandd_version(),
        "python": platform.python_version(),
        "role": "signer",
    }
    assert build.value == 1.0
    assert zandd_version() != "unknown"  # the project is installed in its venv


def test_without_a_role_no_label_is_added() -> None:
    recorder = Metrics()
    recorder.observe_request("sign", "ok", 0.01)
    labels = [
        sample.labels
        for family in recorder.registry.collect()
        for sample in family.samples
        if sample.name == "zandd_requests_total"
    ]
    assert labels == [{"operation": "sign", "outcome": "ok"}]
