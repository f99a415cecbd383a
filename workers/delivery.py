"""One delivery from the broker, as the runtime, its audit hook and its spans see it.

The runtime's own connection (``workers/wire.py``) decodes ``basic.deliver`` and its content
straight into this small read-only view: no message object with a dozen properties copied one
by one, no second task per delivery.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Delivery:
    """A request as delivered: its body, its AMQP properties, where it came from."""

    body: bytes
    delivery_tag: int
    exchange: str
    routing_key: str
    redelivered: bool
    headers: dict[str, Any]
    message_id: str | None
    correlation_id: str | None
    type: str | None
    reply_to: str | None
    user_id: str | None
    content_type: str | None
