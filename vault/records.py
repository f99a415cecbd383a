"""Key records: one sealed private key version and what the service knows about it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from contracts.errors import IntegrityError
from contracts.models import KeyState, Protection
from vault.sealing import RecordBinding, SealedKey

__all__ = [
    "KeyRecord",
    "KeyStamp",
    "KeyState",
    "RecordMac",
    "check_head",
    "check_replacement",
]


@dataclass(frozen=True, slots=True, repr=False)
class RecordMac:
    """A record's MAC (``vault.record_mac``) and the KEK its MAC key was derived from."""

    kek_id: str
    tag: bytes

    def __repr__(self) -> str:
        return f"RecordMac(kek_id={self.kek_id!r}, tag=<{len(self.tag)} bytes>)"


@dataclass(frozen=True, slots=True, repr=False)
class KeyRecord:
    """One version of a key as the vault stores it; ``sealed`` is None once destroyed.

    ``destroy_after`` is when a scheduled destruction falls due: set while the version is
    ``pending_destruction`` and kept once it is ``destroyed``. ``generation`` counts the
    version's changes (1 when created) and ``mac`` authenticates every field
    (``vault.record_mac``); None only in a vault not upgraded yet. ``attestation`` is the
    TPM's certification of the key (``contracts.attestation.AttestationParts.encode``), None
    for keys made before attestation. ``tpm_blob`` holds a key of protection ``tpm`` instead of
    ``sealed``: its TPM-wrapped private part and its public part, which only the TPM that made
    it can load (``workers.keygen.attest.TpmBoundKey.encode``).
    """

    key_id: str
    version: int
    algorithm: str
    public_key_der: bytes
    sealed: SealedKey | None
    state: KeyState
    label: str | None
    allowed_signers: tuple[str, ...]
    created_at: datetime
    created_by: str
    request_id: str | None
    destroy_after: datetime | None = None
    generation: int = 1
    mac: RecordMac | None = None
    attestation: bytes | None = None
    tpm_blob: bytes | None = None
    rotation_period_s: int | None = None
    next_rotation_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.version < 1:
            raise ValueError("key versions start at 1")
        if self.generation < 1:
            raise ValueError("record generations start at 1")
        if self.rotation_period_s is not None and self.rotation_period_s < 1:
            raise ValueError("a rotation period is a positive number of seconds")
        for moment in (self.created_at, self.destroy_after, self.next_rotation_at):
            if moment is not None and moment.tzinfo is None:
                raise ValueError("record times must be timezone-aware")
        if self.sealed is not None and self.tpm_blob is not None:
            raise ValueError("a record holds sealed material or a TPM-bound key, not both")
        held = self.sealed is not None or self.tpm_blob is not None
        if held == (self.state == KeyState.DESTROYED):
            raise ValueError("a record has key material exactly when it is not destroyed")
        if self.state == KeyState.PENDING_DESTRUCTION and self.destroy_after is None:
            raise ValueError("a version pending destruction needs its destroy_after time")

    @property
    def binding(self) -> RecordBinding:
        """What this record's sealed key is bound to."""
        return RecordBinding(key_id=self.key_id, version=self.version, algorithm=self.algorithm)

    @property
    def protection(self) -> Protection:
        """``tpm`` for a key that never leaves its TPM, else ``exportable``."""
        return "tpm" if self.tpm_blob is not None else "exportable"

    @property
    def kek_id(self) -> str | None:
        """The KEK that sealed this version, None once destroyed."""
        return None if self.sealed is None else self.sealed.kek_id

    @property
    def owner(self) -> str:
        """The principal that created the key; it may manage the key's lifecycle."""
        return self.created_by

    def __repr__(self) -> str:
        destroy_after = None if self.destroy_after is None else self.destroy_after.isoformat()
        return (
            f"KeyRecord(key_id={self.key_id!r}, version={self.version}, "
            f"algorithm={self.algorithm!r}, state={self.state.value!r}, "
            f"sealed={self.sealed!r}, label={self.label!r}, "
            f"allowed_signers={self.allowed_signers!r}, "
            f"created_at={self.created_at.isoformat()!r}, created_by={self.created_by!r}, "
            f"request_id={self.request_id!r}, destroy_after={destroy_after!r}, "
            f"generation={self.generation}, mac={self.mac!r}, "
            f"attested={self.attestation is not None}, protection={self.protection!r}, "
            f"rotation_period_s={self.rotation_period_s!r}, "
            f"next_rotation_at={_iso(self.next_rotation_at)!r})"
        )


class KeyStamp(NamedTuple):
    """What a stored version is recognised by without reading it (``VaultStore.key_stamps``):
    its ``generation`` and its MAC's tag (None for a row without a MAC).

    A tuple, so that the thousands a revalidation of the signer's cache reads cost little to
    make and compare.
    """

    generation: int
    mac_tag: bytes | None

    @classmethod
    def of(cls, record: KeyRecord) -> KeyStamp:
        """The stamp ``record`` would have in the vault."""
        return cls(record.generation, None if record.mac is None else record.mac.tag)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def check_replacement(record: KeyRecord, expected: KeyRecord) -> None:
    """Raise ValueError unless ``record`` may replace ``expected`` (for ``replace_key``).

    Both must be the same version, and every change raises its generation by exactly one:
    that is what lets a reader tell an older copy of a row from the current one.
    """
    if (record.key_id, record.version) != (expected.key_id, expected.version):
        raise ValueError("replace_key needs two versions of the same record")
    if record.generation != expected.generation + 1:
        raise ValueError("replace_key must raise the record generation by exactly one")


def check_head(key_id: str, version: int, generation: int, head: int | None) -> None:
    """Raise IntegrityError when a stored row is older than the head its store keeps for it.

    Every write raises the version's head to the generation written; a row below its head
    was put back from an older copy. A row without a head (from before heads, or whose head
    was deleted) passes: the head is a tripwire beside the row, not a proof.
    """
    if head is not None and generation < head:
        raise IntegrityError(
            f"key {key_id} v{version} is generation {generation}, but the vault wrote "
            f"generation {head}: an older copy of the record was put back"
        )
