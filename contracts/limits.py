"""Size limits on requests, applied while the JSON is validated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationInfo

DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
DEFAULT_MAX_BATCH_ITEMS = 1000
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """How large a request may be. Workers pass theirs as pydantic validation context."""

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS
    #: Checked on the raw AMQP body before any JSON is parsed, so a huge batch of large
    #: messages is refused without decoding it (1,000 items of 1 MiB would be 1.3 GiB).
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def as_context(self) -> dict[str, Any]:
        """The pydantic validation context that carries these limits."""
        return {"limits": self}


DEFAULT_LIMITS = Limits()


def limits_from(info: ValidationInfo) -> Limits:
    """The limits in force for one validation: the context's, else the defaults."""
    context = info.context
    if isinstance(context, dict):
        limits = context.get("limits")
        if isinstance(limits, Limits):
            return limits
    return DEFAULT_LIMITS
