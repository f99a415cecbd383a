"""The least-privilege broker users of ops/rabbitmq/definitions.json, on the real broker.

The definitions are imported with ``rabbitmqctl import_definitions`` into a private vhost,
with the users renamed so that parallel runs (and a real deployment on the same broker) never
collide; their development passwords are the ones the file documents. Each user does its job
and is refused outside its rights. Users and vhost are removed afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiormq.exceptions import ChannelAccessRefused, ChannelClosed, ChannelPreconditionFailed
from yarl import URL

from contracts.client import SigningClient
from contracts.errors import KeyNotFound
from contracts.models import ErrorReply
from contracts.operations import ERROR_REPLY_TYPE
from contracts.replyto import (
    DIRECT_REPLY_TO,
    direct_reply_node,
    learn_direct_reply_node,
    producer_permissions,
)
from contracts.topology import (
    DEAD_LETTER_QUEUE,
    EVENTS_EXCHANGE,
    EXCHANGE,
    KEYGEN_QUEUE,
    SIGN_QUEUE,
    declare_topology,
)
from tests.support.broker import BASE_AMQP_URL, rabbitmqctl

pytestmark = pytest.mark.rabbitmq

DEFINITIONS = Path(__file__).parents[2] / "ops" / "rabbitmq" / "definitions.json"
ROLES = ("ops", "producer", "signer", "keygen")


@dataclass(frozen=True)
class Broker:
    """The imported definitions: one AMQP URL per role, on the private vhost."""

    vhost: str
    users: dict[str, str]

    def url(self, role: str) -> str:
        return str(
            URL(BASE_AMQP_URL)
            .with_user(self.users[role])
            .with_password(f"{role}-dev")
            .with_path("/" + self.vhost)
        )

    @property
    def admin_url(self) -> str:
        return str(URL(BASE_AMQP_URL).with_path("/" + self.vhost))


def _import(definitions: dict[str, Any]) -> None:
    # Debian's rabbitmqctl runs as the rabbitmq user and 3.10 reads no definitions from stdin:
    # the file must be world-readable (it holds only hashes of the documented dev passwords).
    descriptor, name = tempfile.mkstemp(suffix=".json")
    path = Path(name)
    try:
        with os.fdopen(descriptor, "w") as file:
            json.dump(definitions, file)
        path.chmod(0o644)
        rabbitmqctl("import_definitions", str(path))
    finally:
        path.unlink()


def _private_copy(definitions: dict[str, Any], vhost: str, users: dict[str, str]) -> dict[str, Any]:
    """The definitions with the vhost and user names replaced everywhere they appear."""
    text = json.dumps(definitions)
    copy: dict[str, Any] = json.loads(text)
    for entry in copy["users"]:
        entry["name"] = users[entry["name"]]
    for entry in copy["permissions"]:
        if entry["user"] == "producer":
            # A producer's reply queues carry its name (RabbitMQ 3.10 has no {username} there).
            assert (entry["configure"], entry["write"], entry["read"]) == producer_permissions(
                "producer"
            )
            rights = producer_permissions(users["producer"])
            entry["configure"], entry["write"], entry["read"] = rights
        entry["user"] = users[entry["user"]]
    for section in ("vhosts",):
        for entry in copy[section]:
            entry["name"] = vhost
    for section in ("permissions", "queues", "exchanges", "bindings", "policies"):
        for entry in copy[section]:
            entry["vhost"] = vhost
    return copy


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    definitions = json.loads(DEFINITIONS.read_text())
    assert sorted(user["name"] for user in definitions["users"]) == sorted(ROLES)
    run = uuid.uuid4().hex[:10]
    vhost = f"zandd-test-perm-{run}"
    users = {role: f"zandd-test-{run}-{role}" for role in ROLES}
    admin = URL(BASE_AMQP_URL).user or "guest"
    try:
        _import(_private_copy(definitions, vhost, users))
        rabbitmqctl("set_permissions", "-p", vhost, admin, ".*", ".*", ".*")
        yield Broker(vhost, users)
    finally:
        _remove([("delete_user", user) for user in users.values()] + [("delete_vhost", vhost)])


def _remove(commands: list[tuple[str, str]]) -> None:
    """Run every removal even when one hangs; fail afterwards if any did. A removal of
    something the import never created fails harmlessly and is not reported."""
    timed_out = []
    for command in commands:
        try:
            subprocess.run(["rabbitmqctl", "-q", *command], capture_output=True, timeout=120)
        except subprocess.TimeoutExpired:
            timed_out.append(" ".join(command))
    assert not timed_out, f"rabbitmqctl timed out: {timed_out}"


@pytest.fixture
async def connections(broker: Broker) -> AsyncIterator[Callable[[str], Awaitable[AbstractChannel]]]:
    """Opens a channel (with publisher confirms) as a role; everything is closed afterwards."""
    opened: list[aio_pika.abc.AbstractConnection] = []

    async def channel_as(role: str) -> AbstractChannel:
        connection = await aio_pika.connect(broker.url(role))
        opened.append(connection)
        return await connection.channel(publisher_confirms=True)

    yield channel_as
    for connection in opened:
        await connection.close()


async def test_the_definitions_declare_exactly_the_topology_the_workers_declare(
    broker: Broker,
) -> None:
    # RabbitMQ refuses a redeclaration whose type or arguments differ (PRECONDITION_FAILED),
    # so the workers' own declare succeeding proves the imported queues match them.
    connection = await aio_pika.connect(broker.admin_url)
    async with connection:
        topology = await declare_topology(await connection.channel())
        assert set(topology.queues) == {KEYGEN_QUEUE, SIGN_QUEUE}


def _queues(vhost: str) -> dict[str, dict[str, Any]]:
    """Each queue's arguments and the policy that applies to it, as the broker has them."""
    columns = ("name", "arguments", "policy")
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost, *columns, "--formatter", "json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return {
        queue["name"]: {
            "arguments": {name: value for name, _type, value in queue["arguments"]},
            "policy": queue["policy"],
        }
        for queue in json.loads(listing)
    }


async def test_the_work_queues_are_bounded_by_their_arguments_and_by_a_policy(
    broker: Broker,
) -> None:
    # The policy is what bounds a queue declared before the bounds were (an import keeps an
    # existing queue's arguments): see docs/operations.md, "Queue bounds".
    queues = _queues(broker.vhost)
    for name, policy, length, size in (
        (SIGN_QUEUE, "zandd-sign-bounds", 100_000, 1024**3),
        (KEYGEN_QUEUE, "zandd-keygen-bounds", 10_000, 64 * 1024**2),
    ):
        arguments = queues[name]["arguments"]
        assert (arguments.get("x-max-length"), arguments.get("x-max-length-bytes")) == (
            length,
            size,
        )
        assert arguments["x-overflow"] == "reject-publish"
        assert queues[name]["policy"] == policy


async def _consumed(channel: AbstractChannel, queue: str) -> None:
    """Until ``queue`` has a consumer (a passive declare needs no permission)."""
    async with asyncio.timeout(30):
        while True:
            declared = await channel.declare_queue(queue, passive=True)
            if declared.declaration_result.consumer_count:
                return
            await asyncio.sleep(0.02)


async def _answer_one(channel: AbstractChannel, queue: str, code: str) -> AbstractIncomingMessage:
    """Consume one request from ``queue`` and answer it with an error reply, as a worker does."""
    delivered: asyncio.Future[AbstractIncomingMessage] = asyncio.get_running_loop().create_future()

    async def on_message(message: AbstractIncomingMessage) -> None:
        reply = ErrorReply(code=code, message="no such key", retryable=False)  # type: ignore[arg-type]
        await channel.default_exchange.publish(
            aio_pika.Message(
                reply.model_dump_json().encode(),
                content_type="application/json",
                type=ERROR_REPLY_TYPE,
                correlation_id=message.correlation_id,
            ),
            routing_key=message.reply_to or "",
            mandatory=False,
        )
        await message.ack()
        if not delivered.done():
            delivered.set_result(message)

    work = await channel.get_queue(queue, ensure=True)
    await work.consume(on_message)
    return await asyncio.wait_for(delivered, 30)


async def test_a_producer_and_a_signer_complete_a_request_with_their_own_rights(
    broker: Broker, connections: Callable[[str], Awaitable[AbstractChannel]]
) -> None:
    signer = await connections("signer")
    async with await SigningClient.connect(broker.url("producer"), timeout_s=30) as client:
        served = asyncio.create_task(_answer_one(signer, SIGN_QUEUE, "key_not_found"))
        await _consumed(signer, SIGN_QUEUE)  # else the client fails fast with NoConsumer
        with pytest.raises(KeyNotFound):
            await client.public_key("zk-00000000000000000000")
        request = await served
    assert request.user_id == broker.users["producer"]


async def test_a_producer_declares_and_reads_its_own_reply_queues(
    broker: Broker, connections: Callable[[str], Awaitable[AbstractChannel]]
) -> None:
    channel = await connections("producer")
    server_named = await channel.declare_queue("", exclusive=True, auto_delete=True)
    assert server_named.name.startswith("amq.gen-")
    own = f"zandd.reply.{broker.users['producer']}.{uuid.uuid4().hex}"
    for queue in (server_named, await channel.declare_queue(own, exclusive=True)):
        await queue.consume(_ignore, no_ack=True)


@pytest.mark.parametrize("role", ["signer", "keygen"])
async def test_a_worker_learns_the_direct_reply_to_node_with_its_own_rights(
    broker: Broker, role: str
) -> None:
    connection = await aio_pika.connect(broker.url(role))
    async with connection:
        node = await learn_direct_reply_node(connection)
        # The node segment a requester's direct reply-to name carries.
        requester = await aio_pika.connect(broker.admin_url)
        async with requester:
            channel = await requester.channel()
            await (await channel.get_queue(DIRECT_REPLY_TO, ensure=False)).consume(
                _ignore, no_ack=True
            )
            returned = await channel.default_exchange.publish(
                aio_pika.Message(b"", reply_to=DIRECT_REPLY_TO, message_id="probe"),
                routing_key="no-such-queue",
                mandatory=True,
            )
    assert node is not None
    assert node == direct_reply_node(returned.header.properties.reply_to or "")  # type: ignore[union-attr]


async def test_a_keygen_worker_serves_its_queue_and_publishes_events_signers_hear(
    broker: Broker, connections: Callable[[str], Awaitable[AbstractChannel]]
) -> None:
    signer, keygen = await connections("signer"), await connections("keygen")
    # A signer's event queue, named as workers.service.events names it.
    events_queue = await signer.declare_queue(
        f"{EVENTS_EXCHANGE}.test.{uuid.uuid4().hex[:8]}", exclusive=True, auto_delete=True
    )
    await events_queue.bind(await signer.get_exchange(EVENTS_EXCHANGE))
    heard: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    await events_queue.consume(heard.put, no_ack=True)
    events = await keygen.get_exchange(EVENTS_EXCHANGE)
    await events.publish(aio_pika.Message(b"{}", type="key.state_changed"), routing_key="")
    assert (await asyncio.wait_for(heard.get(), 30)).type == "key.state_changed"

    async with await SigningClient.connect(broker.url("producer"), timeout_s=30) as client:
        served = asyncio.create_task(_answer_one(keygen, KEYGEN_QUEUE, "forbidden"))
        await _consumed(keygen, KEYGEN_QUEUE)
        with pytest.raises(Exception, match="no such key"):
            await client.create_key(request_id=uuid.uuid4().hex)
        await served


async def _publish(channel: AbstractChannel, exchange: str, routing_key: str, **props: Any) -> None:
    target = channel.default_exchange if exchange == "" else await channel.get_exchange(exchange)
    await target.publish(aio_pika.Message(b"{}", **props), routing_key=routing_key)


async def _ignore(message: AbstractIncomingMessage) -> None:
    """A consumer callback for deliveries that must never come."""


async def _consume(channel: AbstractChannel, queue: str) -> None:
    await (await channel.get_queue(queue, ensure=True)).consume(_ignore)


async def _declare(channel: AbstractChannel, queue: str) -> None:
    await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})


async def _declare_reply_queue(channel: AbstractChannel, queue: str) -> None:
    await channel.declare_queue(queue, exclusive=True, auto_delete=True)


async def _delete(channel: AbstractChannel, queue: str) -> None:
    await (await channel.get_queue(queue, ensure=True)).delete(if_unused=False, if_empty=False)


Attempt = Callable[[AbstractChannel, dict[str, str]], Awaitable[None]]

REFUSED: list[tuple[str, str, Attempt, type[ChannelClosed]]] = [
    ("producer", "consume zandd.sign", lambda c, u: _consume(c, SIGN_QUEUE), ChannelAccessRefused),
    (
        "producer",
        "publish as another user",
        lambda c, u: _publish(c, EXCHANGE, "sign", user_id=u["signer"]),
        ChannelPreconditionFailed,
    ),
    (
        "producer",
        "publish to zandd.events",
        lambda c, u: _publish(c, EVENTS_EXCHANGE, ""),
        ChannelAccessRefused,
    ),
    (
        "producer",
        "bypass the exchange via the default exchange",
        lambda c, u: _publish(c, "", SIGN_QUEUE),
        ChannelAccessRefused,
    ),
    (
        "producer",
        "declare a work queue",
        lambda c, u: _declare(c, SIGN_QUEUE),
        ChannelAccessRefused,
    ),
    (
        "producer",
        "declare another producer's reply queue",
        lambda c, u: _declare_reply_queue(c, f"zandd.reply.{u['ops']}.x"),
        ChannelAccessRefused,
    ),
    (
        "producer",
        "declare a reply queue another principal's rule owns",
        lambda c, u: _declare_reply_queue(c, f"zandd.reply.{u['producer']}.evil.x"),
        ChannelAccessRefused,
    ),
    (
        "producer",
        "name a queue amq.gen- itself",
        lambda c, u: _declare_reply_queue(c, "amq.gen-Lj47WP1eYOHeRBztvFuKmQ"),
        ChannelAccessRefused,
    ),
    (
        "producer",
        "read the dead letters",
        lambda c, u: _consume(c, DEAD_LETTER_QUEUE),
        ChannelAccessRefused,
    ),
    (
        "signer",
        "publish requests to zandd",
        lambda c, u: _publish(c, EXCHANGE, "sign"),
        ChannelAccessRefused,
    ),
    (
        "signer",
        "forge a key state event",
        lambda c, u: _publish(c, EVENTS_EXCHANGE, ""),
        ChannelAccessRefused,
    ),
    (
        "signer",
        "consume zandd.keygen",
        lambda c, u: _consume(c, KEYGEN_QUEUE),
        ChannelAccessRefused,
    ),
    ("signer", "delete zandd.sign", lambda c, u: _delete(c, SIGN_QUEUE), ChannelAccessRefused),
    ("keygen", "consume zandd.sign", lambda c, u: _consume(c, SIGN_QUEUE), ChannelAccessRefused),
    (
        "keygen",
        "publish requests to zandd",
        lambda c, u: _publish(c, EXCHANGE, "sign"),
        ChannelAccessRefused,
    ),
    ("keygen", "declare a queue", lambda c, u: _declare(c, "zandd.mine"), ChannelAccessRefused),
]


@pytest.mark.parametrize(
    ("role", "attempt", "expected"),
    [(role, attempt, expected) for role, _, attempt, expected in REFUSED],
    ids=[f"{role}: {what}" for role, what, _, _ in REFUSED],
)
async def test_each_user_is_refused_outside_its_rights(
    broker: Broker,
    connections: Callable[[str], Awaitable[AbstractChannel]],
    role: str,
    attempt: Attempt,
    expected: type[ChannelClosed],
) -> None:
    channel = await connections(role)

    async def attempt_then_round_trip() -> None:
        await attempt(channel, broker.users)
        # A refusal closes the channel; a round trip anyone may make (a passive declare) sees
        # it even where the attempt itself returned before the broker answered.
        await channel.get_queue(SIGN_QUEUE, ensure=True)

    with pytest.raises(expected):
        await attempt_then_round_trip()
