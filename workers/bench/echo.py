"""The reference: a plain aio-pika request/reply echo, deliberately unoptimized.

This is the yardstick ``sign`` is measured against, so it must stay the plainest code anyone
would write with aio-pika's documented API, and it must not be tuned along with the fleet:
one connection per side, a consumer that publishes each body back to ``reply_to`` and acks,
a client with an exclusive reply queue and a future per correlation id. It does what a signer
does to the broker (quorum queue, publisher confirms on both sides, persistent requests) and
nothing of what a signer does in Python. The consumer runs as its own process
(``python -m workers.bench.echo QUEUE``, broker from ``ZANDD_AMQP_URL``), like a signer, and
prints ``ready`` on stdout once it consumes.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid
from types import TracebackType

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)
from aio_pika.exceptions import AMQPError

from contracts.errors import RequestTimeout

ECHO_PREFETCH = 64
ECHO_TIMEOUT_S = 30.0
READY_LINE = "ready"


def echo_queue_arguments() -> dict[str, str]:
    """The echo queue is a quorum queue, like ``zandd.sign``: the broker does the same work."""
    return {"x-queue-type": "quorum"}


async def serve_echo(amqp_url: str, queue_name: str, stop: asyncio.Event) -> None:
    """Echo every request on ``queue_name`` to its ``reply_to`` until ``stop`` is set."""
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=ECHO_PREFETCH)
        queue = await channel.declare_queue(
            queue_name, durable=True, arguments=echo_queue_arguments()
        )

        async def on_message(message: AbstractIncomingMessage) -> None:
            async with message.process():
                reply = aio_pika.Message(message.body, correlation_id=message.correlation_id)
                await channel.default_exchange.publish(reply, routing_key=message.reply_to or "")

        await queue.consume(on_message)
        print(READY_LINE, flush=True)
        await stop.wait()


class EchoClient:
    """Calls the echo with a future per correlation id; create it with :meth:`connect`."""

    def __init__(
        self, connection: AbstractRobustConnection, channel: AbstractChannel, queue_name: str
    ) -> None:
        self._connection = connection
        self._channel = channel
        self._queue_name = queue_name
        self._reply_to = ""
        self._futures: dict[str, asyncio.Future[bytes]] = {}

    @classmethod
    async def connect(cls, amqp_url: str, queue_name: str) -> EchoClient:
        """Connect and start consuming an exclusive, server-named reply queue."""
        connection = await aio_pika.connect_robust(amqp_url)
        channel = await connection.channel()
        client = cls(connection, channel, queue_name)
        reply_queue = await channel.declare_queue(exclusive=True)
        client._reply_to = reply_queue.name
        await reply_queue.consume(client._on_reply, no_ack=True)
        return client

    async def call(self, body: bytes) -> bytes:
        """Send ``body`` to the echo and wait for it to come back."""
        correlation_id = str(uuid.uuid4())
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._futures[correlation_id] = future
        try:
            await self._channel.default_exchange.publish(
                aio_pika.Message(
                    body,
                    correlation_id=correlation_id,
                    reply_to=self._reply_to,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=self._queue_name,
            )
            async with asyncio.timeout(ECHO_TIMEOUT_S):
                return await future
        except TimeoutError:
            raise RequestTimeout(f"the echo did not answer within {ECHO_TIMEOUT_S:g} s") from None
        finally:
            del self._futures[correlation_id]

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._futures.get(message.correlation_id or "")
        if future is not None and not future.done():
            future.set_result(message.body)

    async def close(self) -> None:
        """Close the connection (and with it the reply queue)."""
        await self._connection.close()

    async def __aenter__(self) -> EchoClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def _main(queue_name: str) -> int:
    from workers.service.config import Settings

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await serve_echo(Settings().amqp_url, queue_name, stop)
    except (AMQPError, OSError) as exc:
        print(f"zandd bench echo: lost the broker ({type(exc).__name__})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m workers.bench.echo QUEUE", file=sys.stderr)
        sys.exit(2)
    sys.exit(asyncio.run(_main(sys.argv[1])))
