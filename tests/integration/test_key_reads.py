"""The signers' reads (issue 15) against the real fleet: ``verify``, ``verify.batch``,
``key.list`` and ``key.describe``, from the Python client, with real RabbitMQ users, swtpm
and SQLite — and tried the way a hostile producer would: no principal sees another's keys in
a list or a description unless allowed, and a vault row changed behind the keygen worker's
back is refused, never believed.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections import Counter
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from contracts.client import SigningClient
from contracts.crypto import der_to_raw
from contracts.errors import Forbidden, IntegrityError, InvalidRequest, KeyNotFound
from contracts.models import KeyState
from tests.support.audit import vault_file
from tests.support.cli import environment, zandd
from tests.support.fleet import RunningFleet
from tests.support.principals import ADMIN, ALICE, BOB, CAROL
from vault.audit import AuditQuery
from workers.signer.reads import encode_cursor

pytestmark = [
    pytest.mark.rabbitmq,
    pytest.mark.tpm,
    pytest.mark.fleet_settings(admins=[ADMIN]),
]


async def _verify_outcomes(fleet: RunningFleet) -> Counter[tuple[str | None, str, str]]:
    """(principal, operation, outcome) of every verify entry in the audit log."""
    seen: Counter[tuple[str | None, str, str]] = Counter()
    after = 0
    while page := await fleet.store.read_audit(AuditQuery(after_seq=after)):
        for entry in page:
            event = entry.event
            if event.operation in {"verify", "verify.batch"}:
                seen[event.principal, event.operation, event.outcome] += 1
        after = page[-1].seq
    return seen


async def _all_keys(client: SigningClient, scope: str = "owned", **filters: object) -> list[str]:
    return [key.key_id async for key in client.iter_keys(scope, **filters)]  # type: ignore[arg-type]


# --- verify and verify.batch -----------------------------------------------------------------


async def test_verify_on_the_fleet_answers_valid_and_invalid_and_audits_the_verdict(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    alice = clients[ALICE]
    key = await alice.create_key(label="invoices")
    signed = await alice.sign(key.key_id, b"invoice 1")
    assert (await alice.verify_on_fleet(key.key_id, signed.signature, message=b"invoice 1")).valid
    digest = hashlib.sha256(b"invoice 1").digest()
    reply = await alice.verify_on_fleet(key.key_id, signed.signature, digest=digest, version=1)
    assert (reply.key_id, reply.version, reply.algorithm, reply.valid) == (
        key.key_id,
        1,
        "ecdsa-p256-sha256",
        True,
    )
    raw = der_to_raw(signed.signature)
    assert (
        await alice.verify_on_fleet(key.key_id, raw, message=b"invoice 1", encoding="raw")
    ).valid
    # Invalid is an answer, not an error: another message, a garbled or mis-encoded signature.
    for signature, message, encoding in (
        (signed.signature, b"invoice 2", "der"),
        (b"\x30\x02\x00\x00", b"invoice 1", "der"),
        (signed.signature, b"invoice 1", "raw"),
        (raw[:-1], b"invoice 1", "raw"),
    ):
        verdict = await alice.verify_on_fleet(
            key.key_id,
            signature,
            message=message,
            encoding=encoding,  # type: ignore[arg-type]
        )
        assert verdict.valid is False
    # A signature by another key over the same message does not hold either.
    stranger = ec.generate_private_key(ec.SECP256R1())
    forged = stranger.sign(b"invoice 1", ec.ECDSA(hashes.SHA256()))
    assert not (await alice.verify_on_fleet(key.key_id, forged, message=b"invoice 1")).valid
    with pytest.raises(KeyNotFound):
        await alice.verify_on_fleet(key.key_id, signed.signature, message=b"x", version=2)

    batch = await alice.verify_batch_on_fleet(
        key.key_id,
        [(b"invoice 1", signed.signature), (b"invoice 2", signed.signature)],
        digests=[(digest, signed.signature)],
    )
    assert batch.valid == [True, False, True]
    assert (
        await alice.verify_batch_on_fleet(key.key_id, [(b"invoice 1", raw)], encoding="raw")
    ).valid == [True]

    # A disabled key's signatures still verify (its public key stays, as for key.public).
    await alice.disable_key(key.key_id)
    assert (await alice.verify_on_fleet(key.key_id, signed.signature, message=b"invoice 1")).valid

    outcomes = await _verify_outcomes(fleet)
    assert outcomes == {
        (ALICE, "verify", "ok:valid"): 4,
        (ALICE, "verify", "ok:invalid"): 5,
        (ALICE, "verify", "key_not_found"): 1,
        (ALICE, "verify.batch", "ok:invalid"): 1,
        (ALICE, "verify.batch", "ok:valid"): 1,
    }


async def test_who_may_verify_signers_owner_and_admins(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    alice, bob, carol = clients[ALICE], clients[BOB], clients[CAROL]
    private = await alice.create_key()
    signed = await alice.sign(private.key_id, b"alice's")
    with pytest.raises(Forbidden, match=f"'{BOB}' may not verify with key {private.key_id}"):
        await bob.verify_on_fleet(private.key_id, signed.signature, message=b"alice's")
    with pytest.raises(Forbidden):
        await bob.verify_batch_on_fleet(private.key_id, [(b"alice's", signed.signature)])
    assert (
        await clients[ADMIN].verify_on_fleet(private.key_id, signed.signature, message=b"alice's")
    ).valid
    # Bob may sign with it but does not own it; Alice owns it but may not sign with it.
    shared = await alice.create_key(allowed_signers=[BOB])
    by_bob = await bob.sign(shared.key_id, b"bob's")
    assert (await bob.verify_on_fleet(shared.key_id, by_bob.signature, message=b"bob's")).valid
    assert (await alice.verify_on_fleet(shared.key_id, by_bob.signature, message=b"bob's")).valid
    with pytest.raises(Forbidden):
        await carol.verify_on_fleet(shared.key_id, by_bob.signature, message=b"bob's")
    anyone = await alice.create_key(allowed_signers=["*"])
    by_carol = await carol.sign(anyone.key_id, b"carol's")
    assert (await bob.verify_on_fleet(anyone.key_id, by_carol.signature, message=b"carol's")).valid
    outcomes = await _verify_outcomes(fleet)
    assert outcomes[BOB, "verify", "forbidden"] == 1
    assert outcomes[BOB, "verify.batch", "forbidden"] == 1
    assert outcomes[CAROL, "verify", "forbidden"] == 1


async def test_verify_trusts_only_the_authenticated_public_key(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    # A vault writer swaps the stored public key for its own before any signer loaded the
    # record: its forgery must not verify — the record's MAC fails, and nothing is answered.
    alice = clients[ALICE]
    key = await alice.create_key()
    attacker = ec.generate_private_key(ec.SECP256R1())
    spki = attacker.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with sqlite3.connect(vault_file(fleet)) as conn:
        conn.execute("UPDATE keys SET public_key_der = ? WHERE key_id = ?", (spki, key.key_id))
    conn.close()
    forged = attacker.sign(b"pay Mallory", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(IntegrityError):
        await alice.verify_on_fleet(key.key_id, forged, message=b"pay Mallory")


# --- key.list --------------------------------------------------------------------------------


async def test_key_list_scopes_pages_and_filters(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    alice, bob, carol, admin = clients[ALICE], clients[BOB], clients[CAROL], clients[ADMIN]
    alices = [(await alice.create_key(label=label)).key_id for label in ("a", "b", "b", "c")]
    bobs_private = (await bob.create_key(label="b")).key_id
    bobs_shared = (await bob.create_key(label="b", allowed_signers=[ALICE, BOB])).key_id
    carols_open = (await carol.create_key(allowed_signers=["*"])).key_id

    assert await _all_keys(alice) == sorted(alices)
    page = await alice.list_keys()
    assert [k.key_id for k in page.keys] == sorted(alices)
    assert page.next_cursor is None
    assert {(k.owner, tuple(k.allowed_signers or ())) for k in page.keys} == {(ALICE, (ALICE,))}
    assert all(k.version == 1 and k.state == KeyState.ENABLED for k in page.keys)

    # Paged one key at a time: the same keys, in order, each once.
    first = await alice.list_keys(page_size=1)
    assert len(first.keys) == 1
    assert first.next_cursor is not None
    assert await _all_keys(alice, page_size=1) == sorted(alices)

    signable = await alice.list_keys("signable")
    assert [k.key_id for k in signable.keys] == sorted([*alices, bobs_shared, carols_open])
    shown = {k.key_id: (k.owner, k.allowed_signers) for k in signable.keys}
    # A signer does not learn who owns another's key nor who else may sign with it.
    assert shown[bobs_shared] == (None, None)
    assert shown[carols_open] == (None, None)

    assert await _all_keys(alice, label="b") == sorted(alices[1:3])
    assert await _all_keys(alice, "signable", label="b") == sorted([*alices[1:3], bobs_shared])
    await alice.disable_key(alices[0])
    assert await _all_keys(alice, state="disabled") == [alices[0]]
    assert await _all_keys(alice, state=KeyState.ENABLED, page_size=2) == sorted(alices[1:])

    assert await _all_keys(bob) == sorted([bobs_private, bobs_shared])
    assert await _all_keys(carol, "signable") == [carols_open]
    with pytest.raises(Forbidden, match="scope 'all' is for admins"):
        await bob.list_keys("all")
    everything = [*alices, bobs_private, bobs_shared, carols_open]
    assert await _all_keys(admin, "all", page_size=3) == sorted(everything)
    assert await _all_keys(admin) == []  # an admin's own keys: none
    admin_view = await admin.list_keys("all", page_size=1000)
    assert {k.owner for k in admin_view.keys} == {ALICE, BOB, CAROL}


async def test_a_hostile_producer_sees_no_one_elses_keys(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    alice, bob = clients[ALICE], clients[BOB]
    secret = await alice.create_key(label="payroll")
    mine = await bob.create_key()
    # Every scope Bob may ask for, every filter, every page: never Alice's key.
    for scope in ("owned", "signable"):
        for label in (None, "payroll"):
            listed = await _all_keys(bob, scope, label=label, page_size=1)
            assert secret.key_id not in listed
    # A cursor is only a position: one made up to start just before Alice's key grants nothing.
    before = secret.key_id[:-1]  # a prefix: sorts just before the key id
    forged = await bob.list_keys("signable", cursor=encode_cursor(before))
    assert secret.key_id not in [k.key_id for k in forged.keys]
    for cursor in ("not-a-cursor", encode_cursor("x")[:-2] + "!!"):
        with pytest.raises(InvalidRequest, match="cursor"):
            await bob.list_keys(cursor=cursor)
    with pytest.raises(Forbidden):
        await bob.describe_key(secret.key_id)

    # Someone with the vault file adds Bob to the signer index of Alice's key: the signers
    # list only what the authenticated record allows.
    with sqlite3.connect(vault_file(fleet)) as conn:
        conn.execute(
            "INSERT INTO key_signers (principal, key_id, version) VALUES (?, ?, 1)",
            (BOB, secret.key_id),
        )
    conn.close()
    assert await _all_keys(bob, "signable") == [mine.key_id]
    # ...and changing the record itself breaks its MAC: refused, not shown.
    with sqlite3.connect(vault_file(fleet)) as conn:
        conn.execute(
            "UPDATE keys SET allowed_signers = ? WHERE key_id = ?", (f'["{BOB}"]', secret.key_id)
        )
    conn.close()
    with pytest.raises(IntegrityError):
        await bob.list_keys("signable")
    with pytest.raises(IntegrityError):
        await bob.describe_key(secret.key_id)


# --- key.describe ----------------------------------------------------------------------------


async def test_key_describe_shows_every_version_and_no_secret(
    fleet: RunningFleet, clients: dict[str, SigningClient]
) -> None:
    alice, bob, carol = clients[ALICE], clients[BOB], clients[CAROL]
    key = await alice.create_key(label="invoices", allowed_signers=[ALICE, BOB])
    described = await alice.describe_key(key.key_id)
    assert (described.key_id, described.current_version) == (key.key_id, 1)
    assert (described.owner, described.allowed_signers) == (ALICE, [ALICE, BOB])
    (version,) = described.versions
    assert (version.version, version.algorithm, version.state, version.label) == (
        1,
        "ecdsa-p256-sha256",
        KeyState.ENABLED,
        "invoices",
    )
    assert version.public_key_pem == key.public_key_pem
    assert version.created_at == key.created_at
    assert (version.protection, version.destroy_after) == ("exportable", None)
    assert version.attested == (key.attestation is not None)
    dumped = described.model_dump_json()
    for secret in ("sealed", "ciphertext", "nonce", "kek", "mac", "tpm_blob"):
        assert secret not in dumped

    # A signer sees the key, not who owns it nor the other signers; the admin sees all.
    as_signer = await bob.describe_key(key.key_id)
    assert (as_signer.owner, as_signer.allowed_signers) == (None, None)
    assert as_signer.versions == described.versions
    assert (await clients[ADMIN].describe_key(key.key_id)).owner == ALICE
    with pytest.raises(Forbidden, match="may not describe"):
        await carol.describe_key(key.key_id)
    with pytest.raises(KeyNotFound):
        await alice.describe_key("zk-00000000000000000000")

    await alice.destroy_key(key.key_id, pending_days=3)
    pending = (await alice.describe_key(key.key_id)).versions[0]
    assert pending.state == KeyState.PENDING_DESTRUCTION
    assert pending.destroy_after is not None


# --- the CLI, as a producer with no vault access ----------------------------------------------


async def test_cli_lists_shows_and_verifies_over_the_wire(
    fleet: RunningFleet,
    clients: dict[str, SigningClient],
    users: dict[str, str],
    tmp_path: Path,
) -> None:
    alice = clients[ALICE]
    mine = await alice.create_key(label="cli-invoices")
    shared = await clients[BOB].create_key(label="bobs", allowed_signers=[ALICE])
    hidden = await clients[BOB].create_key(label="bob only")
    # Alice's shell: her broker URL, and a vault URL that leads nowhere (she has no vault).
    env = environment(
        ZANDD_AMQP_URL=users[ALICE], ZANDD_VAULT_URL=f"sqlite:///{tmp_path}/nowhere/none.db"
    )
    code, out, err = await zandd("keys", "list", "--via-broker", env=env)
    assert code == 0, err
    assert mine.key_id in out
    assert "cli-invoices" in out
    assert shared.key_id not in out
    code, out, err = await zandd(
        "keys", "list", "--via-broker", "--scope", "signable", "--page-size", "1", env=env
    )
    assert code == 0, err
    assert mine.key_id in out
    assert shared.key_id in out
    assert hidden.key_id not in out
    code, out, err = await zandd("keys", "list", "--via-broker", "--scope", "all", env=env)
    assert code != 0
    assert "scope 'all' is for admins" in err
    # An operator on the vault's host: every key, filtered here by label and state.
    operator = environment(ZANDD_DATA_DIR=str(fleet.settings.data_dir))
    code, out, err = await zandd("keys", "list", "--label", "bobs", env=operator)
    assert code == 0, err
    assert shared.key_id in out
    assert mine.key_id not in out
    code, out, _ = await zandd("keys", "list", "--state", "disabled", env=operator)
    assert mine.key_id not in out
    code, _, err = await zandd("keys", "list", "--scope", "owned", env=operator)
    assert code != 0
    assert "--scope needs --via-broker" in err

    code, out, err = await zandd(
        "keys", "show", "--via-broker", "--public-keys", mine.key_id, env=env
    )
    assert code == 0, err
    assert f"owner:           {ALICE}" in out
    assert "v1: enabled, protection exportable" in out
    assert mine.public_key_pem in out
    code, out, err = await zandd("keys", "show", "--via-broker", hidden.key_id, env=env)
    assert code != 0
    assert "may not describe" in err

    document = tmp_path / "invoice.txt"
    document.write_bytes(b"invoice 42")
    signature = (await alice.sign(mine.key_id, b"invoice 42")).signature
    (tmp_path / "sig.der").write_bytes(signature)
    verify = [
        "verify",
        "--key",
        mine.key_id,
        "--on-fleet",
        str(document),
        str(tmp_path / "sig.der"),
    ]
    code, out, err = await zandd(*verify, env=env)
    assert (code, out.strip()) == (0, "signature OK"), err
    assert f"the fleet checked it with {mine.key_id} v1" in err
    document.write_bytes(b"invoice 43")
    code, out, _ = await zandd(*verify, env=env)
    assert (code, out.strip()) == (1, "signature INVALID")
