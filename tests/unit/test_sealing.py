"""Sealing: AES-256-GCM round trip, tamper detection, record binding and no leaks."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.errors import IntegrityError
from vault import Kek, KekRing, RecordBinding, SealedKey, associated_data, open_into, seal

SECRET = bytes(range(1, 33))  # no zero byte, so a wiped buffer is told apart from the secret
BINDING = RecordBinding(key_id="key-1", version=1, algorithm="ecdsa-p256-sha256")
KEK = Kek.generate()
RING = KekRing(KEK)
SEALED = seal(SECRET, BINDING, KEK)
SEALED_SIZE_BITS = (len(SEALED.nonce) + len(SEALED.ciphertext)) * 8


def _open(sealed: SealedKey, binding: RecordBinding = BINDING, ring: KekRing = RING) -> bytearray:
    out = bytearray(len(sealed.ciphertext) - 16)
    open_into(sealed, binding, ring, out)
    return out


def _forms(data: bytes) -> list[str]:
    return [data.hex(), data.hex().upper(), base64.b64encode(data).decode(), repr(data)]


def _assert_no_secrets(exc: BaseException) -> None:
    texts = [str(exc), repr(exc)]
    if exc.__cause__ is not None:
        texts += [str(exc.__cause__), repr(exc.__cause__)]
    for text in texts:
        for secret in (KEK.key, SECRET):
            for form in _forms(secret):
                assert form not in text


def test_round_trip() -> None:
    assert _open(SEALED) == SECRET
    assert SEALED.kek_id == KEK.kek_id
    assert len(SEALED.nonce) == 12
    assert len(SEALED.ciphertext) == len(SECRET) + 16


@pytest.mark.parametrize("secret", [bytearray(SECRET), memoryview(SECRET)])
def test_seal_accepts_mutable_buffers(secret: bytearray | memoryview) -> None:
    assert _open(seal(secret, BINDING, KEK)) == SECRET


def test_two_seals_of_one_secret_differ() -> None:
    again = seal(SECRET, BINDING, KEK)
    assert again.nonce != SEALED.nonce
    assert again.ciphertext != SEALED.ciphertext


@given(bit=st.integers(min_value=0, max_value=SEALED_SIZE_BITS - 1))
def test_any_flipped_bit_fails_and_wipes_the_buffer(bit: int) -> None:
    blob = bytearray(SEALED.nonce + SEALED.ciphertext)
    blob[bit // 8] ^= 1 << (bit % 8)
    tampered = SealedKey(SEALED.kek_id, bytes(blob[:12]), bytes(blob[12:]))
    out = bytearray(len(SECRET))
    with pytest.raises(IntegrityError, match="failed authentication") as info:
        open_into(tampered, BINDING, RING, out)
    assert out == bytes(len(SECRET))
    _assert_no_secrets(info.value)


@pytest.mark.parametrize(
    "other",
    [
        RecordBinding("key-2", 1, "ecdsa-p256-sha256"),
        RecordBinding("key-1", 2, "ecdsa-p256-sha256"),
        RecordBinding("key-1", 1, "ecdsa-p384-sha384"),
    ],
    ids=["key_id", "version", "algorithm"],
)
def test_swapped_binding_fails(other: RecordBinding) -> None:
    with pytest.raises(IntegrityError, match=f"sealed key for {other.key_id} v{other.version}"):
        _open(SEALED, binding=other)


def test_relabelled_kek_id_fails() -> None:
    other = Kek.generate()
    relabelled = SealedKey(other.kek_id, SEALED.nonce, SEALED.ciphertext)
    with pytest.raises(IntegrityError, match="failed authentication"):
        _open(relabelled, ring=KekRing(KEK, others=[other]))


def test_wrong_kek_with_the_same_id_fails() -> None:
    impostor = Kek(kek_id=KEK.kek_id, key=bytes(32))
    with pytest.raises(IntegrityError, match="failed authentication") as info:
        _open(SEALED, ring=KekRing(impostor))
    _assert_no_secrets(info.value)


def test_unknown_kek_fails() -> None:
    with pytest.raises(IntegrityError, match=f"unknown KEK '{KEK.kek_id}'") as info:
        _open(SEALED, ring=KekRing(Kek.generate()))
    _assert_no_secrets(info.value)


def test_truncated_ciphertext_fails() -> None:
    short = SealedKey(SEALED.kek_id, SEALED.nonce, SEALED.ciphertext[:15])
    with pytest.raises(IntegrityError, match="failed authentication"):
        open_into(short, BINDING, RING, bytearray())


@pytest.mark.parametrize("size", [len(SECRET) - 1, len(SECRET) + 1])
def test_wrong_buffer_size_is_refused(size: int) -> None:
    with pytest.raises(ValueError, match="output buffer must be 32 bytes"):
        open_into(SEALED, BINDING, RING, bytearray(size))


class _SpyCipher:
    """Offers only decrypt_into: any other way of decrypting fails the test."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.buffers: list[object] = []

    def decrypt_into(self, nonce: bytes, data: bytes, aad: bytes, buf: bytearray) -> int:
        self.buffers.append(buf)
        return int(self._real.decrypt_into(nonce, data, aad, buf))


def test_plaintext_lands_only_in_the_callers_buffer() -> None:
    kek = Kek(kek_id="kek-spy", key=KEK.key)
    sealed = seal(SECRET, BINDING, kek)
    spy = _SpyCipher(kek.aead)
    object.__setattr__(kek, "_aead", spy)  # swap the cached cipher for the spy
    out = bytearray(len(SECRET))
    open_into(sealed, BINDING, KekRing(kek), out)
    assert out == SECRET
    assert len(spy.buffers) == 1
    assert spy.buffers[0] is out


def test_reprs_do_not_dump_ciphertext() -> None:
    text = repr(SEALED)
    assert SEALED.ciphertext.hex() not in text
    assert repr(SEALED.ciphertext) not in text
    assert "ciphertext=<48 bytes>" in text


_bindings = st.builds(
    RecordBinding,
    key_id=st.text(max_size=8),
    version=st.integers(min_value=0, max_value=2**63 - 1),
    algorithm=st.text(max_size=8),
)


@given(a=_bindings, b=_bindings, kek_a=st.text(max_size=8), kek_b=st.text(max_size=8))
def test_associated_data_is_unambiguous(
    a: RecordBinding, b: RecordBinding, kek_a: str, kek_b: str
) -> None:
    same_input = (a, kek_a) == (b, kek_b)
    assert (associated_data(a, kek_a) == associated_data(b, kek_b)) == same_input


def test_associated_data_keeps_field_boundaries() -> None:
    assert associated_data(RecordBinding("ab", 1, "c"), "k") != associated_data(
        RecordBinding("a", 1, "bc"), "k"
    )
    assert associated_data(BINDING, "k").startswith(b"\x00\x00\x00\x0czandd-seal/1")
