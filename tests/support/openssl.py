"""Signatures checked by OpenSSL, a verifier that shares no code with the project."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path


def verify_files(
    directory: Path,
    *,
    public_pem: str = "public.pem",
    signature_der: str = "signature.der",
    message: str = "message.bin",
) -> subprocess.CompletedProcess[str]:
    """Run ``openssl dgst -sha256 -verify`` on files already in ``directory`` (names relative)."""
    return subprocess.run(
        [
            *("openssl", "dgst", "-sha256", "-verify", public_pem),
            *("-signature", signature_der, message),
        ],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def openssl_verify(directory: Path, public_pem: str, message: bytes, signature_der: bytes) -> str:
    """Write the three to fresh files in ``directory`` and verify them; returns OpenSSL's output.

    The output is ``Verified OK`` on success; the files have new names on every call, so one
    directory serves several checks.
    """
    name = uuid.uuid4().hex
    (directory / f"{name}.pem").write_text(public_pem)
    (directory / f"{name}.msg").write_bytes(message)
    (directory / f"{name}.sig").write_bytes(signature_der)
    result = verify_files(
        directory, public_pem=f"{name}.pem", signature_der=f"{name}.sig", message=f"{name}.msg"
    )
    return (result.stdout + result.stderr).strip()


# -- algorithms (issue 15) --
def openssl_verify_algorithm(
    directory: Path, algorithm: str, public_pem: str, message: bytes, signature: bytes
) -> str:
    """Verify a signature of any contract algorithm (DER for ECDSA) with ``openssl dgst``:
    the algorithm's hash, and for PSS ``rsa_padding_mode:pss`` with a 32-byte salt (MGF1 uses
    the digest's hash). Returns OpenSSL's output (``Verified OK`` on success)."""
    name = uuid.uuid4().hex
    (directory / f"{name}.pem").write_text(public_pem)
    (directory / f"{name}.msg").write_bytes(message)
    (directory / f"{name}.sig").write_bytes(signature)
    digest = "-sha384" if algorithm.endswith("sha384") else "-sha256"
    options: list[str] = []
    if algorithm.startswith("rsa-pss-"):
        options = ["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:32"]
    result = subprocess.run(
        [
            *("openssl", "dgst", digest, "-verify", f"{name}.pem", *options),
            *("-signature", f"{name}.sig", f"{name}.msg"),
        ],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return (result.stdout + result.stderr).strip()


# -- end algorithms --
