"""The keygen worker: ``key.create`` and ``sign.tpm`` on ``zandd.keygen``, the only process
using the TPM.

The lifecycle operations served on the same queue live in ``workers.keygen.lifecycle``.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from contracts.algorithms import ALGORITHM_ECDSA_P256_SHA256
from contracts.attestation import AttestationParts, attestation_reply, qualifying_data
from contracts.crypto import (
    der_to_raw,
    load_algorithm_public_key,
    load_public_key,
    public_key_der,
    public_key_pem,
)
from contracts.errors import IntegrityError, InvalidRequest, KeyDisabled
from contracts.models import KeyCreateReply, KeyCreateRequest, SignReply, SignRequest
from contracts.operations import Operation
from vault.kek import KekRing
from vault.record_mac import authenticated, verify_record
from vault.records import KeyRecord, KeyState
from vault.sealing import RecordBinding, SealedKey, seal
from vault.store import VaultStore
from workers.consumer.probes import vault_answers
from workers.consumer.runtime import Handler, RequestContext
from workers.keygen.attest import TpmBoundKey, certify, create_tpm_bound, sign_tpm_bound
from workers.keygen.session import TpmSession
from workers.observability.metrics import Metrics
from workers.observability.stages import Stage
from workers.observability.telemetry import stage
from workers.service.policy import AccessPolicy

log = logging.getLogger("zandd.keygen")


def new_key_id() -> str:
    """A fresh, unguessable key id: ``zk-`` and 20 hex digits (80 random bits)."""
    return f"zk-{secrets.token_hex(10)}"


class Keygen:
    """Request handlers of the keygen worker.

    TPM commands are blocking and the TPM serves one at a time, so they run on the session's
    one thread; the event loop stays free to take deliveries and write to the vault meanwhile.
    """

    def __init__(
        self,
        store: VaultStore,
        ring: KekRing,
        tpm: TpmSession,
        policy: AccessPolicy | None = None,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._ring = ring
        self._tpm = tpm
        self._policy = policy or AccessPolicy()
        self._metrics = metrics

    @property
    def handlers(self) -> Mapping[Operation, Handler]:
        """Operation → handler, for the consumer runtime."""
        return {Operation.KEY_CREATE: self.create_key, Operation.SIGN_TPM: self.sign_in_tpm}

    async def probe(self) -> None:
        """The runtime's dependency probe, run while the vault is out: the vault answers.

        Not the TPM: a TPM outage is answered ``tpm_unavailable`` request by request (the
        session reopens the TPM at the next request), so it never pauses the worker.
        """
        await vault_answers(self._store)

    async def create_key(
        self, request: KeyCreateRequest, context: RequestContext
    ) -> KeyCreateReply:
        """Create, certify, export, flush, seal and store a new key (with protection ``tpm``:
        create, certify and store it TPM-wrapped, never exported); idempotent on the request id.

        The caller becomes the key's owner and, unless ``allowed_signers`` says otherwise,
        its only signer. Request ids are the caller's own: another principal's request with
        the same id is another request, so a guessed id can neither fetch nor block a key.
        """
        owner = self._policy.principal(context)
        self._policy.check_create(owner)
        if context.request_id is None:
            raise InvalidRequest("key.create needs a message_id: it is the idempotency key")
        existing = await self._store.find_by_request_id(context.request_id, owner=owner)
        if existing is not None:
            log.info("key.create %s repeated: returning %s", context.request_id, existing.key_id)
            return _reply(verify_record(existing, self._ring))
        record = await self._generate(request, owner, context.request_id)
        # The stored record may be a twin request's: it is checked like any read.
        stored = verify_record(await self._store.create_key(record), self._ring)
        if stored.key_id != record.key_id:
            log.info("key.create %s raced a twin: returning %s", context.request_id, stored.key_id)
        else:
            log.info("created key %s for %s", stored.key_id, stored.created_by)
        return _reply(stored)

    async def sign_in_tpm(self, request: SignRequest, context: RequestContext) -> SignReply:
        """``sign.tpm``: sign with a key of protection ``tpm`` inside the TPM.

        The record is read from the vault for every request (no cache: the vault's state is
        the truth) and checked like a signer checks it: MAC, allowed signers, then state.
        The TPM's signature is verified against the stored public key before it is returned.
        """
        principal = self._policy.principal(context)
        record = verify_record(
            await self._store.get_key(request.key_id, request.version), self._ring
        )
        self._policy.check_sign(record, principal)
        if record.state is not KeyState.ENABLED:
            raise KeyDisabled(f"key {record.key_id} v{record.version} is {record.state.value}")
        if record.tpm_blob is None:
            raise InvalidRequest(
                f'key {record.key_id} has protection "exportable": send sign, not sign.tpm'
            )
        if record.algorithm != ALGORITHM_ECDSA_P256_SHA256:
            raise IntegrityError(
                f"key {record.key_id} v{record.version} has protection tpm and algorithm "
                f"{record.algorithm}: only ecdsa-p256-sha256 keys live in the TPM"
            )
        key = TpmBoundKey.decode(record.tpm_blob)
        digest = request.digest_for(record.algorithm)
        with stage(Stage.TPM, self._metrics):
            signature = await self._tpm.run(
                lambda tpm: tpm.under_storage_primary(
                    "signing in the TPM",
                    lambda ectx, primary: sign_tpm_bound(ectx, primary, key, digest),
                )
            )
        try:
            load_public_key(record.public_key_der).verify(
                signature, digest, ec.ECDSA(Prehashed(hashes.SHA256()))
            )
        except InvalidSignature:
            raise IntegrityError(
                f"the TPM's signature by key {record.key_id} v{record.version} does not verify "
                "against its stored public key; nothing was returned"
            ) from None
        return SignReply(
            key_id=record.key_id,
            version=record.version,
            algorithm=record.algorithm,
            encoding=request.encoding,
            signature=der_to_raw(signature) if request.encoding == "raw" else signature,
            protection="tpm",
        )

    async def _generate(self, request: KeyCreateRequest, owner: str, request_id: str) -> KeyRecord:
        # After a `zandd vault rotate-kek` new keys go under the new active KEK at once.
        self._ring.refresh()
        key_id = new_key_id()
        sealed: SealedKey | None = None
        tpm_blob: bytes | None = None
        if request.protection == "tpm":
            if request.algorithm != ALGORITHM_ECDSA_P256_SHA256:
                raise InvalidRequest(
                    f'protection "tpm" supports ecdsa-p256-sha256 only (asked for '
                    f"{request.algorithm}): create the key with protection exportable, or "
                    "as ecdsa-p256-sha256"
                )
            public_der, tpm_blob, attested = await self._tpm_bound(key_id)
        else:
            public_der, sealed, attested = await self._exportable(key_id, request.algorithm)
        signers = request.allowed_signers if request.allowed_signers is not None else [owner]
        created_at = datetime.now(UTC)
        period = request.rotation_period
        record = KeyRecord(
            key_id=key_id,
            version=1,
            algorithm=request.algorithm,
            public_key_der=public_der,
            sealed=sealed,
            state=KeyState.ENABLED,
            label=request.label,
            allowed_signers=tuple(signers),
            created_at=created_at,
            created_by=owner,
            request_id=request_id,
            attestation=attested.encode(),
            tpm_blob=tpm_blob,
            rotation_period_s=period,
            next_rotation_at=None if period is None else created_at + timedelta(seconds=period),
        )
        return authenticated(record, self._ring, generation=1)

    # --- issue 15, key writes: a new version of an existing key (workers.keygen.versions) ---

    async def next_version(
        self, primary: KeyRecord, *, request_id: str | None, now: datetime
    ) -> KeyRecord:
        """A new TPM-born version of ``primary``'s key above it, MACed at generation 1:
        same algorithm, protection, owner, label, allowed signers and rotation period; its
        next rotation one period from ``now``. Not stored."""
        self._ring.refresh()
        version = primary.version + 1
        sealed: SealedKey | None = None
        tpm_blob: bytes | None = None
        if primary.protection == "tpm":
            public_der, tpm_blob, attested = await self._tpm_bound(primary.key_id, version)
        else:
            public_der, sealed, attested = await self._exportable(
                primary.key_id, primary.algorithm, version
            )
        period = primary.rotation_period_s
        record = KeyRecord(
            key_id=primary.key_id,
            version=version,
            algorithm=primary.algorithm,
            public_key_der=public_der,
            sealed=sealed,
            state=KeyState.ENABLED,
            label=primary.label,
            allowed_signers=primary.allowed_signers,
            created_at=now,
            created_by=primary.created_by,
            request_id=request_id,
            attestation=attested.encode(),
            tpm_blob=tpm_blob,
            rotation_period_s=period,
            next_rotation_at=None if period is None else now + timedelta(seconds=period),
        )
        return authenticated(record, self._ring, generation=1)

    # --- end issue 15, key writes ---

    async def _exportable(
        self, key_id: str, algorithm: str, version: int = 1
    ) -> tuple[bytes, SealedKey, AttestationParts]:
        qualifying = qualifying_data(key_id, version)
        attested: list[AttestationParts] = []

        def certify_new_key(ectx: Any, key: Any, public: Any) -> None:
            attested.append(certify(ectx, key, public, qualifying))

        with stage(Stage.TPM, self._metrics):
            exported = await self._tpm.run(
                lambda tpm: tpm.create_exportable(algorithm, certify_new_key)
            )
        with exported:
            binding = RecordBinding(key_id=key_id, version=version, algorithm=algorithm)
            sealed = seal(exported.private_scalar, binding, self._ring.active)
            public_der = public_key_der(exported.public_key())
        return public_der, sealed, attested[0]

    async def _tpm_bound(
        self, key_id: str, version: int = 1
    ) -> tuple[bytes, bytes, AttestationParts]:
        qualifying = qualifying_data(key_id, version)
        with stage(Stage.TPM, self._metrics):
            key, public_key, attested = await self._tpm.run(
                lambda tpm: tpm.under_storage_primary(
                    "TPM-bound key generation",
                    lambda ectx, primary: create_tpm_bound(ectx, primary, qualifying),
                )
            )
        return public_key_der(public_key), key.encode(), attested


def _reply(record: KeyRecord) -> KeyCreateReply:
    return KeyCreateReply(
        key_id=record.key_id,
        version=record.version,
        algorithm=record.algorithm,
        public_key_pem=public_key_pem(
            load_algorithm_public_key(record.public_key_der, record.algorithm)
        ),
        created_at=record.created_at,
        attestation=attestation_reply(record.attestation),
        protection=record.protection,
        rotation_period=record.rotation_period_s,
        next_rotation_at=record.next_rotation_at,
        label=record.label,
    )
