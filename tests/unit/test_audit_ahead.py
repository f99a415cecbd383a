"""issue 19: a sign's audit entry is written while it signs, not after.

A handler announces its reply (``RequestContext.serving``) once only a fault can stop it; the
runtime then hands the entry to the vault at once, so the durable commit and the signature
overlap instead of adding up. Nothing is answered before the entry is durable, and a handler
that fails after announcing leaves its ``ok`` entry followed by the refusal's.

Against a real SQLite vault (a file under ``tmp_path``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Sequence
from pathlib import Path

import pytest
from pydantic import BaseModel

from contracts.errors import IntegrityError, VaultUnavailable
from contracts.limits import Limits
from contracts.models import SignReply, SignRequest
from contracts.operations import Operation
from tests.support.memory_transport import sign_delivery
from vault.audit import AuditEntry, AuditEvent, AuditLog, AuditQuery
from vault.audit_chain import ChainKey
from vault.sqlite import SqliteStore
from workers.audit.auditing import RequestAuditor
from workers.consumer.runtime import ConsumerRuntime, Handler, RequestContext


class _WatchedStore(SqliteStore):
    """A SQLite vault that notes when an audit write is handed to it, and can fail some."""

    begun: list[list[str]]
    failures: int

    def append_audit(
        self, events: Sequence[AuditEvent], chain_key: ChainKey | None = None
    ) -> Awaitable[list[AuditEntry]]:
        self.begun.append([event.outcome for event in events])
        if self.failures > 0:
            self.failures -= 1
            raise VaultUnavailable("SQLite vault failed: SQLITE_BUSY")
        return super().append_audit(events, chain_key)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[_WatchedStore]:
    opened = await SqliteStore.open(str(tmp_path / "vault.db"))
    opened.__class__ = _WatchedStore
    watched = opened
    assert isinstance(watched, _WatchedStore)
    watched.begun = []
    watched.failures = 0
    try:
        yield watched
    finally:
        await watched.close()


async def _probe() -> None:
    return None


def _runtime(store: SqliteStore, handler: Handler) -> ConsumerRuntime:
    return ConsumerRuntime(
        amqp_url="amqp://unused",
        queue="sign",
        handlers={Operation.SIGN: handler},
        prefetch=1,
        limits=Limits(),
        drain_timeout_s=1.0,
        name="test",
        probe=_probe,
        max_backoff_s=0.01,
        audit=RequestAuditor(AuditLog(store)),
    )


def _reply(key_id: str = "zk-1", version: int = 3) -> SignReply:
    return SignReply(
        key_id=key_id,
        version=version,
        algorithm="ecdsa-p256-sha256",
        encoding="der",
        signature=b"\x30" * 70,
    )


async def _entries(store: SqliteStore) -> list[AuditEntry]:
    return await store.read_audit(AuditQuery())


async def test_the_entry_is_handed_to_the_vault_before_the_handler_signs(
    store: _WatchedStore,
) -> None:
    seen_while_signing: list[list[list[str]]] = []

    async def sign(request: BaseModel, context: RequestContext) -> BaseModel:
        assert isinstance(request, SignRequest)
        assert context.serving is not None
        context.serving("zk-1", 3)
        # No await between the announcement and the signature: the write has begun already.
        seen_while_signing.append(list(store.begun))
        return _reply()

    outcome = await _runtime(store, sign)._serve(sign_delivery(1))
    assert outcome.error is None
    assert seen_while_signing == [[["ok"]]], "the audit write began before the signature"
    (entry,) = await _entries(store)
    assert (entry.event.outcome, entry.event.key_id, entry.event.version) == ("ok", "zk-1", 3)
    assert entry.event.request_id == "req-1"
    reply = json.loads(outcome.body)
    assert reply["receipt"] == {"seq": entry.seq, "link": entry.entry_hash}


async def test_a_handler_that_announces_nothing_is_audited_after_its_reply(
    store: _WatchedStore,
) -> None:
    async def sign(request: BaseModel, context: RequestContext) -> BaseModel:
        assert store.begun == []
        return _reply()

    outcome = await _runtime(store, sign)._serve(sign_delivery(1))
    (entry,) = await _entries(store)
    assert json.loads(outcome.body)["receipt"]["seq"] == entry.seq


async def test_a_fault_after_the_announcement_keeps_the_ok_entry_and_adds_the_refusal(
    store: _WatchedStore,
) -> None:
    async def sign(request: BaseModel, context: RequestContext) -> BaseModel:
        assert context.serving is not None
        context.serving("zk-1", 3)
        raise IntegrityError("a signature by key zk-1 v3 did not verify")

    outcome = await _runtime(store, sign)._serve(sign_delivery(1))
    assert outcome.error is not None
    assert outcome.error.code.value == "integrity_error"
    assert not outcome.unaudited
    entries = await _entries(store)
    assert [(e.event.outcome, e.event.request_id) for e in entries] == [
        ("ok", "req-1"),
        ("integrity_error", "req-1"),
    ], "the attempt is never under-recorded: its ok entry stays, the refusal follows it"


async def test_an_entry_written_ahead_that_fails_serves_the_request_again(
    store: _WatchedStore,
) -> None:
    calls = 0

    async def sign(request: BaseModel, context: RequestContext) -> BaseModel:
        nonlocal calls
        calls += 1
        assert context.serving is not None
        context.serving("zk-1", 3)
        return _reply()

    store.failures = 2
    outcome = await _runtime(store, sign)._serve(sign_delivery(1))
    assert outcome.error is None
    assert calls == 3, "the vault's failure is waited out and the request served again"
    (entry,) = await _entries(store)
    assert json.loads(outcome.body)["receipt"]["seq"] == entry.seq


async def test_a_reply_about_another_version_than_announced_gets_its_own_entry(
    store: _WatchedStore,
) -> None:
    async def sign(request: BaseModel, context: RequestContext) -> BaseModel:
        assert context.serving is not None
        context.serving("zk-1", 2)
        return _reply(version=3)

    outcome = await _runtime(store, sign)._serve(sign_delivery(1))
    entries = await _entries(store)
    assert [(e.event.outcome, e.event.version) for e in entries] == [("ok", 2), ("ok", 3)]
    assert json.loads(outcome.body)["receipt"]["seq"] == entries[-1].seq


async def test_the_signer_announces_only_once_every_refusal_is_behind_it() -> None:
    """Access, state, digest size and the sealed blob are checked before the announcement;
    what follows it is the signature and its verification."""
    from contracts.errors import Forbidden, InvalidRequest, KeyDisabled
    from contracts.models import KeyState, KeyStateChangedEvent
    from tests.unit.test_record_mac import RING, T0, maced
    from vault.store import open_store
    from workers.signer.worker import Signer

    store = await open_store("sqlite:///:memory:")
    try:
        await store.create_key(maced())
        signer = Signer(store, RING)
        announced: list[tuple[str, int]] = []

        def context(principal: str) -> RequestContext:
            return RequestContext(
                Operation.SIGN,
                "req",
                principal,
                serving=lambda key_id, version: announced.append((key_id, version)),
            )

        with pytest.raises(Forbidden):
            await signer.sign(SignRequest(key_id="zk-1", message=b"x"), context("mallory"))
        with pytest.raises(InvalidRequest, match="32 bytes"):
            await signer.sign(SignRequest(key_id="zk-1", digest=b"\x01" * 48), context("alice"))
        assert announced == []
        reply = await signer.sign(SignRequest(key_id="zk-1", message=b"x"), context("alice"))
        assert announced == [("zk-1", 1)] == [(reply.key_id, reply.version)]
        signer.on_event(
            KeyStateChangedEvent(
                key_id="zk-1", version=1, state=KeyState.DISABLED, changed_at=T0, generation=2
            )
        )
        with pytest.raises(KeyDisabled):
            await signer.sign(SignRequest(key_id="zk-1", message=b"x"), context("alice"))
        assert announced == [("zk-1", 1)]
    finally:
        await store.close()
