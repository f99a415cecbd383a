"""Operation names: the routing keys and AMQP ``type`` values of wire contract v1."""

from __future__ import annotations

from enum import StrEnum


class Operation(StrEnum):
    """Every operation a producer can request."""

    KEY_CREATE = "key.create"
    SIGN = "sign"
    SIGN_BATCH = "sign.batch"
    KEY_PUBLIC = "key.public"
    KEY_DISABLE = "key.disable"
    KEY_ENABLE = "key.enable"
    KEY_DESTROY = "key.destroy"
    KEY_CANCEL_DESTROY = "key.cancel_destroy"
    #: ``sign`` for a key with protection ``tpm``: the keygen worker signs inside the TPM.
    SIGN_TPM = "sign.tpm"
    # -- issue 15, reads (served by the signers) --
    #: Server-side verification against the record's authenticated public key.
    VERIFY = "verify"
    VERIFY_BATCH = "verify.batch"
    #: The caller's keys (or those it may sign with), paged.
    KEY_LIST = "key.list"
    #: Every version of one key: metadata and public keys, no sealed material.
    KEY_DESCRIBE = "key.describe"
    # -- end issue 15, reads --
    # --- issue 15, key writes (rotation, update) ---
    #: A new TPM-born version of a key, made its primary (the version ``sign`` uses).
    KEY_ROTATE = "key.rotate"
    #: Change a key's label, allowed signers or rotation period.
    KEY_UPDATE = "key.update"
    # --- end issue 15, key writes ---
    # ---- issue 15, aliases ----
    #: Create an alias (``alias/<name>``) or point it at another key of the caller's.
    KEY_ALIAS_SET = "key.alias.set"
    #: Remove an alias (its owner or an admin).
    KEY_ALIAS_DELETE = "key.alias.delete"
    # ---- end issue 15, aliases ----

    @property
    def reply_type(self) -> str:
        """The AMQP ``type`` of a successful reply to this operation."""
        return f"{self.value}.reply"


ERROR_REPLY_TYPE = "error"
#: The AMQP ``type`` of the event published to ``zandd.events`` after a key state change.
KEY_STATE_CHANGED_EVENT = "key.state_changed"
#: The AMQP ``type`` of the event published to ``zandd.events`` after an alias was set or
#: deleted (issue 15, aliases): signers drop their cached resolution of it.
KEY_ALIAS_CHANGED_EVENT = "key.alias_changed"
#: The AMQP ``type`` of a worker's newest audit head on ``zandd.events``.
AUDIT_HEAD_EVENT = "audit.head"
#: The AMQP ``type`` of a TPM-signed audit checkpoint on ``zandd.events``.
AUDIT_CHECKPOINT_EVENT = "audit.checkpoint"

#: Operations served by the single active keygen worker (they touch the TPM or write keys).
KEYGEN_OPERATIONS: tuple[Operation, ...] = (
    Operation.KEY_CREATE,
    Operation.KEY_DISABLE,
    Operation.KEY_ENABLE,
    Operation.KEY_DESTROY,
    Operation.KEY_CANCEL_DESTROY,
    Operation.SIGN_TPM,
    # --- issue 15, key writes ---
    Operation.KEY_ROTATE,
    Operation.KEY_UPDATE,
    # --- end issue 15, key writes ---
    # ---- issue 15, aliases ----
    Operation.KEY_ALIAS_SET,
    Operation.KEY_ALIAS_DELETE,
    # ---- end issue 15, aliases ----
)
#: Operations served by the scaled signer workers.
SIGN_OPERATIONS: tuple[Operation, ...] = (
    Operation.SIGN,
    Operation.SIGN_BATCH,
    Operation.KEY_PUBLIC,
    # -- issue 15, reads --
    Operation.VERIFY,
    Operation.VERIFY_BATCH,
    Operation.KEY_LIST,
    Operation.KEY_DESCRIBE,
    # -- end issue 15, reads --
)
#: Operations that must carry a ``message_id`` (it is their idempotency key).
IDEMPOTENT_OPERATIONS: frozenset[Operation] = frozenset(
    {
        Operation.KEY_CREATE,
        # --- issue 15, key writes ---
        Operation.KEY_ROTATE,
        # --- end issue 15, key writes ---
    }
)
# ---- issue 15, aliases ----
#: Operations whose ``key_id`` may be an alias (``alias/<name>``), resolved by the worker
#: that serves them; their replies name the real key id. The lifecycle operations
#: (disable, enable, destroy, cancel_destroy) take key ids only: a destruction must never
#: follow an alias that was re-pointed between the caller's look-up and its request.
ALIAS_OPERATIONS: frozenset[Operation] = frozenset(
    {
        Operation.SIGN,
        Operation.SIGN_BATCH,
        Operation.SIGN_TPM,
        Operation.KEY_PUBLIC,
        Operation.VERIFY,
        Operation.VERIFY_BATCH,
        Operation.KEY_DESCRIBE,
        Operation.KEY_ROTATE,
        Operation.KEY_UPDATE,
    }
)
# ---- end issue 15, aliases ----
