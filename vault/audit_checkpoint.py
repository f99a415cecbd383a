"""TPM-signed audit checkpoints: the audit chain's head, vouched for by a key nobody can copy.

A keyed chain (``vault/audit_chain.py``) stops a vault writer without the KEK ring; one who
holds the ring can cut the newest entries and link new ones in their place, and every link
checks. A checkpoint closes that, back to the last checkpoint: every N entries or T seconds
the keygen worker has the TPM sign the newest entry's sequence number and link, with a
signing key that never leaves the TPM (``workers/keygen/checkpoint_key.py``). The ring does not
help forge one, and a log that no longer reaches a checkpoint, or holds another entry at its
number, fails ``zandd audit verify``.

The signed bytes are the SHA-256 of a canonical JSON document (sorted keys, no spaces, UTF-8)
``{"format": "zandd-audit-checkpoint/1", "seq": ..., "link": ..., "at": ...}``, ``at`` UTC
with millisecond precision; the signature is ECDSA P-256, DER-encoded. Anyone with the public
key (``zandd tpm checkpoint-key``) checks one offline (:func:`verify_checkpoint`).

What a checkpoint cannot show: entries after the newest one (cut them and nothing tells), and
checkpoints removed from the vault itself — keep a copy elsewhere (``zandd audit checkpoints
--jsonl``, or the ``audit.checkpoint`` events on ``zandd.events``) and verify against it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from contracts.errors import IntegrityError

CHECKPOINT_FORMAT = "zandd-audit-checkpoint/1"
#: A DER ECDSA P-256 signature is at most 72 bytes; anything longer is not one.
MAX_SIGNATURE_BYTES = 80
READ_PAGE_CHECKPOINTS = 1000


def _checkpoint_time(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("checkpoint times must be timezone-aware")
    moment = moment.astimezone(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Audit entry ``seq`` had link ``link`` at ``at``: signed by the TPM's checkpoint key."""

    seq: int
    link: str
    at: datetime
    signature: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "at", _checkpoint_time(self.at))


def signed_bytes(seq: int, link: str, at: datetime) -> bytes:
    """The canonical document a checkpoint's signature is over (its SHA-256, that is)."""
    document = {
        "format": CHECKPOINT_FORMAT,
        "seq": seq,
        "link": link,
        "at": _checkpoint_time(at).isoformat(timespec="milliseconds"),
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def signed_digest(seq: int, link: str, at: datetime) -> bytes:
    """The SHA-256 the TPM signs (TPM2_Sign takes a digest)."""
    return hashlib.sha256(signed_bytes(seq, link, at)).digest()


class CheckpointForged(IntegrityError):
    """A checkpoint's signature does not verify under the checkpoint key."""

    def __init__(self, seq: int) -> None:
        super().__init__(
            f"audit checkpoint #{seq} has a bad signature: it was forged or altered, or made "
            "by another TPM key than the one given"
        )
        self.seq = seq


def verify_checkpoint(checkpoint: Checkpoint, public_key: ec.EllipticCurvePublicKey) -> None:
    """Raise ``CheckpointForged`` unless ``public_key`` signed this checkpoint."""
    digest = signed_digest(checkpoint.seq, checkpoint.link, checkpoint.at)
    if len(checkpoint.signature) > MAX_SIGNATURE_BYTES:
        raise CheckpointForged(checkpoint.seq)
    try:
        public_key.verify(checkpoint.signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    except (InvalidSignature, ValueError):
        raise CheckpointForged(checkpoint.seq) from None


def by_seq(checkpoints: Iterable[Checkpoint]) -> dict[int, Checkpoint]:
    """Checkpoints by sequence number; two different links at one number are a contradiction.

    Two signed checkpoints that disagree on one entry mean the log was rewritten between them
    (by someone whose rewritten head the keygen worker then signed): refused, not chosen.
    """
    found: dict[int, Checkpoint] = {}
    for checkpoint in checkpoints:
        earlier = found.get(checkpoint.seq)
        if earlier is not None and earlier.link != checkpoint.link:
            raise IntegrityError(
                f"two audit checkpoints #{checkpoint.seq} name different entries: the log was "
                "rewritten between them"
            )
        found.setdefault(checkpoint.seq, checkpoint)
    return found


class CheckpointStore(Protocol):
    """The part of a vault store that keeps checkpoints."""

    async def add_checkpoint(self, checkpoint: Checkpoint) -> bool:
        """Store ``checkpoint`` durably; False (and nothing stored) when its number has one."""
        ...

    async def read_checkpoints(
        self, after_seq: int = 0, limit: int = READ_PAGE_CHECKPOINTS, *, latest: bool = False
    ) -> list[Checkpoint]:
        """Checkpoints after ``after_seq`` (or the newest ``limit`` with ``latest``), oldest
        first."""
        ...


async def all_checkpoints(store: CheckpointStore) -> list[Checkpoint]:
    """Every checkpoint the store holds, oldest first."""
    found: list[Checkpoint] = []
    while True:
        page = await store.read_checkpoints(found[-1].seq if found else 0)
        found += page
        if len(page) < READ_PAGE_CHECKPOINTS:
            return found


def check_signatures(
    checkpoints: Sequence[Checkpoint], public_key: ec.EllipticCurvePublicKey
) -> dict[int, Checkpoint]:
    """Verify every checkpoint's signature; the checkpoints by sequence number."""
    for checkpoint in checkpoints:
        verify_checkpoint(checkpoint, public_key)
    return by_seq(checkpoints)
