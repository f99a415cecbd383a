"""A request signed, audited, then left unacked by a worker that lost its connection: the
broker delivers it again, and the second audit entry says so; the metrics count it once.

Before, both entries read ``ok`` alike, so counting the audit's ``ok`` signs overstated the
signatures anyone received. A real fleet (RabbitMQ, swtpm, SQLite), the real CLI; the loss is
the broker closing the signer's connection while the request's audit entry is being written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from yarl import URL

from contracts.client import SigningClient
from tests.support.broker import close_connections_in
from tests.support.cli import environment, zandd
from tests.support.fleet import RunningFleet
from tests.support.principals import ALICE
from vault.audit import AuditEntry, AuditEvent, AuditQuery

pytestmark = [pytest.mark.rabbitmq, pytest.mark.tpm]


def _requests(fleet: RunningFleet, name: str, operation: str, outcome: str) -> tuple[float, float]:
    """One worker's counts of finished requests: first deliveries, and redelivered ones."""
    registry = fleet.metrics[name].registry
    labels = {"operation": operation, "outcome": outcome}
    first = registry.get_sample_value("zandd_requests_total", labels) or 0.0
    again = registry.get_sample_value("zandd_requests_redelivered_total", labels) or 0.0
    return first, again


@pytest.mark.signers(1)
async def test_a_request_redelivered_after_its_signature_is_audited_as_redelivered_and_counted_once(
    fleet: RunningFleet, users: dict[str, str]
) -> None:
    vhost = URL(fleet.amqp_url).path.lstrip("/")
    worker_user = URL(fleet.amqp_url).user or "guest"
    signer = fleet.runtimes["signer-1"]
    append = fleet.store.append_audit
    dropped = asyncio.Event()
    lost = asyncio.Event()

    async def append_after_losing_the_broker(events: Sequence[AuditEvent], *args: Any) -> Any:
        # The first sign entry: the worker has signed; before its entry is stored (and so
        # before any reply or ack), the broker drops the workers' connections.
        if not dropped.is_set() and any(e.operation == "sign" for e in events):
            dropped.set()
            session = signer.acks  # the session that delivered the request (its acks)
            assert session is not None
            assert await close_connections_in(vhost, user=worker_user) >= 1
            # Until the signer has seen it (that session is over, maybe already replaced by
            # a new one): the request will get neither reply nor ack from it.
            for _ in range(1000):
                if signer.acks is not session:
                    lost.set()
                    break
                await asyncio.sleep(0.01)
        return await append(events, *args)

    fleet.store.append_audit = append_after_losing_the_broker  # type: ignore[method-assign]
    # A lone request's entry is otherwise written on the loop's own thread (issue 19:
    # append_audit_now), where nothing else can happen while it is written; the loss is staged
    # on the database thread's path, which any request under load takes.
    fleet.store.append_audit_now = lambda *args: None  # type: ignore[method-assign]
    async with await SigningClient.connect(users[ALICE]) as client:
        key = await client.create_key(label="redelivery")
        reply = await client.sign(key.key_id, b"pay 100 EUR to Alice", timeout_s=60)
    assert dropped.is_set()
    assert lost.is_set()
    assert reply.receipt is not None
    assert fleet.served["signer-1"] == 2  # signed twice

    entries = [e for e in await _all(fleet) if e.event.operation == "sign"]
    assert [(e.event.outcome, e.event.redelivered) for e in entries] == [
        ("ok", False),
        ("ok", True),
    ]
    assert entries[0].event.request_id == entries[1].event.request_id
    assert entries[0].event.data_sha256 == entries[1].event.data_sha256
    assert reply.receipt.seq == entries[1].seq  # the answer the caller got is the second's

    # Counted once: not as a first delivery (its worker lost the connection before it
    # answered), once as a redelivered one.
    assert _requests(fleet, "signer-1", "sign", "ok") == (0, 1)

    env = environment(ZANDD_DATA_DIR=str(fleet.settings.data_dir))
    code, out, err = await zandd("audit", "tail", "--lines", "2", env=env)
    assert code == 0, err
    first, second = out.splitlines()
    assert " sign " in first
    assert not first.endswith(" redelivered")
    assert " sign " in second
    assert second.endswith(" redelivered")
    code, out, err = await zandd("audit", "verify", env=env)
    assert code == 0, err
    assert "redelivered: 1 entries are of requests the broker had delivered before" in out


async def _all(fleet: RunningFleet) -> list[AuditEntry]:
    return await fleet.store.read_audit(AuditQuery())
