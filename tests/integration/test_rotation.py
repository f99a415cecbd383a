"""Key versions (issue 15): ``key.rotate``, ``key.update``, ``rotation_period`` — against the
real fleet (RabbitMQ, swtpm, SQLite), from the Python client and from ``zandd``."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from contracts.client import SigningClient
from contracts.crypto import load_public_key
from contracts.errors import Forbidden, InvalidRequest, KeyDisabled, ZanddError
from contracts.models import KeyPublicReply, KeyState, SignReply
from tests.support.cli import environment, zandd
from tests.support.fleet import RunningFleet
from tests.support.openssl import openssl_verify
from tests.support.principals import ADMIN, ALICE, BOB, CAROL
from vault.audit import AuditQuery
from vault.records import KeyRecord
from workers.keygen.lifecycle import SYSTEM_PRINCIPAL
from workers.keygen.versions import ROTATED_OPERATION

pytestmark = [
    pytest.mark.rabbitmq,
    pytest.mark.tpm,
    pytest.mark.fleet_settings(admins=[ADMIN]),
]
DAY = timedelta(days=1)


async def test_rotation_makes_a_new_primary_and_every_version_keeps_verifying(
    fleet: RunningFleet, clients: dict[str, SigningClient], tmp_path: Path
) -> None:
    alice = clients[ALICE]
    key = await alice.create_key(label="invoices")
    first = await alice.sign(key.key_id, b"signed by v1")
    assert first.version == 1

    rotated = await alice.rotate_key(key.key_id, request_id="rotate-1")
    assert (rotated.key_id, rotated.version, rotated.algorithm) == (key.key_id, 2, key.algorithm)
    assert rotated.public_key_jwk.kid == f"{key.key_id}.v2"
    assert rotated.public_key_pem != key.public_key_pem
    # The signer that served v1 had it cached as the primary; the event came first.
    after = await asyncio.gather(*(alice.sign(key.key_id, b"signed by v2") for _ in range(20)))
    assert {reply.version for reply in after} == {2}
    pinned = await alice.sign(key.key_id, b"signed by v1 again", version=1)
    assert pinned.version == 1

    # Idempotent on the request id: a retry returns the same version, makes none.
    assert (await alice.rotate_key(key.key_id, request_id="rotate-1")).version == 2
    # key.public: the primary by default, any version, or all.
    assert (await alice.public_key(key.key_id)).version == 2
    assert (await alice.public_key(key.key_id, 1)).public_key_pem == key.public_key_pem
    everything = await clients[BOB].public_key(key.key_id, all_versions=True)
    assert everything.version == 2
    assert everything.versions is not None
    assert [(v.version, v.public_key_jwk.kid) for v in everything.versions] == [
        (1, f"{key.key_id}.v1"),
        (2, f"{key.key_id}.v2"),
    ]
    assert everything.versions[0].public_key_pem == key.public_key_pem
    assert everything.versions[1].public_key_pem == rotated.public_key_pem
    assert everything.versions[1].attestation is not None

    # An independent verifier: each signature under its own version's public key only.
    for reply, message, pem, other in (
        (first, b"signed by v1", key.public_key_pem, rotated.public_key_pem),
        (after[0], b"signed by v2", rotated.public_key_pem, key.public_key_pem),
        (pinned, b"signed by v1 again", key.public_key_pem, rotated.public_key_pem),
    ):
        assert openssl_verify(tmp_path, pem, message, reply.signature) == "Verified OK"
        assert "Verified OK" not in openssl_verify(tmp_path, other, message, reply.signature)

    # Versions are disabled and destroyed one by one; the primary goes on signing.
    disabled = await alice.disable_key(key.key_id, 1)
    assert [(v.version, v.state) for v in disabled.versions] == [(1, KeyState.DISABLED)]
    with pytest.raises(KeyDisabled, match="v1 is disabled"):
        await alice.sign(key.key_id, b"x", version=1)
    assert (await alice.sign(key.key_id, b"still signing")).version == 2
    await alice.destroy_key(key.key_id, 1, pending_days=1)
    assert (await alice.sign(key.key_id, b"still signing")).version == 2
    # A disabled primary is never stepped over for an older version.
    third = await alice.rotate_key(key.key_id)
    assert third.version == 3
    await alice.disable_key(key.key_id, 3)
    with pytest.raises(KeyDisabled, match="v3 is disabled"):
        await alice.sign(key.key_id, b"no fallback to v2")
    assert (await alice.sign(key.key_id, b"named", version=2)).version == 2


async def test_a_key_that_lives_in_the_tpm_rotates_in_it(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    alice = clients[ALICE]
    key = await alice.create_key(protection="tpm")
    rotated = await alice.rotate_key(key.key_id)
    assert (rotated.version, rotated.protection) == (2, "tpm")
    signed = await alice.sign_in_tpm(key.key_id, b"in the TPM, by v2")
    assert signed.version == 2
    assert await alice.verify(rotated, signed.signature, message=b"in the TPM, by v2")
    assert not await alice.verify(key, signed.signature, message=b"in the TPM, by v2")
    old = await alice.sign_in_tpm(key.key_id, b"by v1", version=1)
    assert await alice.verify(key, old.signature, message=b"by v1")


async def test_who_may_rotate_and_the_audit_of_it(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    alice = clients[ALICE]
    key = await alice.create_key()
    with pytest.raises(Forbidden):
        await clients[BOB].rotate_key(key.key_id, request_id="bob-1")
    # An admin's request id is its own: the owner's same id is another rotation.
    by_admin = await clients[ADMIN].rotate_key(key.key_id, request_id="same-id")
    by_owner = await alice.rotate_key(key.key_id, request_id="same-id")
    assert (by_admin.version, by_owner.version) == (2, 3)
    assert (await clients[ADMIN].rotate_key(key.key_id, request_id="same-id")).version == 2
    # A request id that made a version of one key cannot rotate another.
    other = await alice.create_key()
    with pytest.raises(InvalidRequest, match="another key"):
        await alice.rotate_key(other.key_id, request_id="same-id")
    with pytest.raises(ZanddError, match="not found"):
        await alice.rotate_key("zk-nope-nope", request_id="x")
    assert await _audited(fleet, key.key_id, "key.rotate") == [
        (BOB, "forbidden", None),
        (ADMIN, "ok", 2),
        (ALICE, "ok", 3),
        (ADMIN, "ok", 2),
    ]


async def test_rotation_under_load_loses_nothing_and_never_signs_with_a_disabled_version(
    fleet: RunningFleet,
    clients: dict[str, SigningClient],
    tmp_path: Path,
    report: Callable[[str], None],
) -> None:
    alice = clients[ALICE]
    key = await alice.create_key()
    v1 = load_public_key(key.public_key_pem.encode())
    await asyncio.gather(*(alice.sign(key.key_id, b"warm") for _ in range(8)))  # cached
    #: (sent at, answered at, reply, message) of every sign of the load.
    results: list[tuple[float, float, SignReply, bytes]] = []
    sent = 0
    stop = asyncio.Event()
    progress = asyncio.Condition()

    async def one() -> None:
        nonlocal sent
        sent += 1
        message = f"load {sent}".encode()
        sent_at = time.monotonic()
        reply = await alice.sign(key.key_id, message)
        results.append((sent_at, time.monotonic(), reply, message))
        async with progress:
            progress.notify_all()

    async def loader() -> None:
        # Overlapping waves of 25: some signs are in flight at every moment.
        while not stop.is_set():
            await asyncio.gather(*(one() for _ in range(25)))

    async def answered(count: int, after: float = 0.0) -> None:
        async with progress:
            await progress.wait_for(lambda: sum(r[0] > after for r in results) >= count)

    loaders = [asyncio.create_task(loader()) for _ in range(3)]
    await answered(150)  # the load is well under way
    rotate_sent_at = time.monotonic()
    in_flight_at_rotate = sent - len(results)
    rotated = await alice.rotate_key(key.key_id)
    rotated_at = time.monotonic()
    disabled = await alice.disable_key(key.key_id, 1)
    disabled_at = time.monotonic()
    assert disabled.versions[0].state == KeyState.DISABLED
    await answered(200, after=disabled_at)  # 200 more signs, all sent after the disable reply
    stop.set()
    await asyncio.gather(*loaders)  # a refused or lost sign would raise here

    assert len(results) == sent  # nothing lost: every request answered, none refused
    versions = Counter(reply.version for _, _, reply, _ in results)
    assert set(versions) == {1, 2}, versions
    v2 = load_public_key(rotated.public_key_pem.encode())
    for _, _, reply, message in results:
        assert await alice.verify(
            v1 if reply.version == 1 else v2, reply.signature, message=message
        )
    # Sent after the rotate reply: the new primary, every one (the event came first).
    after_rotate = [reply for at, _, reply, _ in results if at > rotated_at]
    assert after_rotate
    assert {reply.version for reply in after_rotate} == {2}
    # Sent after the disable reply: never signed by the disabled version (nor refused).
    after_disable = [reply.version for at, _, reply, _ in results if at > disabled_at]
    assert len(after_disable) >= 200
    assert set(after_disable) == {2}
    # Signs in flight across the rotation, answered by either version.
    across = [reply.version for at, done, reply, _ in results if at < rotate_sent_at < done]
    first_v2 = min(done for _, done, reply, _ in results if reply.version == 2)
    # openssl agrees for one signature of each version.
    for version, pem in ((1, key.public_key_pem), (2, rotated.public_key_pem)):
        _, _, reply, message = next(r for r in results if r[2].version == version)
        assert openssl_verify(tmp_path, pem, message, reply.signature) == "Verified OK"
    report(
        f"rotation under load: {len(results)} signs ({versions[1]} by v1, {versions[2]} by v2), "
        f"{in_flight_at_rotate} in flight when key.rotate was sent, of which answered by "
        f"v1/v2: {across.count(1)}/{across.count(2)}; rotate round trip "
        f"{(rotated_at - rotate_sent_at) * 1000:.0f} ms; first v2 answer "
        f"{(first_v2 - rotated_at) * 1000:+.1f} ms from the rotate reply; sent after the "
        f"reply: {len(after_rotate)}, all by v2"
    )


async def test_update_changes_the_signers_at_once_and_is_audited(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    alice, bob = clients[ALICE], clients[BOB]
    key = await alice.create_key(label="before")
    await alice.rotate_key(key.key_id)
    with pytest.raises(Forbidden):
        await bob.sign(key.key_id, b"not yet")
    added = await alice.update_key(key.key_id, allowed_signers=[ALICE, BOB])
    assert (added.primary_version, added.allowed_signers) == (2, [ALICE, BOB])
    assert added.label == "before"  # left out: unchanged
    assert (await bob.sign(key.key_id, b"allowed now")).version == 2
    assert (await bob.sign(key.key_id, b"and v1", version=1)).version == 1

    # Bob's signers have the record cached as allowing him; the update's events come first.
    removed = await alice.update_key(key.key_id, allowed_signers=[ALICE], label=None)
    assert (removed.allowed_signers, removed.label) == ([ALICE], None)
    refusals = await asyncio.gather(
        *(bob.sign(key.key_id, f"m{i}".encode()) for i in range(20)),
        *(bob.sign(key.key_id, f"v1 {i}".encode(), version=1) for i in range(10)),
        return_exceptions=True,
    )
    assert all(isinstance(r, Forbidden) for r in refusals), refusals
    assert (await alice.sign(key.key_id, b"owner")).version == 2

    # Owner or admin only; an admin may; a request that changes nothing is refused unsent.
    with pytest.raises(Forbidden):
        await clients[CAROL].update_key(key.key_id, label="carol's")
    by_admin = await clients[ADMIN].update_key(key.key_id, allowed_signers=None)
    assert by_admin.allowed_signers == [ALICE]  # null: back to the owner alone
    with pytest.raises(InvalidRequest, match="at least one"):
        await alice.update_key(key.key_id)
    for version in (1, 2):
        record = await fleet.store.get_key(key.key_id, version)
        assert (record.label, record.allowed_signers) == (None, (ALICE,))
    assert [entry[:2] for entry in await _audited(fleet, key.key_id, "key.update")] == [
        (ALICE, "ok"),
        (ALICE, "ok"),
        (CAROL, "forbidden"),
        (ADMIN, "ok"),
    ]


@pytest.mark.fleet_settings(admins=[ADMIN], destroy_check_interval_s=0.2)
async def test_a_rotation_period_is_honoured_by_the_keygen_worker(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    alice = clients[ALICE]
    key = await alice.create_key(rotation_period=DAY)
    assert key.rotation_period == 86_400
    assert key.next_rotation_at is not None
    idle = await alice.create_key(rotation_period=2 * DAY)
    await alice.disable_key(idle.key_id)
    plain = await alice.create_key()
    with pytest.raises(InvalidRequest, match="rotation_period"):
        await alice.create_key(rotation_period=3600)  # under a day

    fleet.clock.advance(DAY - timedelta(minutes=1))
    await asyncio.sleep(1)  # several due checks: nothing is due yet
    assert (await alice.public_key(key.key_id)).version == 1
    fleet.clock.advance(timedelta(minutes=2))
    rotated = await _primary_after(alice, key.key_id, 2)
    assert rotated.public_key_jwk.kid == f"{key.key_id}.v2"
    assert (await alice.sign(key.key_id, b"by the new version")).version == 2
    v1 = await fleet.store.get_key(key.key_id, 1)
    v2 = await fleet.store.get_key(key.key_id, 2)
    assert v1.next_rotation_at is None
    assert v2.rotation_period_s == 86_400
    assert v2.next_rotation_at is not None
    assert v2.next_rotation_at - v2.created_at == DAY
    assert (await fleet.store.get_key(plain.key_id)).version == 1

    # A disabled key is not given a fresh enabled version: its next check moves a period on.
    idle_first = (await fleet.store.get_key(idle.key_id)).next_rotation_at
    assert idle_first is not None
    fleet.clock.advance(DAY)
    await _primary_after(alice, key.key_id, 3)
    idle_record = await _rescheduled(fleet, idle.key_id, idle_first)
    assert idle_record.version == 1
    assert idle_record.state == KeyState.DISABLED
    assert idle_record.next_rotation_at is not None
    assert idle_record.next_rotation_at > fleet.clock()

    # Changing the period reschedules from now; none stops it.
    updated = await alice.update_key(key.key_id, rotation_period=30 * DAY)
    assert updated.next_rotation_at is not None
    assert updated.next_rotation_at - fleet.clock() > 29 * DAY
    stopped = await alice.update_key(key.key_id, rotation_period=None)
    assert (stopped.rotation_period, stopped.next_rotation_at) == (None, None)
    fleet.clock.advance(365 * DAY)
    await asyncio.sleep(1)
    assert (await alice.public_key(key.key_id)).version == 3
    assert await _audited(fleet, key.key_id, ROTATED_OPERATION) == [
        (SYSTEM_PRINCIPAL, "ok", 2),
        (SYSTEM_PRINCIPAL, "ok", 3),
    ]


async def _rescheduled(fleet: RunningFleet, key_id: str, before: datetime) -> KeyRecord:
    """The key's primary once its next rotation is no longer ``before`` (the due check moved
    it; it runs every 0.2 s)."""
    async with asyncio.timeout(30):
        while True:
            record = await fleet.store.get_key(key_id)
            if record.next_rotation_at != before:
                return record
            await asyncio.sleep(0.1)


async def _audited(
    fleet: RunningFleet, key_id: str, operation: str
) -> list[tuple[str | None, str, int | None]]:
    """(principal, outcome, version) of the key's audit entries of ``operation``, in order."""
    entries = await fleet.store.read_audit(AuditQuery(key_id=key_id))
    return [
        (e.event.principal, e.event.outcome, e.event.version)
        for e in entries
        if e.event.operation == operation
    ]


async def _primary_after(client: SigningClient, key_id: str, version: int) -> KeyPublicReply:
    """The key's public key once its primary is ``version`` (the due check runs every 0.2 s)."""
    async with asyncio.timeout(30):
        while True:
            reply = await client.public_key(key_id)
            if reply.version >= version:
                assert reply.version == version
                return reply
            await asyncio.sleep(0.1)


async def test_rotate_and_update_from_the_shell(fleet: RunningFleet, tmp_path: Path) -> None:
    env = environment(ZANDD_AMQP_URL=fleet.amqp_url, ZANDD_DATA_DIR=str(tmp_path / "cli"))
    code, out, err = await zandd("keys", "create", "--rotation-period", "90d", env=env)
    assert code == 0, err
    key_id = out.split("\n", 1)[0]
    code, out, err = await zandd("keys", "rotate", key_id, "--request-id", "r-1", env=env)
    assert code == 0, err
    assert out.startswith(f"{key_id} v2: enabled, primary\nnext rotation: ")
    assert "-----BEGIN PUBLIC KEY-----" in out
    code, again, err = await zandd("keys", "rotate", key_id, "--request-id", "r-1", env=env)
    assert (code, again.split("\n")[0]) == (0, f"{key_id} v2: enabled, primary"), err
    code, out, err = await zandd(
        "keys", "update", key_id, "--label", "shell", "--allowed-signer", "*",
        "--rotation-period", "none", env=env,
    )  # fmt: skip
    assert code == 0, err
    assert "label:           shell" in out
    assert "allowed signers: *" in out
    assert "rotation period: none" in out
    local = environment(ZANDD_DATA_DIR=str(fleet.settings.data_dir))
    code, out, err = await zandd("keys", "show", key_id, env=local)
    assert code == 0, err
    assert "primary version: v2" in out
    assert "rotation period: none" in out
    assert "REFUSED" not in out  # the updated records' MACs hold
    code, out, err = await zandd("keys", "public", key_id, "--all-versions", "--jwk", env=env)
    assert code == 0, err
    assert [jwk["kid"] for jwk in json.loads(out)["keys"]] == [f"{key_id}.v1", f"{key_id}.v2"]
    code, out, err = await zandd("keys", "update", key_id, env=env)
    assert code != 0
    assert "at least one" in err
    code, _, err = await zandd("keys", "update", key_id, "--rotation-period", "1h", env=env)
    assert code != 0
    assert "rotation period" in err
