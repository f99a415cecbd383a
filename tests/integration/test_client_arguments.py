"""Arguments the fleet would refuse, refused by the client before anything is sent, in one
sentence with the fix: a str where bytes belong (``client.sign(key, "text")``) from every call
that signs or verifies, and a message over the 1 MiB limit (the client and ``zandd sign``).
And what ``key.create`` answers: the label too."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from contracts.client import SigningClient
from contracts.errors import InvalidRequest, NotBytes
from contracts.limits import DEFAULT_LIMITS
from tests.support.cli import environment, zandd
from tests.support.fleet import RunningFleet

Call = Callable[[SigningClient], Awaitable[object]]
PUBLIC = ec.generate_private_key(ec.SECP256R1()).public_key()

CALLS: dict[str, tuple[Call, str]] = {
    "sign": (lambda c: c.sign("zk-1", "text"), "message must be bytes, not str"),  # type: ignore[arg-type]
    "sign digest": (lambda c: c.sign("zk-1", digest="ab" * 16), "digest must be bytes, not str"),  # type: ignore[arg-type]
    "sign_in_tpm": (lambda c: c.sign_in_tpm("zk-1", "text"), "message must be bytes, not str"),  # type: ignore[arg-type]
    "sign_batch": (lambda c: c.sign_batch("zk-1", [b"ok", "text"]), "message must be bytes"),  # type: ignore[list-item]
    "verify": (
        lambda c: c.verify(PUBLIC, b"sig", message="text"),  # type: ignore[arg-type]
        "message must be bytes, not str",
    ),
    "verify signature": (
        lambda c: c.verify(PUBLIC, "c2ln", message=b"m"),  # type: ignore[arg-type]
        "signature must be bytes, not str",
    ),
    "verify_trusting_fleet": (
        lambda c: c.verify_trusting_fleet("zk-1", b"sig", message="text"),  # type: ignore[arg-type]
        "message must be bytes, not str",
    ),
    "verify_on_fleet": (
        lambda c: c.verify_on_fleet("zk-1", b"sig", message="text"),  # type: ignore[arg-type]
        "message must be bytes, not str",
    ),
    "verify_batch_on_fleet": (
        lambda c: c.verify_batch_on_fleet("zk-1", [("text", b"sig")]),  # type: ignore[list-item]
        "message must be bytes, not str",
    ),
}


@pytest.mark.rabbitmq
@pytest.mark.parametrize("name", CALLS)
async def test_a_str_for_bytes_is_a_type_error_naming_the_argument(
    name: str, amqp_url: str
) -> None:
    call, said = CALLS[name]
    # No fleet and no topology: the call must fail before anything is sent or awaited.
    async with await SigningClient.connect(amqp_url) as client:
        with pytest.raises(TypeError, match=said) as info:
            await call(client)
    assert isinstance(info.value, NotBytes)
    assert isinstance(info.value, InvalidRequest)
    if "not str" in said:
        assert info.value.message.endswith("encode the text first, e.g. text.encode()")


BY_DIGEST = "use --digest (or `digest=`) for large data"


@pytest.mark.rabbitmq
async def test_a_message_over_the_limit_says_to_sign_its_digest(
    amqp_url: str, tmp_path: Path
) -> None:
    big = b"x" * (DEFAULT_LIMITS.max_message_bytes + 1)
    async with await SigningClient.connect(amqp_url) as client:
        with pytest.raises(InvalidRequest, match="'message' is larger than the limit") as info:
            await client.sign("zk-1", big)
    assert BY_DIGEST in info.value.message

    (tmp_path / "big.bin").write_bytes(big)
    env = environment(ZANDD_AMQP_URL=amqp_url)
    code, _, err = await zandd("sign", "--key", "zk-1", str(tmp_path / "big.bin"), env=env)
    assert code == 1
    [line] = err.splitlines()
    assert line.startswith("zandd: invalid SignRequest: 'message' is larger than the limit")
    assert BY_DIGEST in line


@pytest.mark.rabbitmq
@pytest.mark.tpm
async def test_key_create_reply_names_the_label(fleet: RunningFleet) -> None:
    async with await fleet.client() as client:
        labelled = await client.create_key(label="invoices 2026")
        unlabelled = await client.create_key()
    assert (labelled.label, unlabelled.label) == ("invoices 2026", None)
    # What the reply says is what the vault holds.
    [record] = await fleet.store.list_versions(labelled.key_id)
    assert record.label == "invoices 2026"
