"""Wire contract v1: validation of every request, encodings, and the generated schemas."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from contracts.crypto import (
    der_to_raw,
    load_public_key,
    public_key_der,
    public_key_jwk,
    public_key_pem,
    raw_to_der,
    verify_signature,
)
from contracts.errors import (
    ERRORS_BY_CODE,
    ErrorCode,
    InternalError,
    InvalidRequest,
    error_from_code,
)
from contracts.limits import Limits
from contracts.models import (
    KeyCreateRequest,
    SignBatchRequest,
    SignRequest,
    parse_request,
)
from contracts.operations import Operation
from contracts.schemas import SCHEMA_DIR, expected_schemas


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


DIGEST = hashlib.sha256(b"m").digest()

VALID = [
    (Operation.SIGN, body(key_id="zk-1", message=b64(b"hello"))),
    (Operation.SIGN, body(key_id="zk-1", digest=b64(DIGEST), encoding="raw", version=3)),
    (Operation.SIGN, body(key_id="a.b:c-d", message=b64(b""))),
    (
        Operation.SIGN_BATCH,
        body(key_id="zk-1", items=[{"message": b64(b"a")}, {"digest": b64(DIGEST)}]),
    ),
    (Operation.KEY_PUBLIC, body(key_id="zk-1")),
    (Operation.KEY_CREATE, body()),
    (
        Operation.KEY_CREATE,
        body(label="x", algorithm="ecdsa-p256-sha256", allowed_signers=["*", "app"]),
    ),
]

INVALID = [
    (Operation.SIGN, b"", "Invalid JSON"),
    (Operation.SIGN, b"\xff", "Invalid JSON"),
    (Operation.SIGN, b'"string"', "object"),
    (Operation.SIGN, body(key_id="zk-1"), "exactly one of"),
    (Operation.SIGN, body(key_id="zk-1", message=b64(b"a"), digest=b64(DIGEST)), "exactly one of"),
    (Operation.SIGN, body(key_id="zk-1", message="not base64!"), "base64"),
    (Operation.SIGN, body(key_id="zk-1", message="aGVsbG8"), "base64"),  # missing padding
    (Operation.SIGN, body(key_id="zk-1", message="aGVs bG8="), "base64"),
    (Operation.SIGN, body(key_id="zk-1", message=b64(b"a").replace("=", "") + "-_"), "base64"),
    (Operation.SIGN, body(key_id="zk-1", message=123), "base64"),
    (Operation.SIGN, body(key_id="zk-1", digest=b64(DIGEST[:31])), "32-byte"),
    (Operation.SIGN, body(key_id="zk-1", digest=b64(DIGEST + b"x")), "32-byte"),
    (Operation.SIGN, body(key_id="zk-1", message=b64(b"a"), encoding="pem"), "encoding"),
    (Operation.SIGN, body(key_id="zk-1", message=b64(b"a"), version=0), "version"),
    (Operation.SIGN, body(key_id="zk-1", message=b64(b"a"), version="1"), "version"),
    (Operation.SIGN, body(key_id="zk-1", message=b64(b"a"), version=1.5), "version"),
    (Operation.SIGN, body(key_id="", message=b64(b"a")), "key_id"),
    (Operation.SIGN, body(key_id="../etc", message=b64(b"a")), "key_id"),
    (Operation.SIGN, body(key_id=7, message=b64(b"a")), "key_id"),
    (Operation.SIGN, body(message=b64(b"a")), "key_id"),
    (Operation.SIGN, body(key_id="zk-1", message=b64(b"a"), sneaky=True), "sneaky"),
    (Operation.SIGN_BATCH, body(key_id="zk-1", items=[]), "items"),
    (Operation.SIGN_BATCH, body(key_id="zk-1", items=[{}]), "exactly one of"),
    (Operation.SIGN_BATCH, body(key_id="zk-1", items="x"), "items"),
    (Operation.KEY_PUBLIC, body(key_id="zk-1", message=b64(b"a")), "message"),
    (Operation.KEY_CREATE, body(algorithm="rsa-2048"), "algorithm"),
    (Operation.KEY_CREATE, body(label="x" * 257), "label"),
    (Operation.KEY_CREATE, body(allowed_signers=["bad\nname"]), "allowed_signers"),
    (Operation.KEY_CREATE, body(allowed_signers="*"), "allowed_signers"),
]


@pytest.mark.parametrize(("operation", "raw"), VALID)
def test_valid_requests_parse(operation: Operation, raw: bytes) -> None:
    assert parse_request(operation, raw) is not None


@pytest.mark.parametrize(("operation", "raw", "mentions"), INVALID)
def test_invalid_requests_are_refused_by_field(
    operation: Operation, raw: bytes, mentions: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_request(operation, raw)
    assert mentions in info.value.message
    assert info.value.code == ErrorCode.INVALID_REQUEST
    assert info.value.retryable is False


def test_refusals_never_quote_the_input() -> None:
    secret = "c2VjcmV0LXBheWxvYWQtdGhhdC1tdXN0LW5vdC1sZWFr"
    with pytest.raises(InvalidRequest) as info:
        parse_request(Operation.SIGN, body(key_id="zk-1", message=secret + "!", encoding=secret))
    assert secret not in info.value.message


def test_size_limits_apply_and_are_configurable() -> None:
    big = body(key_id="zk-1", message=b64(b"x" * (1024 * 1024 + 1)))
    with pytest.raises(InvalidRequest, match="larger than the limit"):
        parse_request(Operation.SIGN, big)
    assert parse_request(Operation.SIGN, big, Limits(max_message_bytes=2 * 1024 * 1024))
    small = Limits(max_message_bytes=4, max_batch_items=2, max_body_bytes=2048)
    with pytest.raises(InvalidRequest, match="limit of 4 bytes"):
        parse_request(Operation.SIGN, body(key_id="k", message=b64(b"12345")), small)
    three = body(key_id="k", items=[{"digest": b64(DIGEST)}] * 3)
    with pytest.raises(InvalidRequest, match="limit of 2 entries"):
        parse_request(Operation.SIGN_BATCH, three, small)
    with pytest.raises(InvalidRequest, match="body is larger"):
        parse_request(Operation.SIGN, body(key_id="k", message=b64(b"x" * 2000)), small)


def test_default_batch_limit_is_1000_items() -> None:
    items = [{"digest": b64(DIGEST)}]
    assert parse_request(Operation.SIGN_BATCH, body(key_id="k", items=items * 1000))
    with pytest.raises(InvalidRequest, match="1000"):
        parse_request(Operation.SIGN_BATCH, body(key_id="k", items=items * 1001))


@pytest.mark.parametrize(
    "operation",
    [
        Operation.SIGN,
        Operation.SIGN_BATCH,
        Operation.KEY_PUBLIC,
        Operation.KEY_DISABLE,
        Operation.KEY_ENABLE,
        Operation.KEY_DESTROY,
        Operation.KEY_CANCEL_DESTROY,
    ],
)
def test_versions_are_bounded_so_every_store_can_hold_them(operation: Operation) -> None:
    # 2**63 raised OverflowError in SQLite, past the audit log (issue 12, finding 3).
    fields: dict[str, Any] = {"key_id": "k"}
    if operation is Operation.SIGN:
        fields["digest"] = b64(DIGEST)
    if operation is Operation.SIGN_BATCH:
        fields["items"] = [{"digest": b64(DIGEST)}]
    assert parse_request(operation, body(**fields, version=2**31 - 1))
    for huge in (2**31, 2**63, 2**64 + 1):
        with pytest.raises(InvalidRequest, match="version: Input should be less than"):
            parse_request(operation, body(**fields, version=huge))


def _values(count: int, value: bytes = b"{}") -> bytes:
    return b",".join([value] * count)


PARSE_BOMBS = {
    # Each was validated value by value, and each refusal built, before any limit applied.
    "300,000 empty items": (
        Operation.SIGN_BATCH,
        b'{"key_id":"k","items":[' + _values(300_000) + b"]}",
    ),
    "400,000 allowed signers": (
        Operation.KEY_CREATE,
        b'{"allowed_signers":[' + _values(400_000, b'"a"') + b"]}",
    ),
    "100,000 unknown keys": (
        Operation.SIGN,
        b'{"key_id":"k",' + b",".join(b'"k%d":1' % i for i in range(100_000)) + b"}",
    ),
    "100,000 duplicated keys": (Operation.SIGN, b"{" + _values(100_000, b'"key_id":"k"') + b"}"),
}


@pytest.mark.parametrize("bomb", PARSE_BOMBS)
def test_parse_bombs_are_refused_before_any_value_is_validated(bomb: str) -> None:
    operation, raw = PARSE_BOMBS[bomb]
    assert len(raw) < 2 * 1024 * 1024, "within the body limit: the count is what refuses it"
    with pytest.raises(InvalidRequest, match="holds more than 4024 JSON values"):
        parse_request(operation, raw)


def test_the_largest_valid_batch_fits_the_structure_bound() -> None:
    # Every field set, commas inside nothing: 1,000 items is what the default limits allow.
    items = [{"digest": b64(DIGEST)}] * 1000
    raw = body(key_id="k", version=1, encoding="raw", items=items)
    assert parse_request(Operation.SIGN_BATCH, raw)
    # A verify.batch item carries two fields: three structure bytes per item.
    pairs = [{"digest": b64(DIGEST), "signature": b64(b"s" * 72)}] * 1000
    raw = body(key_id="k", version=1, encoding="der", items=pairs)
    assert parse_request(Operation.VERIFY_BATCH, raw)
    signers = [f"team-{i},{{[" for i in range(256)]
    assert parse_request(Operation.KEY_CREATE, body(label="a,b" * 80, allowed_signers=signers))


def test_error_reports_are_capped_and_say_how_many_more() -> None:
    raw = b'{"key_id":"k","items":[' + _values(1000) + b"]}"
    with pytest.raises(InvalidRequest) as info:
        parse_request(Operation.SIGN_BATCH, raw)
    assert info.value.message.count("exactly one of") == 5
    assert info.value.message.endswith("; and 995 more")


def test_deep_nesting_and_huge_numbers_are_refused_by_the_parser() -> None:
    deep = b'{"key_id":"k","items":[' + b"[" * 1000 + b"]" * 1000 + b"]}"
    with pytest.raises(InvalidRequest, match="recursion limit"):
        parse_request(Operation.SIGN_BATCH, deep)
    with pytest.raises(InvalidRequest, match="number out of range"):
        parse_request(Operation.SIGN, b'{"key_id":"k","version":1' + b"0" * 100_000 + b"}")
    with pytest.raises(InvalidRequest, match="version"):
        parse_request(Operation.SIGN, b'{"key_id":"k","version":1e999999}')


def test_python_callers_pass_bytes_and_serialise_to_base64() -> None:
    request = SignRequest(key_id="zk-1", message=b"\x00\xff")
    assert json.loads(request.model_dump_json(exclude_none=True)) == {
        "key_id": "zk-1",
        "message": "AP8=",
        "encoding": "der",
    }
    assert request.sha256_digest() == hashlib.sha256(b"\x00\xff").digest()
    batch = SignBatchRequest.model_validate({"key_id": "k", "items": [{"digest": DIGEST}]})
    assert batch.items[0].sha256_digest() == DIGEST
    assert KeyCreateRequest().algorithm == "ecdsa-p256-sha256"


def test_schemas_in_the_repo_match_the_models() -> None:
    expected = expected_schemas()
    on_disk = {path.name: path.read_text(encoding="utf-8") for path in SCHEMA_DIR.glob("*.json")}
    assert set(on_disk) == set(expected), "run: python -m contracts.schemas"
    for name, content in expected.items():
        assert on_disk[name] == content, (
            f"{name} drifted from the models: run python -m contracts.schemas"
        )


def test_every_wire_code_has_its_error_class() -> None:
    assert set(ERRORS_BY_CODE) == set(ErrorCode)
    for code, cls in ERRORS_BY_CODE.items():
        error = error_from_code(code.value, "m")
        assert type(error) is cls
        assert error.code == code
    assert isinstance(error_from_code("from_the_future", "m"), InternalError)


@pytest.fixture(scope="module")
def private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_der_and_raw_round_trip(private_key: ec.EllipticCurvePrivateKey) -> None:
    der = private_key.sign(b"m", ec.ECDSA(hashes.SHA256()))
    raw = der_to_raw(der)
    assert len(raw) == 64
    assert raw_to_der(raw) == der
    public_key = private_key.public_key()
    assert verify_signature(public_key, raw, message=b"m", encoding="raw")
    assert verify_signature(public_key, der, digest=hashlib.sha256(b"m").digest())
    assert not verify_signature(public_key, raw, message=b"n", encoding="raw")
    assert not verify_signature(public_key, raw[:63], message=b"m", encoding="raw")
    assert not verify_signature(public_key, b"\x30\x00", message=b"m")


def test_pem_der_and_jwk_describe_one_key(private_key: ec.EllipticCurvePrivateKey) -> None:
    public_key = private_key.public_key()
    pem = public_key_pem(public_key)
    assert pem.startswith("-----BEGIN PUBLIC KEY-----")
    assert load_public_key(pem).public_numbers() == public_key.public_numbers()
    assert (
        load_public_key(public_key_der(public_key)).public_numbers() == public_key.public_numbers()
    )
    jwk = public_key_jwk(public_key, kid="zk-1.v1")
    numbers = public_key.public_numbers()
    assert (jwk.kty, jwk.crv, jwk.alg, jwk.use, jwk.kid) == (
        "EC",
        "P-256",
        "ES256",
        "sig",
        "zk-1.v1",
    )
    assert "=" not in jwk.x + jwk.y
    assert int.from_bytes(base64.urlsafe_b64decode(jwk.x + "="), "big") == numbers.x
    assert int.from_bytes(base64.urlsafe_b64decode(jwk.y + "="), "big") == numbers.y


def test_only_p256_public_keys_load() -> None:
    other = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(InvalidRequest, match="P-256"):
        load_public_key(public_key_pem(other))
