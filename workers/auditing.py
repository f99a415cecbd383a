"""The runtime's audit hook: every request served or refused becomes one audit entry.

The runtime awaits the hook before it publishes the reply, so no signature leaves a worker
before the entry that records it is durable in the vault.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime

from pydantic import BaseModel

from contracts.errors import ZanddError
from contracts.models import SignBatchRequest, SignRequest
from contracts.wire import Delivery
from vault.audit import OUTCOME_OK, AuditEvent, AuditLog

Clock = Callable[[], datetime]
#: Names and ids that callers choose are kept to this length in the log.
MAX_RECORDED_CHARS = 128


def utc_now() -> datetime:
    """The current time, timezone-aware."""
    return datetime.now(UTC)


def data_digest(request: BaseModel | None) -> str | None:
    """The hex SHA-256 of what a request asks to have signed, never the data itself.

    For ``sign`` that is the SHA-256 digest the signature is made over (a holder of the
    message can find its entry); for ``sign.batch`` the SHA-256 of the item digests in order.
    """
    if isinstance(request, SignRequest):
        return request.sha256_digest().hex()
    if isinstance(request, SignBatchRequest):
        batch = hashlib.sha256()
        for item in request.items:
            batch.update(item.sha256_digest())
        return batch.hexdigest()
    return None


def _text(value: object) -> str | None:
    return value[:MAX_RECORDED_CHARS] if isinstance(value, str) else None


def _number(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def audit_event(
    message: Delivery,
    request: BaseModel | None,
    result: BaseModel | ZanddError,
    at: datetime,
) -> AuditEvent:
    """The audit event of one request: who, what, which key version, how it ended."""
    # The reply names the version actually used; the request only what was asked for.
    key_id = getattr(result, "key_id", None) or getattr(request, "key_id", None)
    version = getattr(result, "version", None) or getattr(request, "version", None)
    return AuditEvent(
        at=at,
        principal=_text(message.user_id),
        operation=_text(message.type or message.routing_key) or "",
        outcome=result.code.value if isinstance(result, ZanddError) else OUTCOME_OK,
        key_id=_text(key_id),
        version=_number(version),
        request_id=_text(message.message_id),
        data_sha256=data_digest(request),
    )


class RequestAuditor:
    """The audit hook for ``ConsumerRuntime``: records each outcome in the audit log."""

    def __init__(self, log: AuditLog, *, clock: Clock = utc_now) -> None:
        self._log = log
        self._clock = clock

    async def __call__(
        self,
        message: Delivery,
        request: BaseModel | None,
        result: BaseModel | ZanddError,
    ) -> None:
        await self._log.record(audit_event(message, request, result, self._clock()))
