"""The signer worker: ``sign``, ``sign.batch`` and ``key.public`` on ``zandd.sign``.

Per request: who is asking (the AMQP ``user_id``), the key version from the vault, may this
principal sign with it, is it enabled — by the vault's record and by any newer state change
the events announced — then open, sign, verify, wipe.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from contracts.crypto import public_key_jwk, public_key_pem
from contracts.errors import KeyDisabled
from contracts.models import (
    KeyPublicReply,
    KeyPublicRequest,
    KeyState,
    KeyStateChangedEvent,
    SignBatchReply,
    SignBatchRequest,
    SignReply,
    SignRequest,
)
from contracts.operations import Operation
from vault.kek import KekRing
from vault.records import KeyRecord
from vault.store import VaultStore
from workers.policy import AccessPolicy
from workers.runtime import Handler, RequestContext
from workers.signer.signing import sign_digests, stored_public_key

log = logging.getLogger("zandd.signer")


class Signer:
    """Request handlers of a signer: the vault, the KEK ring, the access policy.

    ``on_event`` takes the lifecycle events from ``zandd.events``. A version an event says is
    no longer enabled is refused at once, even when the vault read that request made is older
    than the change (a lagging replica, a cache); an event can only make the signer refuse.
    """

    def __init__(
        self, store: VaultStore, ring: KekRing, policy: AccessPolicy | None = None
    ) -> None:
        self._store = store
        self._ring = ring
        self._policy = policy or AccessPolicy()
        self._not_enabled: dict[tuple[str, int], KeyState] = {}

    @property
    def handlers(self) -> Mapping[Operation, Handler]:
        """Operation → handler, for the consumer runtime."""
        return {
            Operation.SIGN: self.sign,
            Operation.SIGN_BATCH: self.sign_batch,
            Operation.KEY_PUBLIC: self.public_key,
        }

    def on_event(self, event: KeyStateChangedEvent) -> None:
        """Note a committed state change announced on ``zandd.events``."""
        version = (event.key_id, event.version)
        if event.state == KeyState.ENABLED:
            self._not_enabled.pop(version, None)
        else:
            self._not_enabled[version] = event.state
        log.debug("key %s v%d is now %s", event.key_id, event.version, event.state.value)

    def forget_events(self) -> None:
        """Drop what the events said: some may have been missed; the vault decides alone."""
        self._not_enabled.clear()

    async def sign(self, request: SignRequest, context: RequestContext) -> SignReply:
        """One signature over the request's message or digest."""
        record = await self._usable_record(request.key_id, request.version, context)
        (signature,) = sign_digests(record, self._ring, [request.sha256_digest()], request.encoding)
        return SignReply(
            key_id=record.key_id,
            version=record.version,
            algorithm=record.algorithm,
            encoding=request.encoding,
            signature=signature,
        )

    async def sign_batch(
        self, request: SignBatchRequest, context: RequestContext
    ) -> SignBatchReply:
        """Signatures over every item, in item order, with the key opened once."""
        record = await self._usable_record(request.key_id, request.version, context)
        digests = [item.sha256_digest() for item in request.items]
        signatures = sign_digests(record, self._ring, digests, request.encoding)
        return SignBatchReply(
            key_id=record.key_id,
            version=record.version,
            algorithm=record.algorithm,
            encoding=request.encoding,
            signatures=signatures,
        )

    async def public_key(
        self, request: KeyPublicRequest, context: RequestContext
    ) -> KeyPublicReply:
        """The public key as PEM and JWK (``kid`` is ``<key_id>.v<version>``), for anyone
        authenticated and in any state: signatures made before a key was destroyed stay
        verifiable."""
        self._policy.principal(context)
        record = await self._store.get_key(request.key_id, request.version)
        key = stored_public_key(record)
        return KeyPublicReply(
            key_id=record.key_id,
            version=record.version,
            algorithm=record.algorithm,
            public_key_pem=public_key_pem(key),
            public_key_jwk=public_key_jwk(key, kid=f"{record.key_id}.v{record.version}"),
        )

    async def _usable_record(
        self, key_id: str, version: int | None, context: RequestContext
    ) -> KeyRecord:
        principal = self._policy.principal(context)
        record = await self._store.get_key(key_id, version)
        # Access before state: someone who may not use the key learns nothing of its state.
        self._policy.check_sign(record, principal)
        announced = self._not_enabled.get((record.key_id, record.version))
        if announced is not None:
            raise KeyDisabled(f"key {record.key_id} v{record.version} is {announced.value}")
        return record
