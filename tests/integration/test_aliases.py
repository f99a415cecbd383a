"""Aliases (issue 15): ``key.alias.set`` / ``key.alias.delete`` and an alias wherever a key
id may be one — against the real fleet (RabbitMQ, swtpm, SQLite, two signers)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from contracts.client import SigningClient
from contracts.crypto import load_public_key
from contracts.errors import (
    Forbidden,
    IntegrityError,
    InvalidRequest,
    KeyDisabled,
    KeyNotFound,
)
from contracts.models import SignReply
from tests.support.cli import environment, zandd
from tests.support.fleet import RunningFleet
from tests.support.principals import ADMIN, ALICE, BOB
from vault.audit import AuditQuery

pytestmark = [
    pytest.mark.rabbitmq,
    pytest.mark.tpm,
    pytest.mark.fleet_settings(admins=[ADMIN]),
]


async def test_an_alias_works_wherever_a_key_id_does_and_replies_name_the_key(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    alice = clients[ALICE]
    key = await alice.create_key(label="invoices")
    made = await alice.set_alias("alias/invoices", key.key_id)
    assert (made.alias, made.key_id, made.previous_key_id, made.owner) == (
        "alias/invoices",
        key.key_id,
        None,
        ALICE,
    )
    signed = await alice.sign("alias/invoices", b"through the alias")
    assert signed.key_id == key.key_id
    assert await alice.verify(key, signed.signature, message=b"through the alias")
    batch = await alice.sign_batch("alias/invoices", [b"a", b"b"])
    assert (batch.key_id, len(batch.signatures)) == (key.key_id, 2)
    assert (await alice.public_key("alias/invoices")).key_id == key.key_id
    checked = await alice.verify_on_fleet(
        "alias/invoices", signed.signature, message=b"through the alias"
    )
    assert (checked.key_id, checked.valid) == (key.key_id, True)
    assert (await alice.describe_key("alias/invoices")).key_id == key.key_id
    rotated = await alice.rotate_key("alias/invoices")
    assert (rotated.key_id, rotated.version) == (key.key_id, 2)
    assert (await alice.sign("alias/invoices", b"v2")).version == 2
    updated = await alice.update_key("alias/invoices", label="renamed")
    assert (updated.key_id, updated.label) == (key.key_id, "renamed")
    tpm_key = await alice.create_key(protection="tpm")
    await alice.set_alias("alias/in-the-tpm", tpm_key.key_id)
    assert (await alice.sign_in_tpm("alias/in-the-tpm", b"x")).key_id == tpm_key.key_id

    # The lifecycle operations take key ids only: refused before anything is sent.
    with pytest.raises(InvalidRequest, match="key_id"):
        await alice.disable_key("alias/invoices")
    # An alias is never a key id, nor a key id an alias; unknown aliases are not found.
    with pytest.raises(KeyNotFound, match="alias/nothing"):
        await alice.sign("alias/nothing", b"x")
    for bad in ("alias/", "alias/a b", "alias/" + "x" * 129, "alias/ü", "alias/x/y"):
        with pytest.raises(InvalidRequest):
            await alice.set_alias(bad, key.key_id)
    with pytest.raises(InvalidRequest):  # no chains: the target is a key id
        await alice.set_alias("alias/chain", "alias/invoices")

    # Every change is audited, naming the key.
    entries = await fleet.store.read_audit(AuditQuery(key_id=key.key_id, limit=1000))
    assert [
        (e.event.principal, e.event.outcome)
        for e in entries
        if e.event.operation == "key.alias.set"
    ] == [(ALICE, "ok")]
    # key.list's alias filter: the key it points at, if in the caller's scope; else nothing
    # (the same for an unknown alias).
    listed = await alice.list_keys(alias="alias/invoices")
    assert [k.key_id for k in listed.keys] == [key.key_id]
    assert (await alice.list_keys(alias="alias/invoices", label="other")).keys == []
    assert (await clients[BOB].list_keys(alias="alias/invoices")).keys == []
    assert (await clients[BOB].list_keys("signable", alias="alias/invoices")).keys == []
    assert (await alice.list_keys(alias="alias/nothing")).keys == []
    deleted = await alice.delete_alias("alias/invoices")
    assert (deleted.key_id, deleted.previous_key_id) == (None, key.key_id)
    with pytest.raises(KeyNotFound):
        await alice.sign("alias/invoices", b"gone")
    assert await fleet.store.get_alias("alias/invoices") is None


async def test_no_principal_can_hijack_or_probe_anothers_alias(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    alice, bob, admin = clients[ALICE], clients[BOB], clients[ADMIN]
    mine = await alice.create_key()
    other = await alice.create_key()
    bobs = await bob.create_key()
    await alice.set_alias("alias/payroll", mine.key_id)

    # Bob may not point an alias at Alice's key: the same answer as for a key that does not
    # exist, so it tells him nothing about which keys exist.
    with pytest.raises(Forbidden) as refused:
        await bob.set_alias("alias/bobs", mine.key_id)
    with pytest.raises(Forbidden) as unknown:
        await bob.set_alias("alias/bobs", "zk-00000000000000000000")
    assert refused.value.message.replace(mine.key_id, "K") == unknown.value.message.replace(
        "zk-00000000000000000000", "K"
    )
    # Nor re-point Alice's alias, even at his own key; nor delete it (deleting one that does
    # not exist answers the same).
    with pytest.raises(Forbidden, match="belongs to another"):
        await bob.set_alias("alias/payroll", bobs.key_id)
    with pytest.raises(KeyNotFound) as not_his:
        await bob.delete_alias("alias/payroll")
    with pytest.raises(KeyNotFound) as absent:
        await bob.delete_alias("alias/absent")
    assert not_his.value.message.replace("payroll", "X") == absent.value.message.replace(
        "absent", "X"
    )
    # Through the alias he may not sign, and the refusal does not name the key behind it.
    with pytest.raises(Forbidden) as through:
        await bob.sign("alias/payroll", b"x")
    assert mine.key_id not in through.value.message
    assert (await fleet.store.get_alias("alias/payroll")).key_id == mine.key_id  # type: ignore[union-attr]

    # The owner re-points it (to another of her keys); an admin may too, and the alias stays
    # its owner's.
    moved = await alice.set_alias("alias/payroll", other.key_id)
    assert (moved.key_id, moved.previous_key_id) == (other.key_id, mine.key_id)
    assert (await alice.sign("alias/payroll", b"x")).key_id == other.key_id
    by_admin = await admin.set_alias("alias/payroll", bobs.key_id)
    assert (by_admin.key_id, by_admin.owner) == (bobs.key_id, ALICE)
    with pytest.raises(Forbidden):  # Alice may not sign with Bob's key through her alias
        await alice.sign("alias/payroll", b"x")
    entries = await fleet.store.read_audit(AuditQuery(principal=BOB, limit=1000))
    assert Counter(
        (e.event.operation, e.event.outcome)
        for e in entries
        if e.event.operation.startswith("key.alias")
    ) == {("key.alias.set", "forbidden"): 3, ("key.alias.delete", "key_not_found"): 2}


async def test_a_dangling_alias_and_a_tampered_one_give_clear_errors(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    alice = clients[ALICE]
    key = await alice.create_key()
    await alice.set_alias("alias/short-lived", key.key_id)
    assert (await alice.sign("alias/short-lived", b"x")).key_id == key.key_id
    await alice.destroy_key(key.key_id, pending_days=1)
    with pytest.raises(KeyDisabled, match=f"{key.key_id} v1 is pending_destruction"):
        await alice.sign("alias/short-lived", b"after destroy")

    # A vault writer without the KEK ring re-points an alias: its MAC no longer holds, so
    # the signers refuse to resolve it rather than sign with another key.
    target, decoy = await alice.create_key(), await alice.create_key()
    await alice.set_alias("alias/tampered", target.key_id)
    row = await fleet.store.get_alias("alias/tampered")
    assert row is not None
    forged = dataclasses.replace(row, key_id=decoy.key_id, generation=row.generation + 1)
    assert await fleet.store.put_alias(forged, row)
    with pytest.raises(IntegrityError, match="alias/tampered failed its MAC"):
        await alice.sign("alias/tampered", b"x")


async def test_an_alias_repointed_under_load_switches_signers_at_the_reply(
    fleet: RunningFleet,
    clients: dict[str, SigningClient],
    report: Callable[[str], None],
) -> None:
    alice = clients[ALICE]
    first, second = await alice.create_key(), await alice.create_key()
    await alice.set_alias("alias/load", first.key_id)
    await asyncio.gather(*(alice.sign("alias/load", b"warm") for _ in range(8)))  # cached
    #: (sent at, answered at, reply) of every sign of the load.
    results: list[tuple[float, float, SignReply]] = []
    sent = 0
    stop = asyncio.Event()
    progress = asyncio.Condition()

    async def one() -> None:
        nonlocal sent
        sent += 1
        sent_at = time.monotonic()
        reply = await alice.sign("alias/load", f"load {sent}".encode())
        results.append((sent_at, time.monotonic(), reply))
        async with progress:
            progress.notify_all()

    async def loader() -> None:
        while not stop.is_set():
            await asyncio.gather(*(one() for _ in range(25)))

    async def answered(count: int, after: float = 0.0) -> None:
        async with progress:
            await progress.wait_for(lambda: sum(r[0] > after for r in results) >= count)

    loaders = [asyncio.create_task(loader()) for _ in range(3)]
    await answered(150)
    set_sent_at = time.monotonic()
    await alice.set_alias("alias/load", second.key_id)
    set_at = time.monotonic()
    await answered(200, after=set_at)
    stop.set()
    await asyncio.gather(*loaders)

    assert len(results) == sent  # nothing lost or refused
    keys = Counter(reply.key_id for _, _, reply in results)
    assert set(keys) == {first.key_id, second.key_id}, keys
    # Sent after the reply: every one by the new key (the event reached the signers first).
    after = [reply.key_id for at, _, reply in results if at > set_at]
    assert len(after) >= 200
    assert set(after) == {second.key_id}
    last_old = max(done for _, done, reply in results if reply.key_id == first.key_id)
    first_new = min(done for _, done, reply in results if reply.key_id == second.key_id)
    across = [r.key_id == second.key_id for at, done, r in results if at < set_sent_at < done]
    report(
        f"alias re-point under load: {len(results)} signs through one alias "
        f"({keys[first.key_id]} by the old key, {keys[second.key_id]} by the new), "
        f"key.alias.set round trip {(set_at - set_sent_at) * 1000:.0f} ms; first new-key "
        f"answer {(first_new - set_at) * 1000:+.1f} ms and last old-key answer "
        f"{(last_old - set_at) * 1000:+.1f} ms from the reply; in flight across the set "
        f"{len(across)} ({sum(across)} by the new key); sent after the reply: {len(after)}, "
        "all by the new key (cache bound without events: the signers' record-cache TTL)"
    )


async def test_aliases_from_the_shell(fleet: RunningFleet, tmp_path: Path) -> None:
    env = environment(ZANDD_AMQP_URL=fleet.amqp_url, ZANDD_DATA_DIR=str(tmp_path / "cli"))
    code, out, err = await zandd("keys", "create", env=env)
    assert code == 0, err
    first = out.split("\n", 1)[0]
    code, out, err = await zandd("keys", "create", env=env)
    assert code == 0, err
    second = out.split("\n", 1)[0]
    code, out, err = await zandd("keys", "alias-set", "alias/shell", first, env=env)
    assert code == 0, err
    assert out.startswith(f"alias/shell -> {first}, owner ")
    (tmp_path / "m").write_bytes(b"from the shell")
    code, out, err = await zandd("sign", "--key", "alias/shell", str(tmp_path / "m"), env=env)
    assert code == 0, err
    signature = base64.b64decode(out.strip())
    code, out, err = await zandd("keys", "alias-set", "alias/shell", second, env=env)
    assert code == 0, err
    assert f"(was {first})" in out
    local = environment(ZANDD_DATA_DIR=str(fleet.settings.data_dir))
    code, out, err = await zandd("keys", "aliases", "--key-id", second, env=local)
    assert code == 0, err
    assert "alias/shell" in out
    assert second in out
    assert "REFUSED" not in out  # its MAC holds
    code, out, err = await zandd("keys", "alias-delete", "alias/shell", env=env)
    assert (code, out.strip()) == (0, f"alias/shell deleted (it pointed at {second})"), err
    code, out, err = await zandd("keys", "alias-delete", "alias/shell", env=env)
    assert code != 0
    assert "alias/shell not found" in err
    # Made by the first key, through the alias.
    record = await fleet.store.get_key(first)
    load_public_key(record.public_key_der).verify(
        signature, b"from the shell", ec.ECDSA(hashes.SHA256())
    )
