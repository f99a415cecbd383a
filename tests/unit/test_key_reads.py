"""The signers' reads without a broker: cursors, who may read, audit outcomes, and the
handlers against a real SQLite vault with real records (MACs, public keys)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from contracts.crypto import der_to_raw, public_key_der
from contracts.errors import Forbidden, IntegrityError, InvalidRequest, KeyNotFound
from contracts.models import (
    KeyDescribeRequest,
    KeyListRequest,
    KeyState,
    VerifyBatchReply,
    VerifyBatchRequest,
    VerifyItem,
    VerifyReply,
    VerifyRequest,
)
from contracts.operations import Operation
from vault.kek import Kek, KekRing
from vault.record_mac import authenticated
from vault.records import KeyRecord
from vault.sealing import RecordBinding, seal
from vault.sqlite import SqliteStore
from workers.audit.auditing import audit_event, data_digest
from workers.consumer.runtime import RequestContext
from workers.service.policy import AccessPolicy
from workers.signer.reads import decode_cursor, encode_cursor
from workers.signer.worker import Signer

AT = datetime(2026, 11, 29, 23, 0, tzinfo=UTC)
ADMIN = "root-ops"


def test_cursors_round_trip_and_refuse_what_the_service_did_not_make() -> None:
    for key_id in ("zk-0123456789abcdef0123", "a", "A.b_c:d-e" + "x" * 119):
        cursor = encode_cursor(key_id)
        assert decode_cursor(cursor) == key_id
        assert KeyListRequest.model_validate({"cursor": cursor}).cursor == cursor
    for forged in ("", "zz", "a" * 10, encode_cursor("x")[4:], "emsxAC8uLw", "emsxAA"):
        with pytest.raises(InvalidRequest, match="cursor"):
            decode_cursor(forged)


def _record(owner: str, signers: tuple[str, ...]) -> Any:
    return SimpleNamespace(owner=owner, allowed_signers=signers, key_id="zk-1")


def test_who_may_read_a_key_and_who_sees_its_access_list() -> None:
    policy = AccessPolicy(admins=frozenset({ADMIN}))
    private, shared, anyone = (
        _record("alice", ("alice",)),
        _record("alice", ("bob",)),
        _record("alice", ("*",)),
    )
    assert policy.may_read(private, "alice")
    assert policy.may_read(private, ADMIN)
    assert not policy.may_read(private, "bob")
    assert policy.may_read(shared, "alice")  # the owner, though not a signer
    assert policy.may_read(shared, "bob")
    assert policy.may_read(anyone, "carol")
    with pytest.raises(Forbidden, match="'bob' may not describe key zk-1"):
        policy.check_read(private, "bob", "describe")
    assert policy.sees_access(shared, "alice")
    assert policy.sees_access(shared, ADMIN)
    assert not policy.sees_access(shared, "bob")
    policy.check_list_all(ADMIN)
    with pytest.raises(Forbidden, match="scope 'all' is for admins"):
        policy.check_list_all("alice")


def _delivery(operation: str) -> Any:
    return SimpleNamespace(
        user_id="svc-a", type=operation, routing_key=operation, message_id="r-1", redelivered=False
    )


def test_a_verify_is_audited_as_served_with_its_verdict_and_digest() -> None:
    digest = hashlib.sha256(b"m").digest()
    request = VerifyRequest(key_id="zk-1", message=b"m", signature=b"s")
    assert data_digest(request) == digest.hex()
    for valid, outcome in ((True, "ok:valid"), (False, "ok:invalid")):
        reply = VerifyReply(
            key_id="zk-1", version=2, algorithm="ecdsa-p256-sha256", encoding="der", valid=valid
        )
        event = audit_event(_delivery("verify"), request, reply, AT)
        assert (event.outcome, event.version, event.data_sha256) == (outcome, 2, digest.hex())
    batch = VerifyBatchRequest(
        key_id="zk-1", items=[VerifyItem(message=m, signature=b"s") for m in (b"a", b"b")]
    )
    expected = hashlib.sha256(hashlib.sha256(b"a").digest() + hashlib.sha256(b"b").digest())
    assert data_digest(batch) == expected.hexdigest()
    for verdicts, outcome in (([True, True], "ok:valid"), ([True, False], "ok:invalid")):
        reply_batch = VerifyBatchReply(
            key_id="zk-1", version=1, algorithm="ecdsa-p256-sha256", encoding="der", valid=verdicts
        )
        assert audit_event(_delivery("verify.batch"), batch, reply_batch, AT).outcome == outcome


# --- the handlers on a real vault ------------------------------------------------------------


class Vault:
    def __init__(self, store: SqliteStore, ring: KekRing) -> None:
        self.store, self.ring = store, ring
        self.keys: dict[str, ec.EllipticCurvePrivateKey] = {}

    async def add(
        self, key_id: str, owner: str, signers: tuple[str, ...], *, version: int = 1
    ) -> KeyRecord:
        private = ec.generate_private_key(ec.SECP256R1())
        self.keys[key_id] = private
        scalar = private.private_numbers().private_value.to_bytes(32, "big")
        binding = RecordBinding(key_id=key_id, version=version, algorithm="ecdsa-p256-sha256")
        record = KeyRecord(
            key_id=key_id,
            version=version,
            algorithm="ecdsa-p256-sha256",
            public_key_der=public_key_der(private.public_key()),
            sealed=seal(scalar, binding, self.ring.active),
            state=KeyState.ENABLED,
            label=f"label-{owner}",
            allowed_signers=signers,
            created_at=AT,
            created_by=owner,
            request_id=None,
        )
        record = authenticated(record, self.ring, generation=1)
        await self.store.create_key(record)
        return record


@pytest.fixture
async def vault(tmp_path: Path) -> AsyncIterator[Vault]:
    store = await SqliteStore.open(str(tmp_path / "vault.db"))
    try:
        yield Vault(store, KekRing(Kek.generate()))
    finally:
        await store.close()


def _signer(vault: Vault) -> Signer:
    return Signer(vault.store, vault.ring, AccessPolicy(admins=frozenset({ADMIN})))


def _context(operation: Operation, principal: str) -> RequestContext:
    return RequestContext(operation=operation, request_id="r-1", principal=principal)


async def test_verify_handler_checks_against_the_record_and_never_errs_on_a_bad_signature(
    vault: Vault,
) -> None:
    await vault.add("zk-a", "alice", ("alice",))
    handlers = _signer(vault).handlers
    good = vault.keys["zk-a"].sign(b"m", ec.ECDSA(hashes.SHA256()))
    context = _context(Operation.VERIFY, "alice")
    for signature, encoding, valid in (
        (good, "der", True),
        (der_to_raw(good), "raw", True),
        (good, "raw", False),
        (b"\x00" * 64, "raw", False),
        (b"\x30", "der", False),
    ):
        request = VerifyRequest(key_id="zk-a", message=b"m", signature=signature, encoding=encoding)
        reply = await handlers[Operation.VERIFY](request, context)
        assert isinstance(reply, VerifyReply)
        assert (reply.valid, reply.version) == (valid, 1)
    with pytest.raises(Forbidden):
        await handlers[Operation.VERIFY](
            VerifyRequest(key_id="zk-a", message=b"m", signature=good),
            _context(Operation.VERIFY, "bob"),
        )


async def test_list_and_describe_handlers_show_only_what_the_caller_may_see(
    vault: Vault,
) -> None:
    await vault.add("zk-1", "alice", ("alice",))
    await vault.add("zk-2", "bob", ("bob", "alice"))
    await vault.add("zk-3", "bob", ("bob",))
    handlers = _signer(vault).handlers
    listing = handlers[Operation.KEY_LIST]

    async def listed(principal: str, **fields: Any) -> list[tuple[str, str | None]]:
        reply = await listing(KeyListRequest(**fields), _context(Operation.KEY_LIST, principal))
        return [(key.key_id, key.owner) for key in reply.keys]

    assert await listed("alice") == [("zk-1", "alice")]
    assert await listed("alice", scope="signable") == [("zk-1", "alice"), ("zk-2", None)]
    assert await listed("bob", scope="signable") == [("zk-2", "bob"), ("zk-3", "bob")]
    assert await listed(ADMIN, scope="all") == [("zk-1", "alice"), ("zk-2", "bob"), ("zk-3", "bob")]
    with pytest.raises(Forbidden):
        await listed("alice", scope="all")
    page = await listing(
        KeyListRequest(page_size=1, scope="signable"), _context(Operation.KEY_LIST, "alice")
    )
    assert page.next_cursor is not None
    rest = await listed("alice", scope="signable", cursor=page.next_cursor)
    assert rest == [("zk-2", None)]

    describe = handlers[Operation.KEY_DESCRIBE]
    described = await describe(
        KeyDescribeRequest(key_id="zk-2"), _context(Operation.KEY_DESCRIBE, "alice")
    )
    assert (described.owner, described.allowed_signers) == (None, None)
    assert [v.version for v in described.versions] == [1]
    with pytest.raises(Forbidden):
        await describe(KeyDescribeRequest(key_id="zk-3"), _context(Operation.KEY_DESCRIBE, "alice"))
    with pytest.raises(KeyNotFound):
        await describe(KeyDescribeRequest(key_id="zk-9"), _context(Operation.KEY_DESCRIBE, "alice"))

    # A signer index changed behind the keygen worker's back shows Alice nothing more; a
    # changed record is refused.
    await vault.store._run(
        lambda conn: conn.execute(
            "INSERT INTO key_signers (principal, key_id, version) VALUES ('alice', 'zk-3', 1)"
        )
    )
    assert await listed("alice", scope="signable") == [("zk-1", "alice"), ("zk-2", None)]
    await vault.store._run(
        lambda conn: conn.execute("UPDATE keys SET label = 'x' WHERE key_id = 'zk-3'")
    )
    with pytest.raises(IntegrityError):
        await listed("alice", scope="signable")
