"""The TPM beside a running fleet, read as an operator would."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec

from workers.keygen.attest import attestation_public_key
from workers.keygen.tpm import Tpm


def fleet_attestation_key(tcti: str) -> ec.EllipticCurvePublicKey:
    """The attestation key as an operator reads it from the TPM beside the running worker."""
    with Tpm(tcti, flush_leftovers=False) as tpm:
        return tpm.with_context("reading the attestation key", attestation_public_key)
