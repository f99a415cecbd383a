"""``zandd verify`` tells raw r||s from DER by the signature's form, for every algorithm of the
contract, offline against a pinned key (no broker, no vault)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from contracts.algorithms import ALGORITHMS, AlgorithmSpec, PrivateKey, encoding_of
from tests.support.cli import environment, run_zandd

MESSAGE = b"raw or DER, told by length\n"


def generate_private_key_for(spec: AlgorithmSpec) -> PrivateKey:
    if spec.family == "ecdsa":
        return ec.generate_private_key(spec.curve())
    return rsa.generate_private_key(65537, spec.rsa_bits)


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_verify_needs_no_encoding_flag(algorithm: str, tmp_path: Path) -> None:
    spec = ALGORITHMS[algorithm]
    private = generate_private_key_for(spec)
    der = spec.sign_digest(private, spec.digest(MESSAGE))
    raw = spec.to_raw(der)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "public.pem").write_bytes(pem)
    (tmp_path / "message").write_bytes(MESSAGE)
    if spec.family == "ecdsa":
        assert len(raw) == 2 * spec.coordinate_bytes  # 64 for P-256, 96 for P-384
    for signature in (der, raw):
        result = run_zandd(
            "verify",
            "--public-key",
            str(tmp_path / "public.pem"),
            "--algorithm",
            algorithm,
            str(tmp_path / "message"),
            base64.b64encode(signature).decode(),
            env=environment(),
        )
        assert (result.returncode, result.stdout) == (0, "signature OK\n"), result.stderr
    tampered = bytearray(raw)
    tampered[-1] ^= 1
    result = run_zandd(
        "verify",
        "--public-key",
        str(tmp_path / "public.pem"),
        "--algorithm",
        algorithm,
        str(tmp_path / "message"),
        base64.b64encode(bytes(tampered)).decode(),
        env=environment(),
    )
    assert (result.returncode, result.stdout) == (1, "signature INVALID\n")


def test_encoding_is_told_by_form() -> None:
    p256, p384 = ALGORITHMS["ecdsa-p256-sha256"], ALGORITHMS["ecdsa-p384-sha384"]
    for spec in (p256, p384):
        der = spec.sign_digest(generate_private_key_for(spec), spec.digest(MESSAGE))
        assert encoding_of(der) == "der"
        assert encoding_of(spec.to_raw(der)) == "raw"
    assert encoding_of(b"\x01" * 63) == "der"  # neither: verifies as nothing either way
