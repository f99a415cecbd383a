"""Per-request key use: open the sealed scalar into our own buffer, check, sign, verify, wipe.

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

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from contracts.crypto import der_to_raw, load_public_key
from contracts.errors import IntegrityError, InvalidRequest, KeyDisabled
from contracts.models import Encoding
from vault.kek import KekRing
from vault.opening import private_key_of
from vault.records import KeyRecord, KeyState
from workers.observability.metrics import Metrics
from workers.observability.stages import Stage
from workers.observability.telemetry import stage

_PREHASHED_ECDSA = ec.ECDSA(Prehashed(hashes.SHA256()))


def stored_public_key(record: KeyRecord) -> ec.EllipticCurvePublicKey:
    """The record's public key; a stored key that does not parse is an integrity failure."""
    try:
        return load_public_key(record.public_key_der)
    except (InvalidRequest, ValueError) as exc:
        raise IntegrityError(
            f"key {record.key_id} v{record.version} has a stored public key that does not parse"
        ) from exc


@contextmanager
def opened_key(record: KeyRecord, ring: KekRing) -> Iterator[ec.EllipticCurvePrivateKey]:
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
    public_key: ec.EllipticCurvePublicKey | None = None,
    metrics: Metrics | None = None,
) -> list[bytes]:
    """Sign every SHA-256 digest with the record's key and verify each signature.

    Verification uses the public key stored in the record (``public_key`` when the caller
    parsed it already), not one derived from the opened scalar: a fault during signing, or a
    scalar that does not belong to the record, fails here and nothing is returned
    (``integrity_error``).
    """
    if public_key is None:
        public_key = stored_public_key(record)
    signatures: list[bytes] = []
    with ExitStack() as key_scope:
        with stage(Stage.UNSEAL, metrics):
            private_key = key_scope.enter_context(opened_key(record, ring))
        with stage(Stage.SIGN, metrics):
            for digest in digests:
                signatures.append(_signed(private_key, public_key, record, digest, encoding))
    return signatures


def _signed(
    private_key: ec.EllipticCurvePrivateKey,
    public_key: ec.EllipticCurvePublicKey,
    record: KeyRecord,
    digest: bytes,
    encoding: Encoding,
) -> bytes:
    signature = private_key.sign(digest, _PREHASHED_ECDSA)
    try:
        public_key.verify(signature, digest, _PREHASHED_ECDSA)
    except InvalidSignature:
        raise IntegrityError(
            f"a signature by key {record.key_id} v{record.version} did not verify "
            "against its stored public key (a fault, or a sealed scalar that does not "
            "belong to the record); nothing was returned"
        ) from None
    return der_to_raw(signature) if encoding == "raw" else signature
