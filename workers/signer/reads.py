"""The signers' read operations (issue 15): ``verify``, ``verify.batch``, ``key.list`` and
``key.describe``. None of them opens a private key.

- ``verify``/``verify.batch`` check signatures against the public key of the record the
  signer's cache holds — the one its MAC covers, checked as it was loaded, exactly as for
  ``sign`` — for a named version or, without ``version``, the key's current one (a DER or raw
  signature does not name its version). An invalid signature is a reply (``valid: false``),
  never an error. Any state: a destroyed version's public key stays, as for ``key.public``.
- ``key.list`` pages through the vault (``vault.listing``), keys in key id order, behind an
  opaque cursor. Every record of a page has its MAC checked and is matched again against the
  caller's scope, so a row or a signer index changed behind the keygen worker's back can
  neither show a key to someone else nor hide the change (``integrity_error``).
- ``key.describe`` reads every version of one key, MACs checked.

Who may: ``verify`` and ``key.describe`` — whoever may sign with the key, its owner and the
admins (``AccessPolicy.may_read``); ``key.list`` — one's own keys (``owned``), the keys one may
sign with (``signable``), every key for admins (``all``). Owners and admins see ``owner`` and
``allowed_signers``; a mere signer does not.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import Awaitable, Callable, Mapping

from contracts.crypto import public_key_pem, verify_signature
from contracts.errors import InvalidRequest, KeyNotFound
from contracts.models import (
    KeyDescribeReply,
    KeyDescribeRequest,
    KeyListReply,
    KeyListRequest,
    KeySummary,
    KeyVersionInfo,
    VerifyBatchReply,
    VerifyBatchRequest,
    VerifyReply,
    VerifyRequest,
)
from contracts.operations import Operation
from vault.kek import KekRing
from vault.listing import KeyListQuery
from vault.record_mac import GenerationWatermark, verify_record
from vault.records import KeyRecord
from vault.store import VaultStore
from workers.consumer.runtime import Handler, RequestContext
from workers.service.policy import AccessPolicy
from workers.signer.cache import CachedKey
from workers.signer.signing import stored_public_key

#: Verifying one signature takes ~70 us of event loop: a batch yields after each chunk.
VERIFY_CHUNK_ITEMS = 64
#: Records whose MACs a page checks before it yields to the loop (~12 us each).
MAC_CHUNK_RECORDS = 128
_CURSOR_TAG = b"zk1\x00"
#: The signer's cached record lookup (``Signer._fetch``): key id, version or None → record.
Fetch = Callable[[str, int | None], Awaitable[CachedKey]]
_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def encode_cursor(after: str) -> str:
    """The opaque cursor of a page that ends at key id ``after`` (base64url, no padding)."""
    return base64.urlsafe_b64encode(_CURSOR_TAG + after.encode()).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str) -> str:
    """The key id a cursor continues after; ``InvalidRequest`` for one the service did not
    hand out. A cursor grants nothing: the caller's scope applies on every page."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        after = raw.removeprefix(_CURSOR_TAG).decode("ascii")
    except (binascii.Error, ValueError):
        raw, after = b"", ""
    if not raw.startswith(_CURSOR_TAG) or not _KEY_ID.match(after):
        raise InvalidRequest("invalid key.list request: cursor: not a cursor key.list handed out")
    return after


class KeyReads:
    """The read handlers of a signer, sharing its cache, watermark, store and policy."""

    def __init__(
        self,
        store: VaultStore,
        ring: KekRing,
        policy: AccessPolicy,
        fetch: Fetch,
        generations: GenerationWatermark,
        resolve: Callable[[str], Awaitable[str]] | None = None,
    ) -> None:
        self._resolve = resolve
        self._store = store
        self._ring = ring
        self._policy = policy
        self._fetch = fetch
        self._generations = generations

    @property
    def handlers(self) -> Mapping[Operation, Handler]:
        """Operation → handler, merged into the signer's."""
        return {
            Operation.VERIFY: self.verify,
            Operation.VERIFY_BATCH: self.verify_batch,
            Operation.KEY_LIST: self.list_keys,
            Operation.KEY_DESCRIBE: self.describe,
        }

    async def verify(self, request: VerifyRequest, context: RequestContext) -> VerifyReply:
        """Whether the signature holds under the key version's authenticated public key."""
        cached = await self._readable(request.key_id, request.version, context, "verify with")
        record = cached.record
        valid = verify_signature(
            cached.public_key,
            request.signature,
            digest=request.digest_for(record.algorithm),
            encoding=request.encoding,
            algorithm=record.algorithm,
        )
        return VerifyReply(
            key_id=record.key_id,
            version=record.version,
            algorithm=record.algorithm,
            encoding=request.encoding,
            valid=valid,
        )

    async def verify_batch(
        self, request: VerifyBatchRequest, context: RequestContext
    ) -> VerifyBatchReply:
        """A verdict per item, in item order, under one key version."""
        cached = await self._readable(request.key_id, request.version, context, "verify with")
        algorithm = cached.record.algorithm
        verdicts: list[bool] = []
        for start in range(0, len(request.items), VERIFY_CHUNK_ITEMS):
            if start:
                await asyncio.sleep(0)  # let other requests and heartbeats through
            for item in request.items[start : start + VERIFY_CHUNK_ITEMS]:
                verdicts.append(
                    verify_signature(
                        cached.public_key,
                        item.signature,
                        digest=item.digest_for(algorithm),
                        encoding=request.encoding,
                        algorithm=algorithm,
                    )
                )
        record = cached.record
        return VerifyBatchReply(
            key_id=record.key_id,
            version=record.version,
            algorithm=record.algorithm,
            encoding=request.encoding,
            valid=verdicts,
        )

    async def list_keys(self, request: KeyListRequest, context: RequestContext) -> KeyListReply:
        """One page of the caller's keys (``owned``), those it may sign with (``signable``) or,
        for admins, all (``all``)."""
        principal = self._policy.principal(context)
        if request.scope == "all":
            self._policy.check_list_all(principal)
        query = KeyListQuery(
            limit=request.page_size,
            after=None if request.cursor is None else decode_cursor(request.cursor),
            owner=principal if request.scope == "owned" else None,
            signer=principal if request.scope == "signable" else None,
            label=request.label,
            state=request.state,
        )
        if request.alias is not None:
            return await self._list_alias(request.alias, query, principal)
        page = await self._store.list_key_page(query)
        keys: list[KeySummary] = []
        for n, record in enumerate(page.records):
            if n and n % MAC_CHUNK_RECORDS == 0:
                await asyncio.sleep(0)
            verify_record(record, self._ring)
            # Matched again on the authenticated record: a store's index (the SQLite signer
            # rows, a MongoDB query) is not what decides who sees a key.
            if not query.matches(record):
                continue
            keys.append(self._summary(record, principal))
        next_cursor = None if page.next_after is None else encode_cursor(page.next_after)
        return KeyListReply(keys=keys, next_cursor=next_cursor)

    async def _list_alias(self, alias: str, query: KeyListQuery, principal: str) -> KeyListReply:
        """issue 15, aliases: ``key.list`` with ``alias``: the one key it points at, if it
        belongs in the listing (scope, label, state, after the cursor); an empty page
        otherwise — the same for an unknown alias and a key outside the caller's scope."""
        if self._resolve is None:
            return KeyListReply(keys=[])
        try:
            key_id = await self._resolve(alias)
            record = verify_record(await self._store.get_key(key_id), self._ring)
        except KeyNotFound:
            return KeyListReply(keys=[])
        if not query.matches(record) or (query.after is not None and key_id <= query.after):
            return KeyListReply(keys=[])
        return KeyListReply(keys=[self._summary(record, principal)])

    async def describe(
        self, request: KeyDescribeRequest, context: RequestContext
    ) -> KeyDescribeReply:
        """Every version of the key, oldest first: metadata and public key, no key material."""
        principal = self._policy.principal(context)
        records = await self._store.list_versions(request.key_id)
        if not records:
            raise KeyNotFound(f"key {request.key_id} not found")
        for record in records:
            verify_record(record, self._ring)
            self._generations.check(record)
        current = records[-1]
        self._policy.check_read(current, principal, "describe")
        shown = self._policy.sees_access(current, principal)
        return KeyDescribeReply(
            key_id=current.key_id,
            current_version=current.version,
            owner=current.owner if shown else None,
            allowed_signers=list(current.allowed_signers) if shown else None,
            versions=[_version_info(record) for record in records],
        )

    async def _readable(
        self, key_id: str, version: int | None, context: RequestContext, what: str
    ) -> CachedKey:
        principal = self._policy.principal(context)
        cached = await self._fetch(key_id, version)
        self._policy.check_read(cached.record, principal, what)
        self._generations.check(cached.record)
        return cached

    def _summary(self, record: KeyRecord, principal: str) -> KeySummary:
        shown = self._policy.sees_access(record, principal)
        return KeySummary(
            key_id=record.key_id,
            version=record.version,
            algorithm=record.algorithm,
            state=record.state,
            protection=record.protection,
            label=record.label,
            created_at=record.created_at,
            destroy_after=record.destroy_after,
            owner=record.owner if shown else None,
            allowed_signers=list(record.allowed_signers) if shown else None,
        )


def _version_info(record: KeyRecord) -> KeyVersionInfo:
    return KeyVersionInfo(
        version=record.version,
        algorithm=record.algorithm,
        state=record.state,
        protection=record.protection,
        label=record.label,
        created_at=record.created_at,
        destroy_after=record.destroy_after,
        public_key_pem=public_key_pem(stored_public_key(record)),
        attested=record.attestation is not None,
    )
