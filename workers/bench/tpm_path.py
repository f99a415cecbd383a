"""The "TPM-only" path the original design compared itself with, for ``tpm_only`` only.

Per operation: create an ECDSA P-256 key inside the TPM (``TPM2_Create`` under the storage
primary), load it, sign a digest with it (``TPM2_Sign``), verify the signature in the TPM
(``TPM2_VerifySignature``), flush it. The key never leaves the TPM. The storage primary is
made once and kept (``Tpm`` does), as a TPM-only service would keep it, so the figure is the
cheapest honest version of that path. Benchmark code: the service never signs in the TPM.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from workers.keygen.tpm import Tpm

_P256_DIGEST_BYTES = 32


@cache
def _key_template_and_scheme() -> tuple[Any, Any]:
    """Built once, so the timed operation is the TPM's work, not template parsing."""
    from tpm2_pytss import TPM2_ALG, TPM2B_PUBLIC, TPMA_OBJECT, TPMT_SIG_SCHEME

    # A key bound to this TPM: neither duplicable nor movable to another parent.
    template = TPM2B_PUBLIC.parse(
        "ecc256:ecdsa-sha256",
        objectAttributes=TPMA_OBJECT.SIGN_ENCRYPT
        | TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH,
    )
    # The key's template fixes the scheme; TPM2_Sign then wants the NULL scheme.
    return template, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)


def sign_in_tpm(tpm: Tpm, digest: bytes) -> None:
    """Create a key in the TPM, sign ``digest`` with it, verify in the TPM, flush it.

    A signature that does not verify fails ``TPM2_VerifySignature`` (``TpmUnavailable``).
    """
    if len(digest) != _P256_DIGEST_BYTES:
        raise ValueError("the digest must be a 32-byte SHA-256 digest")
    from tpm2_pytss import TPM2B_DIGEST

    template, scheme = _key_template_and_scheme()

    def create_sign_verify_flush(ectx: Any, primary: Any) -> None:
        private, public, _, _, _ = ectx.create(primary, None, template)
        key = ectx.load(primary, private, public)
        try:
            signature = ectx.sign(key, TPM2B_DIGEST(digest), scheme)
            ectx.verify_signature(key, TPM2B_DIGEST(digest), signature)
        finally:
            ectx.flush_context(key)

    tpm.under_storage_primary("the TPM-only sign path", create_sign_verify_flush)
