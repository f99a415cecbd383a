"""``zandd bench`` as a user runs it: it completes, reports every field, and cleans up.

The figures' values are not checked (no test asserts a speed): only that each is a positive
number, and that the run leaves no vhost, queue or process behind.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from contracts.algorithms import ALGORITHMS
from tests.support.broker import rabbitmqctl
from tests.support.cli import environment, zandd
from tests.support.fleet import RunningFleet
from workers.bench.algorithms import AlgorithmRuns
from workers.bench.in_process import InProcessResults
from workers.bench.many_keys import MANY_KEYS_LABEL, KeySet
from workers.bench.measure import Run
from workers.bench.queue_scenarios import FleetResults
from workers.bench.report import BenchReport, many_keys_check, render_table, targets

TINY_RUN = (
    "--json",
    *("--duration-s", "0.3", "--warmup-s", "0.05", "--max-keys", "3", "--many-keys", "3"),
)
#: issue 15: ``sign_many_keys`` beside ``sign`` (the first fleet size only).
MANY_KEYS_FIELDS = {"keys", "created", "rps", "p50_ms", "p99_ms", "ratio_to_sign"}

FLEET_FIELDS = {
    "echo": {"rps", "p50_ms", "p99_ms"},
    "echo_serial": {"p50_ms", "p99_ms"},
    "sign": {"rps", "p50_ms", "p99_ms"},
    "sign_serial": {"p50_ms", "p99_ms"},
    "batch": {"signatures_per_s", "items_per_message"},
}
FIELDS = {
    **FLEET_FIELDS,
    "tpm_only": {"ops_per_s", "p50_ms"},
    "hybrid": {"p50_ms"},
    "tpm_protection": {"ops_per_s", "p50_ms"},
    "keygen": {"p50_ms", "p99_ms"},
    "crypto_limit": {"signatures_per_s"},
}


async def zandd_bench(*args: str, amqp_url: str) -> tuple[int, str, str]:
    """Run ``zandd bench`` without blocking the event loop (an in-process fleet may serve it)."""
    return await zandd("bench", *args, env=environment(ZANDD_AMQP_URL=amqp_url), timeout_s=240)


def assert_positive_fields(document: dict[str, Any], fields: dict[str, set[str]]) -> None:
    for scenario, names in fields.items():
        assert set(document[scenario]) == names, scenario
        for name in names:
            value = document[scenario][name]
            assert isinstance(value, int | float), f"{scenario}.{name}"
            assert value > 0, f"{scenario}.{name} = {value}"


def assert_many_keys(document: dict[str, Any], *, keys: int) -> dict[str, Any]:
    """``sign_many_keys`` has every field, positive, over ``keys`` keys."""
    many: dict[str, Any] = document["sign_many_keys"]
    assert set(many) == MANY_KEYS_FIELDS
    assert many["keys"] == keys
    assert 0 <= many["created"] <= keys
    for name in MANY_KEYS_FIELDS - {"created"}:
        assert isinstance(many[name], int | float), name
        assert many[name] > 0, f"sign_many_keys.{name} = {many[name]}"
    assert many["ratio_to_sign"] == pytest.approx(many["rps"] / document["sign"]["rps"], abs=0.01)
    return many


def assert_algorithms(document: dict[str, Any]) -> None:
    """Every algorithm of the contract has its sign rate and keygen p50 (issue 15)."""
    assert set(document["algorithms"]) == set(ALGORITHMS)
    for name, runs in document["algorithms"].items():
        assert_positive_fields(
            runs, {"sign": {"ops_per_s", "p50_ms"}, "keygen": {"p50_ms", "p99_ms", "keys"}}
        )
        assert runs["keygen"]["keys"] <= 3, name  # --max-keys bounds every algorithm's keygen


@pytest.mark.rabbitmq
@pytest.mark.tpm
@pytest.mark.timeout(300)
async def test_own_fleet_per_size_reports_every_field_and_scaling(amqp_url: str) -> None:
    code, out, err = await zandd_bench("--signers", "1,2", *TINY_RUN, amqp_url=amqp_url)
    assert code == 0, err
    document = json.loads(out)
    assert set(document) == {
        *FIELDS,
        "signers",
        "scaling",
        "sign_other_transport",
        "shards",
        "algorithms",
        "sign_many_keys",
    }
    assert_algorithms(document)
    # The bench's own fleet has a new vault: every key of the set was created for the run.
    assert assert_many_keys(document, keys=3)["created"] == 3
    assert "sign_many_keys" not in document["scaling"][1]
    # The test broker has no consistent-hash exchange: the sharded option says why it skipped.
    assert "rabbitmq_consistent_hash_exchange" in document["shards"]["skipped"]
    assert_positive_fields(document, FIELDS)
    other = document["sign_other_transport"]
    assert other.pop("transport") == "aiormq", "the targets stay on the default (lean) transport"
    assert_positive_fields({"sign": other}, {"sign": {"rps", "p50_ms", "p99_ms"}})
    assert document["signers"] == 1
    assert document["batch"]["items_per_message"] == 100
    assert [entry["signers"] for entry in document["scaling"]] == [1, 2]
    for entry in document["scaling"]:
        assert set(entry) == {*FLEET_FIELDS, "signers"}
        assert_positive_fields(entry, FLEET_FIELDS)
    assert document["scaling"][0]["sign"] == document["sign"]

    created = re.search(r"created the vhost (zandd-bench-[0-9a-f]+)", err)
    assert created is not None, err
    assert created.group(1) not in rabbitmqctl("list_vhosts", "name").split()
    assert "Traceback" not in err


@pytest.mark.rabbitmq
@pytest.mark.tpm
@pytest.mark.timeout(300)
async def test_attach_measures_the_running_fleet(fleet: RunningFleet) -> None:
    code, out, err = await zandd_bench("--attach", *TINY_RUN, amqp_url=fleet.amqp_url)
    assert code == 0, err
    document = json.loads(out)
    assert set(document) == {*FIELDS, "signers", "shards", "algorithms", "sign_many_keys"}
    assert_algorithms(document)
    assert_many_keys(document, keys=3)
    assert "rabbitmq_consistent_hash_exchange" in document["shards"]["skipped"]
    assert_positive_fields(document, FIELDS)
    assert document["signers"] == len([name for name in fleet.runtimes if name != "keygen"])
    assert fleet.served.get("signer-1", 0) + fleet.served.get("signer-2", 0) > 0
    vhost = fleet.amqp_url.rsplit("/", 1)[1]
    queues = rabbitmqctl("list_queues", "-p", vhost, "name").split()
    assert not [name for name in queues if name.startswith("zandd-bench")]


async def labelled_many_keys(fleet: RunningFleet) -> set[str]:
    """The key ids of the vault's ``sign_many_keys`` set, read from the vault itself."""
    return {
        record.key_id for record in await fleet.store.list_keys() if record.label == MANY_KEYS_LABEL
    }


@pytest.mark.rabbitmq
@pytest.mark.tpm
@pytest.mark.timeout(300)
async def test_attach_reuses_the_many_keys_set_of_an_earlier_run(fleet: RunningFleet) -> None:
    """The first run completes the set, the second creates no key of it (issue 15)."""
    before = await labelled_many_keys(fleet)
    code, out, err = await zandd_bench(
        "--attach", *TINY_RUN, "--many-keys", "5", amqp_url=fleet.amqp_url
    )
    assert code == 0, err
    first = assert_many_keys(json.loads(out), keys=5)
    assert first["created"] == 5 - min(len(before), 5)
    after_first = await labelled_many_keys(fleet)
    assert len(after_first) == len(before) + first["created"]

    code, out, err = await zandd_bench(
        "--attach", *TINY_RUN, "--many-keys", "5", amqp_url=fleet.amqp_url
    )
    assert code == 0, err
    assert assert_many_keys(json.loads(out), keys=5)["created"] == 0
    assert await labelled_many_keys(fleet) == after_first
    assert "creating 0" in err


async def test_refusals_are_one_sentence_before_anything_starts() -> None:
    code, out, err = await zandd_bench(
        "--attach", "--signers", "2", amqp_url="amqp://guest:secret-pw@127.0.0.1:1/"
    )
    assert (code, out) == (1, "")
    assert err.strip().splitlines() == [
        "zandd: --signers starts a fleet of that size, --attach measures the running one: "
        "give one of them"
    ]
    code, out, err = await zandd_bench(amqp_url="amqp://guest:secret-pw@192.0.2.1:5672/")
    assert (code, out) == (1, "")
    assert len(err.strip().splitlines()) == 1
    assert "is not local: measure a fleet running there with --attach" in err
    assert "secret-pw" not in err


def run_of(per_s: float, p50_ms: float) -> Run:
    """A run of 100 operations at ``per_s`` whose latencies all equal ``p50_ms``."""
    return Run(operations=100, elapsed_s=100 / per_s, latencies_s=(p50_ms / 1000,) * 100)


def test_targets_compare_the_right_ratios() -> None:
    fleet = FleetResults(
        signers=2,
        echo=run_of(1000, 50),
        echo_serial=run_of(500, 2.0),
        sign=run_of(1500, 40),
        sign_serial=run_of(300, 3.2),
        batch=run_of(90, 100),
    )
    local = InProcessResults(
        crypto_limit=run_of(10_000, 0.1),
        hybrid=run_of(6000, 0.15),
        tpm_only=run_of(300, 3.0),
        tpm_protection=run_of(200, 5.0),
    )
    report = BenchReport(
        where="test",
        duration_s=1,
        warmup_s=1,
        fleets=(fleet,),
        keygen=run_of(20, 45),
        in_process=local,
    )
    assert [(t.value, t.met) for t in targets(report)] == [
        (pytest.approx(1.5), True),
        (pytest.approx(1.6), False),
        (pytest.approx(9000), False),
        (pytest.approx(20), True),
        (pytest.approx(45), False),
    ]
    table = render_table(report)
    for scenario in (
        "echo",
        "echo_serial",
        "sign",
        "sign_serial",
        "batch",
        "keygen",
        "tpm_protection",
    ):
        assert f"\n{scenario} " in table
    assert table.count("  pass  ") == 2
    assert table.count("  FAIL  ") == 3
    assert "scaling" not in table
    assert "algorithms" not in report.to_json()


def test_each_algorithm_is_reported_and_no_target_depends_on_it() -> None:
    fleet = FleetResults(
        signers=1,
        echo=run_of(1000, 50),
        echo_serial=run_of(500, 2.0),
        sign=run_of(1500, 40),
        sign_serial=run_of(300, 3.2),
        batch=run_of(90, 100),
    )
    local = InProcessResults(
        crypto_limit=run_of(10_000, 0.1),
        hybrid=run_of(6000, 0.15),
        tpm_only=run_of(300, 3.0),
        tpm_protection=run_of(200, 5.0),
        algorithms=tuple(
            AlgorithmRuns(name, keygen=run_of(2, 500), sign=run_of(800, 1.25))
            for name in ALGORITHMS
        ),
    )
    report = BenchReport(
        where="test",
        duration_s=1,
        warmup_s=1,
        fleets=(fleet,),
        keygen=run_of(20, 45),
        in_process=local,
    )
    document = report.to_json()
    assert set(document["algorithms"]) == set(ALGORITHMS)
    assert document["algorithms"]["rsa-pss-3072-sha256"] == {
        "sign": {"ops_per_s": 800.0, "p50_ms": 1.25},
        "keygen": {"p50_ms": 500.0, "p99_ms": 500.0, "keys": 100},
    }
    assert len(targets(report)) == 5
    table = render_table(report)
    for name in ALGORITHMS:
        assert f"\n  {name}\n    sign " in table
    assert table.count("\n    keygen ") == len(ALGORITHMS)


def test_sign_many_keys_is_reported_beside_sign_and_checked_against_0_8() -> None:
    def report_with(many_per_s: float) -> BenchReport:
        fleet = FleetResults(
            signers=2,
            echo=run_of(1000, 50),
            echo_serial=run_of(500, 2.0),
            sign=run_of(1500, 40),
            sign_serial=run_of(300, 3.2),
            batch=run_of(90, 100),
            sign_many_keys=run_of(many_per_s, 45),
            key_set=KeySet(tuple(f"zk-{n}" for n in range(10_000)), created=0, create_s=0.0),
        )
        local = InProcessResults(
            crypto_limit=run_of(10_000, 0.1),
            hybrid=run_of(6000, 0.15),
            tpm_only=run_of(300, 3.0),
            tpm_protection=run_of(200, 5.0),
        )
        return BenchReport(
            where="test",
            duration_s=1,
            warmup_s=1,
            fleets=(fleet,),
            keygen=run_of(20, 45),
            in_process=local,
        )

    passing, failing = report_with(1200), report_with(1150)
    assert passing.to_json()["sign_many_keys"] == {
        "keys": 10_000,
        "created": 0,
        "rps": 1200.0,
        "p50_ms": 45.0,
        "p99_ms": 45.0,
        "ratio_to_sign": 0.8,
    }
    passed, failed = many_keys_check(passing), many_keys_check(failing)
    assert passed is not None
    assert failed is not None
    assert passed.met
    assert passed.value == pytest.approx(0.8)
    assert not failed.met
    assert failed.value == pytest.approx(1150 / 1500)
    # Beside the five targets, never one of them.
    assert len(targets(passing)) == 5
    table = render_table(failing)
    assert "\nsign_many_keys  10,000 keys" in table
    assert "  FAIL  sign_many_keys.rps / sign.rps ≥ 0.8 (10,000 keys)" in table
