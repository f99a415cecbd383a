"""ops/alerts: valid for Prometheus, unit-tested with promtool, and in step with our metrics."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from workers.observability.metrics import ClientCollector, Metrics

ALERTS = Path(__file__).parents[2] / "ops" / "alerts"
RUNBOOK = Path(__file__).parents[2] / "docs" / "operations.md"
RABBITMQ_DETAILED_METRICS = {
    "rabbitmq_detailed_queue_consumers",
    "rabbitmq_detailed_queue_messages",
    "rabbitmq_detailed_queue_messages_ready",
    # The broker's global dead-lettering counters (RabbitMQ 3.10+, /metrics).
    "rabbitmq_global_messages_dead_lettered_rejected_total",
    "rabbitmq_global_messages_dead_lettered_delivery_limit_total",
}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.skip(
            "promtool is not installed (ops/lib.sh installs it: apt-get install prometheus)"
        )
    return subprocess.run(
        ["promtool", *args], cwd=ALERTS, capture_output=True, text=True, timeout=120
    )


def test_promtool_accepts_the_rules_and_the_scrape_config() -> None:
    for args in (("check", "rules", "zandd.rules.yml"), ("check", "config", "prometheus.yml")):
        result = _promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_alert_unit_tests_pass() -> None:
    result = _promtool("test", "rules", "zandd.rules.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def _rules() -> list[dict[str, str]]:
    groups = yaml.safe_load((ALERTS / "zandd.rules.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_metric_the_rules_use_exists() -> None:
    metrics = Metrics()
    metrics.registry.register(ClientCollector(type("Client", (), {"unmatched_replies": 0})()))
    ours = {sample.name for family in metrics.registry.collect() for sample in family.samples} | {
        # Families without a sample until first used (labelled counters and histograms).
        f"{family.name}{suffix}"
        for family in metrics.registry.collect()
        for suffix in ("_total", "_bucket", "_count", "_sum")
    }
    used = set()
    for rule in _rules():
        used |= set(re.findall(r"\b((?:zandd|rabbitmq)_[a-z_]+)\b", rule["expr"]))
    assert used, "the rules use no metric?"
    unknown = {name for name in used if not (name in ours or name in RABBITMQ_DETAILED_METRICS)}
    assert not unknown, f"metrics no one exports: {sorted(unknown)}"


def test_every_alert_has_a_runbook_section() -> None:
    runbook = RUNBOOK.read_text()
    headings = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in runbook.splitlines()
        if line.startswith("#")
    }
    for rule in _rules():
        anchor = rule["annotations"]["runbook_url"].split("#", 1)[1]
        assert rule["annotations"]["runbook_url"].startswith("docs/operations.md#")
        assert anchor == rule["alert"].lower()
        assert anchor in headings, f"docs/operations.md has no section for {rule['alert']}"
