"""Letting no one in, tried the way an attacker would: real RabbitMQ users, swtpm, SQLite.

Every refusal is checked twice: the caller gets the typed error, and the audit log holds one
entry with that outcome for that request id — and no signature was returned.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import signal
import sqlite3
import subprocess
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import AMQPError
from pydantic import BaseModel
from yarl import URL

from contracts.client import SigningClient
from contracts.errors import Forbidden, IntegrityError, KeyDisabled, ZanddError
from contracts.models import (
    SPECS,
    KeyDestroyRequest,
    KeyPublicRequest,
    KeyState,
    KeyStateChangedEvent,
    KeyStateRequest,
    SignBatchRequest,
    SignPayload,
    SignRequest,
)
from contracts.operations import Operation
from contracts.topology import EXCHANGE
from tests.support.audit import audit_outcomes, vault_file
from tests.support.cli import ZANDD, environment, zandd
from tests.support.fleet import RunningFleet
from tests.support.principals import ADMIN, ALICE, BOB, CAROL
from vault.audit import AuditQuery, verify_log
from vault.audit_chain import ChainKeys
from vault.rewrap import RewrapOutcome, rewrap
from vault.sealing import open_into
from workers.consumer.runtime import RequestContext
from workers.service.events import EventSubscriber
from workers.signer.worker import Signer

pytestmark = [
    pytest.mark.rabbitmq,
    pytest.mark.tpm,
    pytest.mark.fleet_settings(admins=[ADMIN]),
]


class RawProducer:
    """Publishes hand-made requests (with any ``user_id``, or none) and collects replies."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._replies: dict[str, asyncio.Future[AbstractIncomingMessage]] = {}

    async def __aenter__(self) -> RawProducer:
        self._connection = await aio_pika.connect(self._url)
        self.channel = await self._connection.channel()
        self._exchange = await self.channel.get_exchange(EXCHANGE, ensure=False)
        # Server-named, like the client's reply queue: a reply_to the workers serve.
        queue = await self.channel.declare_queue("", exclusive=True, auto_delete=True)
        self._reply_to = queue.name
        await queue.consume(self._on_reply, no_ack=True)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._connection.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._replies.get(message.correlation_id or "")
        if future is not None and not future.done():
            future.set_result(message)

    async def send(
        self, operation: str, body: dict[str, Any], *, user_id: str | None, request_id: str
    ) -> None:
        self._replies[request_id] = asyncio.get_running_loop().create_future()
        message = aio_pika.Message(
            json.dumps(body).encode(),
            content_type="application/json",
            type=operation,
            message_id=request_id,
            correlation_id=request_id,
            reply_to=self._reply_to,
            user_id=user_id,
        )
        await self._exchange.publish(message, routing_key=operation)

    async def error_code(self, request_id: str) -> str:
        reply = await asyncio.wait_for(self._replies[request_id], 30)
        assert reply.type == "error", reply.body
        return str(json.loads(reply.body)["code"])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def outcome_of(error: BaseException | None) -> str:
    if error is None:
        return "ok"
    assert isinstance(error, ZanddError), repr(error)
    return error.code.value


# --- principals and key access ------------------------------------------------------------


async def test_a_second_user_signing_with_someone_elses_key_is_forbidden(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    alice, bob = clients[ALICE], clients[BOB]
    mine = await alice.create_key(label="alice only")
    with pytest.raises(Forbidden, match=f"'{BOB}' may not sign with key {mine.key_id}"):
        await bob.sign(mine.key_id, b"pay Bob")
    with pytest.raises(Forbidden):
        await bob.sign_batch(mine.key_id, [b"pay Bob", b"pay Bob again"])
    with pytest.raises(Forbidden, match="may not change the state"):
        await bob.disable_key(mine.key_id)
    assert (await bob.public_key(mine.key_id)).public_key_pem == mine.public_key_pem
    signed = await alice.sign(mine.key_id, b"pay Alice")
    assert await bob.verify(mine, signed.signature, message=b"pay Alice")

    shared = await alice.create_key(allowed_signers=[BOB])
    await bob.sign(shared.key_id, b"bob may")
    with pytest.raises(Forbidden):  # owning a key is not being one of its signers
        await alice.sign(shared.key_id, b"alice may not")
    await alice.disable_key(shared.key_id)  # ...but the owner manages it
    await clients[ADMIN].enable_key(shared.key_id)  # ...and so do admins
    anyone = await alice.create_key(allowed_signers=["*"])
    await clients[CAROL].sign(anyone.key_id, b"anyone authenticated")


@pytest.mark.fleet_settings(admins=[ADMIN], key_creators=[ALICE])
async def test_key_creators_can_be_restricted(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    await clients[ALICE].create_key()
    with pytest.raises(Forbidden, match=f"'{BOB}' may not create keys"):
        await clients[BOB].create_key()
    with pytest.raises(Forbidden):
        await clients[ADMIN].create_key()  # admins manage keys; creating is another right


async def test_a_spoofed_user_id_never_reaches_a_worker(
    fleet: RunningFleet, clients: dict[str, SigningClient], users: dict[str, str]
) -> None:
    key = await clients[ALICE].create_key()
    spoofed_id = f"spoofed-{uuid.uuid4().hex}"
    async with RawProducer(users[BOB]) as bob:
        with pytest.raises(AMQPError, match="PRECONDITION_FAILED"):
            await bob.send(
                "sign",
                {"key_id": key.key_id, "message": b64(b"pay Mallory")},
                user_id=ALICE,
                request_id=spoofed_id,
            )
        assert bob.channel.is_closed
    # A request sent after it is served; the spoofed one left no trace in any worker.
    after = await clients[ALICE].sign(key.key_id, b"after the attempt")
    assert after.signature
    outcomes = await audit_outcomes(fleet)
    assert spoofed_id not in outcomes


async def test_a_request_without_user_id_is_forbidden(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    key = await clients[ALICE].create_key()
    requests = {
        "sign": {"key_id": key.key_id, "message": b64(b"who am I")},
        "sign.batch": {"key_id": key.key_id, "items": [{"message": b64(b"x")}]},
        "key.public": {"key_id": key.key_id},
        "key.create": {},
        "key.disable": {"key_id": key.key_id},
    }
    async with RawProducer(fleet.amqp_url) as nobody:
        ids = {operation: f"anon-{uuid.uuid4().hex}" for operation in requests}
        for operation, body in requests.items():
            await nobody.send(operation, body, user_id=None, request_id=ids[operation])
        codes = {operation: await nobody.error_code(ids[operation]) for operation in requests}
    assert codes == dict.fromkeys(requests, "forbidden")
    outcomes = await audit_outcomes(fleet)
    assert all(outcomes[request_id] == ["forbidden"] for request_id in ids.values())
    assert (await fleet.store.get_key(key.key_id)).state == KeyState.ENABLED


async def test_another_principal_cannot_squat_a_request_id(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    # Request ids are predictable (a producer may derive them from its own data): Bob sending
    # Alice's next id first must not block Alice's key.create, nor hand Bob Alice's key.
    request_id = f"invoice-key-{uuid.uuid4().hex}"
    bobs = await clients[BOB].create_key(request_id=request_id)
    alices = await clients[ALICE].create_key(request_id=request_id)
    assert alices.key_id != bobs.key_id
    # Each one's retry (a redelivery, a reconnect) is answered with that one's own key.
    assert (await clients[ALICE].create_key(request_id=request_id)).key_id == alices.key_id
    assert (await clients[BOB].create_key(request_id=request_id)).key_id == bobs.key_id
    assert (await fleet.store.get_key(alices.key_id)).owner == ALICE
    assert (await fleet.store.get_key(bobs.key_id)).owner == BOB
    signed = await clients[ALICE].sign(alices.key_id, b"mine")
    assert await clients[ALICE].verify(alices, signed.signature, message=b"mine")
    assert (await audit_outcomes(fleet))[request_id] == ["ok"] * 4


async def test_huge_integers_are_refused_and_every_refusal_beside_them_is_audited(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    # version=2**63 overflowed SQLite untranslated: answered `internal` unaudited, and its
    # group-commit batch took 28 innocent refusals' entries with it (issue 12, finding 3).
    key = await clients[ALICE].create_key()
    item = {"message": b64(b"x")}
    huge = {
        "sign": {"key_id": key.key_id, "version": 2**63, **item},
        "sign.batch": {"key_id": key.key_id, "version": 2**64, "items": [item]},
        "key.public": {"key_id": key.key_id, "version": 2**63},
        "key.disable": {"key_id": key.key_id, "version": 2**63},
    }
    async with RawProducer(fleet.amqp_url) as producer:
        ids = {operation: f"huge-{uuid.uuid4().hex}" for operation in huge}
        innocent = [f"innocent-{uuid.uuid4().hex}" for _ in range(28)]
        for operation, body in huge.items():
            await producer.send(operation, body, user_id="guest", request_id=ids[operation])
        for n, request_id in enumerate(innocent):
            missing = {"key_id": f"zk-missing-{n}", **item}
            await producer.send("sign", missing, user_id="guest", request_id=request_id)
        codes = {operation: await producer.error_code(ids[operation]) for operation in huge}
        innocent_codes = {await producer.error_code(request_id) for request_id in innocent}
    assert codes == dict.fromkeys(huge, "invalid_request")
    assert innocent_codes == {"key_not_found"}
    outcomes = await audit_outcomes(fleet)
    assert all(outcomes[request_id] == ["invalid_request"] for request_id in ids.values())
    assert all(outcomes[request_id] == ["key_not_found"] for request_id in innocent)
    await verify_log(fleet.store, ChainKeys(fleet.ring))
    assert (await fleet.store.get_key(key.key_id)).state == KeyState.ENABLED


# --- key states ---------------------------------------------------------------------------------


async def test_a_disabled_key_refuses_and_signs_again_once_enabled(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    alice = clients[ALICE]
    key = await alice.create_key()
    await alice.sign(key.key_id, b"before")
    disabled = await alice.disable_key(key.key_id)
    assert [(v.version, v.state) for v in disabled.versions] == [(1, KeyState.DISABLED)]
    # The signer that signed "before" had cached the enabled record; the event (confirmed by
    # the broker before the disable reply) invalidates it first: all refuse at once.
    refusals = await asyncio.gather(
        *(alice.sign(key.key_id, f"m{i}".encode()) for i in range(20)), return_exceptions=True
    )
    assert all(isinstance(r, KeyDisabled) for r in refusals), refusals
    with pytest.raises(KeyDisabled, match="is disabled"):
        await alice.sign_batch(key.key_id, [b"a", b"b"])
    assert (await alice.disable_key(key.key_id)).versions[0].state == KeyState.DISABLED
    await alice.enable_key(key.key_id)
    signed = await alice.sign(key.key_id, b"after")
    assert await alice.verify(key, signed.signature, message=b"after")


class _FrozenVault:
    """A vault whose reads never change after the first: a signer with a stale cache."""

    def __init__(self, fleet: RunningFleet) -> None:
        self._store = fleet.store
        self._seen: dict[tuple[str, int | None], Any] = {}

    async def get_key(self, key_id: str, version: int | None = None) -> Any:
        if (key_id, version) not in self._seen:
            self._seen[key_id, version] = await self._store.get_key(key_id, version)
        return self._seen[key_id, version]


async def test_a_signer_with_a_stale_vault_read_refuses_once_the_event_arrives(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    alice = clients[ALICE]
    key = await alice.create_key()
    signer = Signer(_FrozenVault(fleet), fleet.ring)  # type: ignore[arg-type]
    heard: asyncio.Queue[KeyStateChangedEvent] = asyncio.Queue()

    def on_event(event: KeyStateChangedEvent) -> None:
        signer.on_event(event)
        heard.put_nowait(event)

    subscriber = EventSubscriber(fleet.amqp_url, on_event, on_gap=signer.forget_events)
    stop = asyncio.Event()
    task = asyncio.create_task(subscriber.run(stop))
    context = RequestContext(Operation.SIGN, "stale-1", ALICE)
    request = SignRequest(key_id=key.key_id, message=b"cached as enabled")
    try:
        await asyncio.wait_for(subscriber.ready.wait(), 30)
        await signer.sign(request, context)  # its (frozen) read says enabled
        await alice.disable_key(key.key_id)
        event = await asyncio.wait_for(heard.get(), 30)
        assert (event.key_id, event.version, event.state) == (key.key_id, 1, KeyState.DISABLED)
        with pytest.raises(KeyDisabled, match="is disabled"):
            await signer.sign(request, context)
        await alice.enable_key(key.key_id)
        enabled = await asyncio.wait_for(heard.get(), 30)
        assert (enabled.state, enabled.generation) == (KeyState.ENABLED, 3)
        # Enabled again, but its (frozen) read is generation 1 of the record: an older copy
        # than the event announced, refused like a row rolled back in the vault.
        with pytest.raises(IntegrityError, match="generation 1, but generation 3 was seen"):
            await signer.sign(request, context)
        await alice.destroy_key(key.key_id, pending_days=30)
        assert (await asyncio.wait_for(heard.get(), 30)).state == KeyState.PENDING_DESTRUCTION
        with pytest.raises(KeyDisabled, match="is pending_destruction"):
            await signer.sign(request, context)
    finally:
        stop.set()
        await task
    assert subscriber.received == 3


def vault_bytes(fleet: RunningFleet) -> bytes:
    """The vault's files as another process reads them (closing a descriptor of the file in
    this process would drop the locks the fleet's SQLite connections hold on it)."""
    db = vault_file(fleet)
    files = [str(p) for p in (db, Path(f"{db}-wal")) if p.exists()]
    return subprocess.run(["cat", *files], capture_output=True, check=True).stdout


async def test_destruction_waits_can_be_cancelled_and_then_erases_the_key(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    alice = clients[ALICE]
    key = await alice.create_key()
    other = await alice.create_key()
    signed = await alice.sign(key.key_id, b"signed before destruction")
    sealed = (await fleet.store.get_key(key.key_id)).sealed
    assert sealed is not None
    assert sealed.ciphertext in vault_bytes(fleet)

    scheduled = await alice.destroy_key(key.key_id, pending_days=1)
    (version,) = scheduled.versions
    assert version.state == KeyState.PENDING_DESTRUCTION
    assert version.destroy_after is not None
    with pytest.raises(KeyDisabled, match="pending_destruction"):
        await alice.sign(key.key_id, b"x")
    with pytest.raises(KeyDisabled, match="cancel its destruction first"):
        await alice.enable_key(key.key_id)
    assert (await alice.cancel_key_destruction(key.key_id)).versions[0].state == KeyState.DISABLED
    await alice.enable_key(key.key_id)
    await alice.sign(key.key_id, b"rescued")

    await alice.destroy_key(key.key_id, pending_days=1)
    fleet.clock.advance(timedelta(hours=23))
    await alice.disable_key(other.key_id)  # every lifecycle request looks for due keys first
    assert (await fleet.store.get_key(key.key_id)).state == KeyState.PENDING_DESTRUCTION
    fleet.clock.advance(timedelta(hours=2))
    await alice.disable_key(other.key_id)

    gone = await fleet.store.get_key(key.key_id)
    assert (gone.state, gone.sealed) == (KeyState.DESTROYED, None)
    contents = vault_bytes(fleet)
    assert sealed.ciphertext not in contents
    assert sealed.nonce not in contents
    with pytest.raises(KeyDisabled, match="destroyed"):
        await alice.sign(key.key_id, b"too late")
    with pytest.raises(KeyDisabled, match="a destroyed key cannot come back"):
        await alice.cancel_key_destruction(key.key_id)
    # What stays: the public key (old signatures still verify) and the audit trail.
    assert await clients[BOB].verify_trusting_fleet(
        key.key_id, signed.signature, message=b"signed before destruction"
    )
    trail = [
        (e.event.principal, e.event.operation, e.event.outcome)
        for e in await fleet.store.read_audit(AuditQuery(key_id=key.key_id))
    ]
    destroyed_at = trail.index(("zandd:keygen", "key.destroyed", "ok"))
    assert trail[destroyed_at - 1] == (ALICE, "key.destroy", "ok")
    assert trail[destroyed_at + 1 :] == [
        (ALICE, "sign", "key_disabled"),
        (ALICE, "key.cancel_destroy", "key_disabled"),
        (BOB, "key.public", "ok"),
    ]


# --- integrity ------------------------------------------------------------------------------------


def tamper(fleet: RunningFleet, sql: str, *params: object) -> None:
    with sqlite3.connect(vault_file(fleet), timeout=10) as conn:
        conn.execute(sql, params)
    conn.close()


def flip_bit(blob: bytes, bit: int) -> bytes:
    changed = bytearray(blob)
    changed[bit // 8] ^= 1 << (bit % 8)
    return bytes(changed)


async def test_tampered_records_are_refused_with_integrity_error_and_audited(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    alice = clients[ALICE]
    keys = [await alice.create_key() for _ in range(6)]
    records = [await fleet.store.get_key(k.key_id) for k in keys]
    donor = records[0].sealed
    assert donor is not None
    tamper(  # 1: a sealed blob copied onto another record
        fleet,
        "UPDATE keys SET kek_id = ?, nonce = ?, ciphertext = ? WHERE key_id = ?",
        donor.kek_id,
        donor.nonce,
        donor.ciphertext,
        keys[1].key_id,
    )
    for index, column, bit in ((2, "ciphertext", 77), (3, "nonce", 5), (4, "public_key_der", 700)):
        sealed = records[index].sealed
        assert sealed is not None
        blob = {
            "ciphertext": sealed.ciphertext,
            "nonce": sealed.nonce,
            "public_key_der": records[index].public_key_der,
        }[column]
        tamper(  # 2-4: one flipped bit in the ciphertext, the nonce, the public key
            fleet,
            f"UPDATE keys SET {column} = ? WHERE key_id = ?",  # noqa: S608
            flip_bit(blob, bit),
            keys[index].key_id,
        )
    tamper(  # 5: the public key of another key (the scalar does not belong to it)
        fleet,
        "UPDATE keys SET public_key_der = ? WHERE key_id = ?",
        records[0].public_key_der,
        keys[5].key_id,
    )
    for key in keys[1:]:
        request_id = f"tampered-{uuid.uuid4().hex}"
        with pytest.raises(IntegrityError):
            await alice.call(
                Operation.SIGN,
                SignRequest(key_id=key.key_id, message=b"must not be signed"),
                SPECS[Operation.SIGN].reply,  # type: ignore[arg-type]
                message_id=request_id,
            )
        assert (await audit_outcomes(fleet))[request_id] == ["integrity_error"]
    await alice.sign(keys[0].key_id, b"the donor itself is fine")


# --- the audit log ---------------------------------------------------------------------------------


async def test_audit_verify_names_an_edited_or_deleted_entry(
    fleet: RunningFleet, clients: dict[str, SigningClient], tmp_path: Path
) -> None:
    alice = clients[ALICE]
    key = await alice.create_key()
    for i in range(5):
        await alice.sign(key.key_id, f"entry {i}".encode())
    with pytest.raises(Forbidden):
        await clients[CAROL].sign(key.key_id, b"refused, and audited")
    env = environment(ZANDD_DATA_DIR=str(fleet.settings.data_dir))

    code, out, err = await zandd("audit", "verify", env=env)
    assert code == 0, err
    total = int(out.split()[3])
    assert out.startswith(f"audit log intact: {total} entries, head #{total} ")

    code, out, _ = await zandd("audit", "tail", "--key", key.key_id, "--principal", CAROL, env=env)
    assert code == 0
    (line,) = out.strip().splitlines()
    assert f"{CAROL} sign {key.key_id} forbidden request=" in line
    assert "sha256=" + hashlib.sha256(b"refused, and audited").hexdigest() in line

    edited = total - 2
    tamper(fleet, "UPDATE audit SET principal = 'mallory' WHERE seq = ?", edited)
    code, _, err = await zandd("audit", "verify", env=env)
    assert (code, err.strip()) == (
        1,
        f"zandd: audit entry #{edited} was altered: its hash does not match its content",
    )
    tamper(fleet, "DELETE FROM audit WHERE seq = ?", edited)
    code, _, err = await zandd("audit", "verify", env=env)
    assert (code, err.strip()) == (
        1,
        f"zandd: audit entry #{edited} is missing: the log jumps from #{edited - 1} to #{edited + 1}",
    )


# --- KEK rotation -----------------------------------------------------------------------------------


async def test_rotation_and_an_interrupted_rewrap_leave_every_key_usable(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    alice = clients[ALICE]
    old_kek = fleet.ring.active.kek_id
    before = [await alice.create_key() for _ in range(6)]
    env = environment(ZANDD_DATA_DIR=str(fleet.settings.data_dir))
    code, out, err = await zandd("vault", "rotate-kek", env=env)
    assert code == 0, err
    new_kek = out.split()[3]
    assert new_kek != old_kek
    # The running keygen seals new keys under the new KEK; the running signers open them.
    after = await alice.create_key()
    assert (await fleet.store.get_key(after.key_id)).kek_id == new_kek
    await alice.sign(after.key_id, b"sealed under the new KEK")

    steps = 0
    async for step in rewrap(fleet.store, fleet.ring):
        steps += step.outcome == RewrapOutcome.REWRAPPED
        if steps == 3:
            break  # interrupted halfway
    for key in [*before, after]:  # every key signs, whichever KEK it is under now
        await alice.sign(key.key_id, b"halfway")
    code, out, _ = await zandd("vault", "status", env=env)
    assert f"KEK {old_kek}: 3 key versions" in out

    code, out, err = await zandd("vault", "rewrap", env=env)
    assert code == 0, err
    assert f"rewrap under {new_kek}: " in out
    assert "3 rewrapped" in out
    code, out, _ = await zandd("vault", "status", env=env)
    assert f"KEK {old_kek}: 0 key versions — unused: it can be retired" in out
    assert f"KEK {new_kek} (active): 7 key versions" in out
    for key in [*before, after]:
        signed = await alice.sign(key.key_id, b"after the rewrap")
        assert await alice.verify(key, signed.signature, message=b"after the rewrap")
    audited = await fleet.store.read_audit(AuditQuery(limit=10_000))
    rewraps = [e.event for e in audited if e.event.operation == "vault.rewrap"]
    assert len(rewraps) == 3
    assert all(e.principal and e.principal.startswith("local:") for e in rewraps)


# --- the attacker's matrix --------------------------------------------------------------------------

STATES = (
    KeyState.ENABLED,
    KeyState.DISABLED,
    KeyState.PENDING_DESTRUCTION,
    KeyState.DESTROYED,
)
SIGNING = (Operation.SIGN, Operation.SIGN_BATCH)
LIFECYCLE = (
    Operation.KEY_DISABLE,
    Operation.KEY_ENABLE,
    Operation.KEY_DESTROY,
    Operation.KEY_CANCEL_DESTROY,
)
IMPOSSIBLE = {
    (Operation.KEY_DISABLE, KeyState.PENDING_DESTRUCTION),
    (Operation.KEY_DISABLE, KeyState.DESTROYED),
    (Operation.KEY_ENABLE, KeyState.PENDING_DESTRUCTION),
    (Operation.KEY_ENABLE, KeyState.DESTROYED),
    (Operation.KEY_CANCEL_DESTROY, KeyState.DESTROYED),
}
ANONYMOUS = None


def expected_outcome(principal: str | None, operation: Operation, state: KeyState) -> str:
    """What the rules say, written out independently of the code that enforces them."""
    if principal is ANONYMOUS:
        return "forbidden"
    if operation == Operation.KEY_PUBLIC:
        return "ok"
    if operation in SIGNING:
        if principal not in (ALICE, BOB):
            return "forbidden"
        return "ok" if state == KeyState.ENABLED else "key_disabled"
    if principal not in (ALICE, ADMIN):
        return "forbidden"
    return "key_disabled" if (operation, state) in IMPOSSIBLE else "ok"


def request_for(operation: Operation, key_id: str) -> BaseModel:
    if operation == Operation.SIGN:
        return SignRequest(key_id=key_id, message=b"matrix")
    if operation == Operation.SIGN_BATCH:
        return SignBatchRequest(key_id=key_id, items=[SignPayload(message=b"matrix")])
    if operation == Operation.KEY_PUBLIC:
        return KeyPublicRequest(key_id=key_id)
    if operation == Operation.KEY_DESTROY:
        return KeyDestroyRequest(key_id=key_id, pending_days=30)
    return KeyStateRequest(key_id=key_id)


async def bring_to(alice: SigningClient, fleet: RunningFleet, key_id: str, state: KeyState) -> None:
    """Drive a key back to ``state`` through the API (so every signer hears of it)."""
    current = (await fleet.store.get_key(key_id)).state
    if current == state:
        return
    if current == KeyState.PENDING_DESTRUCTION:
        await alice.cancel_key_destruction(key_id)
    if state == KeyState.ENABLED:
        await alice.enable_key(key_id)
    elif state == KeyState.DISABLED:
        await alice.disable_key(key_id)
    else:
        await alice.destroy_key(key_id, pending_days=30)


async def test_every_principal_operation_and_state(
    fleet: RunningFleet,
    clients: dict[str, SigningClient],
    report: Callable[[str], None],
) -> None:
    alice = clients[ALICE]
    keys = {
        state: (await alice.create_key(allowed_signers=[ALICE, BOB])).key_id for state in STATES
    }
    await alice.disable_key(keys[KeyState.DISABLED])
    await alice.destroy_key(keys[KeyState.PENDING_DESTRUCTION], pending_days=30)
    await alice.destroy_key(keys[KeyState.DESTROYED], pending_days=1)
    fleet.clock.advance(timedelta(days=2))
    await alice.disable_key(keys[KeyState.DISABLED])  # the sweep runs first
    for state, key_id in keys.items():
        assert (await fleet.store.get_key(key_id)).state == state

    principals: list[str | None] = [ALICE, BOB, CAROL, ADMIN, ANONYMOUS]
    operations = (*SIGNING, Operation.KEY_PUBLIC, *LIFECYCLE)
    outcomes: Counter[str] = Counter()
    expected_by_id: dict[str, str] = {}
    async with RawProducer(fleet.amqp_url) as nobody:
        for state, key_id in keys.items():
            for principal in principals:
                for operation in operations:
                    request_id = f"matrix-{uuid.uuid4().hex}"
                    request = request_for(operation, key_id)
                    expected = expected_outcome(principal, operation, state)
                    if principal is ANONYMOUS:
                        body = json.loads(request.model_dump_json(exclude_none=True))
                        await nobody.send(
                            operation.value, body, user_id=None, request_id=request_id
                        )
                        got = await nobody.error_code(request_id)
                    else:
                        try:
                            await clients[principal].call(
                                operation,
                                request,
                                SPECS[operation].reply,  # type: ignore[arg-type]
                                message_id=request_id,
                            )
                            got = "ok"
                        except ZanddError as exc:
                            got = outcome_of(exc)
                    assert got == expected, (principal, operation.value, state.value)
                    outcomes[got] += 1
                    expected_by_id[request_id] = expected
                    await bring_to(alice, fleet, key_id, state)
    audited = await audit_outcomes(fleet)
    for request_id, expected in expected_by_id.items():
        assert audited[request_id] == [expected], request_id
    cases = len(expected_by_id)
    refused = cases - outcomes["ok"]
    signing_refused = sum(
        1
        for state in STATES
        for principal in principals
        for operation in SIGNING
        if expected_outcome(principal, operation, state) != "ok"
    )
    assert cases == len(STATES) * len(principals) * len(operations) == 140
    report(
        f"security: matrix cases={cases} refused={refused} ({dict(outcomes)}) "
        f"signing attempts that had to fail={signing_refused}, signatures returned for them=0"
    )


# --- key material never in a log --------------------------------------------------------------------


def secret_forms(secret: bytes) -> list[str]:
    return [
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
        repr(secret)[2:-1],
        str(int.from_bytes(secret, "big")),
    ]


async def test_a_debug_log_of_a_full_run_holds_no_key_material(
    users: dict[str, str], swtpm_tcti: str, tmp_path: Path, amqp_url: str
) -> None:
    from workers.operator.fleet import wait_until_ready

    data = tmp_path / "debug-run"
    producer = users[ALICE]
    worker_env = environment(
        ZANDD_AMQP_URL=amqp_url,
        ZANDD_DATA_DIR=str(data),
        ZANDD_TPM_TCTI=swtpm_tcti,
        ZANDD_LOG_LEVEL="DEBUG",
        ZANDD_ADMINS=ADMIN,
        TSS2_LOG="all+none",
    )
    cli_env = {**worker_env, "ZANDD_AMQP_URL": producer}
    logs: list[str] = []

    async def run(*args: str) -> str:
        code, out, err = await zandd(*args, env=cli_env)
        logs.extend((out, err))
        assert code == 0, (args, err)
        return out

    await run("vault", "init")
    workers = [
        await asyncio.create_subprocess_exec(
            *ZANDD,
            role,
            env=worker_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for role in ("keygen-worker", "signer")
    ]
    try:
        await wait_until_ready(amqp_url, signers=1)
        document = tmp_path / "document.txt"
        document.write_bytes(b"a document\n")
        key_ids = []
        for label in ("first", "second"):
            key_ids.append((await run("keys", "create", "--label", label)).split()[0])
            await run("sign", "--key", key_ids[-1], str(document), "--out", str(tmp_path / "s"))
            await run("verify", "--key", key_ids[-1], str(document), str(tmp_path / "s"))
        await run("keys", "disable", key_ids[0])
        await run("keys", "enable", key_ids[0])
        out = await run("keys", "destroy", key_ids[1], "--pending-days", "3")
        assert "pending_destruction (destroyed after" in out
        await run("keys", "cancel-destroy", key_ids[1])
        assert f"owner:           {ALICE}" in await run("keys", "show", key_ids[1])
        assert "disabled" in await run("keys", "list")
        await run("vault", "rotate-kek")
        key_ids.append((await run("keys", "create")).split()[0])
        await run("sign", "--key", key_ids[-1], str(document), "--digest")
        await run("sign", "--key", key_ids[0], str(document))  # opened under the old KEK
        await run("vault", "rewrap")
        await run("vault", "status")
        await run("sign", "--key", key_ids[0], str(document))  # and under the new one
        await run("audit", "verify")
        await run("audit", "tail", "-n", "100")
    finally:
        for worker in workers:
            if worker.returncode is None:
                with contextlib.suppress(ProcessLookupError):  # it may have ended meanwhile
                    worker.terminate()
        for worker in workers:
            out_bytes, err_bytes = await asyncio.wait_for(worker.communicate(), 60)
            logs.extend((out_bytes.decode(errors="replace"), err_bytes.decode(errors="replace")))
            # A worker that ended by itself failed: its stderr says why.
            assert worker.returncode in (0, -signal.SIGTERM), err_bytes.decode(errors="replace")
    text = "\n".join(logs)
    assert "DEBUG" in text
    assert "memory protections: memory locked:" in text

    from vault.kek import KekRing
    from vault.store import open_store
    from workers.keygen.ringseal import TpmRingSealer

    # `vault init` sealed the ring to the TPM: opened here as the workers did.
    ring = KekRing.load(data / "kek-ring.json", sealer=TpmRingSealer(swtpm_tcti))
    store = await open_store(f"sqlite:///{data / 'vault.db'}")
    scalars = []
    try:
        for record in await store.list_versions():
            assert record.sealed is not None
            scalar = bytearray(32)
            open_into(record.sealed, record.binding, ring, scalar)
            scalars.append(bytes(scalar))
    finally:
        await store.close()
    secrets_used = [*scalars, *(ring.get(kek_id).key for kek_id in ring.kek_ids)]
    assert len(scalars) == 3
    assert len(ring.kek_ids) == 2
    password = URL(producer).password
    assert password
    for secret in secrets_used:
        for form in secret_forms(secret):
            assert form not in text
    assert password not in text
