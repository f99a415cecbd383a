"""The signer worker: ``sign``, ``sign.batch`` and ``key.public`` on ``zandd.sign``."""

from __future__ import annotations

from collections.abc import Mapping

from contracts.crypto import load_public_key, public_key_jwk, public_key_pem
from contracts.models import (
    KeyPublicReply,
    KeyPublicRequest,
    SignBatchReply,
    SignBatchRequest,
    SignReply,
    SignRequest,
)
from contracts.operations import Operation
from vault.kek import KekRing
from vault.store import VaultStore
from workers.runtime import Handler, RequestContext
from workers.signer.signing import sign_digests


class Signer:
    """Request handlers of a signer; stateless besides the vault and the KEK ring."""

    def __init__(self, store: VaultStore, ring: KekRing) -> None:
        self._store = store
        self._ring = ring

    @property
    def handlers(self) -> Mapping[Operation, Handler]:
        """Operation → handler, for the consumer runtime."""
        return {
            Operation.SIGN: self.sign,
            Operation.SIGN_BATCH: self.sign_batch,
            Operation.KEY_PUBLIC: self.public_key,
        }

    async def sign(self, request: SignRequest, context: RequestContext) -> SignReply:
        """One signature over the request's message or digest."""
        record = await self._store.get_key(request.key_id, request.version)
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
        record = await self._store.get_key(request.key_id, request.version)
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
        """The public key as PEM and JWK (``kid`` is ``<key_id>.v<version>``)."""
        record = await self._store.get_key(request.key_id, request.version)
        key = load_public_key(record.public_key_der)
        return KeyPublicReply(
            key_id=record.key_id,
            version=record.version,
            algorithm=record.algorithm,
            public_key_pem=public_key_pem(key),
            public_key_jwk=public_key_jwk(key, kid=f"{record.key_id}.v{record.version}"),
        )
