"""Size limits on requests, applied while the JSON is validated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationInfo

DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
DEFAULT_MAX_BATCH_ITEMS = 1000
#: Parsing costs up to ~8 ms of event loop per MiB (integers of 4,300 digits, the most the
#: parser reads; a string of escapes ~3 ms): 2 MiB keeps the worst body near 16 ms on an idle
#: core, and still carries one 1 MiB message (1.4 MB as base64) or 1,000 digests (57 kB).
#: Batches of larger messages send digests.
DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
#: JSON structure a request may carry on top of three per batch item (an item's ``{``, the
#: ``,`` before it and, for ``verify.batch``, the ``,`` between its payload and its
#: signature): a ``key.create``'s 256 allowed signers, commas inside labels and names.
STRUCTURE_PER_ITEM = 3
STRUCTURE_SLACK = 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """How large a request may be. Workers pass theirs as pydantic validation context."""

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS
    #: Checked on the raw AMQP body before any JSON is parsed, so a huge batch of large
    #: messages is refused without decoding it (1,000 items of 1 MiB would be 1.3 GiB).
    #: It also bounds the event loop time one request can take (see DEFAULT_MAX_BODY_BYTES).
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    @property
    def max_structure(self) -> int:
        """The most ``,``, ``{`` and ``[`` bytes a request body may hold.

        Parsing and validating JSON costs per value, not per byte: 0.9 MB of ``{},`` is
        300,000 values to build and refuse one by one, while a 1 MiB base64 string is one.
        This bound is counted on the raw bytes (at memory speed) before any JSON is parsed,
        so a body of many small values is refused before it costs anything. Every valid
        request fits: items are the only list that grows with a limit.
        """
        return STRUCTURE_PER_ITEM * self.max_batch_items + STRUCTURE_SLACK

    def as_context(self) -> dict[str, Any]:
        """The pydantic validation context that carries these limits."""
        return {"limits": self}


DEFAULT_LIMITS = Limits()


def structure_count(body: bytes) -> int:
    """The ``,``, ``{`` and ``[`` bytes of a request body, counted at memory speed (compared
    with ``Limits.max_structure``)."""
    return body.count(b",") + body.count(b"{") + body.count(b"[")


def limits_from(info: ValidationInfo) -> Limits:
    """The limits in force for one validation: the context's, else the defaults."""
    context = info.context
    if isinstance(context, dict):
        limits = context.get("limits")
        if isinstance(limits, Limits):
            return limits
    return DEFAULT_LIMITS
