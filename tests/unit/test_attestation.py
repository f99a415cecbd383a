"""The attestation verifier on hand-built TPM structures (no TPM): it accepts a well-formed
certification and answers anything malformed with IntegrityError, never another exception."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from contracts.attestation import (
    FIXED_PARENT,
    FIXED_TPM,
    SENSITIVE_DATA_ORIGIN,
    SIGN_ENCRYPT,
    USER_WITH_AUTH,
    AttestationParts,
    qualifying_data,
    tpm_name,
    verify_attestation,
)
from contracts.errors import IntegrityError

KEY_ID = "zk-0123456789abcdef0123"


def sized(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def public_area(key: ec.EllipticCurvePublicKey, attributes: int, policy: bytes = b"") -> bytes:
    numbers = key.public_numbers()
    return (
        struct.pack(">HHI", 0x0023, 0x000B, attributes)
        + sized(policy)
        + struct.pack(">HHHHH", 0x0010, 0x0018, 0x000B, 0x0003, 0x0010)  # NULL sym, ECDSA-SHA256
        + sized(numbers.x.to_bytes(32, "big"))
        + sized(numbers.y.to_bytes(32, "big"))
    )


def certify_info(area: bytes, extra: bytes) -> bytes:
    return (
        struct.pack(">IH", 0xFF544347, 0x8017)
        + sized(b"\x00\x0b" + bytes(32))
        + sized(extra)
        + struct.pack(">QIIB", 1234, 1, 0, 1)
        + struct.pack(">Q", 0x2019102300163636)
        + sized(tpm_name(area))
        + sized(b"\x00\x0b" + bytes(32))
    )


def attested(
    attributes: int = SENSITIVE_DATA_ORIGIN | USER_WITH_AUTH | SIGN_ENCRYPT,
) -> tuple[AttestationParts, ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    attestation_key = ec.generate_private_key(ec.SECP256R1())
    area = public_area(key, attributes)
    info = certify_info(area, qualifying_data(KEY_ID, 1))
    signature = attestation_key.sign(info, ec.ECDSA(hashes.SHA256()))
    return AttestationParts(area, info, signature), key, attestation_key


def test_a_well_formed_certification_verifies_and_reports_its_attributes() -> None:
    parts, key, attestation_key = attested(
        FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | USER_WITH_AUTH | SIGN_ENCRYPT
    )
    report = verify_attestation(parts, key, attestation_key.public_key(), key_id=KEY_ID, version=1)
    assert report.tpm_bound
    assert report.attributes == (
        "fixedTPM",
        "fixedParent",
        "sensitiveDataOrigin",
        "userWithAuth",
        "sign",
    )
    assert report.clock == 1234
    assert AttestationParts.decode(parts.encode()) == parts


def test_a_key_made_outside_the_tpm_is_refused() -> None:
    parts, key, attestation_key = attested(USER_WITH_AUTH | SIGN_ENCRYPT)
    with pytest.raises(IntegrityError, match="sensitiveDataOrigin"):
        verify_attestation(parts, key, attestation_key.public_key(), key_id=KEY_ID, version=1)


def test_another_version_is_refused() -> None:
    parts, key, attestation_key = attested()
    with pytest.raises(IntegrityError, match="another key"):
        verify_attestation(parts, key, attestation_key.public_key(), key_id=KEY_ID, version=2)


@pytest.mark.parametrize("field", ["public_area", "certify_info"])
def test_every_truncation_or_extension_is_an_integrity_error(field: str) -> None:
    parts, key, attestation_key = attested()
    whole: bytes = getattr(parts, field)
    for cut in [*range(len(whole)), len(whole) + 1]:
        changed = whole[:cut] if cut < len(whole) else whole + b"\x00"
        candidate = dataclasses.replace(parts, **{field: changed})
        if field == "certify_info":
            # Signed again, so the parser, not the signature check, meets the bad structure.
            signature = attestation_key.sign(changed, ec.ECDSA(hashes.SHA256()))
            candidate = dataclasses.replace(candidate, signature=signature)
        with pytest.raises(IntegrityError):
            verify_attestation(
                candidate, key, attestation_key.public_key(), key_id=KEY_ID, version=1
            )


def test_a_malformed_stored_blob_is_an_integrity_error() -> None:
    parts, _, _ = attested()
    blob = parts.encode()
    for cut in range(len(blob)):
        with pytest.raises(IntegrityError):
            AttestationParts.decode(blob[:cut])
