"""Per-principal quotas: token buckets on an injected clock, and the runtime's refusals."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from contracts.client import _decode_error
from contracts.errors import ErrorCode, Throttled, ZanddError
from contracts.limits import Limits
from contracts.operations import ERROR_REPLY_TYPE, Operation
from contracts.wire import Delivery
from workers.bench.environment import bench_settings
from workers.consumer.runtime import ConsumerRuntime, RequestContext
from workers.observability.metrics import Metrics
from workers.operator.fleet import child_environment
from workers.service.config import Settings
from workers.service.quotas import Quotas, Rates, TokenBucket, rates_from


@dataclass
class FakeClock:
    now_s: float = 1000.0

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


def test_a_bucket_admits_its_burst_then_says_how_long_to_wait() -> None:
    bucket = TokenBucket(10.0, now_s=0.0)  # 10/s, a burst of one second's worth
    assert [bucket.take(1, 0.0) for _ in range(10)] == [0.0] * 10
    assert bucket.take(1, 0.0) == pytest.approx(0.1)
    assert bucket.take(1, 0.05) == pytest.approx(0.05)  # half a token has flowed in
    assert bucket.take(1, 0.1) == 0.0
    # Idle for an hour: still only one second's burst.
    assert bucket.take(11, 3600.0) == pytest.approx(0.1)


def test_a_bucket_in_debt_refuses_until_the_debt_is_paid() -> None:
    bucket = TokenBucket(100.0, now_s=0.0)
    assert bucket.overdrawn_s(0.0) == 0.0
    bucket.charge(1000, 0.0)  # a batch larger than the burst: admitted, into debt
    assert bucket.level == pytest.approx(-900.0)
    assert bucket.overdrawn_s(0.0) == pytest.approx(9.0)
    assert bucket.overdrawn_s(8.99) > 0
    assert bucket.overdrawn_s(9.01) == 0.0


def test_a_bucket_retuned_keeps_its_debt_and_caps_its_surplus() -> None:
    bucket = TokenBucket(100.0, now_s=0.0)
    bucket.retune(50.0, 0.0)
    assert (bucket.capacity, bucket.level) == (50.0, 50.0)
    bucket.charge(150, 0.0)
    bucket.retune(100.0, 0.0)
    assert bucket.level == pytest.approx(-100.0)
    assert bucket.overdrawn_s(0.0) == pytest.approx(1.0)


def delivery(
    operation: Operation,
    body: object,
    *,
    user_id: str | None = "alice",
    message_id: str = "m-1",
) -> Delivery:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Delivery(
        body=raw,
        delivery_tag=1,
        exchange="zandd",
        routing_key=operation.value,
        redelivered=False,
        headers={},
        message_id=message_id,
        correlation_id=message_id,
        type=operation.value,
        reply_to="amq.gen-caller",
        user_id=user_id,
        content_type="application/json",
    )


def sign(user_id: str = "alice") -> Delivery:
    digest = base64.b64encode(bytes(32)).decode()
    return delivery(Operation.SIGN, {"key_id": "zk-1", "digest": digest}, user_id=user_id)


def batch(items: int, user_id: str = "alice") -> Delivery:
    digest = base64.b64encode(bytes(32)).decode()
    body = {"key_id": "zk-1", "items": [{"digest": digest}] * items}
    return delivery(Operation.SIGN_BATCH, body, user_id=user_id)


class Done(BaseModel):
    done: bool = True


@dataclass
class Served:
    calls: list[tuple[Operation, str | None]] = field(default_factory=list)
    audited: list[str] = field(default_factory=list)

    async def handler(self, request: Any, context: RequestContext) -> BaseModel:
        self.calls.append((context.operation, context.principal))
        return Done()

    async def audit(
        self, message: Delivery, request: BaseModel | None, result: BaseModel | ZanddError
    ) -> None:
        self.audited.append(result.code.value if isinstance(result, ZanddError) else "ok")


def runtime(served: Served, quotas: Quotas | None) -> ConsumerRuntime:
    return ConsumerRuntime(
        amqp_url="amqp://unused/",
        queue="zandd.sign",
        handlers={op: served.handler for op in (Operation.SIGN, Operation.SIGN_BATCH)},
        prefetch=1,
        limits=Limits(),
        drain_timeout_s=1.0,
        name="test",
        audit=served.audit,
        admission=quotas,
    )


def reply_of(body: bytes) -> dict[str, Any]:
    reply: dict[str, Any] = json.loads(body)
    return reply


async def test_over_the_request_quota_is_throttled_with_a_retry_after_before_parsing() -> None:
    clock = FakeClock()
    served = Served()
    worker = runtime(served, Quotas(Rates(requests_per_s=2.0), clock=clock))
    assert [(await worker._serve(sign())).error for _ in range(2)] == [None, None]
    # Not even valid JSON: refused for the quota before anyone looks at it.
    outcome = await worker._serve(delivery(Operation.SIGN, b"{not json"))
    assert outcome.type == ERROR_REPLY_TYPE
    # The reply is held 1 s, longer than the 500 ms the quota needs: once sent it says "now".
    assert outcome.hold_s == 1.0
    assert reply_of(outcome.body) == {
        "code": "throttled",
        "message": "over the quota of 2 requests/s; send again after retry_after_ms",
        "retryable": True,
        "retry_after_ms": 1,
    }
    assert len(served.calls) == 2
    assert served.audited == ["ok", "ok", "throttled"]
    # Another principal has buckets of its own; alice is admitted again once the hint passed.
    assert (await worker._serve(sign("bob"))).error is None
    clock.advance(0.5)
    assert (await worker._serve(sign())).error is None


async def test_a_batch_may_overdraw_the_signature_quota_then_everything_signing_waits() -> None:
    clock = FakeClock()
    served = Served()
    worker = runtime(served, Quotas(Rates(signatures_per_s=100.0), clock=clock))
    assert (await worker._serve(batch(500))).error is None
    outcome = await worker._serve(sign())
    reply = reply_of(outcome.body)
    # 4 s to pay the debt back: the reply held 1 s, the rest in the hint.
    assert (reply["code"], outcome.hold_s, reply["retry_after_ms"]) == ("throttled", 1.0, 3000)
    clock.advance(4.0)
    assert (await worker._serve(sign())).error is None
    assert len(served.calls) == 2


def test_every_worker_enforces_its_share_of_the_fleet_quota() -> None:
    clock = FakeClock()
    quotas = Quotas(Rates(requests_per_s=100.0), clock=clock)
    quotas.share_with(4)
    admitted = 0
    for _ in range(100):
        try:
            quotas.admit(sign(), Operation.SIGN)
            admitted += 1
        except Throttled:
            pass
    assert admitted == 25  # a second's burst of 100/s shared by four workers
    quotas.share_with(0)  # nobody consuming (this worker is between sessions): all of it
    assert quotas.workers == 1


def test_overrides_exempt_or_change_a_principals_quota() -> None:
    settings = Settings(
        quota_requests_per_s=1,
        quota_overrides=json.dumps(
            {"ops": "unlimited", "batch": {"requests_per_s": 50}, "sig": {"signatures_per_s": 9}}
        ),
    )
    default, overrides = rates_from(settings)
    assert default == Rates(requests_per_s=1.0)
    assert overrides == {
        "ops": Rates(),
        "batch": Rates(requests_per_s=50.0),
        "sig": Rates(requests_per_s=1.0, signatures_per_s=9.0),
    }
    quotas = Quotas(default, overrides, clock=FakeClock())
    for _ in range(1000):
        quotas.admit(sign("ops"), Operation.SIGN)
    quotas.admit(sign("alice"), Operation.SIGN)
    with pytest.raises(Throttled):
        quotas.admit(sign("alice"), Operation.SIGN)


@pytest.mark.parametrize(
    "overrides",
    [
        '{"alice": {"request_per_s": 1}}',  # a misspelt field
        '{"alice": {"requests_per_s": 0}}',
        '{"alice": "none"}',
        '{"": "unlimited"}',
        "alice=1",
        "[]",
    ],
)
def test_malformed_overrides_are_refused_naming_the_setting(overrides: str) -> None:
    with pytest.raises(ValidationError, match="quota_overrides"):
        Settings(quota_overrides=overrides)


def test_quotas_are_off_by_default_and_nobody_is_throttled() -> None:
    settings = Settings()
    assert (settings.quota_requests_per_s, settings.quota_signatures_per_s) == (None, None)
    assert settings.quota_overrides == {}
    assert Quotas.from_settings(settings) is None
    # Overrides that only exempt limit nobody either.
    assert Quotas.from_settings(Settings(quota_overrides='{"ops": "unlimited"}')) is None


def test_idle_principals_are_forgotten_beyond_the_bound() -> None:
    clock = FakeClock()
    quotas = Quotas(Rates(requests_per_s=1.0), clock=clock, max_principals=100)
    for n in range(1000):
        quotas.admit(sign(f"user-{n}"), Operation.SIGN)
    assert quotas.tracked == 100
    # The most recently seen are the ones kept: user-999 is still out of requests.
    with pytest.raises(Throttled):
        quotas.admit(sign("user-999"), Operation.SIGN)


def test_throttled_refusals_are_counted_by_quota() -> None:
    metrics = Metrics()
    quotas = Quotas(Rates(requests_per_s=1.0), clock=FakeClock(), metrics=metrics)
    quotas.admit(sign(), Operation.SIGN)
    for _ in range(3):
        with pytest.raises(Throttled):
            quotas.admit(sign(), Operation.SIGN)
    value = metrics.registry.get_sample_value("zandd_throttled_total", {"quota": "requests"})
    assert value == 3.0


def test_the_client_raises_throttled_with_the_hint_in_seconds() -> None:
    body = b'{"code":"throttled","message":"slow down","retryable":true,"retry_after_ms":1500}'
    error = _decode_error(delivery(Operation.SIGN, body))
    assert isinstance(error, Throttled)
    assert (error.code, error.retryable, error.retry_after_s) == (ErrorCode.THROTTLED, True, 1.5)


def quota_variables(env: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in env.items() if name.startswith("ZANDD_QUOTA_")}


def test_zandd_up_children_get_the_quotas_its_flags_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZANDD_QUOTA_SIGNATURES_PER_S", "7")  # a flag below says otherwise
    settings = Settings(
        quota_requests_per_s="5",
        quota_signatures_per_s=None,
        quota_overrides='{"ops": "unlimited", "job": {"signatures_per_s": null}}',
    )
    env = quota_variables(child_environment(settings, "swtpm:port=1"))
    assert env == {
        "ZANDD_QUOTA_REQUESTS_PER_S": "5.0",
        "ZANDD_QUOTA_OVERRIDES": '{"ops": "unlimited", "job": {"signatures_per_s": null}}',
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("ZANDD_QUOTA_SIGNATURES_PER_S")
    assert rates_from(Settings()) == rates_from(settings)


def test_the_bench_fleet_runs_unthrottled_whatever_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ZANDD_QUOTA_REQUESTS_PER_S", "1")
    monkeypatch.setenv("ZANDD_QUOTA_OVERRIDES", '{"bench": {"signatures_per_s": 1}}')
    settings = bench_settings(Settings(), amqp_url="amqp://x/", data_dir=tmp_path, tcti="t")
    assert Quotas.from_settings(settings) is None
    env = quota_variables(child_environment(settings, "t"))
    assert env == {"ZANDD_QUOTA_OVERRIDES": "{}"}
