"""Per-request key use: open the sealed key into our own buffer, check, sign, verify, wipe.

Each record signs with its own algorithm (``contracts.algorithms``: ECDSA P-256/P-384, RSA
PKCS#1 v1.5 or PSS), the one sealed with it.

Python cannot promise that no copy of the scalar survives: ``cryptography`` needs it as an
``int`` (immutable, freed but not zeroed) and OpenSSL keeps its own copy inside the key object
until that is freed. What we control is the buffer the plaintext is decrypted into, which is
zeroed as soon as the key object is built, and the key object's lifetime (one request).

Integrity before use: a sealed blob that does not open (tampered, copied from another
record, unknown KEK), a scalar that is not a valid P-256 key, or one whose public key is not
the record's stored public key, is refused with ``integrity_error`` and never signs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager

from contracts.algorithms import AlgorithmSpec, PrivateKey, PublicKey, UnsupportedAlgorithm
from contracts.algorithms import algorithm_spec as _algorithm_spec
from contracts.crypto import load_algorithm_public_key
from contracts.errors import IntegrityError, InvalidRequest, KeyDisabled
from contracts.models import Encoding
from vault.kek import KekRing
from vault.opening import private_key_of
from vault.records import KeyRecord, KeyState
from workers.observability.metrics import Metrics
from workers.observability.stages import Stage
from workers.observability.telemetry import stage


def algorithm_of(record: KeyRecord) -> AlgorithmSpec:
    """The record's algorithm; one this software does not know is an integrity failure."""
    try:
        return _algorithm_spec(record.algorithm)
    except UnsupportedAlgorithm:
        raise IntegrityError(
            f"key {record.key_id} v{record.version} names an unknown algorithm"
        ) from None


def stored_public_key(record: KeyRecord) -> PublicKey:
    """The record's public key; a stored key that does not parse, or is not a key of the
    record's algorithm, is an integrity failure."""
    try:
        return load_algorithm_public_key(record.public_key_der, algorithm_of(record).name)
    except (InvalidRequest, ValueError) as exc:
        raise IntegrityError(
            f"key {record.key_id} v{record.version} has a stored public key that does not parse"
        ) from exc


@contextmanager
def opened_key(record: KeyRecord, ring: KekRing) -> Iterator[PrivateKey]:
    """The record's private key for a ``with`` block; refuses unusable records.

    A scalar that does not belong to the record's public key is caught by the verification
    after signing (``sign_digests``), which costs less than deriving the public point here.
    """
    if record.state is not KeyState.ENABLED or record.sealed is None:
        raise KeyDisabled(f"key {record.key_id} v{record.version} is {record.state.value}")
    with private_key_of(record, ring) as private_key:
        yield private_key


def sign_digests(
    record: KeyRecord,
    ring: KekRing,
    digests: Iterable[bytes],
    encoding: Encoding,
    public_key: PublicKey | None = None,
    metrics: Metrics | None = None,
) -> list[bytes]:
    """Sign every digest (of the record's algorithm's hash) with the record's key and verify
    each signature.

    Verification uses the public key stored in the record (``public_key`` when the caller
    parsed it already), not one derived from the opened scalar: a fault during signing, or a
    scalar that does not belong to the record, fails here and nothing is returned
    (``integrity_error``).
    """
    if public_key is None:
        public_key = stored_public_key(record)
    spec = algorithm_of(record)
    signatures: list[bytes] = []
    with ExitStack() as key_scope:
        with stage(Stage.UNSEAL, metrics):
            private_key = key_scope.enter_context(opened_key(record, ring))
        with stage(Stage.SIGN, metrics):
            for digest in digests:
                signatures.append(_signed(spec, private_key, public_key, record, digest, encoding))
    return signatures


def _signed(
    spec: AlgorithmSpec,
    private_key: PrivateKey,
    public_key: PublicKey,
    record: KeyRecord,
    digest: bytes,
    encoding: Encoding,
) -> bytes:
    if len(digest) != spec.digest_bytes:
        raise InvalidRequest(
            f"a key of {spec.name} signs {spec.digest_bytes}-byte {spec.hash_name.upper()} digests"
        )
    try:
        signature = spec.sign_digest(private_key, digest)
    except UnsupportedAlgorithm:
        raise IntegrityError(
            f"key {record.key_id} v{record.version} opened to a key of another algorithm"
        ) from None
    if not spec.verify_digest(public_key, signature, digest):
        raise IntegrityError(
            f"a signature by key {record.key_id} v{record.version} did not verify "
            "against its stored public key (a fault, or a sealed scalar that does not "
            "belong to the record); nothing was returned"
        ) from None
    return spec.to_raw(signature) if encoding == "raw" else signature
