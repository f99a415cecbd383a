"""The signer worker: ``sign``, ``sign.batch`` and ``key.public`` on ``zandd.sign`` (and the
reads of ``workers/signer/reads.py``: ``verify``, ``verify.batch``, ``key.list``,
``key.describe``).

Per request: who is asking (the AMQP ``user_id``), the key version from the vault (its MAC
checked when it was loaded), may this principal sign with it, is it enabled — by the vault's
record and by any newer state change the events announced — is it not older than a
generation seen before, then open, sign, verify, wipe.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from contracts.attestation import attestation_reply
from contracts.crypto import public_key_jwk, public_key_pem
from contracts.errors import InvalidRequest, KeyDisabled
from contracts.models import (
    Encoding,
    KeyAliasChangedEvent,
    KeyPublicReply,
    KeyPublicRequest,
    KeyPublicVersion,
    KeyState,
    KeyStateChangedEvent,
    SignBatchReply,
    SignBatchRequest,
    SignReply,
    SignRequest,
)
from contracts.operations import Operation
from vault.kek import KekRing
from vault.record_mac import GenerationWatermark, verify_record
from vault.store import VaultStore
from workers.consumer.runtime import Handler, RequestContext
from workers.observability.metrics import Metrics
from workers.observability.stages import Stage
from workers.observability.telemetry import stage
from workers.service.aliases import AliasCache, resolving
from workers.service.policy import AccessPolicy
from workers.signer.cache import CachedKey, RecordCache
from workers.signer.reads import KeyReads
from workers.signer.signing import sign_digests, stored_public_key

log = logging.getLogger("zandd.signer")
#: Signing and verifying one digest takes ~85 us of event loop: a batch yields to the loop
#: after each chunk (~6 ms), not once after 1,000 items (~85 ms); the next chunk runs before
#: the callbacks that became ready meanwhile, so they wait up to two chunks. The key is
#: opened per chunk, which costs ~0.5% of the chunk (~30 us).
SIGN_CHUNK_ITEMS = 64


class Signer:
    """Request handlers of a signer: the vault, the KEK ring, the access policy.

    ``on_event`` takes the lifecycle events from ``zandd.events``. A version an event says is
    no longer enabled is refused at once, even when the vault read that request made is older
    than the change (a lagging replica, a cache); an event can only make the signer refuse.
    """

    def __init__(
        self,
        store: VaultStore,
        ring: KekRing,
        policy: AccessPolicy | None = None,
        *,
        metrics: Metrics | None = None,
        cache: RecordCache | None = None,
    ) -> None:
        self._store = store
        self._ring = ring
        self._policy = policy or AccessPolicy()
        self._metrics = metrics
        self._cache = cache if cache is not None else RecordCache(store, ring)
        self._not_enabled: dict[tuple[str, int], KeyState] = {}
        self._generations = GenerationWatermark()
        # issue 15, aliases: resolved through a cache the alias events invalidate.
        self._aliases = AliasCache(store, ring, ttl_s=self._cache.ttl_s)
        # issue 15, reads: verify, verify.batch, key.list, key.describe (no private key).
        self._reads = KeyReads(
            store, ring, self._policy, self._fetch, self._generations, self._aliases.resolve
        )

    @property
    def handlers(self) -> Mapping[Operation, Handler]:
        """Operation → handler, for the consumer runtime."""
        handlers: dict[Operation, Handler] = {
            Operation.SIGN: self.sign,
            Operation.SIGN_BATCH: self.sign_batch,
            Operation.KEY_PUBLIC: self.public_key,
            **self._reads.handlers,
        }
        # issue 15, aliases: a key id may be an alias in the operations that allow one.
        return resolving(handlers, self._aliases.resolve)

    def on_alias_event(self, event: KeyAliasChangedEvent) -> None:
        """issue 15, aliases: an alias was set, re-pointed or deleted: resolve it anew."""
        self._aliases.invalidate(event.alias)
        log.debug("%s now points at %s", event.alias, event.key_id)

    def on_event(self, event: KeyStateChangedEvent) -> None:
        """Note a committed state change announced on ``zandd.events``."""
        version = (event.key_id, event.version)
        self._cache.invalidate(event.key_id)
        if event.generation is not None:
            self._generations.saw(event.key_id, event.version, event.generation)
        if event.state == KeyState.ENABLED:
            self._not_enabled.pop(version, None)
        else:
            self._not_enabled[version] = event.state
        log.debug("key %s v%d is now %s", event.key_id, event.version, event.state.value)

    def forget_events(self) -> None:
        """Drop what the events said and what was cached: some events may have been missed,
        so the vault decides alone until the next ones arrive.

        The generations seen are kept: a missed event can only have been about a newer one.
        """
        self._not_enabled.clear()
        self._cache.clear()
        self._aliases.clear()

    async def revalidate_cache_forever(self, stop: asyncio.Event) -> None:
        """issue 19: revalidate the cached records in the background until ``stop``
        (``RecordCache.revalidate_forever``): keys in use are not read again at their TTL."""
        await self._cache.revalidate_forever(stop)

    async def sign(self, request: SignRequest, context: RequestContext) -> SignReply:
        """One signature over the request's message or digest."""
        cached = await self._usable_key(request.key_id, request.version, context)
        record = cached.record
        digest = request.digest_for(record.algorithm)
        (signature,) = self._sign(cached, [digest], request.encoding)
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
        """Signatures over every item, in item order, the key opened once per chunk."""
        cached = await self._usable_key(request.key_id, request.version, context)
        record = cached.record
        digests = [item.digest_for(record.algorithm) for item in request.items]
        signatures: list[bytes] = []
        for start in range(0, len(digests), SIGN_CHUNK_ITEMS):
            if start:
                await asyncio.sleep(0)  # let other requests and heartbeats through
            chunk = digests[start : start + SIGN_CHUNK_ITEMS]
            signatures += self._sign(cached, chunk, request.encoding)
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
        cached = await self._fetch(request.key_id, request.version)
        record, key = cached.record, cached.public_key
        return KeyPublicReply(
            key_id=record.key_id,
            version=record.version,
            algorithm=record.algorithm,
            public_key_pem=public_key_pem(key),
            public_key_jwk=public_key_jwk(
                key, kid=f"{record.key_id}.v{record.version}", algorithm=record.algorithm
            ),
            attestation=attestation_reply(record.attestation),
            protection=record.protection,
            versions=await self._all_versions(record.key_id) if request.all_versions else None,
        )

    async def _all_versions(self, key_id: str) -> list[KeyPublicVersion]:
        """issue 15: every version's public key, each record checked (MAC) as it is read."""
        versions = []
        with stage(Stage.VAULT_FETCH, self._metrics, attributes={"zandd.key.id": key_id}):
            records = await self._store.list_versions(key_id)
        for record in records:
            verify_record(record, self._ring)
            self._generations.check(record)
            key = stored_public_key(record)
            versions.append(
                KeyPublicVersion(
                    version=record.version,
                    algorithm=record.algorithm,
                    public_key_pem=public_key_pem(key),
                    public_key_jwk=public_key_jwk(
                        key, kid=f"{record.key_id}.v{record.version}", algorithm=record.algorithm
                    ),
                    attestation=attestation_reply(record.attestation),
                    protection=record.protection,
                )
            )
        return versions

    async def _fetch(self, key_id: str, version: int | None) -> CachedKey:
        with stage(Stage.VAULT_FETCH, self._metrics, attributes={"zandd.key.id": key_id}):
            before = self._cache.hits
            cached = await self._cache.get(key_id, version)
        if self._metrics is not None:
            self._metrics.cache_lookup("keys", hit=self._cache.hits > before)
        return cached

    def _sign(self, cached: CachedKey, digests: list[bytes], encoding: Encoding) -> list[bytes]:
        return sign_digests(
            cached.record, self._ring, digests, encoding, cached.public_key, self._metrics
        )

    async def _usable_key(
        self, key_id: str, version: int | None, context: RequestContext
    ) -> CachedKey:
        principal = self._policy.principal(context)
        cached = await self._fetch(key_id, version)
        record = cached.record
        # Access before state: someone who may not use the key learns nothing of its state.
        self._policy.check_sign(record, principal)
        announced = self._not_enabled.get((record.key_id, record.version))
        if announced is not None:
            raise KeyDisabled(f"key {record.key_id} v{record.version} is {announced.value}")
        # After the state check: a lagging read of a version announced disabled is that.
        self._generations.check(record)
        if record.tpm_blob is not None:
            # Signers have no TPM; the keygen worker signs with the keys that live in one.
            raise InvalidRequest(
                f'key {record.key_id} has protection "tpm": its signatures are made in the '
                "TPM, send sign.tpm instead of sign or sign.batch"
            )
        return cached
