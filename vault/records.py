"""Key records: one sealed private key version and what the service knows about it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from vault.sealing import RecordBinding, SealedKey


class KeyState(StrEnum):
    """Lifecycle state of a key version."""

    ENABLED = "enabled"
    DISABLED = "disabled"
    PENDING_DESTRUCTION = "pending_destruction"
    DESTROYED = "destroyed"


@dataclass(frozen=True, slots=True, repr=False)
class KeyRecord:
    """One version of a key as the vault stores it; ``sealed`` is None once destroyed."""

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

    def __post_init__(self) -> None:
        if self.version < 1:
            raise ValueError("key versions start at 1")
        if self.created_at.tzinfo is None:
            raise ValueError("created_at must be timezone-aware")
        if (self.sealed is None) != (self.state == KeyState.DESTROYED):
            raise ValueError("a record has sealed material exactly when it is not destroyed")

    @property
    def binding(self) -> RecordBinding:
        """What this record's sealed key is bound to."""
        return RecordBinding(key_id=self.key_id, version=self.version, algorithm=self.algorithm)

    @property
    def kek_id(self) -> str | None:
        """The KEK that sealed this version, None once destroyed."""
        return None if self.sealed is None else self.sealed.kek_id

    def __repr__(self) -> str:
        return (
            f"KeyRecord(key_id={self.key_id!r}, version={self.version}, "
            f"algorithm={self.algorithm!r}, state={self.state.value!r}, "
            f"sealed={self.sealed!r}, label={self.label!r}, "
            f"allowed_signers={self.allowed_signers!r}, "
            f"created_at={self.created_at.isoformat()!r}, created_by={self.created_by!r}, "
            f"request_id={self.request_id!r})"
        )
