"""The KEK ring's wrapping key, sealed to this host's TPM (a TPM2 sealed-data object).

A TPM seals at most 128 bytes (MAX_SYM_DATA) per object, less than a ring of several KEKs, so
the TPM seals one random 32-byte wrapping key and the ring file holds the ring encrypted
under it (``vault.kek``). The sealed object is a ``keyedhash`` object with no scheme, created
with ``TPM2_Create`` under the storage primary (an ECC P-256 key derived from the owner
hierarchy's seed, the same template as the keygen worker's). Its private part is encrypted by
that primary, which another TPM (another swtpm state) derives differently: the blobs load
only in the TPM that created them, as long as its owner hierarchy is not cleared.

Optionally the object also carries a PCR policy (``TPM2_PolicyPCR`` on a PCR selection such
as ``sha256:0,2,4,7``, the PCR values at sealing time): it then unseals only while those PCRs
hold the same values — the same firmware, boot chain and Secure Boot state on real hardware.
Without it (the default) any process that can use the TPM can unseal the key.
"""

from __future__ import annotations

import base64
import binascii
import random
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from tpm2_pytss import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_RC,
    TPM2_SE,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMA_OBJECT,
    TPML_PCR_SELECTION,
    TPMS_SENSITIVE_CREATE,
    TSS2_Exception,
)

from contracts.errors import ConfigurationError, TpmUnavailable
from workers.keygen.tpm import Tpm

#: How long opening the ring at start-up retries a TPM that fails (not one that refuses it).
UNSEAL_RETRY_S = 10.0
SEALED_KIND = "tpm2-sealed-data/owner-ecc256-storage-primary"

# fixedTPM and fixedParent: the object can never be duplicated out of this TPM. No
# sensitiveDataOrigin: the data is ours. userWithAuth only without a PCR policy, so a policy,
# when there is one, cannot be bypassed with the (empty) auth value.
_SEALED_ATTRIBUTES = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.NODA


class TpmRingSealer:
    """Seals and unseals the ring's wrapping key with the TPM at ``tcti``.

    The TPM is opened for each call and closed again: the supervisor of ``zandd up`` and the
    CLI use it once, while the keygen worker keeps its own connection.
    """

    def __init__(self, tcti: str, *, pcrs: str | None = None) -> None:
        if pcrs is not None:
            _pcr_selection(pcrs)  # refuse a bad selection now, not after the ring is made
        self._tcti = tcti
        self._pcrs = pcrs

    @property
    def description(self) -> str:
        """``the TPM at swtpm:… (PCR policy sha256:0,7)``, for status lines and logs."""
        policy = f" (PCR policy {self._pcrs})" if self._pcrs else " (no PCR policy)"
        return f"the TPM at {self._tcti}{policy}"

    def seal(self, wrapping_key: bytes) -> dict[str, Any]:
        """A JSON-able description of a new TPM object sealing ``wrapping_key``."""
        pcrs = self._pcrs

        def create(ectx: Any, primary: Any) -> tuple[TPM2B_PUBLIC, TPM2B_PRIVATE]:
            template = TPM2B_PUBLIC.parse(
                "keyedhash",
                objectAttributes=_SEALED_ATTRIBUTES
                | (TPMA_OBJECT(0) if pcrs else TPMA_OBJECT.USERWITHAUTH),
                nameAlg="sha256",
            )
            if pcrs:
                template.publicArea.authPolicy = _pcr_policy_digest(ectx, pcrs)
            sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(data=wrapping_key))
            private, public, _, _, _ = ectx.create(primary, sensitive, template)
            return public, private

        with Tpm(self._tcti, flush_leftovers=False) as tpm:
            public, private = tpm.under_storage_primary("sealing the KEK ring", create)
        return {
            "kind": SEALED_KIND,
            "pcrs": pcrs,
            "public": base64.b64encode(public.marshal()).decode("ascii"),
            "private": base64.b64encode(private.marshal()).decode("ascii"),
        }

    def unseal(self, sealed: Mapping[str, Any]) -> bytes:
        """The wrapping key ``sealed`` holds, unsealed by this TPM.

        Raises:
            ConfigurationError: the object is not ours to open (another TPM, a cleared owner
                hierarchy, PCRs that changed, altered blobs).
            TpmUnavailable: the TPM cannot be reached.
        """
        public, private, pcrs = _parse_sealed(sealed)
        deadline_s = time.monotonic() + UNSEAL_RETRY_S
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._unseal_once(public, private, pcrs)
            except TpmUnavailable:
                # The TPM failed, not the object: a swtpm has no resource manager, so workers
                # starting together (each loading the primary and the ring's object) can run
                # out of its three object slots for a moment. Try again, briefly.
                if time.monotonic() >= deadline_s:
                    raise
                time.sleep(random.uniform(0.05, min(1.0, 0.1 * attempt)))  # noqa: S311 - jitter

    def _unseal_once(self, public: TPM2B_PUBLIC, private: TPM2B_PRIVATE, pcrs: str | None) -> bytes:
        with Tpm(self._tcti, flush_leftovers=False) as tpm:
            try:
                key: bytes = tpm.under_storage_primary(
                    "unsealing the KEK ring", _unsealer(public, private, pcrs)
                )
                return key
            except TpmUnavailable as exc:
                reason = _refusal_reason(exc.__cause__)
                if reason is None:
                    raise  # the TPM failed, not the object: retryable, not a wrong ring
                raise ConfigurationError(
                    f"{self.description} cannot unseal the KEK ring: {reason} ({exc.__cause__})"
                ) from exc


def _unsealer(public: TPM2B_PUBLIC, private: TPM2B_PRIVATE, pcrs: str | None) -> Any:
    def unseal(ectx: Any, primary: Any) -> bytes:
        with _flushed(ectx, ectx.load(primary, private, public)) as item:
            if pcrs is None:
                data = ectx.unseal(item)
            else:
                with _flushed(ectx, _policy_session(ectx, trial=False)) as session:
                    ectx.policy_pcr(session, None, _pcr_selection(pcrs))
                    data = ectx.unseal(item, session1=session)
        try:
            return bytes(data.buffer)
        finally:
            # The C copy of the wrapping key; the returned bytes are the caller's to drop.
            for index in range(len(data)):
                data.buffer[index] = 0

    return unseal


def _refusal_reason(cause: BaseException | None) -> str | None:
    """Why the TPM refused to open the sealed object, when it was the object's fault."""
    if not isinstance(cause, TSS2_Exception):
        return None
    if cause.error == TPM2_RC.INTEGRITY:
        # The parent (our storage primary) cannot decrypt the private blob.
        return (
            "it was sealed to another TPM (or this TPM's owner hierarchy was cleared, or the "
            "file was altered)"
        )
    if cause.error == TPM2_RC.POLICY_FAIL:
        return "its PCR policy fails: the PCRs no longer hold the values it was sealed with"
    return None


def _pcr_policy_digest(ectx: Any, pcrs: str) -> bytes:
    with _flushed(ectx, _policy_session(ectx, trial=True)) as session:
        ectx.policy_pcr(session, None, _pcr_selection(pcrs))
        return bytes(ectx.policy_get_digest(session).buffer)


def _policy_session(ectx: Any, *, trial: bool) -> Any:
    return ectx.start_auth_session(
        tpm_key=ESYS_TR.NONE,
        bind=ESYS_TR.NONE,
        session_type=TPM2_SE.TRIAL if trial else TPM2_SE.POLICY,
        symmetric=None,
        auth_hash=TPM2_ALG.SHA256,
    )


@contextmanager
def _flushed(ectx: Any, handle: Any) -> Iterator[Any]:
    try:
        yield handle
    finally:
        ectx.flush_context(handle)


def _pcr_selection(pcrs: str) -> TPML_PCR_SELECTION:
    try:
        return TPML_PCR_SELECTION.parse(pcrs)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigurationError(
            f"invalid PCR selection {pcrs!r}: write it like sha256:0,2,4,7"
        ) from exc


def _parse_sealed(sealed: Mapping[str, Any]) -> tuple[TPM2B_PUBLIC, TPM2B_PRIVATE, str | None]:
    if sealed.get("kind") != SEALED_KIND:
        raise ConfigurationError(
            f"the KEK ring is sealed by an unknown method {sealed.get('kind')!r}"
        )
    pcrs = sealed.get("pcrs")
    try:
        public, _ = TPM2B_PUBLIC.unmarshal(base64.b64decode(sealed["public"], validate=True))
        private, _ = TPM2B_PRIVATE.unmarshal(base64.b64decode(sealed["private"], validate=True))
    except (KeyError, TypeError, ValueError, binascii.Error, TSS2_Exception) as exc:
        raise ConfigurationError("the KEK ring's sealed TPM object is malformed") from exc
    if pcrs is not None and not isinstance(pcrs, str):
        raise ConfigurationError("the KEK ring's sealed TPM object has a malformed PCR policy")
    return public, private, pcrs
