"""The signing algorithms of wire contract v1: what each one is, and how it signs and verifies.

Every key has one algorithm, chosen at ``key.create`` and sealed with it (the AAD of the sealed
private key and the record MAC both cover it). The names follow ``ecdsa-p256-sha256``, the
first one: scheme, key size or curve, hash.

| algorithm | key | signature | JWK |
|---|---|---|---|
| ``ecdsa-p256-sha256`` | EC P-256 | ECDSA, SHA-256; ``der`` or ``raw`` r‖s (64 bytes) | EC ``ES256`` |
| ``ecdsa-p384-sha384`` | EC P-384 | ECDSA, SHA-384; ``der`` or ``raw`` r‖s (96 bytes) | EC ``ES384`` |
| ``rsa-pkcs1-2048-sha256`` | RSA 2048, e=65537 | RSASSA-PKCS1-v1_5, SHA-256 | RSA ``RS256`` |
| ``rsa-pkcs1-3072-sha256`` | RSA 3072, e=65537 | RSASSA-PKCS1-v1_5, SHA-256 | RSA ``RS256`` |
| ``rsa-pss-2048-sha256`` | RSA 2048, e=65537 | RSASSA-PSS, SHA-256, MGF1-SHA-256, salt 32 | RSA ``PS256`` |
| ``rsa-pss-3072-sha256`` | RSA 3072, e=65537 | RSASSA-PSS, SHA-256, MGF1-SHA-256, salt 32 | RSA ``PS256`` |

An RSA signature has one encoding (the RSASSA octet string, as long as the modulus, what JWS
and ``openssl dgst -verify`` take): ``der`` and ``raw`` return the same bytes. The PSS salt is
as long as the digest, as JWS ``PS256`` requires.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Final, Literal, TypeAlias

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)

ALGORITHM_ECDSA_P256_SHA256: Final = "ecdsa-p256-sha256"
ALGORITHM_ECDSA_P384_SHA384: Final = "ecdsa-p384-sha384"
ALGORITHM_RSA_PKCS1_2048_SHA256: Final = "rsa-pkcs1-2048-sha256"
ALGORITHM_RSA_PKCS1_3072_SHA256: Final = "rsa-pkcs1-3072-sha256"
ALGORITHM_RSA_PSS_2048_SHA256: Final = "rsa-pss-2048-sha256"
ALGORITHM_RSA_PSS_3072_SHA256: Final = "rsa-pss-3072-sha256"

#: The wire values of ``KeyCreateRequest.algorithm`` (kept in step with ``ALGORITHMS``).
AlgorithmName = Literal[
    "ecdsa-p256-sha256",
    "ecdsa-p384-sha384",
    "rsa-pkcs1-2048-sha256",
    "rsa-pkcs1-3072-sha256",
    "rsa-pss-2048-sha256",
    "rsa-pss-3072-sha256",
]

#: The public exponent the TPM uses when a template leaves it 0 (TPM 2.0 part 2, 12.2.3.5).
RSA_PUBLIC_EXPONENT: Final = 65537

PublicKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
Family = Literal["ecdsa", "rsa"]


class UnsupportedAlgorithm(ValueError):
    """An algorithm name this contract does not know, or a key that is not of the algorithm."""


@dataclass(frozen=True, slots=True)
class AlgorithmSpec:
    """One signing algorithm: its key, hash, padding and encodings."""

    name: str
    family: Family
    hash_name: Literal["sha256", "sha384"]
    #: EC: the curve's coordinate size in bytes (r and s have this size in ``raw``).
    coordinate_bytes: int = 0
    #: RSA: the modulus size in bits.
    rsa_bits: int = 0
    pss: bool = False
    jwk_alg: str = ""
    jwk_crv: str = ""

    @property
    def digest_bytes(self) -> int:
        """The size of the digest that gets signed."""
        return 48 if self.hash_name == "sha384" else 32

    def hash(self) -> hashes.HashAlgorithm:
        """A new ``cryptography`` hash object of this algorithm's hash."""
        return hashes.SHA384() if self.hash_name == "sha384" else hashes.SHA256()

    def curve(self) -> ec.EllipticCurve:
        """The EC curve (ECDSA algorithms only)."""
        if self.family != "ecdsa":
            raise UnsupportedAlgorithm(f"{self.name} has no curve")
        return ec.SECP384R1() if self.coordinate_bytes == 48 else ec.SECP256R1()

    def digest(self, message: bytes) -> bytes:
        """The digest of ``message`` this algorithm signs."""
        hasher = hashes.Hash(self.hash())
        hasher.update(message)
        return hasher.finalize()

    def check_public_key(self, key: object) -> PublicKey:
        """``key`` itself when it is a public key of this algorithm, else UnsupportedAlgorithm."""
        if self.family == "ecdsa":
            if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == self.curve().name:
                return key
        elif (
            isinstance(key, rsa.RSAPublicKey)
            and key.key_size == self.rsa_bits
            and key.public_numbers().e == RSA_PUBLIC_EXPONENT
        ):
            return key
        raise UnsupportedAlgorithm(f"not a public key of {self.name}")

    def sign_digest(self, private_key: PrivateKey, digest: bytes) -> bytes:
        """Sign a prehashed ``digest``: DER ``ECDSA-Sig-Value`` for ECDSA, the RSASSA bytes
        for RSA."""
        if isinstance(private_key, ec.EllipticCurvePrivateKey) and self.family == "ecdsa":
            return private_key.sign(digest, _ecdsa(self.hash_name))
        if isinstance(private_key, rsa.RSAPrivateKey) and self.family == "rsa":
            return private_key.sign(digest, _rsa_padding(self.pss), _prehashed(self.hash_name))
        raise UnsupportedAlgorithm(f"not a private key of {self.name}")

    def verify_digest(self, public_key: PublicKey, signature_der: bytes, digest: bytes) -> bool:
        """True when ``signature_der`` (DER for ECDSA) signs the prehashed ``digest``."""
        try:
            if isinstance(public_key, ec.EllipticCurvePublicKey) and self.family == "ecdsa":
                public_key.verify(signature_der, digest, _ecdsa(self.hash_name))
            elif isinstance(public_key, rsa.RSAPublicKey) and self.family == "rsa":
                public_key.verify(
                    signature_der, digest, _rsa_padding(self.pss), _prehashed(self.hash_name)
                )
            else:
                return False
        except (InvalidSignature, ValueError):
            return False
        return True

    def to_raw(self, signature_der: bytes) -> bytes:
        """The ``raw`` encoding: r‖s for ECDSA (each ``coordinate_bytes``), unchanged for RSA."""
        if self.family == "rsa":
            return signature_der
        r, s = decode_dss_signature(signature_der)
        size = self.coordinate_bytes
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")

    def from_raw(self, signature_raw: bytes) -> bytes:
        """The DER form of a ``raw`` signature (ValueError when it has the wrong size)."""
        if self.family == "rsa":
            return signature_raw
        size = self.coordinate_bytes
        if len(signature_raw) != 2 * size:
            raise ValueError(f"a raw {self.name} signature has {2 * size} bytes")
        r = int.from_bytes(signature_raw[:size], "big")
        s = int.from_bytes(signature_raw[size:], "big")
        return encode_dss_signature(r, s)


# The scheme objects are built once: a signer signs and verifies every digest with them.
@cache
def _prehashed(hash_name: str) -> Prehashed:
    return Prehashed(hashes.SHA384() if hash_name == "sha384" else hashes.SHA256())


@cache
def _ecdsa(hash_name: str) -> ec.ECDSA:
    return ec.ECDSA(_prehashed(hash_name))


@cache
def _rsa_padding(pss: bool) -> padding.AsymmetricPadding:
    # Every RSA algorithm of the contract hashes with SHA-256: MGF1-SHA-256, a 32-byte salt.
    if pss:
        return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    return padding.PKCS1v15()


ALGORITHMS: Final[dict[str, AlgorithmSpec]] = {
    spec.name: spec
    for spec in (
        AlgorithmSpec(
            ALGORITHM_ECDSA_P256_SHA256,
            "ecdsa",
            "sha256",
            coordinate_bytes=32,
            jwk_alg="ES256",
            jwk_crv="P-256",
        ),
        AlgorithmSpec(
            ALGORITHM_ECDSA_P384_SHA384,
            "ecdsa",
            "sha384",
            coordinate_bytes=48,
            jwk_alg="ES384",
            jwk_crv="P-384",
        ),
        AlgorithmSpec(
            ALGORITHM_RSA_PKCS1_2048_SHA256, "rsa", "sha256", rsa_bits=2048, jwk_alg="RS256"
        ),
        AlgorithmSpec(
            ALGORITHM_RSA_PKCS1_3072_SHA256, "rsa", "sha256", rsa_bits=3072, jwk_alg="RS256"
        ),
        AlgorithmSpec(
            ALGORITHM_RSA_PSS_2048_SHA256, "rsa", "sha256", rsa_bits=2048, pss=True, jwk_alg="PS256"
        ),
        AlgorithmSpec(
            ALGORITHM_RSA_PSS_3072_SHA256, "rsa", "sha256", rsa_bits=3072, pss=True, jwk_alg="PS256"
        ),
    )
}


def algorithm_spec(name: str) -> AlgorithmSpec:
    """The spec of algorithm ``name``; UnsupportedAlgorithm for a name not in the contract."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise UnsupportedAlgorithm(f"unknown algorithm {name[:40]!r}") from None


def algorithm_of_key(key: PublicKey) -> AlgorithmSpec:
    """The algorithm an EC public key implies (its curve names it). RSA keys imply none: the
    padding is not in the key, so UnsupportedAlgorithm."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        for spec in ALGORITHMS.values():
            if spec.family == "ecdsa" and spec.curve().name == key.curve.name:
                return spec
        raise UnsupportedAlgorithm(f"no algorithm of the contract uses curve {key.curve.name}")
    raise UnsupportedAlgorithm(
        "an RSA key does not say its padding: name the algorithm (rsa-pkcs1-… or rsa-pss-…)"
    )


def encoding_of(signature: bytes) -> Literal["der", "raw"]:
    """The encoding a signature is in, told by its form, for a caller who did not say.

    ``der`` when it is exactly one DER ``ECDSA-Sig-Value`` (re-encoding gives the same bytes);
    else ``raw`` when its length is an r‖s length of a contract curve (64 bytes for P-256, 96
    for P-384); else ``der``. An RSA signature (as long as the modulus: 256 or 384 bytes) is
    the same bytes in both encodings, so either answer verifies it; a raw ECDSA signature that
    is also valid DER of its own length is of negligible probability.
    """
    try:
        r, s = decode_dss_signature(signature)
        if encode_dss_signature(r, s) == signature:
            return "der"
    except ValueError:
        pass
    raw_lengths = {
        2 * spec.coordinate_bytes for spec in ALGORITHMS.values() if spec.family == "ecdsa"
    }
    return "raw" if len(signature) in raw_lengths else "der"
