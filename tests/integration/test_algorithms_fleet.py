"""Every algorithm over the wire: keys created by the real fleet (keygen on swtpm, signers,
RabbitMQ, SQLite), signed with through ``sign`` and ``sign.batch``, served by ``key.public``
as PEM and JWK, and verified by OpenSSL, by the client and from the shell."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import get_args

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from contracts.algorithms import AlgorithmName, algorithm_spec
from contracts.attestation import parts_of, verify_attestation
from contracts.crypto import load_algorithm_public_key
from contracts.errors import InvalidRequest
from contracts.pinning import PinnedKey
from tests.support.cli import environment, zandd
from tests.support.fleet import RunningFleet
from tests.support.openssl import openssl_verify_algorithm
from tests.support.tpm import fleet_attestation_key

pytestmark = [pytest.mark.rabbitmq, pytest.mark.tpm]

MESSAGE = b"signed by every algorithm of the fleet"


async def test_every_algorithm_end_to_end_over_the_wire(
    fleet: RunningFleet, tmp_path: Path, swtpm_tcti: str
) -> None:
    attestation_key = fleet_attestation_key(swtpm_tcti)
    async with await fleet.client() as client:
        # An old producer's key.create (no algorithm) still makes a P-256 key.
        default = await client.create_key(label="default")
        assert default.algorithm == "ecdsa-p256-sha256"
        for algorithm in get_args(AlgorithmName):
            spec = algorithm_spec(algorithm)
            created = await client.create_key(label=algorithm, algorithm=algorithm)
            assert created.algorithm == algorithm
            public_key = load_algorithm_public_key(created.public_key_pem, algorithm)
            stored = await fleet.store.get_key(created.key_id)
            assert stored.algorithm == algorithm

            signed = await client.sign(created.key_id, MESSAGE)
            assert (signed.algorithm, signed.encoding) == (algorithm, "der")
            out = await asyncio.to_thread(
                openssl_verify_algorithm,
                tmp_path,
                algorithm,
                created.public_key_pem,
                MESSAGE,
                signed.signature,
            )
            assert out == "Verified OK", f"{algorithm}: {out}"
            assert await client.verify(created, signed.signature, message=MESSAGE)
            assert not await client.verify(created, signed.signature, message=MESSAGE + b"!")

            raw = await client.sign(created.key_id, MESSAGE, encoding="raw")
            expected_raw = spec.rsa_bits // 8 if spec.family == "rsa" else 2 * spec.coordinate_bytes
            assert len(raw.signature) == expected_raw
            assert await client.verify_trusting_fleet(
                created.key_id, raw.signature, message=MESSAGE, encoding="raw"
            )

            # The batch path: messages and digests of the algorithm's hash, in item order.
            digest = spec.digest(MESSAGE + b" by digest")
            batch = await client.sign_batch(
                created.key_id, [MESSAGE, MESSAGE + b" 2"], digests=[digest]
            )
            assert batch.algorithm == algorithm
            pinned = PinnedKey.of(created)
            assert pinned.verify(batch.signatures[0], message=MESSAGE)
            assert pinned.verify(batch.signatures[1], message=MESSAGE + b" 2")
            assert pinned.verify(batch.signatures[2], digest=digest)

            # A digest of the wrong hash is refused, not signed.
            wrong = hashlib.sha256(MESSAGE).digest() if spec.digest_bytes == 48 else bytes(48)
            with pytest.raises(InvalidRequest, match="'digest' must have"):
                await client.sign(created.key_id, digest=wrong)

            served = await client.public_key(created.key_id)
            assert served.algorithm == algorithm
            assert served.public_key_jwk.alg == spec.jwk_alg
            assert served.public_key_jwk.kid == f"{created.key_id}.v1"
            from_jwk = PinnedKey.of(json.loads(served.public_key_jwk.model_dump_json()))
            assert from_jwk.verify(signed.signature, message=MESSAGE)
            assert isinstance(from_jwk.public_key, rsa.RSAPublicKey) == (spec.family == "rsa")

            # The TPM certified the key it made: the attestation names this public key.
            assert served.attestation is not None
            report = verify_attestation(
                parts_of(served.attestation),
                public_key,
                attestation_key,
                key_id=created.key_id,
                version=1,
            )
            assert report.sensitive_data_origin
            assert not report.tpm_bound

        # Keys that live in the TPM stay P-256: anything else is refused, clearly.
        with pytest.raises(InvalidRequest, match='protection "tpm" supports ecdsa-p256-sha256'):
            await client.create_key(algorithm="rsa-pss-2048-sha256", protection="tpm")


async def test_keys_of_other_algorithms_from_the_shell(fleet: RunningFleet, tmp_path: Path) -> None:
    env = environment(ZANDD_AMQP_URL=fleet.amqp_url, ZANDD_DATA_DIR=str(tmp_path / "cli"))
    document = tmp_path / "document.txt"
    document.write_bytes(b"signed from a shell, RSA and P-384\n")

    code, out, err = await zandd(
        "keys", "create", "--algorithm", "rsa-pkcs1-3072-sha256", "--label", "rsa", env=env
    )
    assert code == 0, err
    key_id, pem = out.split("\n", 1)
    (tmp_path / "rsa.pem").write_text(pem)
    code, out, err = await zandd(
        "sign", "--key", key_id, str(document), "--out", str(tmp_path / "rsa.sig"), env=env
    )
    assert code == 0, err
    signature = (tmp_path / "rsa.sig").read_bytes()
    assert len(signature) == 384
    out = await asyncio.to_thread(
        openssl_verify_algorithm,
        tmp_path,
        "rsa-pkcs1-3072-sha256",
        pem,
        document.read_bytes(),
        signature,
    )
    assert out == "Verified OK"
    # A pinned RSA PEM needs its algorithm (the padding is not in the key); the JWK names it.
    code, out, err = await zandd(
        "verify",
        "--public-key",
        str(tmp_path / "rsa.pem"),
        str(document),
        str(tmp_path / "rsa.sig"),
        env=env,
    )
    assert code == 1
    assert "needs its algorithm" in err
    code, out, err = await zandd(
        "verify",
        "--public-key",
        str(tmp_path / "rsa.pem"),
        "--algorithm",
        "rsa-pkcs1-3072-sha256",
        str(document),
        str(tmp_path / "rsa.sig"),
        env=env,
    )
    assert (code, out.strip()) == (0, "signature OK"), err

    code, out, err = await zandd("keys", "create", "--algorithm", "ecdsa-p384-sha384", env=env)
    assert code == 0, err
    p384 = out.split("\n", 1)[0]
    code, jwk, err = await zandd("keys", "public", p384, "--jwk", env=env)
    assert code == 0, err
    assert json.loads(jwk)["crv"] == "P-384"
    (tmp_path / "p384.jwk").write_text(jwk)
    code, signature_b64, err = await zandd(
        "sign",
        "--key",
        p384,
        str(document),
        "--digest",
        "--digest-hash",
        "sha384",
        "--encoding",
        "raw",
        env=env,
    )
    assert code == 0, err
    code, out, err = await zandd(
        "verify",
        "--public-key",
        str(tmp_path / "p384.jwk"),
        str(document),
        signature_b64.strip(),
        "--encoding",
        "raw",
        env=env,
    )
    assert (code, out.strip()) == (0, "signature OK"), err
    # A SHA-256 digest for a SHA-384 key is refused by the signer, in one sentence.
    code, _, err = await zandd("sign", "--key", p384, str(document), "--digest", env=env)
    assert code == 1
    assert "'digest' must have 48 bytes" in err


async def test_tpm_check_says_which_algorithms_the_tpm_supports(
    swtpm_tcti: str, tmp_path: Path
) -> None:
    env = environment(ZANDD_TPM_TCTI=swtpm_tcti, ZANDD_DATA_DIR=str(tmp_path / "data"))
    code, out, err = await zandd("tpm", "check", env=env)
    assert code == 0, err
    for algorithm in get_args(AlgorithmName):
        assert f"  {algorithm}: supported\n" in out


@pytest.mark.parametrize("algorithm", ["ecdsa-p384-sha384", "rsa-pss-2048-sha256"])
async def test_a_key_of_another_algorithm_rotates_and_the_fleet_verifies_each_version(
    fleet: RunningFleet, tmp_path: Path, algorithm: AlgorithmName
) -> None:
    """The parts of the KMS work together: a rotated P-384 or RSA key keeps its algorithm,
    every version's JWK says it, and ``verify`` on the fleet checks with the key's own hash."""
    spec = algorithm_spec(algorithm)
    async with await fleet.client() as client:
        created = await client.create_key(algorithm=algorithm)
        first = await client.sign(created.key_id, MESSAGE)
        rotated = await client.rotate_key(created.key_id)
        assert (rotated.version, rotated.algorithm) == (2, algorithm)
        assert rotated.public_key_jwk.kid == f"{created.key_id}.v2"
        second = await client.sign(created.key_id, MESSAGE)
        assert (second.version, second.algorithm) == (2, algorithm)
        out = await asyncio.to_thread(
            openssl_verify_algorithm,
            tmp_path,
            algorithm,
            rotated.public_key_pem,
            MESSAGE,
            second.signature,
        )
        assert out == "Verified OK", out
        for version, signed in ((1, first), (2, second)):
            verdict = await client.verify_on_fleet(
                created.key_id, signed.signature, message=MESSAGE, version=version
            )
            assert (verdict.version, verdict.algorithm, verdict.valid) == (
                version,
                algorithm,
                True,
            )
            digest = spec.digest(MESSAGE)
            by_digest = await client.verify_on_fleet(
                created.key_id, signed.signature, digest=digest, version=version
            )
            assert by_digest.valid
        # Each version's signature holds under its own version only.
        crossed = await client.verify_on_fleet(
            created.key_id, first.signature, message=MESSAGE, version=2
        )
        assert not crossed.valid
        public = await client.public_key(created.key_id, all_versions=True)
        assert public.versions is not None
        assert [(v.version, v.public_key_jwk.alg) for v in public.versions] == [
            (1, created_jwk_alg(algorithm)),
            (2, created_jwk_alg(algorithm)),
        ]
        described = await client.describe_key(created.key_id)
        assert {v.algorithm for v in described.versions} == {algorithm}


def created_jwk_alg(algorithm: str) -> str:
    """The JWK ``alg`` a key of ``algorithm`` is served with."""
    return {"ecdsa-p384-sha384": "ES384", "rsa-pss-2048-sha256": "PS256"}[algorithm]
