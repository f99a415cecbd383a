"""The fleet attestation key and the TPM-bound ("tpm" protection) keys, in the TPM.

The attestation key is a primary key of the endorsement hierarchy, re-created from a fixed
template whenever it is needed: the same template and the same hierarchy seed give the same
key, so it needs no persistent handle (no NV slot to manage or leak) and it is the same after
a keygen restart, a swtpm restart (its state persists) or a ``TPM2_Clear`` (which changes only
the owner seed, not the endorsement seed). It is restricted, so it signs only structures the
TPM made itself (``TPMS_ATTEST``), never a digest a caller chose.

TPM-bound keys are ordinary children of the storage primary with ``fixedTPM|fixedParent`` and
no policy: their ``TPM2B_PRIVATE`` is wrapped by the storage primary, which only this TPM (with
the same owner seed) can re-derive, and they are loaded for every signature and flushed after.

Every function here takes an ESAPI context and the storage primary (``Tpm.under_storage_primary``)
and flushes every object it loads: swtpm has three transient object slots.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_RC,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPMA_OBJECT,
    TPMT_SIG_SCHEME,
    TSS2_Exception,
)

from contracts.attestation import AttestationParts
from contracts.crypto import public_key_der
from contracts.errors import IntegrityError
from workers.keygen.tpm import _flushed, _public_point

#: The attestation key's template: the TPM derives the same key from it every time.
ATTESTATION_KEY_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
)
# The unique field seeds the derivation: ours, so the key is not shared with another program
# that creates a primary from the default ECC signing template.
_ATTESTATION_KEY_UNIQUE = b"zandd-attestation-key/1"

#: A TPM-bound key: generated in the TPM, never duplicable, usable with its (empty) authValue.
TPM_BOUND_KEY_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.SIGN_ENCRYPT
)


def _ecdsa_sha256() -> TPMT_SIG_SCHEME:
    scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
    scheme.details.any.hashAlg = TPM2_ALG.SHA256
    return scheme


def attestation_key_template() -> TPM2B_PUBLIC:
    """The fixed template of the fleet attestation key (ECDSA P-256/SHA-256, restricted)."""
    template = TPM2B_PUBLIC.parse(
        "ecc256:ecdsa-sha256:null", objectAttributes=ATTESTATION_KEY_ATTRIBUTES
    )
    template.publicArea.unique.ecc.x = _ATTESTATION_KEY_UNIQUE
    return template


def _point_key(public: TPM2B_PUBLIC) -> ec.EllipticCurvePublicKey:
    x, y = _public_point(public)
    return ec.EllipticCurvePublicNumbers(
        int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
    ).public_key()


def attestation_public_key(ectx: Any) -> ec.EllipticCurvePublicKey:
    """The fleet attestation key's public half (the key is re-derived, then flushed)."""
    handle, public, _, _, _ = ectx.create_primary(
        None, attestation_key_template(), ESYS_TR.ENDORSEMENT
    )
    with _flushed(ectx, handle):
        return _point_key(public)


def certify(ectx: Any, key: Any, public: TPM2B_PUBLIC, qualifying: bytes) -> AttestationParts:
    """TPM2_Certify the loaded object ``key`` with the attestation key (loaded, then flushed).

    The caller has the key loaded; with the storage primary that makes three objects, swtpm's
    limit, until the attestation key is flushed again here.
    """
    handle, signer, _, _, _ = ectx.create_primary(
        None, attestation_key_template(), ESYS_TR.ENDORSEMENT
    )
    with _flushed(ectx, handle):
        certify_info, signature = ectx.certify(key, handle, qualifying, _ecdsa_sha256())
    return AttestationParts(
        public_area=public.publicArea.marshal(),
        certify_info=bytes(certify_info),
        signature=bytes(signature),
        signer=public_key_der(_point_key(signer)),
    )


@dataclass(frozen=True, slots=True, repr=False)
class TpmBoundKey:
    """A TPM-bound key as the vault keeps it: the TPM-wrapped private part and the public one.

    ``private_blob`` is a marshalled ``TPM2B_PRIVATE``: encrypted and integrity-protected under
    the storage primary's seed, so only this TPM can load it. ``public_blob`` is the
    marshalled ``TPM2B_PUBLIC``.
    """

    private_blob: bytes
    public_blob: bytes

    def __repr__(self) -> str:
        return f"TpmBoundKey(<{len(self.private_blob)}-byte TPM-wrapped private part>)"

    def encode(self) -> bytes:
        """Both parts length-prefixed, how the vault keeps them (``KeyRecord.tpm_blob``)."""
        return b"".join(
            struct.pack(">I", len(part)) + part for part in (self.private_blob, self.public_blob)
        )

    @classmethod
    def decode(cls, blob: bytes) -> TpmBoundKey:
        """The parts of an :meth:`encode` blob; IntegrityError if it is not one."""
        parts: list[bytes] = []
        at = 0
        for _ in range(2):
            if at + 4 > len(blob):
                raise IntegrityError("the stored TPM-bound key is truncated")
            (size,) = struct.unpack_from(">I", blob, at)
            parts.append(blob[at + 4 : at + 4 + size])
            at += 4 + size
        if at != len(blob):
            raise IntegrityError("the stored TPM-bound key is malformed")
        return cls(*parts)


def create_tpm_bound(
    ectx: Any, primary: Any, qualifying: bytes
) -> tuple[TpmBoundKey, ec.EllipticCurvePublicKey, AttestationParts]:
    """Create a ``fixedTPM|fixedParent`` P-256 key under ``primary`` and certify it."""
    template = TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256", objectAttributes=TPM_BOUND_KEY_ATTRIBUTES)
    private, public, _, _, _ = ectx.create(primary, None, template)
    with _flushed(ectx, ectx.load(primary, private, public)) as key:
        attestation = certify(ectx, key, public, qualifying)
    blob = TpmBoundKey(private_blob=private.marshal(), public_blob=public.marshal())
    return blob, _point_key(public), attestation


def sign_tpm_bound(ectx: Any, primary: Any, key: TpmBoundKey, digest: bytes) -> bytes:
    """Sign a SHA-256 ``digest`` with a TPM-bound key inside the TPM; the DER signature.

    Raises:
        IntegrityError: the stored blobs do not parse, or the TPM refuses them (its integrity
            check of the private part fails).
    """
    try:
        private, _ = TPM2B_PRIVATE.unmarshal(key.private_blob)
        public, _ = TPM2B_PUBLIC.unmarshal(key.public_blob)
    except TSS2_Exception as exc:
        raise IntegrityError("the stored TPM-bound key does not parse") from exc
    try:
        loaded = ectx.load(primary, private, public)
    except TSS2_Exception as exc:
        if exc.error != TPM2_RC.INTEGRITY:
            raise  # the TPM failed, not the blob: retryable
        # The storage primary cannot open the private part: another TPM made it, this TPM's
        # owner hierarchy was cleared, or the blob was altered. Retrying changes nothing.
        raise IntegrityError(
            "the TPM refuses the stored TPM-bound key: it was made by another TPM (or this "
            "TPM's owner hierarchy was cleared), or it was altered"
        ) from exc
    with _flushed(ectx, loaded) as handle:
        # An unrestricted key takes the NULL ticket ESAPI sends by default.
        signature = ectx.sign(handle, digest, _ecdsa_sha256())
    return bytes(signature)
