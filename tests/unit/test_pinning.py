"""``PinnedKey``: every way a caller can hand over a public key, and the ways that are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from contracts.crypto import public_key_der, public_key_jwk, public_key_pem
from contracts.errors import InvalidRequest
from contracts.pinning import MAX_PUBLIC_KEY_FILE_BYTES, PinnedKey

PRIVATE = ec.generate_private_key(ec.SECP256R1())
PUBLIC = PRIVATE.public_key()
SIGNATURE = PRIVATE.sign(b"pinned", ec.ECDSA(hashes.SHA256()))


def _same_key(pinned: PinnedKey) -> bool:
    return public_key_der(pinned.public_key) == public_key_der(PUBLIC)


@pytest.mark.parametrize(
    "source",
    [
        PUBLIC,
        public_key_pem(PUBLIC),
        public_key_pem(PUBLIC).encode(),
        public_key_der(PUBLIC),
        public_key_jwk(PUBLIC, kid="zk-1.v3"),
        public_key_jwk(PUBLIC, kid="zk-1.v3").model_dump(),
        public_key_jwk(PUBLIC, kid="zk-1.v3").model_dump_json(),
    ],
    ids=["object", "pem-str", "pem-bytes", "der", "jwk-model", "jwk-dict", "jwk-json"],
)
def test_every_form_pins_the_same_key(source: object) -> None:
    pinned = PinnedKey.of(source)  # type: ignore[arg-type]
    assert _same_key(pinned)
    assert pinned.verify(SIGNATURE, message=b"pinned")
    assert not pinned.verify(SIGNATURE, message=b"not pinned")


def test_a_jwk_kid_names_key_and_version_and_a_foreign_jwk_needs_none() -> None:
    jwk = public_key_jwk(PUBLIC, kid="zk-abc.v3").model_dump()
    assert (PinnedKey.of(jwk).key_id, PinnedKey.of(jwk).version) == ("zk-abc", 3)
    minimal = {k: jwk[k] for k in ("kty", "crv", "x", "y")}
    assert _same_key(PinnedKey.of(minimal))
    assert PinnedKey.of(minimal).key_id is None


@pytest.mark.parametrize(
    ("source", "says"),
    [
        ("zk-0123456789abcdef0123", "a key id is not one"),
        ({"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"}, "not an EC P-256/P-384 or RSA JWK"),
        ({"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}, "coordinate has 32 bytes"),
        ({"kty": "EC", "crv": "P-384", "x": "A" * 43, "y": "A" * 43}, "coordinate has 48 bytes"),
        ({"kty": "RSA", "n": "AQAB", "e": "AQAB"}, "needs alg RS256 or PS256"),
        ({"kty": "RSA", "alg": "RS256", "n": "AQAB", "e": "AQAB"}, "2048- or 3072-bit"),
        ({"kty": "EC", "crv": "P-256", "x": "A" * 43, "y": "A" * 43}, "not a point on P-256"),
        ("[1, 2]", "a JWK is a JSON object"),
        ("{not json", "neither PEM nor a JWK"),
        ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "neither PEM nor a JWK"),
    ],
)
def test_what_is_not_a_public_key_is_refused(source: object, says: str) -> None:
    with pytest.raises(InvalidRequest, match=says):
        PinnedKey.of(source)  # type: ignore[arg-type]


def test_a_private_jwk_is_refused_without_quoting_it() -> None:
    jwk = public_key_jwk(PUBLIC, kid="k.v1").model_dump()
    secret = "c2VjcmV0LXNjYWxhci1ub3QtdG8tYmUtcXVvdGVkLWFueXdoZXJl"
    with pytest.raises(InvalidRequest) as caught:
        PinnedKey.of({**jwk, "d": secret})
    assert secret not in str(caught.value)


def test_a_key_on_another_curve_is_refused() -> None:
    other = ec.generate_private_key(ec.SECP521R1()).public_key()
    with pytest.raises(InvalidRequest, match="secp521r1"):
        PinnedKey.of(other)
    pem = other.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(InvalidRequest, match="not a public key of any algorithm"):
        PinnedKey.of(pem)


def test_files_hold_pem_or_jwk_and_nothing_huge(tmp_path: Path) -> None:
    (tmp_path / "k.pem").write_text(public_key_pem(PUBLIC))
    (tmp_path / "k.jwk").write_text(json.dumps(public_key_jwk(PUBLIC, kid="k.v1").model_dump()))
    assert _same_key(PinnedKey.from_file(tmp_path / "k.pem"))
    assert _same_key(PinnedKey.from_file(str(tmp_path / "k.jwk")))
    assert PinnedKey.of(PinnedKey.from_file(tmp_path / "k.pem").pem).pem == public_key_pem(PUBLIC)
    (tmp_path / "huge").write_bytes(b" " * (MAX_PUBLIC_KEY_FILE_BYTES + 1))
    with pytest.raises(InvalidRequest, match="larger than any public key file"):
        PinnedKey.from_file(tmp_path / "huge")
    with pytest.raises(InvalidRequest, match="cannot read the public key file"):
        PinnedKey.from_file(tmp_path / "missing.pem")
