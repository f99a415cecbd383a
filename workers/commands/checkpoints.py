"""TPM-signed audit checkpoints from a shell: ``zandd audit checkpoints`` and
``zandd tpm checkpoint-key``, and what ``zandd audit verify --checkpoint-key`` reads."""

from __future__ import annotations

import argparse
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from contracts.errors import ConfigurationError
from contracts.models import AuditCheckpointEvent
from vault.audit_checkpoint import Checkpoint, all_checkpoints
from workers.audit.audit_checkpoint import checkpoint_event, event_checkpoint
from workers.commands.base import TPM, VAULT, CommandTree
from workers.commands.local import opened_store, printable, when
from workers.service.config import Settings

#: ``--checkpoint-key tpm``: read the key from the TPM (not beside a running keygen worker on
#: a TPM that serves one client, such as swtpm).
FROM_TPM = "tpm"


def load_checkpoint_key(source: str, settings: Settings) -> ec.EllipticCurvePublicKey:
    """The checkpoint public key from a PEM file, or from the TPM for ``tpm``."""
    if source == FROM_TPM:
        return _key_from_tpm(settings)
    try:
        key = serialization.load_pem_public_key(Path(source).read_bytes())
    except OSError as exc:
        raise ConfigurationError(f"cannot read the checkpoint key {source}: {exc}") from None
    except ValueError:
        raise ConfigurationError(f"{source} is not a PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ConfigurationError(f"{source} is not a P-256 public key")
    return key


def _key_from_tpm(settings: Settings) -> ec.EllipticCurvePublicKey:
    from workers.keygen.checkpoint_key import checkpoint_public_key
    from workers.keygen.tpm import Tpm
    from workers.service.serve import resolve_tcti

    # flush_leftovers=False: the objects a TPM without a resource manager holds may be a
    # running keygen worker's.
    with Tpm(resolve_tcti(settings), flush_leftovers=False) as tpm:
        return checkpoint_public_key(tpm)


def read_exported(path: Path) -> list[Checkpoint]:
    """Checkpoints from a file of ``audit.checkpoint`` events, one JSON object per line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read the checkpoint file {path}: {exc}") from None
    found = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            found.append(event_checkpoint(AuditCheckpointEvent.model_validate_json(line)))
        except ValidationError:
            raise ConfigurationError(
                f"{path} line {number} is not an audit.checkpoint event"
            ) from None
    return found


async def _cmd_audit_checkpoints(args: argparse.Namespace, settings: Settings) -> int:
    async with opened_store(settings) as store:
        checkpoints = await all_checkpoints(store)
    for checkpoint in checkpoints:
        if args.jsonl:
            print(checkpoint_event(checkpoint).model_dump_json())
        else:
            print(
                f"#{checkpoint.seq} {when(checkpoint.at)} {printable(checkpoint.link)} "
                f"signature={checkpoint.signature.hex()}"
            )
    return 0


async def _cmd_tpm_checkpoint_key(args: argparse.Namespace, settings: Settings) -> int:
    from workers.keygen.checkpoint_key import public_key_pem

    print(public_key_pem(_key_from_tpm(settings)), end="")
    return 0


def register(tree: CommandTree) -> None:
    """Add the checkpoint commands."""
    listing = tree.add(
        "audit checkpoints",
        _cmd_audit_checkpoints,
        "list the TPM-signed audit checkpoints in the vault (--jsonl to ship them elsewhere)",
        settings=VAULT,
    )
    listing.add_argument(
        "--jsonl",
        action="store_true",
        help="one audit.checkpoint event per line, for zandd audit verify --checkpoints",
    )
    tree.add(
        "tpm checkpoint-key",
        _cmd_tpm_checkpoint_key,
        "print the TPM's audit checkpoint public key (PEM)",
        settings=TPM,
    )
