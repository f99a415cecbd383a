"""A producer, as an upstream system would write one: one key, then a signature every few seconds.

Runs in the compose stack as the least-privileged ``producer`` broker user (it may publish to
``zandd`` and use its own reply queue, nothing else). Each round signs a fresh message, checks
the signature locally against the public key pinned from the ``key.create`` reply (not one the
fleet serves later), and prints one line.

    ZANDD_AMQP_URL=amqp://producer:producer-dev@localhost:5672/zandd python producer_example.py
"""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime

from contracts.client import SigningClient
from contracts.errors import ZanddError

KEY_REQUEST_ID = "compose-producer-example-key"
INTERVAL_S = float(os.environ.get("PRODUCER_INTERVAL_S", "5"))


async def produce(amqp_url: str) -> None:
    """Create (or find again: the request id is the idempotency key) the key, then sign."""
    async with await SigningClient.connect(amqp_url) as client:
        key = await client.create_key(label="producer-example", request_id=KEY_REQUEST_ID)
        print(f"producer: using key {key.key_id}", flush=True)
        round_number = 0
        while True:
            round_number += 1
            message = f"invoice {round_number} at {datetime.now(UTC).isoformat()}".encode()
            try:
                reply = await client.sign(key.key_id, message)
                valid = await client.verify(key, reply.signature, message=message)
            except ZanddError as exc:
                print(f"producer: round {round_number} failed: {exc.message}", flush=True)
            else:
                print(f"producer: round {round_number} signature valid={valid}", flush=True)
            await asyncio.sleep(INTERVAL_S)


def main() -> int:
    """Run until interrupted; one sentence on stderr when the fleet cannot be reached."""
    try:
        asyncio.run(produce(os.environ["ZANDD_AMQP_URL"]))
    except ZanddError as exc:
        print(f"producer: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
