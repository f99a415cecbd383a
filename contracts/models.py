"""Pydantic models of wire contract v1: one request and one reply model per operation.

Requests are validated strictly (unknown fields, wrong types and bad base64 are refused)
straight from the AMQP body bytes; replies ignore fields they do not know, so a v1 client
keeps working when a later v1.x server adds one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)

from contracts.algorithms import AlgorithmName, algorithm_spec
from contracts.errors import ErrorCode, InvalidRequest
from contracts.limits import DEFAULT_LIMITS, Limits, limits_from, structure_count
from contracts.operations import Operation

ALGORITHM_ECDSA_P256_SHA256: Final = "ecdsa-p256-sha256"
DIGEST_SIZE_BYTES = 32
#: The digest sizes a request may carry: SHA-256 (32) and, for ``ecdsa-p384-sha384``, SHA-384
#: (48). The signer checks the size against the key's algorithm.
DIGEST_SIZES_BYTES: Final = (32, 48)
DEFAULT_PENDING_DAYS = 7
MAX_PENDING_DAYS = 365
# --- issue 15, key writes: rotation periods ---
#: Bounds of a key's ``rotation_period`` in seconds: a day (as Cloud KMS) to ten years.
MIN_ROTATION_PERIOD_S: Final = 86_400
MAX_ROTATION_PERIOD_S: Final = 3650 * 86_400
#: A key's automatic rotation period in seconds (``null``/absent: never rotated on its own).
RotationPeriod = Annotated[
    int, Field(ge=MIN_ROTATION_PERIOD_S, le=MAX_ROTATION_PERIOD_S, strict=True)
]
# --- end issue 15, key writes ---


class KeyState(StrEnum):
    """Lifecycle state of a key version, as the cloud KMSs have them.

    ``enabled`` ⇄ ``disabled`` → ``pending_destruction`` (cancellable back to ``disabled``) →
    ``destroyed`` (sealed material erased; the public key and the audit trail stay).
    """

    ENABLED = "enabled"
    DISABLED = "disabled"
    PENDING_DESTRUCTION = "pending_destruction"
    DESTROYED = "destroyed"


def _decode_base64(value: object, info: ValidationInfo) -> bytes:
    # Python callers may hand over bytes directly; on the wire only a base64 string is valid.
    if isinstance(value, bytes) and info.mode == "python":
        return value
    if not isinstance(value, str):
        raise ValueError("must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("must be standard base64 with padding (RFC 4648 section 4)") from exc


def _encode_base64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


Base64Bytes = Annotated[
    bytes,
    PlainValidator(_decode_base64),
    PlainSerializer(_encode_base64, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "contentEncoding": "base64"}),
]
KeyId = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"), Field(strict=True)
]
# ---- issue 15, aliases ----
#: An alias: ``alias/`` then 1 to 128 of ``[A-Za-z0-9._-]``. Never a key id: key ids cannot
#: hold a ``/``, so no key id reads as an alias nor an alias as a key id.
ALIAS_PREFIX: Final = "alias/"
ALIAS_PATTERN: Final = r"^alias/[A-Za-z0-9._-]{1,128}$"
AliasName = Annotated[str, StringConstraints(pattern=ALIAS_PATTERN), Field(strict=True)]
#: Where a key id is on the wire of the operations in ``ALIAS_OPERATIONS``: a key id or an
#: alias, which the serving worker resolves (replies name the real key id).
KeyRef = Annotated[
    str,
    StringConstraints(
        pattern=r"^(?:[A-Za-z0-9][A-Za-z0-9._:-]{0,127}|alias/[A-Za-z0-9._-]{1,128})$"
    ),
    Field(strict=True),
]


def is_alias(key_ref: str) -> bool:
    """Whether ``key_ref`` (a validated ``KeyRef``) is an alias rather than a key id."""
    return key_ref.startswith(ALIAS_PREFIX)


# ---- end issue 15, aliases ----
#: Versions count from 1; the upper bound keeps every integer storable (SQLite's INTEGER is 64
#: bits, BSON's int32/int64) and printable, whatever a caller sends.
MAX_VERSION = 2**31 - 1
Version = Annotated[int, Field(ge=1, le=MAX_VERSION, strict=True)]
Principal = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f]{1,128}$")]
Encoding = Literal["der", "raw"]
#: ``exportable``: generated in the TPM, exported once, sealed in the vault, signed with by the
#: signers. ``tpm``: never leaves the TPM (``fixedTPM|fixedParent``); ``sign.tpm`` signs in it.
Protection = Literal["exportable", "tpm"]
Algorithm = AlgorithmName


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


def _check_payload(message: bytes | None, digest: bytes | None, info: ValidationInfo) -> None:
    if (message is None) == (digest is None):
        raise ValueError("exactly one of 'message' or 'digest' is required")
    if digest is not None and len(digest) not in DIGEST_SIZES_BYTES:
        raise ValueError(
            "'digest' must be a 32-byte SHA-256 digest (48-byte SHA-384 for ecdsa-p384-sha384)"
        )
    limit = limits_from(info).max_message_bytes
    if message is not None and len(message) > limit:
        raise ValueError(f"'message' is larger than the limit of {limit} bytes")


class KeyCreateRequest(_Request):
    """``key.create``: make a new key inside the TPM and store it sealed; ``algorithm`` is one
    of ``contracts.algorithms`` (ECDSA P-256/P-384, RSA 2048/3072 PKCS#1 v1.5 or PSS)."""

    label: Annotated[str, StringConstraints(max_length=256)] | None = None
    algorithm: Algorithm = ALGORITHM_ECDSA_P256_SHA256
    allowed_signers: Annotated[list[Principal], Field(max_length=256)] | None = None
    protection: Protection = "exportable"
    # issue 15, key writes: rotated automatically every this many seconds (none when absent).
    rotation_period: RotationPeriod | None = None


class SignPayload(_Request):
    """What to sign: the message itself, or its digest (SHA-256; SHA-384 for
    ``ecdsa-p384-sha384``)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        json_schema_extra={"oneOf": [{"required": ["message"]}, {"required": ["digest"]}]},
    )

    message: Base64Bytes | None = None
    digest: Base64Bytes | None = None

    @model_validator(mode="after")
    def _one_payload(self, info: ValidationInfo) -> SignPayload:
        _check_payload(self.message, self.digest, info)
        return self

    def sha256_digest(self) -> bytes:
        """The digest that gets signed (computed from ``message`` when that was sent)."""
        if self.digest is not None:
            return self.digest
        assert self.message is not None  # guaranteed by the validator
        return hashlib.sha256(self.message).digest()

    def digest_for(self, algorithm: str) -> bytes:
        """The digest ``algorithm`` signs: ``digest`` when sent (its size checked against the
        algorithm's hash), else the hash of ``message``; InvalidRequest on a size mismatch."""
        spec = algorithm_spec(algorithm)
        if self.digest is not None:
            if len(self.digest) != spec.digest_bytes:
                raise InvalidRequest(
                    f"'digest' must have {spec.digest_bytes} bytes for a key of {spec.name} "
                    f"({spec.hash_name.upper()})"
                )
            return self.digest
        assert self.message is not None  # guaranteed by the validator
        return spec.digest(self.message)


class SignRequest(SignPayload):
    """``sign``: one signature over a message or a digest (also ``sign.tpm``, for a key with
    protection ``tpm``, served by the keygen worker)."""

    key_id: KeyRef
    version: Version | None = None
    encoding: Encoding = "der"


def _check_batch_size(items: Sequence[object], info: ValidationInfo) -> None:
    """A batch holds at most the worker's ``max_batch_items`` (``contracts/limits.py``)."""
    limit = limits_from(info).max_batch_items
    if len(items) > limit:
        raise ValueError(f"'items' has more than the limit of {limit} entries")


class SignBatchRequest(_Request):
    """``sign.batch``: several signatures with one key, returned in item order."""

    key_id: KeyRef
    version: Version | None = None
    items: Annotated[list[SignPayload], Field(min_length=1)]
    encoding: Encoding = "der"

    @model_validator(mode="after")
    def _batch_size(self, info: ValidationInfo) -> SignBatchRequest:
        _check_batch_size(self.items, info)
        return self


class KeyPublicRequest(_Request):
    """``key.public``: the public half of a key, as PEM and JWK.

    ``all_versions`` (issue 15) adds every version's public key to the reply (``versions``);
    the top-level fields stay those of the primary version, so it goes without ``version``.
    """

    key_id: KeyRef
    version: Version | None = None
    all_versions: Annotated[bool, Field(strict=True)] = False

    @model_validator(mode="after")
    def _one_version_or_all(self) -> KeyPublicRequest:
        if self.all_versions and self.version is not None:
            raise ValueError("'version' and 'all_versions' exclude each other")
        return self


class KeyStateRequest(_Request):
    """``key.disable``, ``key.enable``, ``key.cancel_destroy``: change a key's state.

    Without ``version`` the change applies to every version of the key not yet destroyed.
    Only the key's owner and the configured admins may ask.
    """

    key_id: KeyId
    version: Version | None = None


class KeyDestroyRequest(KeyStateRequest):
    """``key.destroy``: schedule destruction after ``pending_days`` (cancellable until then)."""

    pending_days: Annotated[int, Field(ge=1, le=MAX_PENDING_DAYS, strict=True)] = (
        DEFAULT_PENDING_DAYS
    )


class KeyAttestation(_Reply):
    """The TPM's certification of a key (``TPM2_Certify`` with the fleet attestation key).

    ``public_area`` is the key's ``TPMT_PUBLIC``, ``certify_info`` the ``TPMS_ATTEST`` the TPM
    signed, ``signature`` the attestation key's ECDSA P-256/SHA-256 signature over it (DER).
    Check it with ``contracts.attestation.verify_attestation`` and an attestation key pinned
    out of band (``zandd tpm attestation-key``), never one the fleet hands over:
    ``attestation_key_pem`` only names the key that signed (to see which TPM made the key, or
    to pin it on first use), as the vault says.
    """

    public_area: Base64Bytes
    certify_info: Base64Bytes
    signature: Base64Bytes
    attestation_key_pem: str | None = None


class KeyCreateReply(_Reply):
    """Reply to ``key.create``; ``attestation`` is absent for keys made before attestation."""

    key_id: str
    version: int
    algorithm: str
    public_key_pem: str
    created_at: AwareDatetime
    attestation: KeyAttestation | None = None
    protection: Protection = "exportable"
    # issue 15, key writes (absent from older servers: no automatic rotation).
    rotation_period: int | None = None
    next_rotation_at: AwareDatetime | None = None
    #: The label the key was created with (absent from older servers, as is a key without).
    label: str | None = None


#: An audit link: ``hmac-sha256/<kek_id>/<64 hex>`` (keyed) or 64 hex (legacy).
AUDIT_LINK_PATTERN: Final = r"^[A-Za-z0-9._/-]+$"
MAX_AUDIT_LINK_CHARS: Final = 160


class Receipt(_Reply):
    """Where a request's audit entry stands in the chain: its sequence number and its link.

    Find it with ``zandd audit show SEQ``; its ``sha256`` is the request's data digest. A
    later TPM-signed checkpoint (``audit.checkpoint``) at or after ``seq`` vouches for it.
    """

    seq: int = Field(ge=1)
    link: str = Field(max_length=MAX_AUDIT_LINK_CHARS, pattern=AUDIT_LINK_PATTERN)


class SignReply(_Reply):
    """Reply to ``sign`` and ``sign.tpm``; ``receipt`` (v1.1, absent from older workers) names
    its audit entry."""

    key_id: str
    version: int
    algorithm: str
    encoding: Encoding
    signature: Base64Bytes
    receipt: Receipt | None = None
    protection: Protection = "exportable"


class SignBatchReply(_Reply):
    """Reply to ``sign.batch``: ``signatures[i]`` signs ``items[i]``; ``receipt`` (v1.1) names
    the batch's one audit entry."""

    key_id: str
    version: int
    algorithm: str
    encoding: Encoding
    signatures: list[Base64Bytes]
    receipt: Receipt | None = None


class EcPublicJwk(_Reply):
    """An EC public key as a JSON Web Key (RFC 7517/7518), coordinates base64url unpadded."""

    kty: Literal["EC"] = "EC"
    crv: Literal["P-256", "P-384"] = "P-256"
    x: str
    y: str
    alg: Literal["ES256", "ES384"] = "ES256"
    use: Literal["sig"] = "sig"
    kid: str


class RsaPublicJwk(_Reply):
    """An RSA public key as a JSON Web Key (RFC 7518 6.3), ``n`` and ``e`` base64url unpadded;
    ``alg`` says the padding (``RS256`` PKCS#1 v1.5, ``PS256`` PSS)."""

    kty: Literal["RSA"] = "RSA"
    n: str
    e: str
    alg: Literal["RS256", "PS256"]
    use: Literal["sig"] = "sig"
    kid: str


#: ``key.public``'s JWK, told apart by ``kty``.
PublicJwk = Annotated[EcPublicJwk | RsaPublicJwk, Field(discriminator="kty")]


class KeyPublicVersion(_Reply):
    """One version's public key in a ``key.public`` reply asked with ``all_versions``."""

    version: int
    algorithm: str
    public_key_pem: str
    public_key_jwk: PublicJwk
    attestation: KeyAttestation | None = None
    protection: Protection = "exportable"


class KeyPublicReply(_Reply):
    """Reply to ``key.public``; ``attestation`` is absent for keys made before attestation.

    ``versions`` (issue 15) comes only when the request asked for ``all_versions``: every
    version of the key by version number, destroyed ones too (their public keys stay).
    """

    key_id: str
    version: int
    algorithm: str
    public_key_pem: str
    public_key_jwk: PublicJwk
    attestation: KeyAttestation | None = None
    protection: Protection = "exportable"
    versions: list[KeyPublicVersion] | None = None


class KeyVersionState(_Reply):
    """The state of one key version; ``destroy_after`` is set once destruction is scheduled."""

    version: int
    state: KeyState
    destroy_after: AwareDatetime | None = None


class KeyStateReply(_Reply):
    """Reply to the lifecycle operations: the resulting state of every version addressed."""

    key_id: str
    versions: list[KeyVersionState]


class KeyStateChangedEvent(_Reply):
    """Published to the fanout exchange ``zandd.events`` after each committed state change.

    AMQP ``type`` ``key.state_changed``, ``content_type`` ``application/json``, one message per
    key version. Also sent again when a lifecycle request finds the key already in the asked
    state, so a retried request repairs an event that was lost. ``generation`` is the vault
    record's generation after the change: signers refuse any older copy of the record from
    then on (absent from publishers that predate it).
    """

    key_id: str
    version: int
    state: KeyState
    destroy_after: AwareDatetime | None = None
    changed_at: AwareDatetime
    generation: Annotated[int, Field(ge=1, lt=2**63, strict=True)] | None = None


# --- issue 15, key writes: key.rotate, key.update ---


class KeyRotateRequest(_Request):
    """``key.rotate``: a new TPM-born version of the key (same algorithm, protection, owner,
    label, allowed signers and rotation period), made its primary: ``sign`` without a
    ``version`` uses it from the reply on. Older versions keep their state: they still sign
    when asked by number and verify. Idempotent on the request's ``message_id`` (required),
    for the key's owner and the admins."""

    key_id: KeyRef


class KeyRotateReply(_Reply):
    """Reply to ``key.rotate``: the new primary version; ``public_key_jwk.kid`` names it."""

    key_id: str
    version: int
    algorithm: str
    public_key_pem: str
    public_key_jwk: PublicJwk
    created_at: AwareDatetime
    attestation: KeyAttestation | None = None
    protection: Protection = "exportable"
    rotation_period: int | None = None
    next_rotation_at: AwareDatetime | None = None


_UPDATABLE = ("label", "allowed_signers", "rotation_period")


class KeyUpdateRequest(_Request):
    """``key.update``: change what a key's owner or an admin may change, on every version.

    A field left out stays as it is; ``null`` resets it: no label, the owner as the only
    signer, no automatic rotation. At least one field must be given. A new
    ``rotation_period`` counts from the update (the next rotation is then + period).
    """

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        json_schema_extra={"anyOf": [{"required": [name]} for name in _UPDATABLE]},
    )

    key_id: KeyRef
    label: Annotated[str, StringConstraints(max_length=256)] | None = None
    allowed_signers: Annotated[list[Principal], Field(max_length=256)] | None = None
    rotation_period: RotationPeriod | None = None

    @model_validator(mode="after")
    def _something_to_change(self) -> KeyUpdateRequest:
        if not self.changes:
            raise ValueError(f"give at least one of {', '.join(map(repr, _UPDATABLE))}")
        return self

    @property
    def changes(self) -> frozenset[str]:
        """The fields the request sets (to a value or to ``null``)."""
        return frozenset(self.model_fields_set & set(_UPDATABLE))


class KeyUpdateReply(_Reply):
    """Reply to ``key.update``: the key's settings after it, and its versions' states."""

    key_id: str
    primary_version: int
    label: str | None = None
    allowed_signers: list[str]
    rotation_period: int | None = None
    next_rotation_at: AwareDatetime | None = None
    versions: list[KeyVersionState]


# --- end issue 15, key writes ---

#: The longest retry-after hint a reply may carry; a client waits no longer than this.
MAX_RETRY_AFTER_MS = 3_600_000


class AuditHeadEvent(_Reply):
    """The newest audit entry a worker wrote, published to ``zandd.events`` every N entries or
    T seconds (AMQP ``type`` ``audit.head``): keep it outside the vault, and ``zandd audit verify
    --head SEQ:LINK`` shows whether the log still reaches it — a cut of the newest entries does
    not. ``link`` is the entry's link (``hmac-sha256/<kek_id>/<hex>``, or 64 hex if legacy)."""

    seq: int = Field(ge=0)
    link: str = Field(max_length=MAX_AUDIT_LINK_CHARS, pattern=AUDIT_LINK_PATTERN)
    published_at: AwareDatetime


class AuditCheckpointEvent(_Reply):
    """A TPM-signed audit checkpoint, published to ``zandd.events`` (AMQP ``type``
    ``audit.checkpoint``) and stored in the vault: the keygen worker's TPM-resident checkpoint
    key signed ``seq``, ``link`` and ``at`` (see ``vault/audit_checkpoint.py`` for the signed
    bytes). ``signature`` is ECDSA P-256 over SHA-256, DER, base64; check it with the key
    ``zandd tpm checkpoint-key`` prints. Keep these elsewhere: ``zandd audit verify
    --checkpoints FILE`` shows a log cut back before any of them, even by a ring holder."""

    seq: int = Field(ge=1)
    link: str = Field(max_length=MAX_AUDIT_LINK_CHARS, pattern=AUDIT_LINK_PATTERN)
    at: AwareDatetime
    signature: Base64Bytes


class ErrorReply(_Reply):
    """The reply of AMQP ``type`` ``error``, for any operation that failed.

    ``retry_after_ms`` comes only with ``throttled`` (omitted otherwise): how long to wait
    before sending the request again.
    """

    code: ErrorCode
    message: str
    retryable: bool
    retry_after_ms: Annotated[int, Field(ge=0, le=MAX_RETRY_AFTER_MS)] | None = None


# -- issue 15, reads: verify, verify.batch, key.list, key.describe -------------------------

#: The longest signature ``verify`` takes: an RSA-4096 signature is 512 bytes, a DER ECDSA
#: P-521 one 139; anything longer signs nothing and is refused unread.
MAX_SIGNATURE_BYTES = 1024
#: ``key.list`` pages: at most this many keys per reply (``page_size``), 100 by default.
MAX_LIST_PAGE_SIZE = 1000
DEFAULT_LIST_PAGE_SIZE = 100
#: An opaque ``key.list`` cursor: base64url text, as the service hands it out.
MAX_CURSOR_CHARS = 256
Signature = Annotated[
    bytes,
    PlainValidator(_decode_base64),
    PlainSerializer(_encode_base64, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "contentEncoding": "base64", "maxLength": 1368}),
]
#: ``owned``: keys the caller created; ``signable``: keys whose ``allowed_signers`` name the
#: caller (or ``*``); ``all``: every key (admins only).
ListScope = Literal["owned", "signable", "all"]
Label = Annotated[str, StringConstraints(max_length=256), Field(strict=True)]
Cursor = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,256}$"), Field(strict=True)]


def _check_signature(signature: bytes) -> None:
    if not signature:
        raise ValueError("'signature' is empty")
    if len(signature) > MAX_SIGNATURE_BYTES:
        raise ValueError(f"'signature' is longer than {MAX_SIGNATURE_BYTES} bytes")


class VerifyItem(SignPayload):
    """One ``verify.batch`` item: the message (or its digest) and the signature over it."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        json_schema_extra={"oneOf": [{"required": ["message"]}, {"required": ["digest"]}]},
    )

    signature: Signature

    @model_validator(mode="after")
    def _bounded_signature(self) -> VerifyItem:
        _check_signature(self.signature)
        return self


class VerifyRequest(VerifyItem):
    """``verify``: is ``signature`` a signature by the key over the message (or digest)?

    Checked against the public key of the vault record (its MAC checked), never a private
    key. ``version`` omitted: the key's current version (a DER or raw signature does not
    name the version that made it). An invalid signature is a reply with ``valid: false``.
    """

    key_id: KeyRef
    version: Version | None = None
    encoding: Encoding = "der"


class VerifyBatchRequest(_Request):
    """``verify.batch``: several signatures under one key version, answered in item order."""

    key_id: KeyRef
    version: Version | None = None
    items: Annotated[list[VerifyItem], Field(min_length=1)]
    encoding: Encoding = "der"

    @model_validator(mode="after")
    def _batch_size(self, info: ValidationInfo) -> VerifyBatchRequest:
        _check_batch_size(self.items, info)
        return self


class VerifyReply(_Reply):
    """Reply to ``verify``: ``valid`` says whether the signature holds for that version."""

    key_id: str
    version: int
    algorithm: str
    encoding: Encoding
    valid: bool


class VerifyBatchReply(_Reply):
    """Reply to ``verify.batch``: ``valid[i]`` is the verdict on ``items[i]``."""

    key_id: str
    version: int
    algorithm: str
    encoding: Encoding
    valid: list[bool]


class KeyListRequest(_Request):
    """``key.list``: one page of keys, ordered by key id; follow ``next_cursor`` for more.

    A page may hold fewer than ``page_size`` keys while more follow: only a reply without
    ``next_cursor`` is the last. ``label`` matches exactly; ``state`` is the current
    version's.
    """

    scope: ListScope = "owned"
    label: Label | None = None
    state: KeyState | None = None
    # issue 15, aliases: only the key this alias points at (if it is in the scope).
    alias: AliasName | None = None
    page_size: Annotated[int, Field(ge=1, le=MAX_LIST_PAGE_SIZE, strict=True)] = (
        DEFAULT_LIST_PAGE_SIZE
    )
    cursor: Cursor | None = None


class KeySummary(_Reply):
    """A key in a ``key.list`` page: its current version's metadata, never key material.

    ``owner`` and ``allowed_signers`` are shown to the key's owner and admins only (absent
    for a caller who may only sign with the key).
    """

    key_id: str
    version: int
    algorithm: str
    state: KeyState
    protection: Protection = "exportable"
    label: str | None = None
    created_at: AwareDatetime
    destroy_after: AwareDatetime | None = None
    owner: str | None = None
    allowed_signers: list[str] | None = None


class KeyListReply(_Reply):
    """Reply to ``key.list``: one page; ``next_cursor`` (absent on the last page) asks for
    the next with the same scope and filters."""

    keys: list[KeySummary]
    next_cursor: str | None = None


class KeyDescribeRequest(_Request):
    """``key.describe``: the metadata of every version of one key."""

    key_id: KeyRef


class KeyVersionInfo(_Reply):
    """One version in a ``key.describe`` reply: no sealed material, ever."""

    version: int
    algorithm: str
    state: KeyState
    protection: Protection = "exportable"
    label: str | None = None
    created_at: AwareDatetime
    destroy_after: AwareDatetime | None = None
    public_key_pem: str
    attested: bool = False


class KeyDescribeReply(_Reply):
    """Reply to ``key.describe``: the key, its current version and every version in order.

    ``owner`` and ``allowed_signers`` (the current version's) are shown to the owner and
    admins only, as in ``key.list``.
    """

    key_id: str
    current_version: int
    owner: str | None = None
    allowed_signers: list[str] | None = None
    versions: list[KeyVersionInfo]


# -- end issue 15, reads ---------------------------------------------------------------------


# ---- issue 15, aliases ------------------------------------------------------------------


class KeyAliasSetRequest(_Request):
    """``key.alias.set``: create ``alias`` pointing at ``key_id``, or point it at another key.

    The caller must own ``key_id`` (or be an admin); an existing alias may be re-pointed only
    by its owner (the principal that created it) or an admin. ``key_id`` is a key id, never
    another alias (no chains).
    """

    alias: AliasName
    key_id: KeyId


class KeyAliasDeleteRequest(_Request):
    """``key.alias.delete``: remove ``alias`` (its owner or an admin); the key stays."""

    alias: AliasName


class KeyAliasReply(_Reply):
    """Reply to ``key.alias.set`` and ``key.alias.delete``: the alias and the key it points
    at (``key_id`` null once deleted); ``previous_key_id`` is where it pointed before."""

    alias: str
    key_id: str | None = None
    previous_key_id: str | None = None
    owner: str
    updated_at: AwareDatetime


class KeyAliasChangedEvent(_Reply):
    """Published to ``zandd.events`` (AMQP ``type`` ``key.alias_changed``) once an alias
    change is committed, before the reply: signers drop their cached resolution of it.
    ``key_id`` is where it points now (null: deleted)."""

    alias: str
    key_id: str | None = None
    changed_at: AwareDatetime


# ---- end issue 15, aliases --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OperationSpec:
    """What travels for one operation: its request and its successful reply."""

    operation: Operation
    request: type[BaseModel]
    reply: type[BaseModel]


SPECS: dict[Operation, OperationSpec] = {
    spec.operation: spec
    for spec in (
        OperationSpec(Operation.KEY_CREATE, KeyCreateRequest, KeyCreateReply),
        OperationSpec(Operation.SIGN, SignRequest, SignReply),
        OperationSpec(Operation.SIGN_BATCH, SignBatchRequest, SignBatchReply),
        OperationSpec(Operation.KEY_PUBLIC, KeyPublicRequest, KeyPublicReply),
        OperationSpec(Operation.KEY_DISABLE, KeyStateRequest, KeyStateReply),
        OperationSpec(Operation.KEY_ENABLE, KeyStateRequest, KeyStateReply),
        OperationSpec(Operation.KEY_DESTROY, KeyDestroyRequest, KeyStateReply),
        OperationSpec(Operation.KEY_CANCEL_DESTROY, KeyStateRequest, KeyStateReply),
        OperationSpec(Operation.SIGN_TPM, SignRequest, SignReply),
        # -- issue 15, reads --
        OperationSpec(Operation.VERIFY, VerifyRequest, VerifyReply),
        OperationSpec(Operation.VERIFY_BATCH, VerifyBatchRequest, VerifyBatchReply),
        OperationSpec(Operation.KEY_LIST, KeyListRequest, KeyListReply),
        OperationSpec(Operation.KEY_DESCRIBE, KeyDescribeRequest, KeyDescribeReply),
        # -- end issue 15, reads --
        # --- issue 15, key writes ---
        OperationSpec(Operation.KEY_ROTATE, KeyRotateRequest, KeyRotateReply),
        OperationSpec(Operation.KEY_UPDATE, KeyUpdateRequest, KeyUpdateReply),
        # --- end issue 15, key writes ---
        # ---- issue 15, aliases ----
        OperationSpec(Operation.KEY_ALIAS_SET, KeyAliasSetRequest, KeyAliasReply),
        OperationSpec(Operation.KEY_ALIAS_DELETE, KeyAliasDeleteRequest, KeyAliasReply),
        # ---- end issue 15, aliases ----
    )
}

_MAX_FIELD_NAME_CHARS = 40


def _describe(error: Any) -> str:
    # Only the location and pydantic's message: never the offending input, which may be a
    # caller's payload. Field names can be attacker-chosen (extra keys), so they are cut short.
    location = ".".join(str(part)[:_MAX_FIELD_NAME_CHARS] for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{location}: {message}" if location else message


def describe_errors(exc: ValidationError, limit: int = 5) -> str:
    """Pydantic's errors as ``field: problem; …`` (the first ``limit``), never quoting the input."""
    described = "; ".join(_describe(error) for error in exc.errors(include_input=False)[:limit])
    more = exc.error_count() - limit
    return f"{described}; and {more} more" if more > 0 else described


def parse_request(operation: Operation, body: bytes, limits: Limits = DEFAULT_LIMITS) -> BaseModel:
    """Validate an AMQP body as ``operation``'s request, or raise ``InvalidRequest``.

    The body's size and the number of JSON values it can hold (``Limits.max_structure``)
    are checked before any JSON is parsed, so no request costs more than a valid one of the
    same size. The error text names the first five problems by field, and never quotes the
    input.
    """
    if len(body) > limits.max_body_bytes:
        raise InvalidRequest(
            f"request body is larger than the limit of {limits.max_body_bytes} bytes"
        )
    if structure_count(body) > limits.max_structure:
        raise InvalidRequest(
            f"request body holds more than {limits.max_structure} JSON values "
            "(',', '{' and '[' counted)"
        )
    model = SPECS[operation].request
    try:
        return model.model_validate_json(body, context=limits.as_context())
    except ValidationError as exc:
        raise InvalidRequest(f"invalid {operation.value} request: {describe_errors(exc)}") from None
