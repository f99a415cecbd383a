"""What an error reply tells the caller: their mistakes in full, our failures in one sentence.

And that no refusal is answered before its audit entry is written.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel

from contracts.errors import (
    ConfigurationError,
    Forbidden,
    InternalError,
    InvalidRequest,
    TpmUnavailable,
    VaultUnavailable,
    ZanddError,
)
from contracts.limits import Limits
from contracts.operations import Operation
from contracts.wire import Delivery
from workers.consumer.runtime import ConsumerRuntime, _error_outcome


def reply_of(error: ZanddError) -> dict[str, object]:
    outcome = _error_outcome(error)
    body: dict[str, object] = json.loads(outcome.body)
    return body


def test_our_failures_do_not_leak_paths_urls_or_tpm_codes() -> None:
    vault = reply_of(VaultUnavailable("SQLite vault /srv/zandd/vault.db failed: SQLITE_BUSY"))
    tpm = reply_of(TpmUnavailable("cannot open the TPM through TCTI 'swtpm:host=10.1.2.3'"))
    config = reply_of(ConfigurationError("KEK file /etc/zandd/kek-ring.json does not exist"))
    assert vault == {
        "code": "vault_unavailable",
        "message": "the key vault is unavailable; try again later",
        "retryable": True,
    }
    assert tpm["message"] == "the keygen worker cannot reach its TPM; try again later"
    assert config["code"] == "internal"
    assert "/etc/zandd" not in str(config["message"])


def test_the_callers_own_refusals_are_explained() -> None:
    reply = reply_of(Forbidden("app-2 may not sign with key zk-1"))
    assert reply == {
        "code": "forbidden",
        "message": "app-2 may not sign with key zk-1",
        "retryable": False,
    }


def _request(body: bytes, headers: dict[str, Any] | None = None) -> Delivery:
    return Delivery(
        body=body,
        delivery_tag=1,
        exchange="zandd",
        routing_key="sign",
        redelivered=False,
        headers=headers or {},
        message_id="req-1",
        correlation_id="req-1",
        type="sign",
        reply_to="amq.gen-caller",
        user_id="svc-a",
        content_type="application/json",
    )


class _Audit:
    """An audit hook that fails the first ``failures`` calls with ``error``."""

    def __init__(self, error: ZanddError, failures: int) -> None:
        self.error = error
        self.failures = failures
        self.recorded: list[object] = []

    async def __call__(self, message: Delivery, request: object, result: object) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise self.error
        self.recorded.append(result)


async def _probe() -> None:
    return None


def _runtime(audit: _Audit) -> ConsumerRuntime:
    return ConsumerRuntime(
        amqp_url="amqp://unused",
        queue="sign",
        handlers={Operation.SIGN: _never_called},
        prefetch=1,
        limits=Limits(),
        drain_timeout_s=1.0,
        name="test",
        probe=_probe,
        max_backoff_s=0.01,
        audit=audit,
    )


async def test_a_refusal_waits_for_the_vault_and_is_answered_once_audited() -> None:
    audit = _Audit(VaultUnavailable("SQLite vault failed: SQLITE_BUSY"), failures=3)
    outcome = await _runtime(audit)._serve(
        _request(b'{"key_id":"k","version":9223372036854775808}')
    )
    assert outcome.error is not None
    assert outcome.error.code.value == "invalid_request"
    assert not outcome.unaudited
    assert [type(result) for result in audit.recorded] == [InvalidRequest]


async def test_a_refusal_that_cannot_be_audited_is_not_answered() -> None:
    audit = _Audit(InternalError("the audit entry could not be stored"), failures=1)
    outcome = await _runtime(audit)._serve(_request(b"{}"))
    assert outcome.unaudited, "dead-lettered for the operator, never answered unaudited"
    assert audit.recorded == []


@pytest.mark.parametrize("deadline_ms", [-1, 2**63 - 1, 253_402_300_800_000])
async def test_a_deadline_header_out_of_range_is_an_invalid_request(deadline_ms: int) -> None:
    audit = _Audit(InternalError("unused"), failures=0)
    body = b'{"key_id":"k","digest":"' + b"A" * 43 + b'="}'
    outcome = await _runtime(audit)._serve(_request(body, {"x-deadline-ms": deadline_ms}))
    assert outcome.error is not None
    assert "x-deadline-ms must be Unix milliseconds" in outcome.error.message


async def _never_called(request: object, context: object) -> BaseModel:
    raise AssertionError("every request in these tests is refused before its handler")
