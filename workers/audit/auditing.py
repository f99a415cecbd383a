"""The runtime's audit hook: every request served or refused becomes one audit entry.

The runtime awaits the hook before it publishes the reply, so no signature leaves a worker
before the entry that records it is durable in the vault. The hook returns the entry the log
stored, and a sign or sign.batch reply carries it as its receipt (``with_receipt``): no vault
read, the group commit already hands each waiter its entry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime

from pydantic import BaseModel

from contracts.errors import VaultUnavailable, ZanddError
from contracts.models import (
    Receipt,
    SignBatchReply,
    SignBatchRequest,
    SignPayload,
    SignReply,
    SignRequest,
    VerifyBatchReply,
    VerifyBatchRequest,
    VerifyReply,
    VerifyRequest,
)
from contracts.wire import Delivery
from vault.audit import MAX_STORED_INT, OUTCOME_OK, AuditEntry, AuditEvent, AuditLog

Clock = Callable[[], datetime]
#: Names and ids that callers choose are kept to this length in the log.
MAX_RECORDED_CHARS = 128
#: Principals are kept whole: an AMQP ``user_id`` is a short string of at most 255 bytes, and
#: two names sharing a prefix must stay two principals in the audit.
MAX_RECORDED_PRINCIPAL_CHARS = 255


def utc_now() -> datetime:
    """The current time, timezone-aware."""
    return datetime.now(UTC)


def data_digest(request: BaseModel | None) -> str | None:
    """The hex SHA-256 of what a request asks to have signed, never the data itself.

    For ``sign`` that is the SHA-256 digest the signature is made over (a holder of the
    message can find its entry); for ``sign.batch`` the SHA-256 of the item digests in order;
    ``verify`` and ``verify.batch`` likewise, for the digests whose signatures were checked.
    """
    if isinstance(request, SignRequest | VerifyRequest):
        return _sha256_of(request).hex()
    if isinstance(request, SignBatchRequest | VerifyBatchRequest):
        batch = hashlib.sha256()
        for item in request.items:
            batch.update(_sha256_of(item))
        return batch.hexdigest()
    return None


#: The outcome of a served ``verify``: ok, and the verdict (``verify.batch``: ``ok:valid``
#: when every signature held, ``ok:invalid`` when one did not).
OUTCOME_VALID = f"{OUTCOME_OK}:valid"
OUTCOME_INVALID = f"{OUTCOME_OK}:invalid"


def outcome_of(result: BaseModel | ZanddError) -> str:
    """How a request ended, for its audit entry: the error code, ``ok``, or for a verify
    ``ok:valid``/``ok:invalid`` — served either way, the verdict kept in the log."""
    if isinstance(result, ZanddError):
        return result.code.value
    if isinstance(result, VerifyReply):
        return OUTCOME_VALID if result.valid else OUTCOME_INVALID
    if isinstance(result, VerifyBatchReply):
        return OUTCOME_VALID if all(result.valid) else OUTCOME_INVALID
    return OUTCOME_OK


def _sha256_of(payload: SignPayload) -> bytes:
    """The SHA-256 of the message, or the digest sent when it is one (32 bytes); a SHA-384
    digest (``ecdsa-p384-sha384``) is recorded by its SHA-256, so the field stays 64 hex."""
    digest = payload.sha256_digest()
    return digest if len(digest) == 32 else hashlib.sha256(digest).digest()


def _text(value: object, limit: int = MAX_RECORDED_CHARS) -> str | None:
    if not isinstance(value, str):
        return None
    # Lone surrogates cannot be encoded, hashed or stored: escape them, whatever sent them.
    return value[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


def _number(value: object) -> int | None:
    # Out of range is recorded as absent: the entry must always be storable.
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_STORED_INT:
        return value
    return None


def audit_event(
    message: Delivery,
    request: BaseModel | None,
    result: BaseModel | ZanddError,
    at: datetime,
) -> AuditEvent:
    """The audit event of one request: who, what, which key version, how it ended, and whether
    the broker had delivered it before (``redelivered``: an earlier entry may be the same
    request's, from a worker that lost its connection before it acked).

    Every field is bounded here (texts cut and escaped, numbers range-checked), so the event
    is storable whatever the request carried.
    """
    # The reply names the version actually used; the request only what was asked for.
    key_id = getattr(result, "key_id", None) or getattr(request, "key_id", None)
    version = getattr(result, "version", None) or getattr(request, "version", None)
    return AuditEvent(
        at=at,
        principal=_text(message.user_id, MAX_RECORDED_PRINCIPAL_CHARS),
        operation=_text(message.type or message.routing_key) or "",
        outcome=outcome_of(result),
        key_id=_text(key_id),
        version=_number(version),
        request_id=_text(message.message_id),
        data_sha256=data_digest(request),
        redelivered=message.redelivered is True,
    )


def with_receipt(reply: BaseModel, entry: AuditEntry | None) -> BaseModel:
    """``reply`` with the receipt of its audit ``entry`` when it is a reply that carries one."""
    if entry is None or not isinstance(reply, SignReply | SignBatchReply):
        return reply
    # Not validated again: the sequence number and link are the store's own, just written.
    receipt = Receipt.model_construct(seq=entry.seq, link=entry.entry_hash)
    return reply.model_copy(update={"receipt": receipt})


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
    ) -> AuditEntry:
        event = audit_event(message, request, result, self._clock())
        try:
            return await self._log.record(event)
        except VaultUnavailable:
            raise  # the runtime waits for the vault and audits again
        except ZanddError:
            # The store refused this entry itself: record what it cannot refuse instead (who,
            # what, how it ended), so the request still has its entry.
            return await self._log.record(_minimal(event))


def _minimal(event: AuditEvent) -> AuditEvent:
    def ascii_text(value: str | None) -> str | None:
        return None if value is None else value.encode("ascii", "backslashreplace").decode()

    return AuditEvent(
        at=event.at,
        principal=ascii_text(event.principal),
        operation=ascii_text(event.operation) or "",
        outcome=event.outcome,
        redelivered=event.redelivered,
    )
