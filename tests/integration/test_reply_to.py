"""``reply_to`` is no confused deputy: on the real broker, with two producers of documented rights.

Bob may publish requests; he must not make the fleet deliver into any queue he cannot read
himself — Alice's reply queues, ``zandd.dead``, the work queues, another application's queue —
nor end a worker's connection with a forged direct reply-to name. Alice, replying through a
server-named queue, direct reply-to or a queue named for her, notices nothing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from contracts.client import SigningClient
from contracts.replyto import DIRECT_REPLY_TO
from contracts.topology import DEAD_LETTER_QUEUE, EXCHANGE, KEYGEN_QUEUE, SIGN_QUEUE
from tests.support.audit import audit_outcomes
from tests.support.fleet import RunningFleet
from tests.support.principals import ALICE, BOB, SUFFIX
from workers.operator.dead import DeadLetterQueue

OTHER_APP_QUEUE = "billing.invoices"

pytestmark = [pytest.mark.rabbitmq, pytest.mark.tpm]


class Producer:
    """One producer connection that publishes hand-made requests as its own user."""

    def __init__(self, url: str, user: str) -> None:
        self._url = url
        self.user = user
        self.received: dict[str, list[AbstractIncomingMessage]] = {}

    async def __aenter__(self) -> Producer:
        self._connection = await aio_pika.connect(self._url)
        self.channel = await self._connection.channel()
        self._exchange = await self.channel.get_exchange(EXCHANGE, ensure=False)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._connection.close()

    async def listen(self, queue: AbstractQueue) -> str:
        """Collect whatever arrives on ``queue``; its name."""
        arrived = self.received.setdefault(queue.name, [])

        async def collect(message: AbstractIncomingMessage) -> None:
            arrived.append(message)

        await queue.consume(collect, no_ack=True)
        return queue.name

    async def sign(self, key_id: str, request_id: str, reply_to: str) -> None:
        body = {"key_id": key_id, "message": base64.b64encode(b"pay Bob").decode()}
        await self._exchange.publish(
            aio_pika.Message(
                json.dumps(body).encode(),
                content_type="application/json",
                type="sign",
                message_id=request_id,
                correlation_id=request_id,
                reply_to=reply_to,
                user_id=self.user,
            ),
            routing_key="sign",
        )


@pytest.fixture
async def admin(fleet: RunningFleet) -> AsyncIterator[AbstractChannel]:
    """A channel with every right on the vhost, for the other application's queue and counts."""
    connection = await aio_pika.connect(fleet.amqp_url)
    async with connection:
        yield await connection.channel()


async def _depth(channel: AbstractChannel, queue: str) -> int:
    declared = await channel.declare_queue(queue, passive=True)
    count = declared.declaration_result.message_count
    assert count is not None
    return count


async def _wait_for_dead_letters(channel: AbstractChannel, count: int) -> None:
    try:
        async with asyncio.timeout(60):  # generous: each is settled in milliseconds
            while await _depth(channel, DEAD_LETTER_QUEUE) < count:  # noqa: ASYNC110 - polled
                await asyncio.sleep(0.05)
    except TimeoutError:
        depth = await _depth(channel, DEAD_LETTER_QUEUE)
        pytest.fail(f"{depth} of {count} attacks were dead-lettered; the others were served")


def _sessions(fleet: RunningFleet) -> dict[str, int]:
    """Which broker connection each worker is on: a reconnect makes a new session."""
    return {name: id(runtime.acks) for name, runtime in fleet.runtimes.items()}


async def _attack(
    fleet: RunningFleet, users: dict[str, str], admin: AbstractChannel, targets: list[str]
) -> None:
    """Bob sends one ``sign`` per target as ``reply_to``; none is served, delivered or lost."""
    await (await admin.declare_queue(DEAD_LETTER_QUEUE, passive=True)).purge()
    async with (
        await SigningClient.connect(users[ALICE]) as alice_client,
        Producer(users[BOB], BOB) as bob,
    ):
        # Bob may sign with this key: a request served for him would be a signature.
        key = await alice_client.create_key(allowed_signers=[ALICE, BOB])
        sessions = _sessions(fleet)
        attacks = {f"attack-{n}-{uuid.uuid4().hex[:8]}": target for n, target in enumerate(targets)}
        for request_id, target in attacks.items():
            await bob.sign(key.key_id, request_id, reply_to=target)
        await _wait_for_dead_letters(admin, len(attacks))
        # Alice is served as before, after every attack was settled.
        signed = await alice_client.sign(key.key_id, b"after the attacks")
        assert await alice_client.verify(key, signed.signature, message=b"after the attacks")

    assert _sessions(fleet) == sessions, "no worker lost its broker connection"
    letters = await DeadLetterQueue(fleet.amqp_url).list()
    assert sorted((d.message_id or "", d.reason, d.count, d.queue) for d in letters) == sorted(
        (request_id, "rejected", 1, SIGN_QUEUE) for request_id in attacks
    ), "each attack dead-lettered on its first delivery, and nothing else landed there"
    outcomes = await audit_outcomes(fleet)
    recorded = {request_id: outcomes.get(request_id) for request_id in attacks}
    assert recorded == {request_id: ["invalid_request"] for request_id in attacks}, (
        "one audit entry per attack, and no signature made"
    )


async def test_a_producer_cannot_make_the_fleet_deliver_where_it_cannot_read(
    fleet: RunningFleet, users: dict[str, str], admin: AbstractChannel
) -> None:
    await admin.declare_queue(OTHER_APP_QUEUE, durable=True)
    async with Producer(users[ALICE], ALICE) as alice:
        # Alice's server-named queues are left out: a producer who learned one's name could
        # still target it (the residual docs/threat-model.md states).
        alice_queue = await alice.listen(
            await alice.channel.declare_queue(f"zandd.reply.{ALICE}.inbox", exclusive=True)
        )
        targets = [
            alice_queue,
            f"zandd.reply.{ALICE}.{SUFFIX}",  # a name of Alice's form that nobody declared
            OTHER_APP_QUEUE,
            DEAD_LETTER_QUEUE,
            SIGN_QUEUE,
            KEYGEN_QUEUE,
            f"zandd.reply.{BOB}",
        ]
        await _attack(fleet, users, admin, targets)
        assert not alice.received[alice_queue]
    assert await _depth(admin, OTHER_APP_QUEUE) == 0


def _direct_reply_to(node: bytes) -> str:
    """A direct reply-to name of the broker's shape, for a node of our choosing."""
    pid = bytes([131, 88, 118]) + struct.pack(">H", len(node)) + node + bytes(12)
    key = base64.b64encode(bytes(16)).decode()
    return f"{DIRECT_REPLY_TO}.{base64.b64encode(pid).decode()}.{key}"


async def test_a_forged_direct_reply_to_name_does_not_end_a_workers_connection(
    fleet: RunningFleet, users: dict[str, str], admin: AbstractChannel
) -> None:
    # Each of these, as a reply's routing key, made RabbitMQ 3.10 close the replying worker's
    # connection (541 INTERNAL_ERROR), request after request until the delivery limit.
    targets = [
        f"{DIRECT_REPLY_TO}.g2gD.xyz",  # a tuple, not a pid
        f"{DIRECT_REPLY_TO}.garbage",
        _direct_reply_to(b"reply@1"),  # a node hash no running node has
        _direct_reply_to(b"rabbit@localhost"),
    ]
    await _attack(fleet, users, admin, targets)


async def test_producers_replying_as_wire_contract_v1_allows_notice_nothing(
    fleet: RunningFleet, users: dict[str, str]
) -> None:
    async with (
        await SigningClient.connect(users[ALICE]) as client,
        Producer(users[ALICE], ALICE) as alice,
    ):
        key = await client.create_key(allowed_signers=[ALICE])
        # The client's own server-named reply queue.
        assert (await client.sign(key.key_id, b"server-named")).signature
        direct = await alice.channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        named = await alice.channel.declare_queue(
            f"zandd.reply.{ALICE}.{uuid.uuid4().hex}", exclusive=True, auto_delete=True
        )
        server_named = await alice.channel.declare_queue("", exclusive=True, auto_delete=True)
        # What a SigningClient from before the reply_to rule declared.
        legacy = await alice.channel.declare_queue(
            f"zandd.reply.{uuid.uuid4().hex}", exclusive=True, auto_delete=True
        )
        for queue in (direct, named, server_named, legacy):
            await alice.listen(queue)
            request_id = f"{queue.name}-{uuid.uuid4().hex}"[-100:]
            await alice.sign(key.key_id, request_id, reply_to=queue.name)
            async with asyncio.timeout(30):
                while not alice.received[queue.name]:  # noqa: ASYNC110 - filled by a callback
                    await asyncio.sleep(0.01)
            (reply,) = alice.received[queue.name]
            assert (reply.type, reply.correlation_id) == ("sign.reply", request_id), reply.body
            signature: Any = json.loads(reply.body)["signature"]
            assert await client.verify(key, base64.b64decode(signature), message=b"pay Bob")
