"""Key state transitions, as pure functions every store backend and worker shares.

    enabled ⇄ disabled ──destroy──▶ pending_destruction ──(waiting period over)──▶ destroyed
       └──────────destroy──────────▲        └──cancel_destroy──▶ disabled

Asking for the state a version is already in changes nothing and is not an error, so a
retried request is harmless. Anything else not drawn above is refused with ``key_disabled``
("the key exists but is not in a state that allows this operation").
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta

from contracts.errors import KeyDisabled
from contracts.operations import Operation
from vault.records import KeyRecord, KeyState

_ENABLED, _DISABLED = KeyState.ENABLED, KeyState.DISABLED
_PENDING, _DESTROYED = KeyState.PENDING_DESTRUCTION, KeyState.DESTROYED

#: Operation → {state it may start from: state it leads to}.
_TRANSITIONS: dict[Operation, dict[KeyState, KeyState]] = {
    Operation.KEY_DISABLE: {_ENABLED: _DISABLED, _DISABLED: _DISABLED},
    Operation.KEY_ENABLE: {_DISABLED: _ENABLED, _ENABLED: _ENABLED},
    Operation.KEY_DESTROY: {
        _ENABLED: _PENDING,
        _DISABLED: _PENDING,
        _PENDING: _PENDING,
        _DESTROYED: _DESTROYED,
    },
    Operation.KEY_CANCEL_DESTROY: {_PENDING: _DISABLED, _DISABLED: _DISABLED, _ENABLED: _ENABLED},
}

_WHY_NOT = {
    _PENDING: "cancel its destruction first",
    _DESTROYED: "a destroyed key cannot come back",
}


def transition(
    record: KeyRecord, operation: Operation, *, now: datetime, pending_days: int
) -> KeyRecord:
    """The record after ``operation``: the same record when it is already there.

    ``key.destroy`` schedules destruction ``pending_days`` after ``now`` (a version already
    pending keeps its date). Raises ``KeyDisabled`` for a transition the lifecycle forbids.
    """
    target = _TRANSITIONS[operation].get(record.state)
    if target is None:
        raise KeyDisabled(
            f"key {record.key_id} v{record.version} is {record.state.value}: "
            f"{operation.value} is not possible ({_WHY_NOT[record.state]})"
        )
    if target == record.state:
        return record
    destroy_after = now + timedelta(days=pending_days) if target == _PENDING else None
    return dataclasses.replace(record, state=target, destroy_after=destroy_after)


def is_due(record: KeyRecord, now: datetime) -> bool:
    """Whether a version pending destruction has reached the end of its waiting period."""
    return (
        record.state == _PENDING
        and record.destroy_after is not None
        and record.destroy_after <= now
    )


def destroyed(record: KeyRecord) -> KeyRecord:
    """The version with its sealed material gone; public key, owner and dates kept."""
    if record.state != _PENDING:
        raise ValueError("only a version pending destruction can be destroyed")
    return dataclasses.replace(record, state=_DESTROYED, sealed=None, tpm_blob=None)
