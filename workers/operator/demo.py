"""``zandd up --demo``: prove a running fleet end to end and report in one line."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

from contracts.client import SigningClient
from contracts.crypto import load_public_key, verify_signature

DEMO_SIGNATURES = 200


@dataclass(frozen=True, slots=True)
class DemoResult:
    """How the demo went."""

    key_id: str
    verified: int
    total: int

    @property
    def line(self) -> str:
        """The one line ``zandd up --demo`` prints."""
        return f"demo: verified {self.verified}/{self.total} signatures with key {self.key_id}"


async def run_demo(amqp_url: str, count: int = DEMO_SIGNATURES) -> DemoResult:
    """Create a key, sign ``count`` different messages through the queue, verify each locally.

    Verification uses the public key from the ``key.create`` reply, not the service, so a
    wrong signature cannot hide behind a wrong public key served with it.
    """
    run = uuid.uuid4().hex
    async with await SigningClient.connect(amqp_url) as client:
        key = await client.create_key(label="zandd-demo", request_id=f"demo-{run}")
        messages = [f"zandd demo {run} message {i}".encode() for i in range(count)]
        replies = await asyncio.gather(*(client.sign(key.key_id, m) for m in messages))
    public_key = load_public_key(key.public_key_pem)
    verified = sum(
        verify_signature(public_key, reply.signature, message=message)
        for message, reply in zip(messages, replies, strict=True)
    )
    return DemoResult(key_id=key.key_id, verified=verified, total=count)
