"""The TPM's audit checkpoint key: a P-256 signing key that never leaves the TPM.

It is a primary key of the owner hierarchy, made again from a fixed template whenever it is
needed (``TPM2_CreatePrimary`` is deterministic: the same seed and template give the same key),
so it needs no persistent handle and no NV space: load, sign, flush, each time. The swtpm has
three transient object slots; with the storage primary loaded this takes a second one, for the
length of one signature.

The template: ``fixedTPM | fixedParent | sensitiveDataOrigin`` (born in this TPM, never
duplicated), ``sign`` only, ECDSA-SHA256, ``userWithAuth`` with an empty auth, and its own
``unique`` value (:data:`CHECKPOINT_KEY_UNIQUE`), so it is not the fleet attestation key or
any other primary made from the same hierarchy. Unrestricted, on purpose: a restricted key
signs only digests the TPM hashed itself (a hash ticket from ``TPM2_Hash``), which would cost
a second command per checkpoint and proves nothing here — the signed document is public and
its format is tagged (``zandd-audit-checkpoint/1``), so a signature over it cannot pass for a
TPM attestation, which would start with ``TPM_GENERATED_VALUE``.

Who can use it: anyone who can send commands to the TPM (the empty auth). It is the keygen
worker's TPM, as for key generation; an attacker able to command it could sign a checkpoint
of a forged head — the same attacker could create keys. A TPM owner hierarchy cleared
(``TPM2_Clear``) gives a new seed, so a new key: publish the new one (``zandd tpm
checkpoint-key``) and keep the old one to check older checkpoints.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_RH,
    TPM2_ST,
    TPM2B_PUBLIC,
    TPMA_OBJECT,
    TPMT_SIG_SCHEME,
    TPMT_TK_HASHCHECK,
)

from contracts.errors import IntegrityError
from workers.keygen.tpm import Tpm, _flushed, _public_point

#: The template's ``unique.ecc.x``: what makes this primary the checkpoint key and no other.
CHECKPOINT_KEY_UNIQUE = b"zandd audit checkpoint key v1"
DIGEST_BYTES = 32

_CHECKPOINT_KEY_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.NODA
)


def checkpoint_key_template() -> TPM2B_PUBLIC:
    """The checkpoint key's public template (fixed: the same key every time)."""
    template = TPM2B_PUBLIC.parse(
        "ecc256:ecdsa-sha256", objectAttributes=_CHECKPOINT_KEY_ATTRIBUTES
    )
    template.publicArea.unique.ecc.x = CHECKPOINT_KEY_UNIQUE
    return template


def checkpoint_public_key(tpm: Tpm) -> ec.EllipticCurvePublicKey:
    """The checkpoint key's public key, as the TPM makes it."""

    def command(ectx: Any, _storage: Any) -> Any:
        key, public, _, _, _ = ectx.create_primary(None, checkpoint_key_template(), ESYS_TR.OWNER)
        ectx.flush_context(key)
        return public

    return _public_key(tpm.under_storage_primary("reading the audit checkpoint key", command))


def sign_checkpoint_digest(tpm: Tpm, digest: bytes) -> bytes:
    """TPM2_Sign ``digest`` (a SHA-256) with the checkpoint key; the DER ECDSA signature."""
    if len(digest) != DIGEST_BYTES:
        raise ValueError("a checkpoint digest is a 32-byte SHA-256")
    scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
    scheme.details.any.hashAlg = TPM2_ALG.SHA256
    # An unrestricted key needs no hash ticket: the NULL ticket says "not hashed by the TPM".
    ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)

    def command(ectx: Any, _storage: Any) -> Any:
        key, _, _, _, _ = ectx.create_primary(None, checkpoint_key_template(), ESYS_TR.OWNER)
        with _flushed(ectx, key):
            return ectx.sign(key, digest, scheme, ticket)

    signature = tpm.under_storage_primary("signing an audit checkpoint", command)
    ecdsa = signature.signature.ecdsa
    return encode_dss_signature(
        int.from_bytes(bytes(ecdsa.signatureR), "big"),
        int.from_bytes(bytes(ecdsa.signatureS), "big"),
    )


def public_key_pem(public_key: ec.EllipticCurvePublicKey) -> str:
    """``public_key`` as SubjectPublicKeyInfo PEM."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def _public_key(public: TPM2B_PUBLIC) -> ec.EllipticCurvePublicKey:
    x, y = _public_point(public)
    try:
        return ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
        ).public_key()
    except ValueError as exc:
        raise IntegrityError("the TPM reported a checkpoint key that is not on P-256") from exc
