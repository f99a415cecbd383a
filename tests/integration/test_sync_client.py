"""The blocking client against a real fleet: many threads share one connection, every signature
verifies, and a call costs a fraction of a per-call ``asyncio.run``."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from yarl import URL

from contracts.client import SigningClient
from contracts.errors import KeyNotFound
from contracts.sync_client import SyncSigningClient
from contracts.wire import Wire
from tests.support.broker import rabbitmqctl
from tests.support.fleet import RunningFleet

pytestmark = [pytest.mark.rabbitmq, pytest.mark.tpm]

_THREADS = 16
_SIGNS = 400
_TIMED = 40


def _client_connections(amqp_url: str) -> list[int]:
    """The peer ports of the broker connections named ``zandd-client`` in the URL's vhost."""
    vhost = URL(amqp_url).path.removeprefix("/")
    rows: list[dict[str, Any]] = json.loads(
        rabbitmqctl(
            "list_connections", "-p", vhost, "peer_port", "client_properties", "--formatter", "json"
        )
    )
    return [
        row["peer_port"]
        for row in rows
        if any(
            key == "connection_name" and value == "zandd-client"
            for key, _type, value in row.get("client_properties") or []
        )
    ]


def _local_port(client: SyncSigningClient) -> int:
    """The local port of the client's connection (the broker lists it as the peer port)."""
    wire = client.async_client._wire
    assert isinstance(wire, Wire)
    assert wire._transport is not None
    port = wire._transport.get_extra_info("sockname")[1]
    assert isinstance(port, int)
    return port


async def test_threads_share_one_connection_and_every_signature_verifies(
    fleet: RunningFleet,
) -> None:
    def produce() -> tuple[int, list[int], list[int], bool, list[str]]:
        with SyncSigningClient.connect(fleet.amqp_url) as client:
            key = client.create_key(label="sync")
            public = load_pem_public_key(key.public_key_pem.encode())
            assert isinstance(public, ec.EllipticCurvePublicKey)
            wire, port = client.async_client._wire, _local_port(client)
            before = _client_connections(fleet.amqp_url)

            def sign(n: int) -> str:
                message = f"invoice {n}".encode()
                reply = client.sign(key.key_id, message)
                # cryptography raises InvalidSignature for a signature that does not verify.
                public.verify(reply.signature, message, ec.ECDSA(hashes.SHA256()))
                return reply.key_id

            with ThreadPoolExecutor(max_workers=_THREADS) as pool:
                signed = list(pool.map(sign, range(_SIGNS)))
            after = _client_connections(fleet.amqp_url)
            same_wire = client.async_client._wire is wire and _local_port(client) == port
            with pytest.raises(KeyNotFound):
                client.sign("zk-does-not-exist", b"m")
        return port, before, after, same_wire, signed

    port, before, after, same_wire, signed = await asyncio.to_thread(produce)
    assert signed == [signed[0]] * _SIGNS
    # One connection for the client's whole life: never reconnected, and the broker lists it,
    # the same one, before and after 400 calls from 16 threads.
    assert same_wire
    assert port in before, f"client connections (peer ports) at start: {before}, ours {port}"
    assert port in after, f"client connections (peer ports) after: {after}, ours {port}"


async def test_close_ends_the_thread_and_the_connection(fleet: RunningFleet) -> None:
    def use_and_close() -> tuple[bool, list[int]]:
        client = SyncSigningClient.connect(fleet.amqp_url)
        client.create_key()
        thread = client._runner.thread
        client.close()
        client.close()  # twice is harmless
        with pytest.raises(RuntimeError, match="closed"):
            client.create_key()
        # The broker lists a closed connection for a moment after its close-ok.
        for _ in range(20):
            if not _client_connections(fleet.amqp_url):
                break
            time.sleep(0.5)
        return thread.is_alive(), _client_connections(fleet.amqp_url)

    alive, connections = await asyncio.to_thread(use_and_close)
    assert not alive
    assert connections == []


async def test_a_sign_costs_less_than_a_per_call_asyncio_run(
    fleet: RunningFleet, report: Callable[[str], None]
) -> None:
    async def one_sign(key_id: str, message: bytes) -> None:
        async with await SigningClient.connect(fleet.amqp_url) as client:
            await client.sign(key_id, message)

    def measure() -> tuple[float, float]:
        with SyncSigningClient.connect(fleet.amqp_url) as client:
            key_id = client.create_key().key_id
            message = os.urandom(32)
            started = time.perf_counter()
            for _ in range(_TIMED):
                client.sign(key_id, message)
            sync_s = (time.perf_counter() - started) / _TIMED
            started = time.perf_counter()
            for _ in range(_TIMED):
                asyncio.run(one_sign(key_id, message))
            per_call_s = (time.perf_counter() - started) / _TIMED
        return sync_s, per_call_s

    sync_s, per_call_s = await asyncio.to_thread(measure)
    async with await SigningClient.connect(fleet.amqp_url) as client:  # on the fleet's own loop
        key_id = (await client.create_key()).key_id
        started = time.perf_counter()
        for _ in range(_TIMED):
            await client.sign(key_id, b"m")
        async_s = (time.perf_counter() - started) / _TIMED
    report(
        f"sign latency over {_TIMED} sequential calls (fleet in this process): SyncSigningClient "
        f"{sync_s * 1000:.1f} ms, asyncio.run per call {per_call_s * 1000:.1f} ms, "
        f"SigningClient on the fleet's loop {async_s * 1000:.1f} ms"
    )
