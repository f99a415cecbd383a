"""Every algorithm's path on a real swtpm: TPM-born key → inner-wrapped export → seal → open →
sign → verify (by ``cryptography`` and by OpenSSL), and the algorithm bound into the seal."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

pytest.importorskip("tpm2_pytss", reason="tpm2-pytss is not installed", exc_type=ImportError)

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from contracts.algorithms import ALGORITHMS, algorithm_spec
from contracts.attestation import AttestationParts, qualifying_data, verify_attestation
from contracts.crypto import public_key_der, public_key_pem, verify_signature
from contracts.errors import IntegrityError, InvalidRequest
from contracts.models import Encoding
from tests.support.openssl import openssl_verify_algorithm
from vault.kek import Kek, KekRing
from vault.opening import private_key_of, sealed_size
from vault.record_mac import authenticated, verify_record
from vault.records import KeyRecord, KeyState
from vault.sealing import RecordBinding, seal
from workers.keygen.attest import attestation_public_key, certify
from workers.keygen.tpm import Tpm
from workers.signer.signing import sign_digests

pytestmark = pytest.mark.tpm

MESSAGE = b"zandd: one message for every algorithm"
RING = KekRing(Kek.generate())


@pytest.fixture(scope="module")
def tpm(swtpm_tcti: str) -> Iterator[Tpm]:
    with Tpm(swtpm_tcti) as opened:
        yield opened


def record_of(tpm: Tpm, algorithm: str, key_id: str) -> tuple[KeyRecord, AttestationParts]:
    """What the keygen worker stores: the TPM's key exported, sealed, MACed, attested."""
    attested: list[AttestationParts] = []

    def certify_it(ectx: object, key: object, public: object) -> None:
        attested.append(certify(ectx, key, public, qualifying_data(key_id, 1)))

    with tpm.create_exportable(algorithm, certify_it) as exported:
        assert len(exported.private_scalar) == sealed_size(algorithm)
        binding = RecordBinding(key_id=key_id, version=1, algorithm=algorithm)
        sealed = seal(exported.private_scalar, binding, RING.active)
        public_der = public_key_der(exported.public_key())
    record = KeyRecord(
        key_id=key_id,
        version=1,
        algorithm=algorithm,
        public_key_der=public_der,
        sealed=sealed,
        state=KeyState.ENABLED,
        label=None,
        allowed_signers=("svc",),
        created_at=datetime.now(UTC),
        created_by="svc",
        request_id=None,
    )
    return authenticated(record, RING, generation=1), attested[0]


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_the_tpm_supports_it(tpm: Tpm, algorithm: str) -> None:
    assert tpm.supported_algorithms()[algorithm] is True


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_export_seal_open_sign_verify(tpm: Tpm, algorithm: str, tmp_path: Path) -> None:
    spec = algorithm_spec(algorithm)
    record, attested = record_of(tpm, algorithm, f"zk-{algorithm}")
    verify_record(record, RING)
    public_key = spec.check_public_key(load_der_public_key(record.public_key_der))
    if spec.family == "rsa":
        assert isinstance(public_key, rsa.RSAPublicKey)
        assert public_key.key_size == spec.rsa_bits
    else:
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        assert public_key.curve.name == spec.curve().name

    # The sealed private value opens back into the key whose public half the TPM reported.
    with private_key_of(record, RING) as private_key:
        assert public_key_der(private_key.public_key()) == record.public_key_der

    digest = spec.digest(MESSAGE)
    der = sign_digests(record, RING, [digest], "der")
    raw = sign_digests(record, RING, [digest], "raw")
    both: list[tuple[bytes, Encoding]] = [(der[0], "der"), (raw[0], "raw")]
    for signature, encoding in both:
        assert verify_signature(
            public_key, signature, message=MESSAGE, encoding=encoding, algorithm=algorithm
        )
        assert not verify_signature(
            public_key, signature, message=MESSAGE + b"!", encoding=encoding, algorithm=algorithm
        )
    if spec.family == "rsa":
        assert len(raw[0]) == spec.rsa_bits // 8  # one encoding: the RSASSA octet string
    else:
        assert len(raw[0]) == 2 * spec.coordinate_bytes  # r‖s
    out = openssl_verify_algorithm(tmp_path, algorithm, public_key_pem(public_key), MESSAGE, der[0])
    assert out == "Verified OK", out

    # The TPM certified the key it made, and the attestation names this very public key.
    attestation_key = tpm.with_context("attestation key", attestation_public_key)
    report = verify_attestation(
        attested, public_key, attestation_key, key_id=record.key_id, version=1
    )
    assert report.sensitive_data_origin
    assert not report.tpm_bound


@pytest.mark.parametrize("algorithm", ["ecdsa-p384-sha384", "rsa-pss-2048-sha256"])
def test_the_algorithm_is_bound_into_the_seal_and_the_mac(tpm: Tpm, algorithm: str) -> None:
    record, _ = record_of(tpm, algorithm, f"zk-bound-{algorithm}")
    other = "rsa-pkcs1-2048-sha256" if algorithm.startswith("rsa-pss") else "ecdsa-p256-sha256"
    relabelled = dataclasses.replace(record, algorithm=other)
    with pytest.raises(IntegrityError):
        verify_record(relabelled, RING)  # the record MAC covers the algorithm
    # Even past the MAC (a vault without one), the seal's AAD names the algorithm.
    with pytest.raises(IntegrityError), private_key_of(relabelled, RING):
        pass


def test_a_digest_of_the_wrong_hash_is_refused(tpm: Tpm) -> None:
    record, _ = record_of(tpm, "ecdsa-p384-sha384", "zk-digest-size")
    with pytest.raises(InvalidRequest, match="48-byte SHA384"):
        sign_digests(record, RING, [hashlib.sha256(MESSAGE).digest()], "der")
