"""The algorithms of the contract, in software: signing, both encodings, JWKs, pinning,
digest sizes, and the RSA key rebuilt from one prime."""

from __future__ import annotations

import base64
import hashlib
from functools import cache
from typing import get_args

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from contracts.algorithms import (
    ALGORITHMS,
    AlgorithmName,
    AlgorithmSpec,
    PrivateKey,
    UnsupportedAlgorithm,
    algorithm_of_key,
    algorithm_spec,
)
from contracts.crypto import (
    load_algorithm_public_key,
    public_key_der,
    public_key_jwk,
    public_key_pem,
    verify_signature,
)
from contracts.errors import InvalidRequest
from contracts.models import (
    Encoding,
    KeyCreateRequest,
    KeyPublicReply,
    RsaPublicJwk,
    SignRequest,
    parse_request,
)
from contracts.operations import Operation
from contracts.pinning import PinnedKey
from vault.opening import rsa_private_key, sealed_size

MESSAGE = b"one message, six algorithms"


@cache
def private_key(algorithm: str) -> PrivateKey:
    spec = algorithm_spec(algorithm)
    if spec.family == "rsa":
        return rsa.generate_private_key(65537, spec.rsa_bits)
    return ec.generate_private_key(spec.curve())


def specs() -> list[AlgorithmSpec]:
    return list(ALGORITHMS.values())


def test_the_wire_literal_lists_every_algorithm() -> None:
    assert set(get_args(AlgorithmName)) == set(ALGORITHMS)


def test_the_names_follow_the_first_one() -> None:
    assert set(ALGORITHMS) == {
        "ecdsa-p256-sha256",
        "ecdsa-p384-sha384",
        "rsa-pkcs1-2048-sha256",
        "rsa-pkcs1-3072-sha256",
        "rsa-pss-2048-sha256",
        "rsa-pss-3072-sha256",
    }


@pytest.mark.parametrize("spec", specs(), ids=lambda spec: spec.name)
def test_sign_and_verify_in_both_encodings(spec: AlgorithmSpec) -> None:
    key = private_key(spec.name)
    public = key.public_key()
    digest = spec.digest(MESSAGE)
    assert len(digest) == spec.digest_bytes
    der = spec.sign_digest(key, digest)
    raw = spec.to_raw(der)
    if spec.family == "rsa":
        assert raw == der
        assert len(raw) == spec.rsa_bits // 8
    else:
        assert len(raw) == 2 * spec.coordinate_bytes
        assert spec.from_raw(raw) == der
    both: list[tuple[bytes, Encoding]] = [(der, "der"), (raw, "raw")]
    for signature, encoding in both:
        assert verify_signature(
            public, signature, message=MESSAGE, encoding=encoding, algorithm=spec.name
        )
        assert verify_signature(
            public, signature, digest=digest, encoding=encoding, algorithm=spec.name
        )
        assert not verify_signature(
            public, signature, message=MESSAGE + b".", encoding=encoding, algorithm=spec.name
        )


def test_pkcs1_and_pss_signatures_are_not_interchangeable() -> None:
    key = private_key("rsa-pss-2048-sha256")
    assert isinstance(key, rsa.RSAPrivateKey)
    pss = algorithm_spec("rsa-pss-2048-sha256")
    pkcs1 = algorithm_spec("rsa-pkcs1-2048-sha256")
    digest = pss.digest(MESSAGE)
    signature = pss.sign_digest(key, digest)
    assert pss.verify_digest(key.public_key(), signature, digest)
    assert not pkcs1.verify_digest(key.public_key(), signature, digest)


def test_an_ec_key_names_its_algorithm_an_rsa_key_does_not() -> None:
    p384 = private_key("ecdsa-p384-sha384").public_key()
    assert isinstance(p384, ec.EllipticCurvePublicKey)
    assert algorithm_of_key(p384).name == "ecdsa-p384-sha384"
    assert verify_signature(
        p384,
        algorithm_spec("ecdsa-p384-sha384").sign_digest(
            private_key("ecdsa-p384-sha384"), hashlib.sha384(MESSAGE).digest()
        ),
        message=MESSAGE,
    )
    rsa_public = private_key("rsa-pkcs1-2048-sha256").public_key()
    assert isinstance(rsa_public, rsa.RSAPublicKey)
    with pytest.raises(UnsupportedAlgorithm, match="padding"):
        algorithm_of_key(rsa_public)
    with pytest.raises(ValueError, match="padding"):
        verify_signature(rsa_public, b"x" * 256, message=MESSAGE)


def test_a_key_of_another_algorithm_is_refused() -> None:
    pem = public_key_pem(private_key("rsa-pkcs1-3072-sha256").public_key())
    assert load_algorithm_public_key(pem, "rsa-pss-3072-sha256")
    for other in ("rsa-pkcs1-2048-sha256", "ecdsa-p256-sha256", "ecdsa-p384-sha384"):
        with pytest.raises(InvalidRequest, match="not a public key of"):
            load_algorithm_public_key(pem, other)
    with pytest.raises(InvalidRequest, match="unknown algorithm"):
        load_algorithm_public_key(pem, "rsa-pkcs1-4096-sha512")


@pytest.mark.parametrize("spec", specs(), ids=lambda spec: spec.name)
def test_jwk_per_algorithm_and_pinning_from_it(spec: AlgorithmSpec) -> None:
    key = private_key(spec.name)
    public = key.public_key()
    jwk = public_key_jwk(public, kid="zk-1.v1", algorithm=spec.name)
    assert jwk.alg == spec.jwk_alg
    if isinstance(jwk, RsaPublicJwk):
        assert jwk.kty == "RSA"
        assert base64.urlsafe_b64decode(jwk.e + "==") == b"\x01\x00\x01"
        assert len(base64.urlsafe_b64decode(jwk.n + "=" * (-len(jwk.n) % 4))) == spec.rsa_bits // 8
    else:
        assert (jwk.kty, jwk.crv) == ("EC", spec.jwk_crv)
    # A JWK round trip through JSON pins the same key, with its algorithm and kid.
    pinned = PinnedKey.of(jwk.model_dump_json())
    assert pinned.algorithm in (None, spec.name)
    assert public_key_der(pinned.public_key) == public_key_der(public)
    assert (pinned.key_id, pinned.version) == ("zk-1", 1)
    signature = spec.sign_digest(key, spec.digest(MESSAGE))
    assert pinned.verify(signature, message=MESSAGE)


def test_key_public_reply_parses_each_jwk() -> None:
    for spec in specs():
        public = private_key(spec.name).public_key()
        reply = KeyPublicReply(
            key_id="zk-1",
            version=1,
            algorithm=spec.name,
            public_key_pem=public_key_pem(public),
            public_key_jwk=public_key_jwk(public, kid="zk-1.v1", algorithm=spec.name),
        )
        again = KeyPublicReply.model_validate_json(reply.model_dump_json())
        assert again.public_key_jwk == reply.public_key_jwk
        pinned = PinnedKey.of(again)
        assert pinned.algorithm == spec.name


def test_an_rsa_pem_pin_needs_its_algorithm() -> None:
    key = private_key("rsa-pss-2048-sha256")
    pem = public_key_pem(key.public_key())
    signature = algorithm_spec("rsa-pss-2048-sha256").sign_digest(
        key, hashlib.sha256(MESSAGE).digest()
    )
    with pytest.raises(InvalidRequest, match="needs its algorithm"):
        PinnedKey.of(pem).verify(signature, message=MESSAGE)
    assert PinnedKey.of(pem, algorithm="rsa-pss-2048-sha256").verify(signature, message=MESSAGE)
    assert not PinnedKey.of(pem, algorithm="rsa-pkcs1-2048-sha256").verify(
        signature, message=MESSAGE
    )


def test_key_create_takes_every_algorithm_and_no_other() -> None:
    for name in ALGORITHMS:
        request = parse_request(Operation.KEY_CREATE, f'{{"algorithm": "{name}"}}'.encode())
        assert isinstance(request, KeyCreateRequest)
        assert request.algorithm == name
    assert parse_request(Operation.KEY_CREATE, b"{}").algorithm == "ecdsa-p256-sha256"  # type: ignore[attr-defined]
    with pytest.raises(InvalidRequest, match="algorithm"):
        parse_request(Operation.KEY_CREATE, b'{"algorithm": "rsa-pkcs1-4096-sha256"}')


def test_digests_of_either_size_travel_and_the_key_decides() -> None:
    sha384 = hashlib.sha384(MESSAGE).digest()
    body = b'{"key_id": "zk-1", "digest": "' + base64.b64encode(sha384) + b'"}'
    request = parse_request(Operation.SIGN, body)
    assert isinstance(request, SignRequest)
    assert request.digest_for("ecdsa-p384-sha384") == sha384
    with pytest.raises(InvalidRequest, match="32 bytes for a key of ecdsa-p256-sha256"):
        request.digest_for("ecdsa-p256-sha256")
    odd = b'{"key_id": "zk-1", "digest": "' + base64.b64encode(bytes(40)) + b'"}'
    with pytest.raises(InvalidRequest, match="digest"):
        parse_request(Operation.SIGN, odd)
    by_message = SignRequest(key_id="zk-1", message=MESSAGE)
    assert by_message.digest_for("ecdsa-p384-sha384") == sha384
    assert by_message.digest_for("rsa-pss-3072-sha256") == hashlib.sha256(MESSAGE).digest()


@pytest.mark.parametrize("bits", [2048, 3072])
def test_an_rsa_key_is_rebuilt_from_one_prime(bits: int) -> None:
    key = private_key(f"rsa-pkcs1-{bits}-sha256")
    assert isinstance(key, rsa.RSAPrivateKey)
    numbers = key.private_numbers()
    prime = numbers.p.to_bytes(bits // 16, "big")
    assert len(prime) == sealed_size(f"rsa-pkcs1-{bits}-sha256")
    rebuilt = rsa_private_key(prime, key.public_key(), validate=True)
    spec = algorithm_spec(f"rsa-pkcs1-{bits}-sha256")
    digest = spec.digest(MESSAGE)
    assert spec.verify_digest(key.public_key(), spec.sign_digest(rebuilt, digest), digest)
    with pytest.raises(ValueError, match="does not divide"):
        rsa_private_key((numbers.p + 2).to_bytes(bits // 16, "big"), key.public_key())
