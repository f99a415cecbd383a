"""The one reconnect loop the consumer runtime and the event subscriber share."""

from __future__ import annotations

import asyncio

import pytest

from contracts.errors import BrokerUnavailable
from workers.consumer.backoff import serve_reconnecting


class _Broker:
    """Hands out numbered connections; ``refusals`` connects fail before each one works."""

    def __init__(self, refusals: list[int]) -> None:
        self._refusals = refusals
        self.opened: list[int] = []
        self.served: list[int] = []
        self.events: list[str] = []

    async def connect(self) -> int:
        if self._refusals and self._refusals[0] > 0:
            self._refusals[0] -= 1
            self.events.append("refused")
            raise BrokerUnavailable("down")
        if self._refusals:
            self._refusals.pop(0)
        self.opened.append(len(self.opened) + 1)
        self.events.append(f"open {self.opened[-1]}")
        return self.opened[-1]


async def test_each_loss_is_reported_then_reconnected_with_backoff_until_stop() -> None:
    broker = _Broker([0, 2, 1])
    stop = asyncio.Event()

    async def serve(connection: int) -> None:
        broker.served.append(connection)
        broker.events.append(f"lost {connection}")
        if connection == 3:
            stop.set()

    await serve_reconnecting(
        broker.connect,
        serve,
        stop=stop,
        what="test",
        retry_on=(BrokerUnavailable,),
        max_delay_s=0.01,
        on_lost=lambda: broker.events.append("gap"),
    )
    assert broker.served == [1, 2, 3]
    assert broker.events == [
        "open 1",
        "lost 1",
        "gap",
        "refused",
        "refused",
        "open 2",
        "lost 2",
        "gap",
        "refused",
        "open 3",
        "lost 3",
    ]


async def test_the_first_connection_is_not_retried() -> None:
    broker = _Broker([1])

    async def serve(connection: int) -> None:
        raise AssertionError("nothing was connected to serve")

    with pytest.raises(BrokerUnavailable):
        await serve_reconnecting(
            broker.connect, serve, stop=asyncio.Event(), what="test", retry_on=(BrokerUnavailable,)
        )
    assert broker.events == ["refused"]


async def test_stop_during_reconnecting_ends_the_loop() -> None:
    stop = asyncio.Event()
    attempts = 0

    async def connect() -> int:
        nonlocal attempts
        attempts += 1
        if attempts > 1:
            stop.set()
            raise BrokerUnavailable("down")
        return attempts

    async def serve(connection: int) -> None:
        return None  # lost at once

    await serve_reconnecting(
        connect, serve, stop=stop, what="test", retry_on=(BrokerUnavailable,), max_delay_s=0.01
    )
    assert attempts == 2
