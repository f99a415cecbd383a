"""What the runtime's audit hook records for a request: never the data, only its digest."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, cast

from contracts.errors import Forbidden, InternalError, InvalidRequest
from contracts.models import (
    KeyCreateReply,
    KeyPublicRequest,
    SignBatchRequest,
    SignPayload,
    SignReply,
    SignRequest,
)
from vault.audit import AuditEvent, AuditLog, canonical_bytes
from workers.audit.auditing import MAX_RECORDED_CHARS, RequestAuditor, audit_event, data_digest

AT = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)


def delivery(**properties: Any) -> Any:
    base = {
        "user_id": "svc-a",
        "type": "sign",
        "routing_key": "sign",
        "message_id": "req-1",
        "redelivered": False,
    }
    return SimpleNamespace(**{**base, **properties})


def test_sign_records_the_digest_that_is_signed() -> None:
    message = b"pay 100 EUR to Alice"
    digest = hashlib.sha256(message).digest()
    assert data_digest(SignRequest(key_id="zk-1", message=message)) == digest.hex()
    assert data_digest(SignRequest(key_id="zk-1", digest=digest)) == digest.hex()


def test_a_batch_records_the_digest_of_its_item_digests_in_order() -> None:
    items = [b"one", b"two"]
    request = SignBatchRequest(key_id="zk-1", items=[SignPayload(message=m) for m in items])
    expected = hashlib.sha256(b"".join(hashlib.sha256(m).digest() for m in items)).hexdigest()
    assert data_digest(request) == expected
    swapped = SignBatchRequest(key_id="zk-1", items=request.items[::-1])
    assert data_digest(swapped) != expected
    assert data_digest(KeyPublicRequest(key_id="zk-1")) is None
    assert data_digest(None) is None


def test_a_signature_is_recorded_with_the_version_used() -> None:
    request = SignRequest(key_id="zk-1", message=b"m")
    reply = SignReply(
        key_id="zk-1", version=3, algorithm="ecdsa-p256-sha256", encoding="der", signature=b"s"
    )
    event = audit_event(delivery(), request, reply, AT)
    assert (event.principal, event.operation, event.outcome) == ("svc-a", "sign", "ok")
    assert (event.key_id, event.version, event.request_id) == ("zk-1", 3, "req-1")


def test_a_redelivered_request_is_recorded_as_such() -> None:
    request = SignRequest(key_id="zk-1", message=b"m")
    reply = SignReply(
        key_id="zk-1", version=1, algorithm="ecdsa-p256-sha256", encoding="der", signature=b"s"
    )
    assert not audit_event(delivery(), request, reply, AT).redelivered
    event = audit_event(delivery(redelivered=True), request, reply, AT)
    assert (event.outcome, event.request_id, event.redelivered) == ("ok", "req-1", True)


def test_a_refusal_records_its_code_and_what_was_asked() -> None:
    request = SignRequest(key_id="zk-1", version=2, message=b"m")
    event = audit_event(delivery(user_id="mallory"), request, Forbidden("no"), AT)
    assert (event.principal, event.outcome, event.key_id, event.version) == (
        "mallory",
        "forbidden",
        "zk-1",
        2,
    )


def test_a_created_key_is_recorded_under_its_new_id() -> None:
    reply = KeyCreateReply(
        key_id="zk-new",
        version=1,
        algorithm="ecdsa-p256-sha256",
        public_key_pem="-----BEGIN PUBLIC KEY-----",
        created_at=AT,
    )
    event = audit_event(delivery(type="key.create"), None, reply, AT)
    assert (event.operation, event.key_id, event.version) == ("key.create", "zk-new", 1)


def test_what_a_caller_chose_is_kept_short_and_may_be_missing() -> None:
    long = "x" * 10_000
    event = audit_event(
        delivery(type=None, routing_key=long, message_id=long, user_id=None),
        None,
        InvalidRequest("bad"),
        AT,
    )
    assert event.operation == "x" * MAX_RECORDED_CHARS
    assert event.request_id == "x" * MAX_RECORDED_CHARS
    assert (event.principal, event.key_id, event.outcome) == (None, None, "invalid_request")


def test_every_recorded_value_is_storable_whatever_the_request_carried() -> None:
    # A request built in Python skips the wire's bounds; the entry must still be storable.
    request = SimpleNamespace(key_id="zk-\udc80", version=2**63)
    event = audit_event(delivery(message_id="id-\ud800"), request, Forbidden("no"), AT)
    assert event.version is None
    assert (event.key_id, event.request_id) == ("zk-\\udc80", "id-\\ud800")
    canonical_bytes(1, event, "0" * 64)  # encodes: the chain can hash it


def test_principals_are_recorded_whole() -> None:
    # Two names sharing 128 characters must stay two principals in the audit.
    first, second = "p" * 128 + "-a", "p" * 128 + "-b"
    recorded = {
        audit_event(delivery(user_id=name), None, Forbidden("no"), AT).principal
        for name in (first, second)
    }
    assert recorded == {first, second}


class _RefusingLog:
    """An audit log whose store refuses any entry naming a key, as a store might refuse data."""

    def __init__(self) -> None:
        self.recorded: list[AuditEvent] = []

    async def record(self, event: AuditEvent) -> None:
        if event.key_id is not None:
            raise InternalError("the audit entry could not be stored: OverflowError")
        self.recorded.append(event)


async def test_an_entry_the_store_refuses_is_recorded_in_its_minimal_form() -> None:
    log = _RefusingLog()
    auditor = RequestAuditor(cast(AuditLog, log), clock=lambda: AT)
    request = SignRequest(key_id="zk-1", message=b"m")
    await auditor(
        delivery(user_id="svc-\u00e9"),
        request,
        Forbidden("no"),
    )
    (event,) = log.recorded
    assert (event.principal, event.operation, event.outcome) == ("svc-\\xe9", "sign", "forbidden")
    assert (event.key_id, event.version, event.request_id) == (None, None, None)
