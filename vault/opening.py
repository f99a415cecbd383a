"""Opening a sealed private key into a key object, through a buffer that is wiped at once.

What is sealed depends on the record's algorithm (``contracts.algorithms``): an ECDSA key's
private scalar (32 bytes for P-256, 48 for P-384), or one prime ``p`` of an RSA key (half the
modulus: what the TPM's ``TPMT_SENSITIVE`` holds), from which the private key is rebuilt with
the record's public key (its MAC checked when the record was read).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from contracts.algorithms import PrivateKey, UnsupportedAlgorithm, algorithm_spec
from contracts.errors import IntegrityError
from vault.kek import KekRing
from vault.records import KeyRecord
from vault.sealing import open_into, wipe

P256_SCALAR_BYTES = 32


def sealed_size(algorithm: str) -> int:
    """How many bytes a record of ``algorithm`` seals: the EC scalar, or RSA's prime."""
    spec = algorithm_spec(algorithm)
    return spec.rsa_bits // 16 if spec.family == "rsa" else spec.coordinate_bytes


def rsa_private_key(
    prime: bytes | bytearray, public_key: rsa.RSAPublicKey, *, validate: bool = False
) -> rsa.RSAPrivateKey:
    """The RSA private key from one prime ``p`` and the public key (what a TPM's RSA
    ``TPMT_SENSITIVE`` holds): q = n / p, d = e⁻¹ mod φ(n), and the CRT values.

    ``validate`` runs OpenSSL's full key check (slow: for a new key, not on every request;
    a signer verifies every signature against the stored public key instead).

    Raises:
        ValueError: ``p`` does not divide the modulus (not this key's prime).
    """
    numbers = public_key.public_numbers()
    n, e = numbers.n, numbers.e
    p = int.from_bytes(prime, "big")
    if p <= 1 or p >= n or n % p:
        raise ValueError("the prime does not divide the public modulus")
    q = n // p
    d = pow(e, -1, (p - 1) * (q - 1))
    return rsa.RSAPrivateNumbers(
        p=p,
        q=q,
        d=d,
        dmp1=rsa.rsa_crt_dmp1(d, p),
        dmq1=rsa.rsa_crt_dmq1(d, q),
        iqmp=rsa.rsa_crt_iqmp(p, q),
        public_numbers=numbers,
    ).private_key(unsafe_skip_rsa_key_validation=not validate)


@contextmanager
def private_key_of(record: KeyRecord, ring: KekRing) -> Iterator[PrivateKey]:
    """The record's private key for a ``with`` block.

    The plaintext lands only in a ``bytearray`` of ours, zeroed as soon as the key object is
    built (``cryptography`` needs the scalar or prime as an ``int``, which Python cannot wipe;
    OpenSSL frees its copy with the key object, dropped at the end of the block). A blob that
    does not open, has the wrong size, or is not a valid key of the record's algorithm is
    ``integrity_error``.
    """
    if record.sealed is None:
        raise IntegrityError(f"key {record.key_id} v{record.version} has no sealed material")
    try:
        spec = algorithm_spec(record.algorithm)
    except UnsupportedAlgorithm:
        raise IntegrityError(
            f"key {record.key_id} v{record.version} names an unknown algorithm"
        ) from None
    secret = bytearray(sealed_size(spec.name))
    private_key: PrivateKey
    try:
        open_into(record.sealed, record.binding, ring, secret)
        if spec.family == "rsa":
            public_key = load_der_public_key(record.public_key_der)
            if not isinstance(public_key, rsa.RSAPublicKey):
                raise ValueError("the record's public key is not an RSA key")
            private_key = rsa_private_key(secret, public_key)
        else:
            private_key = ec.derive_private_key(int.from_bytes(secret, "big"), spec.curve())
    except ValueError as exc:  # the wrong size, or not a valid key of the algorithm
        raise IntegrityError(
            f"key {record.key_id} v{record.version} holds sealed material that is not a "
            f"valid {spec.name} key"
        ) from exc
    finally:
        wipe(secret)
    try:
        yield private_key
    finally:
        del private_key
