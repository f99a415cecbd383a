"""The client and a channel the broker closes over a publish: whose call fails, and how often
a request is sent. The lean connection runs over a recording transport; the broker's
``channel.close`` is fed to it as the frame RabbitMQ sends (``tests/integration/
test_oversized.py`` shows the same against a real broker)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pamqp import commands, frame

from contracts.client import SigningClient
from contracts.errors import BrokerRejected, BrokerUnavailable, InvalidRequest, NotDelivered
from contracts.limits import Limits
from contracts.wire import Wire

SIZE_TEXT = "PRECONDITION_FAILED - message size 70000 is larger than configured max size 65536"


class _Recorder:
    """Records what the connection writes."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.wrote = asyncio.Event()

    def write(self, data: bytes) -> None:
        self.written += data
        self.wrote.set()

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def publishes(self) -> int:
        data = bytes(self.written)
        if data.startswith(b"AMQP"):
            data = data[8:]
        count = 0
        while data:
            consumed, _channel, value = frame.unmarshal(data)
            count += isinstance(value, commands.Basic.Publish)
            data = data[consumed:]
        return count


def _client(*, retry: bool, limits: Limits | None = None) -> SigningClient:
    extra: dict[str, Any] = {} if limits is None else {"limits": limits}
    return SigningClient(
        "amqp://app:secret@localhost/",
        default_timeout_s=10.0,
        retry=retry,
        connect_timeout_s=1.0,
        **extra,
    )


def _connect(client: SigningClient) -> tuple[Wire, _Recorder]:
    """Give the client a fresh connection (what its supervisor does after a loss)."""
    recorder = _Recorder()
    wire = Wire.for_testing(recorder, confirms=True)  # type: ignore[arg-type]
    recorder.written.clear()
    client._wire = wire
    client._connected.set()
    return wire, recorder


def _close_channel(wire: Wire, code: int, text: str) -> None:
    """The broker closes channel 1 (as over a publish it refuses)."""
    close = commands.Channel.Close(reply_code=code, reply_text=text, class_id=60, method_id=40)
    wire.data_received(frame.marshal(close, 1))


async def _published(recorder: _Recorder, count: int) -> None:
    async with asyncio.timeout(5):
        while recorder.publishes() < count:
            recorder.wrote.clear()
            await recorder.wrote.wait()


async def _reconnect_after_loss(client: SigningClient) -> tuple[Wire, _Recorder]:
    client._connected.clear()
    await asyncio.sleep(0)
    return _connect(client)


async def test_the_call_whose_body_is_over_the_brokers_limit_fails_alone_and_is_not_resent() -> (
    None
):
    client = _client(retry=True)
    wire, recorder = _connect(client)
    culprit = asyncio.create_task(client.sign("zk-1", b"\1" * 60_000))
    innocent = asyncio.create_task(client.sign("zk-1", b"small"))
    await _published(recorder, 2)
    _close_channel(wire, 406, SIZE_TEXT)
    with pytest.raises(BrokerRejected, match="max_message_size of 65536") as rejected:
        await culprit
    assert not rejected.value.retryable
    assert rejected.value.reply_code == 406
    # The innocent is resent on the next connection; the culprit is not.
    _wire2, recorder2 = await _reconnect_after_loss(client)
    await _published(recorder2, 1)
    await asyncio.sleep(0.05)
    assert recorder2.publishes() == 1
    assert client.resent_requests == 1
    innocent.cancel()
    with pytest.raises(asyncio.CancelledError):
        await innocent
    # The client learned the broker's limit: a larger body is refused unsent.
    with pytest.raises(BrokerRejected, match="was not sent"):
        await client.sign("zk-1", b"\1" * 60_000)
    assert recorder2.publishes() == 1


async def test_without_retry_the_innocent_fails_retryable() -> None:
    client = _client(retry=False)
    wire, recorder = _connect(client)
    culprit = asyncio.create_task(client.sign("zk-1", b"\1" * 60_000))
    innocent = asyncio.create_task(client.sign("zk-1", b"small"))
    await _published(recorder, 2)
    _close_channel(wire, 406, SIZE_TEXT)
    with pytest.raises(BrokerRejected):
        await culprit
    with pytest.raises(BrokerUnavailable) as failed:
        await innocent
    assert failed.value.retryable
    assert not isinstance(failed.value, BrokerRejected)


async def test_a_channel_error_naming_no_call_is_resent_once_at_most() -> None:
    client = _client(retry=True)
    wire, recorder = _connect(client)
    call = asyncio.create_task(client.sign("zk-1", b"m"))
    await _published(recorder, 1)
    _close_channel(wire, 406, "PRECONDITION_FAILED - something the client cannot tell")
    wire2, recorder2 = await _reconnect_after_loss(client)
    await _published(recorder2, 1)
    _close_channel(wire2, 406, "PRECONDITION_FAILED - something the client cannot tell")
    with pytest.raises(BrokerUnavailable, match="twice: not sent again"):
        await call
    assert recorder.publishes() + recorder2.publishes() == 2


@pytest.mark.parametrize(
    ("code", "error"), [(403, BrokerRejected), (404, NotDelivered)], ids=["403", "404"]
)
async def test_a_channel_error_that_fails_every_call_alike_is_not_resent(
    code: int, error: type[Exception]
) -> None:
    client = _client(retry=True)
    wire, recorder = _connect(client)
    calls = [asyncio.create_task(client.sign("zk-1", f"m{n}".encode())) for n in range(3)]
    await _published(recorder, 3)
    _close_channel(wire, code, "ACCESS_REFUSED - write access to exchange 'zandd' refused")
    for call in calls:
        with pytest.raises(error):
            await call
    assert client.resent_requests == 0


async def test_a_body_over_the_clients_limits_is_never_published() -> None:
    client = _client(retry=True, limits=Limits(max_body_bytes=2048))
    _wire, recorder = _connect(client)
    with pytest.raises(InvalidRequest, match=r"its body is \d+ bytes, over the limit of 2048"):
        await client.sign_batch("zk-1", [b"\0" * 500] * 4)
    too_many = Limits(max_batch_items=2)
    client = _client(retry=True, limits=too_many)
    with pytest.raises(InvalidRequest, match="more than the limit of 2 entries"):
        await client.sign_batch("zk-1", digests=[b"\0" * 32] * 3)
    assert recorder.publishes() == 0
