"""The benchmark's results as a table for people and as one JSON object for tools.

The JSON object has exactly the fields issue #5 lists, for the first fleet size measured. When
several sizes were measured (``--signers 1,2,4``) it also has ``"scaling"``: one entry per
size, in the order given, each ``{"signers": n, "echo", "echo_serial", "sign",
"sign_serial", "batch"}`` with the same inner fields as the top level. ``keygen`` and the
in-process scenarios do not depend on the number of signers and are measured once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from workers.bench.in_process import InProcessResults
from workers.bench.many_keys import MANY_KEYS_BOUND
from workers.bench.measure import Run
from workers.bench.queue_scenarios import ITEMS_PER_MESSAGE, FleetResults
from workers.bench.shards import ShardResults

_MS_DIGITS = 4
_RATE_DIGITS = 1


def _ms(value: float) -> float:
    return round(value, _MS_DIGITS)


def _rate(value: float) -> float:
    return round(value, _RATE_DIGITS)


@dataclass(frozen=True, slots=True)
class BenchReport:
    """Everything one ``zandd bench`` run measured."""

    where: str
    duration_s: float
    warmup_s: float
    fleets: tuple[FleetResults, ...]
    keygen: Run
    in_process: InProcessResults
    #: ``sign`` again with the workers on the other transport (``ZANDD_TRANSPORT``): its name
    #: and run; None with ``--attach`` (the running fleet's transport is what it is).
    other_transport: tuple[str, Run] | None = None
    #: The sharded option (``ZANDD_SIGN_SHARDS``) beside the targets, never one of them:
    #: its results, or why it was skipped (a broker without the plugin).
    shards: ShardResults | str | None = None

    @property
    def first(self) -> FleetResults:
        """The fleet size the top-level figures and the targets are about."""
        return self.fleets[0]

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``zandd bench --json``."""
        local = self.in_process
        document: dict[str, Any] = {
            **_fleet_json(self.first),
            "tpm_only": {
                "ops_per_s": _rate(local.tpm_only.per_s),
                "p50_ms": _ms(local.tpm_only.p50_ms),
            },
            "hybrid": {"p50_ms": _ms(local.hybrid.p50_ms)},
            "tpm_protection": {
                "ops_per_s": _rate(local.tpm_protection.per_s),
                "p50_ms": _ms(local.tpm_protection.p50_ms),
            },
            "keygen": {"p50_ms": _ms(self.keygen.p50_ms), "p99_ms": _ms(self.keygen.p99_ms)},
            "crypto_limit": {"signatures_per_s": _rate(local.crypto_limit.per_s)},
            "signers": self.first.signers,
        }
        many = _many_keys_json(self.first)
        if many is not None:
            document["sign_many_keys"] = many
        if self.other_transport is not None:
            name, run = self.other_transport
            document["sign_other_transport"] = {"transport": name, **_throughput_json(run)}
        if isinstance(self.shards, str):
            document["shards"] = {"skipped": self.shards}
        elif self.shards is not None:
            document["shards"] = _shards_json(self.shards)
        if local.algorithms:
            document["algorithms"] = {
                runs.algorithm: {
                    "sign": {"ops_per_s": _rate(runs.sign.per_s), "p50_ms": _ms(runs.sign.p50_ms)},
                    "keygen": {
                        "p50_ms": _ms(runs.keygen.p50_ms),
                        "p99_ms": _ms(runs.keygen.p99_ms),
                        "keys": runs.keygen.operations,
                    },
                }
                for runs in local.algorithms
            }
        if len(self.fleets) > 1:
            document["scaling"] = [
                {"signers": fleet.signers, **_fleet_json(fleet)} for fleet in self.fleets
            ]
        return document


def _many_keys_json(fleet: FleetResults) -> dict[str, Any] | None:
    """``sign_many_keys`` beside ``sign`` (issue 15): its ratio to the one-key ``sign``."""
    if fleet.sign_many_keys is None or fleet.key_set is None:
        return None
    return {
        "keys": len(fleet.key_set.key_ids),
        "created": fleet.key_set.created,
        **_throughput_json(fleet.sign_many_keys),
        "ratio_to_sign": round(fleet.sign_many_keys.per_s / fleet.sign.per_s, 3),
    }


def many_keys_check(report: BenchReport) -> Target | None:
    """``sign_many_keys.rps / sign.rps ≥ 0.8`` (issue 15): beside the targets, not one of them."""
    fleet = report.first
    if fleet.sign_many_keys is None or fleet.key_set is None:
        return None
    return _ratio_at_least(
        f"sign_many_keys.rps / sign.rps ≥ {MANY_KEYS_BOUND} ({len(fleet.key_set.key_ids):,} keys)",
        fleet.sign_many_keys.per_s / fleet.sign.per_s,
        MANY_KEYS_BOUND,
    )


def _shards_json(shards: ShardResults) -> dict[str, Any]:
    document: dict[str, Any] = {
        "shards": shards.shards,
        "route_one_queue": _throughput_json(shards.route_one),
        "route_sharded": _throughput_json(shards.route_sharded),
    }
    if shards.sign_one is not None and shards.sign_sharded is not None:
        document["sign_one_queue"] = _throughput_json(shards.sign_one)
        document["sign_sharded"] = _throughput_json(shards.sign_sharded)
    return document


def _shard_rows(report: BenchReport) -> list[str]:
    shards = report.shards
    if shards is None:
        return []
    if isinstance(shards, str):
        return [f"{'sharded':<15} skipped: {shards}"]
    n = shards.shards
    rows = [
        _row("route", "1 queue", f"{shards.route_one.per_s:,.0f} msg/s", shards.route_one),
        _row(
            "route", f"{n} queues", f"{shards.route_sharded.per_s:,.0f} msg/s", shards.route_sharded
        ),
    ]
    if shards.sign_one is not None and shards.sign_sharded is not None:
        signers = _plural(report.first.signers, "signer")
        rows += [
            _row("sign (1 queue)", signers, f"{shards.sign_one.per_s:,.0f} req/s", shards.sign_one),
            _row(
                f"sign ({n} shards)",
                signers,
                f"{shards.sign_sharded.per_s:,.0f} req/s",
                shards.sign_sharded,
            ),
        ]
    return rows


def _fleet_json(fleet: FleetResults) -> dict[str, Any]:
    return {
        "echo": _throughput_json(fleet.echo),
        "echo_serial": _latency_json(fleet.echo_serial),
        "sign": _throughput_json(fleet.sign),
        "sign_serial": _latency_json(fleet.sign_serial),
        "batch": {
            "signatures_per_s": _rate(fleet.batch.per_s * ITEMS_PER_MESSAGE),
            "items_per_message": ITEMS_PER_MESSAGE,
        },
    }


def _throughput_json(run: Run) -> dict[str, float]:
    return {"rps": _rate(run.per_s), "p50_ms": _ms(run.p50_ms), "p99_ms": _ms(run.p99_ms)}


def _latency_json(run: Run) -> dict[str, float]:
    return {"p50_ms": _ms(run.p50_ms), "p99_ms": _ms(run.p99_ms)}


@dataclass(frozen=True, slots=True)
class Target:
    """One of the issue's speed targets and how this run fared against it."""

    claim: str
    value: float
    shown: str
    met: bool


def _ratio_at_least(claim: str, value: float, bound: float) -> Target:
    return Target(claim, value, f"{value:.2f}", value >= bound)


def targets(report: BenchReport) -> list[Target]:
    """The issue's targets for the first fleet size: informational, never an exit code."""
    fleet, local = report.first, report.in_process
    batch_signatures_per_s = fleet.batch.per_s * ITEMS_PER_MESSAGE
    serial_ratio = fleet.sign_serial.p50_ms / fleet.echo_serial.p50_ms
    return [
        _ratio_at_least("sign.rps / echo.rps ≥ 1 (aim: 2)", fleet.sign.per_s / fleet.echo.per_s, 1),
        Target(
            "sign_serial.p50 / echo_serial.p50 ≤ 1.5",
            serial_ratio,
            f"{serial_ratio:.2f}",
            serial_ratio <= 1.5,
        ),
        Target(
            "batch ≥ 10,000 signatures/s",
            batch_signatures_per_s,
            f"{batch_signatures_per_s:,.0f}",
            batch_signatures_per_s >= 10_000,
        ),
        _ratio_at_least(
            "tpm_only.p50 / hybrid.p50 ≥ 16", local.tpm_only.p50_ms / local.hybrid.p50_ms, 16
        ),
        Target(
            "keygen.p50 ≤ 40 ms",
            report.keygen.p50_ms,
            f"{report.keygen.p50_ms:.1f} ms",
            report.keygen.p50_ms <= 40,
        ),
    ]


def _row(name: str, where: str, rate: str, run: Run | None) -> str:
    p50 = f"{run.p50_ms:9.3f}" if run else f"{'':9}"
    p99 = f"{run.p99_ms:9.3f}" if run else f"{'':9}"
    return f"{name:<15} {where:<14} {rate:>24} {p50} {p99}"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


def _fleet_rows(fleet: FleetResults) -> list[str]:
    consumers = _plural(fleet.signers, "consumer")
    signers = _plural(fleet.signers, "signer")
    batch_rate = fleet.batch.per_s * ITEMS_PER_MESSAGE
    many = (
        [
            _row(
                "sign_many_keys",
                f"{len(fleet.key_set.key_ids):,} keys",
                f"{fleet.sign_many_keys.per_s:,.0f} req/s",
                fleet.sign_many_keys,
            )
        ]
        if fleet.sign_many_keys is not None and fleet.key_set is not None
        else []
    )
    return [
        _row("echo", consumers, f"{fleet.echo.per_s:,.0f} req/s", fleet.echo),
        _row("echo_serial", consumers, f"{fleet.echo_serial.per_s:,.0f} req/s", fleet.echo_serial),
        _row("sign", signers, f"{fleet.sign.per_s:,.0f} req/s", fleet.sign),
        *many,
        _row("sign_serial", signers, f"{fleet.sign_serial.per_s:,.0f} req/s", fleet.sign_serial),
        _row("batch", signers, f"{batch_rate:,.0f} signatures/s", fleet.batch),
    ]


def _other_transport_rows(report: BenchReport) -> list[str]:
    if report.other_transport is None:
        return []
    name, run = report.other_transport
    return [
        _row(
            f"sign ({name})",
            _plural(report.first.signers, "signer"),
            f"{run.per_s:,.0f} req/s",
            run,
        )
    ]


def render_table(report: BenchReport) -> str:
    """The human-readable report: scenarios, scaling, targets."""
    local = report.in_process
    lines = [
        f"zandd bench: {report.where}; {report.duration_s:g} s per scenario "
        f"after {report.warmup_s:g} s of warm-up",
        "",
        f"{'scenario':<15} {'where':<14} {'rate':>24} {'p50 ms':>9} {'p99 ms':>9}",
        *_fleet_rows(report.first),
        *_other_transport_rows(report),
        _row("keygen", "keygen worker", f"{report.keygen.per_s:,.1f} keys/s", report.keygen),
        _row("crypto_limit", "in process", f"{local.crypto_limit.per_s:,.0f} sign+verify/s", None),
        _row("hybrid", "in process", f"{local.hybrid.per_s:,.0f} ops/s", local.hybrid),
        _row("tpm_only", "in process", f"{local.tpm_only.per_s:,.0f} ops/s", local.tpm_only),
        _row(
            "tpm_protection",
            "in process",
            f"{local.tpm_protection.per_s:,.0f} ops/s",
            local.tpm_protection,
        ),
        *_algorithm_rows(report),
        *(["", "sharded sign path (ZANDD_SIGN_SHARDS; not a target):"] if report.shards else []),
        *_shard_rows(report),
        "",
        f"batch: {ITEMS_PER_MESSAGE} items per message, latencies per message; "
        "rates are completed operations per second of wall time",
    ]
    if len(report.fleets) > 1:
        lines += ["", *_scaling_lines(report.fleets)]
    lines += ["", "targets (informational):"]
    lines += [
        f"  {'pass' if target.met else 'FAIL'}  {target.claim:<42} {target.shown:>10}"
        for target in targets(report)
    ]
    check = many_keys_check(report)
    if check is not None:
        lines += [
            "beside the targets (issue 15):",
            f"  {'pass' if check.met else 'FAIL'}  {check.claim:<42} {check.shown:>10}",
        ]
    return "\n".join(lines)


def _algorithm_rows(report: BenchReport) -> list[str]:
    """Each algorithm's sign (in process, one core) and keygen (keygen handler, TPM) rows."""
    algorithms = report.in_process.algorithms
    if not algorithms:
        return []
    rows = [
        "",
        "algorithms (in process, not targets; sign: open+sign+verify on one core, "
        "keygen: TPM→certify→export→seal→store):",
    ]
    for runs in algorithms:
        rows.append(f"  {runs.algorithm}")
        rows.append(_row("    sign", "in process", f"{runs.sign.per_s:,.0f} ops/s", runs.sign))
        rows.append(
            _row("    keygen", "keygen handler", f"{runs.keygen.per_s:,.1f} keys/s", runs.keygen)
        )
    return rows


def _scaling_lines(fleets: tuple[FleetResults, ...]) -> list[str]:
    base = fleets[0]
    columns: list[tuple[str, Callable[[FleetResults], float]]] = [
        ("echo req/s", lambda f: f.echo.per_s),
        ("sign req/s", lambda f: f.sign.per_s),
        ("batch sig/s", lambda f: f.batch.per_s * ITEMS_PER_MESSAGE),
    ]
    header = f"{'signers':>7} " + " ".join(f"{name:>20}" for name, _ in columns)
    lines = ["scaling (x = against the first size):", header]
    for fleet in fleets:
        cells = [
            f"{value(fleet):>11,.0f} ({value(fleet) / value(base):4.2f}x)" for _, value in columns
        ]
        lines.append(f"{fleet.signers:>7} " + " ".join(f"{cell:>20}" for cell in cells))
    return lines
