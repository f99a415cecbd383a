"""The one error hierarchy of ZANDD HSM.

Every error knows its wire ``code`` (the ``error`` reply's ``code`` field) and whether the
caller may retry it. Workers turn any exception into one of these at their boundary; the
client helper turns an ``error`` reply back into the matching subclass. Messages are written
for the person reading them and never carry key material or request payloads.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class ErrorCode(StrEnum):
    """The ``code`` values of the wire contract's ``error`` reply."""

    INVALID_REQUEST = "invalid_request"
    UNKNOWN_OPERATION = "unknown_operation"
    KEY_NOT_FOUND = "key_not_found"
    KEY_DISABLED = "key_disabled"
    FORBIDDEN = "forbidden"
    INTEGRITY_ERROR = "integrity_error"
    TPM_UNAVAILABLE = "tpm_unavailable"
    VAULT_UNAVAILABLE = "vault_unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    THROTTLED = "throttled"
    INTERNAL = "internal"


class ZanddError(Exception):
    """Root of every error ZANDD raises on purpose."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL
    retryable: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code.value!r}, message={self.message!r})"


class InvalidRequest(ZanddError):
    """The request does not follow the wire contract; sending it again will not help."""

    code = ErrorCode.INVALID_REQUEST


class NotBytes(InvalidRequest, TypeError):
    """A message, digest or signature given as ``str`` (or anything but bytes): what is signed
    is exactly the bytes given, so text is encoded by its caller. A ``TypeError``, as Python's
    own byte APIs raise, and an ``InvalidRequest`` within the error tree."""


class UnknownOperation(ZanddError):
    """The operation name is not one this service knows."""

    code = ErrorCode.UNKNOWN_OPERATION


class KeyNotFound(ZanddError):
    """No key (or no such version of it) exists."""

    code = ErrorCode.KEY_NOT_FOUND


class KeyDisabled(ZanddError):
    """The key exists but is not in a state that allows this operation."""

    code = ErrorCode.KEY_DISABLED


class Forbidden(ZanddError):
    """The caller may not perform this operation on this key."""

    code = ErrorCode.FORBIDDEN


class IntegrityError(ZanddError):
    """Sealed material failed authentication or does not match its record: never used."""

    code = ErrorCode.INTEGRITY_ERROR


class TpmUnavailable(ZanddError):
    """The TPM could not be reached or refused the command."""

    code = ErrorCode.TPM_UNAVAILABLE
    retryable = True


class VaultUnavailable(ZanddError):
    """The key vault could not be reached or did not answer in time."""

    code = ErrorCode.VAULT_UNAVAILABLE
    retryable = True


class DeadlineExceeded(ZanddError):
    """The request's deadline passed before it was served."""

    code = ErrorCode.DEADLINE_EXCEEDED
    retryable = True


class Throttled(ZanddError):
    """The caller is over its quota (requests or signatures per second); nothing was done.

    ``retry_after_s`` is the service's hint: the same request sent again after that long has
    the quota it needs (unless the caller spends it on other requests meanwhile).
    """

    code = ErrorCode.THROTTLED
    retryable = True

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InternalError(ZanddError):
    """An unexpected failure inside the service; details are in the worker's log."""

    code = ErrorCode.INTERNAL
    retryable = True


class ConfigurationError(ZanddError):
    """Local set-up is wrong or missing (a KEK file, a URL, a package); fix it and restart."""

    code = ErrorCode.INTERNAL


class BrokerUnavailable(InternalError):
    """Client side: the broker could not be reached or the connection dropped mid-call."""


class TransportClosed(BrokerUnavailable):
    """The connection to the broker (or its channel) is gone; whatever used it may be retried.

    Raised by every transport (``contracts/transport.py``); ``reply_code`` is the broker's
    close code when the broker closed it (404: a missing exchange or queue, 403: access
    refused…), else None.
    """

    def __init__(self, message: str, reply_code: int | None = None) -> None:
        super().__init__(message)
        self.reply_code = reply_code


class BrokerBlocked(BrokerUnavailable):
    """Client side: the broker refuses new messages for now (a memory or disk alarm on the
    broker); retry later. The message says whether the request was sent at all."""


class NotDelivered(InternalError):
    """Client side: the broker could not route the request (no worker queue is bound)."""


class NoConsumer(NotDelivered):
    """Client side: no worker consumes the queue that serves the request (the fleet is
    stopped, or its keygen worker paused); retryable: the fleet may come back."""

    retryable = True


class Refused(BrokerUnavailable):
    """Client side: the broker did not take the request (a publisher nack, e.g. queue full)."""


class BrokerRejected(InvalidRequest):
    """Client side: the broker refused this request itself by closing the channel it was
    published on (a body over the broker's ``max_message_size``, no right to publish): sending
    it again would do the same, so it was not resent. ``reply_code`` is the broker's code."""

    def __init__(self, message: str, reply_code: int | None = None) -> None:
        super().__init__(message)
        self.reply_code = reply_code


class RequestTimeout(DeadlineExceeded):
    """Client side: no reply arrived within the call's timeout."""


#: Errors no retry or restart mends (bad configuration, a damaged or foreign vault, a ring that
#: does not open it): a worker that meets one at start exits ``EXIT_PERMANENT``.
PERMANENT_ERRORS: tuple[type[ZanddError], ...] = (ConfigurationError, IntegrityError)

ERRORS_BY_CODE: dict[ErrorCode, type[ZanddError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        UnknownOperation,
        KeyNotFound,
        KeyDisabled,
        Forbidden,
        IntegrityError,
        TpmUnavailable,
        VaultUnavailable,
        DeadlineExceeded,
        Throttled,
        InternalError,
    )
}


def error_from_code(code: str, message: str, *, retry_after_ms: int | None = None) -> ZanddError:
    """Rebuild the typed error for a wire ``code``; an unknown code becomes ``InternalError``.

    ``retry_after_ms`` is the ``error`` reply's hint; only ``throttled`` carries one.
    """
    try:
        cls = ERRORS_BY_CODE[ErrorCode(code)]
    except ValueError:
        return InternalError(f"unknown error code {code!r}: {message}")
    if cls is Throttled:
        retry_after_s = None if retry_after_ms is None else retry_after_ms / 1000.0
        return Throttled(message, retry_after_s=retry_after_s)
    return cls(message)
