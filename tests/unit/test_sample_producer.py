"""The sample producer's own unit tests, on the test double (``contracts.testing.FakeFleet``):
what a producer's test suite looks like, and what the double promises."""

from __future__ import annotations

import dataclasses
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from contracts.algorithms import ALGORITHM_RSA_PSS_2048_SHA256
from contracts.errors import (
    Forbidden,
    InvalidRequest,
    KeyDisabled,
    KeyNotFound,
    NotDelivered,
    Throttled,
    TpmUnavailable,
)
from contracts.models import SPECS, ErrorReply, KeyCreateReply, KeyCreateRequest, SignRequest
from contracts.operations import ERROR_REPLY_TYPE, Operation
from contracts.testing import FakeFleet
from tests.unit.sample_producer import (
    InvoiceNotSigned,
    canonical,
    is_authentic,
    sign_invoice,
    sign_invoices,
)

INVOICE = {"number": "2026-0042", "total": "118.00", "currency": "EUR"}


async def test_a_signed_invoice_verifies_with_cryptography() -> None:
    fleet = FakeFleet()
    async with await fleet.client() as client:
        key = await client.create_key(label="invoices")
        signed = await sign_invoice(client, key.key_id, INVOICE)
    assert is_authentic(key.public_key_pem, signed)
    assert not is_authentic(key.public_key_pem, dataclasses.replace(signed, body=b"forged"))
    assert fleet.requests[-1].operation is Operation.SIGN


async def test_a_retryable_failure_is_tried_again_and_a_refusal_explained() -> None:
    fleet = FakeFleet()
    async with await fleet.client() as client:
        key = await client.create_key()
        fleet.fail_next(Operation.SIGN, TpmUnavailable("the TPM is busy"))
        assert is_authentic(key.public_key_pem, await sign_invoice(client, key.key_id, INVOICE))
        await client.disable_key(key.key_id)
        with pytest.raises(InvoiceNotSigned, match="key_disabled"):
            await sign_invoice(client, key.key_id, INVOICE)
        with pytest.raises(InvoiceNotSigned, match="key_not_found"):
            await sign_invoice(client, "zk-0000", INVOICE)


def test_a_batch_from_many_threads_with_the_blocking_client() -> None:
    fleet = FakeFleet()
    with fleet.sync_client() as client:
        key = client.create_key()
        days = [[{**INVOICE, "number": f"{day}-{n}"} for n in range(5)] for day in range(20)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            batches = list(pool.map(lambda day: sign_invoices(client, key.key_id, day), days))
    assert all(is_authentic(key.public_key_pem, s) for batch in batches for s in batch)
    assert [s.body for s in batches[3]] == [canonical(i) for i in days[3]]


# -- what the double promises: the fleet's errors, models and crypto ----------------------------


async def test_the_fleets_errors_come_back_typed() -> None:
    fleet = FakeFleet(admins={"root"})
    async with await fleet.client("alice") as alice, await fleet.client("bob") as bob:
        key = await alice.create_key(allowed_signers=["alice"])
        with pytest.raises(KeyNotFound, match="zk-missing"):
            await alice.sign("zk-missing", b"m")
        with pytest.raises(Forbidden, match="'bob' may not sign"):
            await bob.sign(key.key_id, b"m")
        with pytest.raises(Forbidden):
            await bob.disable_key(key.key_id)
        with pytest.raises(InvalidRequest, match="digest"):
            await alice.sign(key.key_id, digest=b"not 32 bytes")
        await alice.disable_key(key.key_id)
        with pytest.raises(KeyDisabled):
            await alice.sign(key.key_id, b"m")
        fleet.fail_next("sign", Throttled("slow down", retry_after_s=2.5))
        with pytest.raises(Throttled) as throttled:
            await alice.sign(key.key_id, b"m")
        assert throttled.value.retry_after_s == 2.5


async def test_an_operation_the_fleet_does_not_serve_is_not_delivered() -> None:
    fleet = FakeFleet(operations=[Operation.KEY_CREATE])
    async with await fleet.client() as client:
        key = await client.create_key()
        # NotDelivered (or its NoConsumer, where the client checks for a consumer first).
        with pytest.raises(NotDelivered, match="fleet"):
            await client.sign(key.key_id, b"m")


async def test_replies_validate_against_the_contract_models() -> None:
    fleet = FakeFleet()
    create = KeyCreateRequest().model_dump_json().encode()
    body, reply_type = fleet.serve(Operation.KEY_CREATE, create, "app", uuid.uuid4().hex)
    assert reply_type == "key.create.reply"
    assert SPECS[Operation.KEY_CREATE].reply is KeyCreateReply
    key = KeyCreateReply.model_validate_json(body)
    sign = SignRequest(key_id=key.key_id, message=b"m").model_dump_json().encode()
    body, reply_type = fleet.serve(Operation.SIGN, sign, "app", None)
    assert reply_type == "sign.reply"
    SPECS[Operation.SIGN].reply.model_validate_json(body)
    body, reply_type = fleet.serve(Operation.SIGN, sign, "mallory", None)
    assert reply_type == ERROR_REPLY_TYPE
    assert ErrorReply.model_validate_json(body).code == "forbidden"
    body, reply_type = fleet.serve(Operation.SIGN, b'{"key_id": 1}', "app", None)
    assert ErrorReply.model_validate_json(body).code == "invalid_request"


async def test_every_operation_of_the_client_works_on_the_double() -> None:
    fleet = FakeFleet(admins={"root"})
    async with await fleet.client("alice") as client, await fleet.client("root") as root:
        key = await client.create_key(label="all", request_id="create-1")
        assert (await client.create_key(request_id="create-1")).key_id == key.key_id
        raw = await client.sign(key.key_id, b"m", encoding="raw")
        assert await client.verify(key, raw.signature, message=b"m", encoding="raw")
        batch = await client.sign_batch(key.key_id, [b"a"], digests=[bytes(32)])
        assert len(batch.signatures) == 2
        assert (await client.verify_on_fleet(key.key_id, batch.signatures[0], message=b"a")).valid
        verdicts = await client.verify_batch_on_fleet(
            key.key_id, [(b"a", batch.signatures[0]), (b"b", batch.signatures[0])]
        )
        assert verdicts.valid == [True, False]
        assert await client.verify_trusting_fleet(
            key.key_id, raw.signature, message=b"m", encoding="raw"
        )
        rotated = await client.rotate_key(key.key_id)
        assert rotated.version == 2
        public = await client.public_key(key.key_id, all_versions=True)
        assert public.version == 2
        assert public.versions is not None
        assert len(public.versions) == 2
        await client.set_alias("alias/invoices", key.key_id)
        assert (await client.sign("alias/invoices", b"m")).key_id == key.key_id
        await client.delete_alias("alias/invoices")
        updated = await client.update_key(key.key_id, label="renamed", allowed_signers=["*"])
        assert updated.label == "renamed"
        assert [k.key_id async for k in client.iter_keys(page_size=1)] == [key.key_id]
        assert len((await root.list_keys("all")).keys) == 1
        described = await client.describe_key(key.key_id)
        assert [v.version for v in described.versions] == [1, 2]
        await client.destroy_key(key.key_id, 1, pending_days=1)
        await client.cancel_key_destruction(key.key_id, 1)
        await client.enable_key(key.key_id, 1)
        tpm = await client.create_key(protection="tpm")
        assert (await client.sign_in_tpm(tpm.key_id, b"m")).protection == "tpm"
        rsa_key = await client.create_key(algorithm=ALGORITHM_RSA_PSS_2048_SHA256)
        signed = await client.sign(rsa_key.key_id, b"m")
        rsa_public = load_pem_public_key(rsa_key.public_key_pem.encode())
        assert isinstance(rsa_public, rsa.RSAPublicKey)
        rsa_public.verify(
            signed.signature,
            b"m",
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH),
            hashes.SHA256(),
        )
    ec_public = load_pem_public_key(key.public_key_pem.encode())
    assert isinstance(ec_public, ec.EllipticCurvePublicKey)


def test_the_projects_own_integration_tests_never_use_the_double() -> None:
    integration = Path(__file__).parents[1] / "integration"
    for path in integration.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "contracts.testing" not in text, f"{path} uses the test double"
        assert "FakeFleet" not in text, f"{path} uses the test double"


async def test_the_readme_example_of_the_double_runs() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    [example] = [
        block.split("```", 1)[0]
        for block in readme.split("```python\n")[1:]
        if "FakeFleet()" in block.split("```", 1)[0]
    ]
    namespace: dict[str, object] = {}
    exec(compile(example, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    test = namespace["test_invoices_are_signed"]
    assert callable(test)
    await test()


async def test_the_double_says_whether_a_worker_consumes_each_queue() -> None:
    fleet = FakeFleet(operations=[Operation.KEY_CREATE])
    wire = await fleet.source().open(connection_name="test", timeout_s=1)
    assert (await wire.declare_queue("zandd.keygen", passive=True)).consumer_count == 1
    assert (await wire.declare_queue("zandd.sign", passive=True)).consumer_count == 0
