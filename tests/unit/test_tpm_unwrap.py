"""Unwrapping an inner-wrapped TPM duplicate in software (TPM 2.0 part 1, 23.3.2.3), no TPM.

The wrapped blobs are built here as the TPM builds them: a zero-IV AES-128-CFB encryption of
``TPM2B(SHA-256(TPM2B_SENSITIVE || name)) || TPM2B_SENSITIVE``.
"""

from __future__ import annotations

import hashlib
import os
import struct

import pytest

pytest.importorskip("tpm2_pytss", reason="tpm2-pytss is not installed", exc_type=ImportError)

from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from contracts.errors import IntegrityError
from workers.keygen.tpm import _unwrap_inner

ALG_RSA = 0x0001
ALG_ECC = 0x0023
NAME = b"\x00\x0b" + hashlib.sha256(b"the key's public area").digest()


def tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def sensitive_area(scalar: bytes, *, kind: int = ALG_ECC, trailer: bytes = b"") -> bytes:
    """A marshalled TPM2B_SENSITIVE: type, empty authValue, a seedValue, the scalar."""
    body = struct.pack(">H", kind) + tpm2b(b"") + tpm2b(os.urandom(32)) + tpm2b(scalar)
    return tpm2b(body + trailer)


def wrap(sensitive: bytes, key: bytes, *, name: bytes = NAME) -> bytes:
    plain = tpm2b(hashlib.sha256(sensitive + name).digest()) + sensitive
    encryptor = Cipher(algorithms.AES(key), CFB(bytes(16))).encryptor()
    return encryptor.update(plain) + encryptor.finalize()


def unwrap(wrapped: bytes, key: bytes, *, name: bytes = NAME) -> bytearray:
    into = bytearray(32)
    _unwrap_inner(wrapped, bytearray(key), name, into=into)
    return into


def test_unwraps_the_scalar() -> None:
    key, scalar = os.urandom(16), os.urandom(32)
    assert unwrap(wrap(sensitive_area(scalar), key), key) == scalar


def test_a_short_scalar_is_left_padded() -> None:
    key, scalar = os.urandom(16), b"\x01" + os.urandom(30)
    assert unwrap(wrap(sensitive_area(scalar), key), key) == b"\0" + scalar


@pytest.mark.parametrize("position", [0, 1, 5, 40, -1])
def test_a_flipped_bit_fails_the_integrity_check(position: int) -> None:
    key = os.urandom(16)
    wrapped = bytearray(wrap(sensitive_area(os.urandom(32)), key))
    wrapped[position] ^= 0x01
    with pytest.raises(IntegrityError):
        unwrap(bytes(wrapped), key)


def test_another_objects_name_fails_the_integrity_check() -> None:
    key = os.urandom(16)
    wrapped = wrap(sensitive_area(os.urandom(32)), key)
    with pytest.raises(IntegrityError, match="integrity"):
        unwrap(wrapped, key, name=NAME[:-1] + bytes([NAME[-1] ^ 1]))


def test_another_inner_key_fails() -> None:
    wrapped = wrap(sensitive_area(os.urandom(32)), os.urandom(16))
    with pytest.raises(IntegrityError):
        unwrap(wrapped, os.urandom(16))


@pytest.mark.parametrize(
    ("sensitive", "complaint"),
    [
        (sensitive_area(os.urandom(32), kind=ALG_RSA), "not a plain ECC"),
        (sensitive_area(os.urandom(33)), "longer than 32 bytes"),
        (sensitive_area(os.urandom(32), trailer=b"\0"), "not a plain ECC"),
        (sensitive_area(os.urandom(32)) + b"\0", "not a plain ECC"),
        (sensitive_area(os.urandom(32))[:-1], "truncated"),
    ],
    # Named, not by their random bytes: parallel workers must collect the same test ids.
    ids=["rsa-area", "33-byte-scalar", "trailer", "extra-byte", "truncated"],
)
def test_a_well_wrapped_but_malformed_area_is_refused(sensitive: bytes, complaint: str) -> None:
    key = os.urandom(16)
    with pytest.raises(IntegrityError, match=complaint):
        unwrap(wrap(sensitive, key), key)


def test_an_empty_duplicate_is_refused() -> None:
    with pytest.raises(IntegrityError, match="truncated"):
        unwrap(b"", os.urandom(16))


# -- algorithms (issue 15): an RSA duplicate carries one prime --
def test_an_rsa_area_gives_its_prime_and_an_ecc_one_is_refused_for_rsa() -> None:
    key, prime = os.urandom(16), b"\xc1" + os.urandom(127)
    into = bytearray(128)
    _unwrap_inner(
        wrap(sensitive_area(prime, kind=ALG_RSA), key),
        bytearray(key),
        NAME,
        into=into,
        sensitive_type=ALG_RSA,
    )
    assert into == prime
    with pytest.raises(IntegrityError, match="not a plain RSA"):
        _unwrap_inner(
            wrap(sensitive_area(prime), key),
            bytearray(key),
            NAME,
            into=bytearray(128),
            sensitive_type=ALG_RSA,
        )
    with pytest.raises(IntegrityError, match="longer than 128 bytes"):
        _unwrap_inner(
            wrap(sensitive_area(os.urandom(129), kind=ALG_RSA), key),
            bytearray(key),
            NAME,
            into=bytearray(128),
            sensitive_type=ALG_RSA,
        )
