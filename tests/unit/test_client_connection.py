"""The client's connection handling without a broker: a lost connection during a call."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from contracts.client import SigningClient
from contracts.errors import BrokerUnavailable
from contracts.wire import Wire


class _Transport:
    """Takes what the connection writes and forgets it."""

    def __init__(self) -> None:
        self.closed = False

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


async def test_a_connection_lost_while_publishing_leaves_no_unretrieved_future() -> None:
    # The loss fails the publish's confirm and, from the supervisor, the call's reply future;
    # the call ends on the first, and the second was logged "Future exception was never
    # retrieved ... BrokerUnavailable" when collected (issue 16).
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        client = SigningClient(
            "amqp://u:p@127.0.0.1:1/", default_timeout_s=5, retry=False, connect_timeout_s=1
        )
        wire = Wire.for_testing(_Transport(), confirms=True)  # type: ignore[arg-type]
        client._wire = wire
        client._connected.set()
        client._supervisor = loop.create_task(client._supervise())
        call = loop.create_task(client.sign("zk-1", b"hello"))
        for _turn in range(100):  # until published, waiting for its confirm
            if client._pending:
                break
            await asyncio.sleep(0)
        assert client._pending
        wire.connection_lost(None)
        with pytest.raises(BrokerUnavailable, match="lost the broker while sending sign"):
            await call
        await client.close()
        del call
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert [context.get("message") for context in reported] == []
