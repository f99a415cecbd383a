"""The "TPM-only" path the original design compared itself with, for ``tpm_only`` only.

Per operation: create an ECDSA P-256 key inside the TPM (``TPM2_Create`` under a storage
primary), load it, sign a digest with it (``TPM2_Sign``), verify the signature in the TPM
(``TPM2_VerifySignature``), flush it. The key never leaves the TPM. The storage primary is
made once and kept, as a TPM-only service would keep it, so the figure is the cheapest honest
version of that path. Benchmark code: the service never signs in the TPM.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from contracts.errors import TpmUnavailable

_P256_DIGEST_BYTES = 32


@contextmanager
def _tss_errors(action: str) -> Iterator[None]:
    from tpm2_pytss import TSS2_Exception

    try:
        yield
    except TSS2_Exception as exc:
        raise TpmUnavailable(f"{action} failed in the TPM stack: {exc}") from exc


class TpmSignPath:
    """One ESAPI connection and a storage primary; :meth:`sign_once` is one operation."""

    def __init__(self, tcti: str) -> None:
        """Open the TPM at ``tcti`` and create the storage primary (``TpmUnavailable`` if not)."""
        from tpm2_pytss import ESAPI, ESYS_TR, TPM2_ALG, TPM2B_PUBLIC, TPMA_OBJECT, TPMT_SIG_SCHEME

        with _tss_errors("opening the TPM"):
            self._ectx: Any = ESAPI(tcti)
        try:
            with _tss_errors("TPM2_CreatePrimary"):
                storage = TPM2B_PUBLIC.parse(
                    "ecc256:aes128cfb",
                    objectAttributes=TPMA_OBJECT.RESTRICTED
                    | TPMA_OBJECT.DECRYPT
                    | TPMA_OBJECT.FIXEDTPM
                    | TPMA_OBJECT.FIXEDPARENT
                    | TPMA_OBJECT.SENSITIVEDATAORIGIN
                    | TPMA_OBJECT.USERWITHAUTH
                    | TPMA_OBJECT.NODA,
                )
                self._primary: Any = self._ectx.create_primary(None, storage, ESYS_TR.OWNER)[0]
        except BaseException:
            self._ectx.close()
            raise
        # A key bound to this TPM: neither duplicable nor movable to another parent.
        self._template = TPM2B_PUBLIC.parse(
            "ecc256:ecdsa-sha256",
            objectAttributes=TPMA_OBJECT.SIGN_ENCRYPT
            | TPMA_OBJECT.FIXEDTPM
            | TPMA_OBJECT.FIXEDPARENT
            | TPMA_OBJECT.SENSITIVEDATAORIGIN
            | TPMA_OBJECT.USERWITHAUTH,
        )
        # The key's template fixes the scheme; TPM2_Sign then wants the NULL scheme.
        self._scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)

    def sign_once(self, digest: bytes) -> None:
        """Create a key in the TPM, sign ``digest`` with it, verify in the TPM, flush it.

        A signature that does not verify fails ``TPM2_VerifySignature`` (``TpmUnavailable``).
        """
        if len(digest) != _P256_DIGEST_BYTES:
            raise ValueError("the digest must be a 32-byte SHA-256 digest")
        from tpm2_pytss import TPM2B_DIGEST

        ectx = self._ectx
        with _tss_errors("the TPM-only sign path"):
            private, public, _, _, _ = ectx.create(self._primary, None, self._template)
            key = ectx.load(self._primary, private, public)
            try:
                signature = ectx.sign(key, TPM2B_DIGEST(digest), self._scheme)
                ectx.verify_signature(key, TPM2B_DIGEST(digest), signature)
            finally:
                ectx.flush_context(key)

    def close(self) -> None:
        """Flush the storage primary and close the connection; idempotent."""
        if self._ectx is None:
            return
        try:
            with _tss_errors("flushing the storage primary"):
                self._ectx.flush_context(self._primary)
        finally:
            self._ectx.close()
            self._ectx = None

    def __enter__(self) -> TpmSignPath:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
