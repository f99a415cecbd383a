"""The operations of ``contracts.testing.FakeFleet``: an in-memory vault and the fleet's rules.

Each handler takes the request the real fleet would parse (``contracts.models.parse_request``:
same validation, same ``InvalidRequest``) and returns the reply model the real fleet sends, or
raises the ``ZanddError`` it would (``key_not_found``, ``key_disabled``, ``forbidden``, …).
Signatures come from ``contracts.algorithms`` — the project's own sign and verify code — with
keys made by ``cryptography`` in this process and kept in a dict: no TPM, no sealing, no audit,
no receipts, no attestation. Not a security boundary: a test tool.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import BaseModel

from contracts.algorithms import (
    RSA_PUBLIC_EXPONENT,
    AlgorithmSpec,
    PrivateKey,
    UnsupportedAlgorithm,
    algorithm_spec,
)
from contracts.crypto import public_key_jwk, public_key_pem
from contracts.errors import Forbidden, InvalidRequest, KeyDisabled, KeyNotFound
from contracts.models import (
    KeyAliasDeleteRequest,
    KeyAliasReply,
    KeyAliasSetRequest,
    KeyCreateReply,
    KeyCreateRequest,
    KeyDescribeReply,
    KeyDescribeRequest,
    KeyDestroyRequest,
    KeyListReply,
    KeyListRequest,
    KeyPublicReply,
    KeyPublicRequest,
    KeyPublicVersion,
    KeyRotateReply,
    KeyRotateRequest,
    KeyState,
    KeyStateReply,
    KeyStateRequest,
    KeySummary,
    KeyUpdateReply,
    KeyUpdateRequest,
    KeyVersionInfo,
    KeyVersionState,
    SignBatchReply,
    SignBatchRequest,
    SignPayload,
    SignReply,
    SignRequest,
    VerifyBatchReply,
    VerifyBatchRequest,
    VerifyItem,
    VerifyReply,
    VerifyRequest,
    is_alias,
)
from contracts.operations import Operation

#: ``allowed_signers`` entry meaning any authenticated principal (as the fleet has it).
ANYONE = "*"

Handler = Callable[[Any, str], BaseModel]


@dataclass
class _Version:
    number: int
    spec: AlgorithmSpec
    private_key: PrivateKey
    created_at: datetime
    state: KeyState = KeyState.ENABLED
    destroy_after: datetime | None = None

    @property
    def public_pem(self) -> str:
        return public_key_pem(self.private_key.public_key())


@dataclass
class _Key:
    key_id: str
    owner: str
    label: str | None
    allowed_signers: list[str]
    protection: str
    rotation_period: int | None
    versions: list[_Version] = field(default_factory=list)

    @property
    def primary(self) -> _Version:
        return self.versions[-1]


class FakeVault:
    """Keys in a dict and the fleet's operations over them, as ``FakeFleet`` serves them."""

    def __init__(self, *, admins: Iterable[str] = ()) -> None:
        self.admins = frozenset(admins)
        self.keys: dict[str, _Key] = {}
        self.aliases: dict[str, tuple[str, str]] = {}  # alias -> (key id, owner)
        self._created: dict[tuple[str, str], KeyCreateReply] = {}
        self._rotated: dict[tuple[str, str], KeyRotateReply] = {}
        self.handlers: dict[Operation, Handler] = {
            Operation.KEY_CREATE: self.create,
            Operation.SIGN: self.sign,
            Operation.SIGN_TPM: self.sign_tpm,
            Operation.SIGN_BATCH: self.sign_batch,
            Operation.KEY_PUBLIC: self.public,
            Operation.VERIFY: self.verify,
            Operation.VERIFY_BATCH: self.verify_batch,
            Operation.KEY_DISABLE: self._state(KeyState.DISABLED, {KeyState.ENABLED}),
            Operation.KEY_ENABLE: self._state(KeyState.ENABLED, {KeyState.DISABLED}),
            Operation.KEY_DESTROY: self.destroy,
            Operation.KEY_CANCEL_DESTROY: self._state(
                KeyState.DISABLED, {KeyState.PENDING_DESTRUCTION}
            ),
            Operation.KEY_ROTATE: self.rotate,
            Operation.KEY_UPDATE: self.update,
            Operation.KEY_LIST: self.list_keys,
            Operation.KEY_DESCRIBE: self.describe,
            Operation.KEY_ALIAS_SET: self.set_alias,
            Operation.KEY_ALIAS_DELETE: self.delete_alias,
        }
        #: The message id of the request being served (``key.create``/``key.rotate`` use it).
        self.message_id: str | None = None

    # -- keys ----------------------------------------------------------------------------------

    def create(self, request: KeyCreateRequest, principal: str) -> KeyCreateReply:
        """``key.create``: a new key owned by ``principal``; the same message id, the same key."""
        remembered = self._created.get((principal, self.message_id or ""))
        if remembered is not None:
            return remembered
        spec = _spec(request.algorithm)
        if request.protection == "tpm" and spec.family != "ecdsa":
            raise InvalidRequest("protection 'tpm' keys are ecdsa-p256-sha256 only")
        key = _Key(
            key_id=f"zk-{secrets.token_hex(10)}",
            owner=principal,
            label=request.label,
            allowed_signers=list(request.allowed_signers)
            if request.allowed_signers is not None
            else [principal],
            protection=request.protection,
            rotation_period=request.rotation_period,
        )
        key.versions.append(_new_version(1, spec))
        self.keys[key.key_id] = key
        version = key.primary
        reply = KeyCreateReply(
            key_id=key.key_id,
            version=1,
            algorithm=spec.name,
            public_key_pem=version.public_pem,
            created_at=version.created_at,
            protection=request.protection,
            rotation_period=key.rotation_period,
            next_rotation_at=_next_rotation(version.created_at, key.rotation_period),
        )
        if self.message_id:
            self._created[principal, self.message_id] = reply
        return reply

    def rotate(self, request: KeyRotateRequest, principal: str) -> KeyRotateReply:
        """``key.rotate``: a new primary version (owner and admins)."""
        key = self._key(request.key_id)
        self._check_manage(key, principal)
        remembered = self._rotated.get((principal, self.message_id or ""))
        if remembered is not None:
            return remembered
        version = _new_version(len(key.versions) + 1, key.primary.spec)
        key.versions.append(version)
        public = version.private_key.public_key()
        reply = KeyRotateReply(
            key_id=key.key_id,
            version=version.number,
            algorithm=version.spec.name,
            public_key_pem=version.public_pem,
            public_key_jwk=public_key_jwk(
                public, kid=f"{key.key_id}.v{version.number}", algorithm=version.spec.name
            ),
            created_at=version.created_at,
            protection="tpm" if key.protection == "tpm" else "exportable",
            rotation_period=key.rotation_period,
            next_rotation_at=_next_rotation(version.created_at, key.rotation_period),
        )
        if self.message_id:
            self._rotated[principal, self.message_id] = reply
        return reply

    def update(self, request: KeyUpdateRequest, principal: str) -> KeyUpdateReply:
        """``key.update``: label, signers, rotation period (owner and admins)."""
        key = self._key(request.key_id)
        self._check_manage(key, principal)
        given = request.model_fields_set
        if "label" in given:
            key.label = request.label
        if "allowed_signers" in given:
            signers = request.allowed_signers
            key.allowed_signers = list(signers) if signers is not None else [key.owner]
        if "rotation_period" in given:
            key.rotation_period = request.rotation_period
        return KeyUpdateReply(
            key_id=key.key_id,
            primary_version=key.primary.number,
            label=key.label,
            allowed_signers=key.allowed_signers,
            rotation_period=key.rotation_period,
            next_rotation_at=_next_rotation(key.primary.created_at, key.rotation_period),
            versions=_states(key.versions),
        )

    # -- signing -------------------------------------------------------------------------------

    def sign(self, request: SignRequest, principal: str) -> SignReply:
        """``sign``: with an exportable key's version (the primary one by default)."""
        return self._sign_one(request, principal, tpm=False)

    def sign_tpm(self, request: SignRequest, principal: str) -> SignReply:
        """``sign.tpm``: with a key of protection ``tpm`` (here, in software all the same)."""
        return self._sign_one(request, principal, tpm=True)

    def _sign_one(self, request: SignRequest, principal: str, *, tpm: bool) -> SignReply:
        key, version = self._signing_version(request.key_id, request.version, principal, tpm=tpm)
        signature = _signature(version, _digest(version.spec, request), request.encoding)
        return SignReply(
            key_id=key.key_id,
            version=version.number,
            algorithm=version.spec.name,
            encoding=request.encoding,
            signature=signature,
            protection="tpm" if tpm else "exportable",
        )

    def sign_batch(self, request: SignBatchRequest, principal: str) -> SignBatchReply:
        """``sign.batch``: the signatures in item order."""
        key, version = self._signing_version(request.key_id, request.version, principal, tpm=False)
        return SignBatchReply(
            key_id=key.key_id,
            version=version.number,
            algorithm=version.spec.name,
            encoding=request.encoding,
            signatures=[
                _signature(version, _digest(version.spec, item), request.encoding)
                for item in request.items
            ],
        )

    def _signing_version(
        self, key_ref: str, number: int | None, principal: str, *, tpm: bool
    ) -> tuple[_Key, _Version]:
        key = self._key(key_ref)
        if ANYONE not in key.allowed_signers and principal not in key.allowed_signers:
            raise Forbidden(f"{principal!r} may not sign with key {key.key_id}")
        if tpm != (key.protection == "tpm"):
            raise InvalidRequest(
                f"key {key.key_id} has protection {key.protection!r}: sign it with "
                f"{'sign.tpm' if key.protection == 'tpm' else 'sign'}"
            )
        version = self._version(key, number)
        if version.state is not KeyState.ENABLED:
            raise KeyDisabled(f"key {key.key_id} v{version.number} is {version.state.value}")
        return key, version

    # -- reads ---------------------------------------------------------------------------------

    def public(self, request: KeyPublicRequest, principal: str) -> KeyPublicReply:
        """``key.public``: for anyone, in any state."""
        del principal
        key = self._key(request.key_id)
        version = self._version(key, request.version)
        public = version.private_key.public_key()
        return KeyPublicReply(
            key_id=key.key_id,
            version=version.number,
            algorithm=version.spec.name,
            public_key_pem=version.public_pem,
            public_key_jwk=public_key_jwk(
                public, kid=f"{key.key_id}.v{version.number}", algorithm=version.spec.name
            ),
            protection="tpm" if key.protection == "tpm" else "exportable",
            versions=[
                KeyPublicVersion(
                    version=each.number,
                    algorithm=each.spec.name,
                    public_key_pem=each.public_pem,
                    public_key_jwk=public_key_jwk(
                        each.private_key.public_key(),
                        kid=f"{key.key_id}.v{each.number}",
                        algorithm=each.spec.name,
                    ),
                )
                for each in key.versions
            ]
            if request.all_versions
            else None,
        )

    def verify(self, request: VerifyRequest, principal: str) -> VerifyReply:
        """``verify``: the verdict of the version's public key."""
        key, version = self._reading_version(request.key_id, request.version, principal)
        return VerifyReply(
            key_id=key.key_id,
            version=version.number,
            algorithm=version.spec.name,
            encoding=request.encoding,
            valid=_valid(version, request, request.encoding),
        )

    def verify_batch(self, request: VerifyBatchRequest, principal: str) -> VerifyBatchReply:
        """``verify.batch``: the verdicts in item order."""
        key, version = self._reading_version(request.key_id, request.version, principal)
        return VerifyBatchReply(
            key_id=key.key_id,
            version=version.number,
            algorithm=version.spec.name,
            encoding=request.encoding,
            valid=[_valid(version, item, request.encoding) for item in request.items],
        )

    def _reading_version(
        self, key_ref: str, number: int | None, principal: str
    ) -> tuple[_Key, _Version]:
        key = self._key(key_ref)
        self._check_read(key, principal, "use")
        return key, self._version(key, number)

    def list_keys(self, request: KeyListRequest, principal: str) -> KeyListReply:
        """``key.list``: one page, by key id; the cursor is the last key id of the page."""
        if request.scope == "all" and principal not in self.admins:
            raise Forbidden(f"{principal!r} may not list every key (admins only)")
        only = self.aliases.get(request.alias, ("", ""))[0] if request.alias else None
        chosen = [
            key
            for key_id, key in sorted(self.keys.items())
            if (request.cursor is None or key_id > request.cursor)
            and (only is None or key_id == only)
            and (request.label is None or key.label == request.label)
            and (request.state is None or key.primary.state is request.state)
            and self._in_scope(key, request.scope, principal)
        ]
        page = chosen[: request.page_size]
        more = len(chosen) > request.page_size
        return KeyListReply(
            keys=[self._summary(key, principal) for key in page],
            next_cursor=page[-1].key_id if more else None,
        )

    def describe(self, request: KeyDescribeRequest, principal: str) -> KeyDescribeReply:
        """``key.describe``: every version's state and public key."""
        key = self._key(request.key_id)
        self._check_read(key, principal, "describe")
        sees = principal == key.owner or principal in self.admins
        return KeyDescribeReply(
            key_id=key.key_id,
            current_version=key.primary.number,
            owner=key.owner if sees else None,
            allowed_signers=key.allowed_signers if sees else None,
            versions=[
                KeyVersionInfo(
                    version=version.number,
                    algorithm=version.spec.name,
                    state=version.state,
                    protection="tpm" if key.protection == "tpm" else "exportable",
                    label=key.label,
                    created_at=version.created_at,
                    destroy_after=version.destroy_after,
                    public_key_pem=version.public_pem,
                )
                for version in key.versions
            ],
        )

    # -- lifecycle -----------------------------------------------------------------------------

    def _state(self, target: KeyState, sources: set[KeyState]) -> Handler:
        def change(request: KeyStateRequest, principal: str) -> KeyStateReply:
            return self._change(request, principal, target, sources, None)

        return change

    def destroy(self, request: KeyDestroyRequest, principal: str) -> KeyStateReply:
        """``key.destroy``: pending destruction for ``pending_days``."""
        after = datetime.now(UTC) + timedelta(days=request.pending_days)
        return self._change(
            request,
            principal,
            KeyState.PENDING_DESTRUCTION,
            {KeyState.ENABLED, KeyState.DISABLED},
            after,
        )

    def _change(
        self,
        request: KeyStateRequest,
        principal: str,
        target: KeyState,
        sources: set[KeyState],
        destroy_after: datetime | None,
    ) -> KeyStateReply:
        key = self._key(request.key_id)
        self._check_manage(key, principal)
        versions = [self._version(key, request.version)] if request.version else key.versions
        for version in versions:
            if version.state in sources:
                version.state, version.destroy_after = target, destroy_after
            elif version.state is not target:
                raise InvalidRequest(
                    f"key {key.key_id} v{version.number} is {version.state.value}: "
                    f"it cannot become {target.value}"
                )
        return KeyStateReply(key_id=key.key_id, versions=_states(versions))

    # -- aliases -------------------------------------------------------------------------------

    def set_alias(self, request: KeyAliasSetRequest, principal: str) -> KeyAliasReply:
        """``key.alias.set``: create or move an alias of the caller's to a key of theirs."""
        key = self._key(request.key_id)
        self._check_manage(key, principal)
        previous = self.aliases.get(request.alias)
        if previous is not None and previous[1] != principal and principal not in self.admins:
            raise Forbidden(f"{principal!r} may not move alias {request.alias}")
        owner = previous[1] if previous is not None else principal
        self.aliases[request.alias] = (key.key_id, owner)
        return KeyAliasReply(
            alias=request.alias,
            key_id=key.key_id,
            previous_key_id=previous[0] if previous is not None else None,
            owner=owner,
            updated_at=datetime.now(UTC),
        )

    def delete_alias(self, request: KeyAliasDeleteRequest, principal: str) -> KeyAliasReply:
        """``key.alias.delete``: remove an alias of the caller's."""
        previous = self.aliases.get(request.alias)
        if previous is None:
            raise KeyNotFound(f"alias {request.alias} not found")
        if previous[1] != principal and principal not in self.admins:
            raise Forbidden(f"{principal!r} may not delete alias {request.alias}")
        del self.aliases[request.alias]
        return KeyAliasReply(
            alias=request.alias,
            previous_key_id=previous[0],
            owner=previous[1],
            updated_at=datetime.now(UTC),
        )

    # -- rules ---------------------------------------------------------------------------------

    def _key(self, key_ref: str) -> _Key:
        key_id = self.aliases.get(key_ref, ("", ""))[0] if is_alias(key_ref) else key_ref
        key = self.keys.get(key_id)
        if key is None:
            raise KeyNotFound(f"key {key_ref} not found")
        return key

    @staticmethod
    def _version(key: _Key, number: int | None) -> _Version:
        if number is None:
            return key.primary
        if not 1 <= number <= len(key.versions):
            raise KeyNotFound(f"key {key.key_id} has no version {number}")
        return key.versions[number - 1]

    def _check_manage(self, key: _Key, principal: str) -> None:
        if principal != key.owner and principal not in self.admins:
            raise Forbidden(f"{principal!r} may not change the state of key {key.key_id}")

    def _check_read(self, key: _Key, principal: str, what: str) -> None:
        if not (
            ANYONE in key.allowed_signers
            or principal in key.allowed_signers
            or principal == key.owner
            or principal in self.admins
        ):
            raise Forbidden(f"{principal!r} may not {what} key {key.key_id}")

    @staticmethod
    def _in_scope(key: _Key, scope: str, principal: str) -> bool:
        if scope == "owned":
            return key.owner == principal
        if scope == "signable":
            return ANYONE in key.allowed_signers or principal in key.allowed_signers
        return True

    def _summary(self, key: _Key, principal: str) -> KeySummary:
        sees = principal == key.owner or principal in self.admins
        primary = key.primary
        return KeySummary(
            key_id=key.key_id,
            version=primary.number,
            algorithm=primary.spec.name,
            state=primary.state,
            protection="tpm" if key.protection == "tpm" else "exportable",
            label=key.label,
            created_at=primary.created_at,
            destroy_after=primary.destroy_after,
            owner=key.owner if sees else None,
            allowed_signers=key.allowed_signers if sees else None,
        )


def _spec(name: str) -> AlgorithmSpec:
    try:
        return algorithm_spec(name)
    except UnsupportedAlgorithm as exc:
        raise InvalidRequest(str(exc)) from None


def _new_version(number: int, spec: AlgorithmSpec) -> _Version:
    private_key: PrivateKey
    if spec.family == "ecdsa":
        private_key = ec.generate_private_key(spec.curve())
    else:
        private_key = rsa.generate_private_key(RSA_PUBLIC_EXPONENT, spec.rsa_bits)
    return _Version(number, spec, private_key, datetime.now(UTC))


def _next_rotation(created_at: datetime, period_s: int | None) -> datetime | None:
    return None if period_s is None else created_at + timedelta(seconds=period_s)


def _states(versions: list[_Version]) -> list[KeyVersionState]:
    return [
        KeyVersionState(version=v.number, state=v.state, destroy_after=v.destroy_after)
        for v in versions
    ]


def _digest(spec: AlgorithmSpec, payload: SignPayload) -> bytes:
    if payload.message is not None:
        return spec.digest(payload.message)
    assert payload.digest is not None  # the model requires one of the two
    if len(payload.digest) != spec.digest_bytes:
        raise InvalidRequest(f"{spec.name} signs a {spec.digest_bytes}-byte digest")
    return payload.digest


def _signature(version: _Version, digest: bytes, encoding: str) -> bytes:
    der = version.spec.sign_digest(version.private_key, digest)
    return version.spec.to_raw(der) if encoding == "raw" else der


def _valid(version: _Version, item: VerifyItem, encoding: str) -> bool:
    spec = version.spec
    try:
        signature = spec.from_raw(item.signature) if encoding == "raw" else item.signature
    except (ValueError, InvalidRequest):
        return False
    return spec.verify_digest(version.private_key.public_key(), signature, _digest(spec, item))
