"""One delivery from the broker, as the runtime, its audit hook and its spans see it.

The runtime consumes with aiormq (aio-pika's own transport) rather than through aio-pika's
``IncomingMessage``: per delivery that saves a second task, a message object with a dozen
properties copied one by one, and a publish wrapper — a tenth of a request's cost
(docs/performance.md). This is the small read-only view the rest of the worker needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiormq.abc import DeliveredMessage


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

    @classmethod
    def of(cls, delivered: DeliveredMessage) -> Delivery:
        """The view of an aiormq delivery (a ``basic.deliver``)."""
        frame = delivered.delivery
        properties = delivered.header.properties
        return cls(
            body=delivered.body,
            delivery_tag=getattr(frame, "delivery_tag", 0) or 0,
            exchange=getattr(frame, "exchange", "") or "",
            routing_key=getattr(frame, "routing_key", "") or "",
            redelivered=bool(getattr(frame, "redelivered", False)),
            headers=dict(properties.headers or {}),
            message_id=properties.message_id,
            correlation_id=properties.correlation_id,
            type=properties.message_type,
            reply_to=properties.reply_to,
            user_id=properties.user_id,
            content_type=properties.content_type,
        )
