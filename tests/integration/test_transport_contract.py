"""One contract, every transport: the lean connection and the aiormq one, on the real broker.

consume, ack, reject, publish, confirm, return, declare, close, and a connection the broker
ends — each case runs on both, the way ``tests/unit/test_store_contract.py`` runs every store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import pytest
from yarl import URL

from contracts.errors import TransportClosed
from contracts.transport import Delivery, Properties, Transport
from contracts.transport_aiormq import AiormqTransport
from contracts.wire import DeclaredQueue, Wire
from tests.support.broker import close_connections_in


class _Full(Transport, Protocol):
    """What the contract exercises beyond the runtime's needs (the client's part)."""

    on_return: Callable[[int, str, Delivery], None] | None

    async def confirm_select(self) -> None: ...

    async def declare_queue(
        self, queue: str, *, exclusive: bool = False, auto_delete: bool = False,
        passive: bool = False,
    ) -> DeclaredQueue: ...  # fmt: skip


Connect = Callable[[str], Awaitable[Any]]


async def _lean(url: str) -> Wire:
    return await Wire.connect(url, connection_name="test-contract")


async def _aiormq(url: str) -> AiormqTransport:
    return await AiormqTransport.connect(url, connection_name="test-contract")


@pytest.fixture(params=["lean", "aiormq"])
def connect(request: pytest.FixtureRequest) -> Connect:
    return {"lean": _lean, "aiormq": _aiormq}[request.param]


async def _open(connect: Connect, url: str) -> _Full:
    transport: _Full = await connect(url)
    return transport


async def _until(condition: Callable[[], bool], what: str) -> None:
    # A generous bound: it only keeps a broken transport from hanging the test.
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 - the conditions are the broker's, not events
            await asyncio.sleep(0.01)
    assert condition(), what


async def _ready(connect: Connect, url: str, queue: str) -> int:
    """How many messages wait in ``queue`` (a connection of its own)."""
    transport = await _open(connect, url)
    try:
        return (await transport.declare_queue(queue, passive=True)).message_count
    finally:
        await transport.close()


async def test_published_messages_are_consumed_in_order_and_acked(
    connect: Connect, empty_amqp_url: str
) -> None:
    transport = await _open(connect, empty_amqp_url)
    queue = (await transport.declare_queue("contract.work")).name
    for n in range(3):
        transport.publish(
            f"m{n}".encode(),
            Properties(message_id=f"r-{n}", reply_to="amq.gen-x", headers={"n": n}),
            routing_key=queue,
        )
    deliveries: list[Delivery] = []
    await transport.qos(10)
    tag = await transport.consume(queue, deliveries.append)
    await _until(lambda: len(deliveries) == 3, "three deliveries")
    assert [d.body for d in deliveries] == [b"m0", b"m1", b"m2"]
    assert [d.message_id for d in deliveries] == ["r-0", "r-1", "r-2"]
    assert deliveries[2].headers == {"n": 2}
    assert deliveries[0].reply_to == "amq.gen-x"
    transport.ack(deliveries[1].delivery_tag, multiple=True)
    transport.ack(deliveries[2].delivery_tag)
    await transport.cancel(tag)
    await transport.close()
    assert transport.lost.is_set()
    assert await _ready(connect, empty_amqp_url, queue) == 0, "all three acked"


async def test_a_rejected_message_is_requeued_or_dropped(
    connect: Connect, empty_amqp_url: str
) -> None:
    transport = await _open(connect, empty_amqp_url)
    queue = (await transport.declare_queue("contract.reject")).name
    transport.publish(b"again", Properties(), routing_key=queue)
    deliveries: list[Delivery] = []
    await transport.consume(queue, deliveries.append)
    await _until(lambda: len(deliveries) == 1, "delivered")
    transport.reject(deliveries[0].delivery_tag, requeue=True)
    await _until(lambda: len(deliveries) == 2, "redelivered")
    assert deliveries[1].redelivered
    transport.reject(deliveries[1].delivery_tag, requeue=False)
    await transport.close()
    assert await _ready(connect, empty_amqp_url, queue) == 0


async def test_confirms_say_yes_and_an_unroutable_mandatory_message_comes_back(
    connect: Connect, empty_amqp_url: str
) -> None:
    transport = await _open(connect, empty_amqp_url)
    queue = (await transport.declare_queue("contract.confirm")).name
    await transport.confirm_select()
    returned: list[tuple[int, str, bytes]] = []
    transport.on_return = lambda code, text, message: returned.append((code, text, message.body))
    confirmed = transport.publish(b"kept", Properties(), routing_key=queue)
    assert confirmed is not None
    assert await asyncio.wait_for(confirmed, 10) is True
    bounced = transport.publish(b"lost", Properties(), routing_key="nowhere", mandatory=True)
    assert bounced is not None
    assert await asyncio.wait_for(bounced, 10) is True
    assert returned == [(312, "NO_ROUTE", b"lost")]
    await transport.close()
    assert await _ready(connect, empty_amqp_url, queue) == 1


async def test_a_missing_queue_is_a_typed_404(connect: Connect, empty_amqp_url: str) -> None:
    transport = await _open(connect, empty_amqp_url)
    with pytest.raises(TransportClosed):
        await transport.declare_queue("contract.missing", passive=True)
    await transport.close()


async def test_an_over_long_short_string_is_refused_before_anything_is_sent(
    connect: Connect, empty_amqp_url: str
) -> None:
    from contracts.errors import InvalidRequest

    transport = await _open(connect, empty_amqp_url)
    with pytest.raises(InvalidRequest, match="255 bytes"):
        transport.publish(b"", Properties(message_id="r" * 256), routing_key="x")
    assert not transport.lost.is_set()
    await transport.close()


async def test_a_connection_the_broker_ends_is_lost_and_writes_raise(
    connect: Connect, empty_amqp_url: str
) -> None:
    transport = await _open(connect, empty_amqp_url)
    await transport.declare_queue("contract.lost")
    assert await close_connections_in(URL(empty_amqp_url).path.lstrip("/")) >= 1
    await asyncio.wait_for(transport.lost.wait(), 15)
    assert isinstance(transport.reason, TransportClosed)
    assert transport.reason.retryable
    with pytest.raises(TransportClosed):
        transport.ack(1)
    await transport.close()
