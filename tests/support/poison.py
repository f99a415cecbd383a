"""Poison messages of issue 12: AMQP header tables no AMQP library can read, built by hand.

pamqp (and so aio-pika) cannot encode them, so the tests publish them with ``RawProperties``
through the lean connection, which writes whatever properties it is given.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

from contracts.wire import Delivery, Properties, Wire


def table(*entries: bytes) -> bytes:
    """A field table of raw entries, with its length."""
    body = b"".join(entries)
    return struct.pack(">I", len(body)) + body


def entry(key: bytes, value: bytes) -> bytes:
    """One table entry: a key (raw bytes: it need not be UTF-8) and a typed value."""
    return bytes((len(key),)) + key + value


def longstr(text: bytes) -> bytes:
    """A long-string field value."""
    return b"S" + struct.pack(">I", len(text)) + text


def nested(depth: int) -> bytes:
    """A table value holding a table, ``depth`` times."""
    value = b"F" + table()
    for _ in range(depth):
        value = b"F" + table(entry(b"n", value))
    return value


TRACEPARENT = entry(b"traceparent", longstr(b"00-ab-cd-01"))
#: The three poison headers of issue 12, each next to an innocent traceparent.
POISON_HEADERS = {
    "timestamp": table(entry(b"when", b"T" + b"\xff" * 8), TRACEPARENT),
    "nested": table(entry(b"deep", nested(2000)), TRACEPARENT),
    "key": table(entry(b"\xff\xfe\x1b[31m", longstr(b"x")), TRACEPARENT),
}


def shortstr(text: str) -> bytes:
    encoded = text.encode()
    return bytes((len(encoded),)) + encoded


@dataclass(frozen=True, slots=True)
class RawProperties(Properties):
    """Properties whose headers table is given as raw bytes (only the short strings besides)."""

    raw_headers: bytes = b""

    def encode(self) -> tuple[int, bytes]:
        """The property flags and the properties, in wire order."""
        flags, parts = 0x2000, [self.raw_headers]
        for flag, value in (
            (0x0400, self.correlation_id),
            (0x0200, self.reply_to),
            (0x0080, self.message_id),
            (0x0020, self.type),
            (0x0010, self.user_id),
        ):
            if value is not None:
                flags |= flag
                parts.append(shortstr(value))
        return flags, b"".join(parts)


async def publish_poison(amqp_url: str, *, answerable: tuple[bool, ...]) -> list[Delivery]:
    """Publish one poison ``sign`` of each kind per entry of ``answerable`` (with a
    ``reply_to`` or not) as user ``guest``; the replies to the answerable ones, once all came.

    Each message id carries an ANSI escape (clear screen) that no listing may run:
    ``poison-<kind>-<answerable>\\x1b[2J``; the correlation id is ``<kind>-<answerable>``.
    """
    expected = len(POISON_HEADERS) * sum(answerable)
    replies: list[Delivery] = []
    answered = asyncio.Event()

    def on_reply(reply: Delivery) -> None:
        replies.append(reply)
        if len(replies) == expected:
            answered.set()

    wire = await Wire.connect(amqp_url, connection_name="poison-producer")
    try:
        await wire.confirm_select()
        # Server-named: a reply_to the fleet answers (contracts/replyto.py).
        reply_queue = (await wire.declare_queue("", exclusive=True)).name
        await wire.consume(reply_queue, on_reply, no_ack=True)
        for kind, headers in POISON_HEADERS.items():
            for with_reply in answerable:
                properties = RawProperties(
                    raw_headers=headers,
                    correlation_id=f"{kind}-{with_reply}",
                    reply_to=reply_queue if with_reply else None,
                    message_id=f"poison-{kind}-{with_reply}\x1b[2J",
                    type="sign",
                    user_id="guest",
                )
                confirmed = wire.publish(b"{}", properties, routing_key="sign", exchange="zandd")
                assert confirmed is not None
                assert await confirmed
        if expected:
            await asyncio.wait_for(answered.wait(), 60)
    finally:
        await wire.close()
    return replies
