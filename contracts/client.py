"""``SigningClient``: call the signing fleet over RabbitMQ in one line.

    async with await SigningClient.connect("amqp://app:secret@mq/") as client:
        key = await client.create_key(label="invoices")
        reply = await client.sign(key.key_id, b"hello")
        assert await client.verify(key, reply.signature, message=b"hello")

``verify`` checks against a public key the caller pinned — here the ``key.create`` reply's —
never against a fresh ``key.public`` answer, which is the public key *as the vault says*
(``verify_trusting_fleet`` is that weaker check, named for what it trusts).

One connection, one channel with publisher confirms and one exclusive, server-named reply
queue (``amq.gen-...``: a ``reply_to`` the fleet serves, see ``contracts/replyto.py``) per
client; any number of concurrent calls share them. The connection is the lean one of
``contracts/wire.py`` (a call costs a fraction of its CPU through aiormq); a lost one is
reconnected in the background, with a new reply queue declared (the broker names it anew;
calls in flight on the lost connection have failed, or are resent with ``retry``). Each call
has a timeout that also becomes the request's AMQP ``expiration``, so the fleet does not sign
for a caller who stopped waiting.
Requests are published ``mandatory``: when no worker queue is bound the call fails at once
with ``NotDelivered`` instead of waiting for its timeout.

While the broker blocks the connection (a memory or disk alarm on the broker; RabbitMQ says so
once the client publishes during one), a new call fails at once with the retryable
``BrokerBlocked`` and is not sent — with ``retry`` it waits for the alarm to clear, within its
timeout. A call whose request was sent but not yet confirmed when the block began fails the
same way (``retry``: it waits), its message saying the broker may still deliver it when the
alarm clears; a call already waiting for its reply keeps waiting, and its ``RequestTimeout``
says the connection was blocked.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Sequence
from contextlib import suppress
from types import TracebackType
from typing import Any, TypeVar

from aio_pika.exceptions import AMQPError
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ValidationError

from contracts.amqp import (
    DEADLINE_HEADER,
    DEFAULT_AMQP_URL,
    JSON_CONTENT_TYPE,
    connect_plain,
    principal_of,
)
from contracts.crypto import load_public_key, verify_signature
from contracts.errors import (
    BrokerBlocked,
    BrokerUnavailable,
    InternalError,
    InvalidRequest,
    NotDelivered,
    Refused,
    RequestTimeout,
    Throttled,
    ZanddError,
    error_from_code,
)
from contracts.models import (
    DEFAULT_PENDING_DAYS,
    SPECS,
    Encoding,
    ErrorReply,
    KeyCreateReply,
    KeyCreateRequest,
    KeyDestroyRequest,
    KeyPublicReply,
    KeyPublicRequest,
    KeyStateReply,
    KeyStateRequest,
    Protection,
    SignBatchReply,
    SignBatchRequest,
    SignPayload,
    SignReply,
    SignRequest,
    describe_errors,
)
from contracts.operations import ERROR_REPLY_TYPE, Operation
from contracts.pinning import PinnedKey, PublicKeySource
from contracts.topology import EXCHANGE, declare_topology
from contracts.tracing import producer_span
from contracts.wire import Delivery, Properties, Wire, WireClosed

DEFAULT_TIMEOUT_S = 30.0
_RESEND_FIRST_DELAY_S = 0.05
_RESEND_MAX_DELAY_S = 2.0
_RECONNECT_MAX_DELAY_S = 5.0
_NOT_FOUND = 404
log = logging.getLogger("zandd.client")
ReplyT = TypeVar("ReplyT", bound=BaseModel)
RequestT = TypeVar("RequestT", bound=BaseModel)


class SigningClient:
    """Async RPC client for ZANDD HSM. Create it with ``await SigningClient.connect(url)``."""

    def __init__(
        self, url: str, *, default_timeout_s: float, retry: bool, connect_timeout_s: float
    ) -> None:
        self._url = url
        #: Server-named, so a new one after each reconnect (the calls in flight were failed).
        self._reply_queue = ""
        self._principal = principal_of(url)
        self._default_timeout_s = default_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._retry = retry
        self._wire: Wire | None = None
        #: Set while a connection is up; cleared from its loss until the reconnect.
        self._connected = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[Delivery]] = {}
        self._public_keys: dict[tuple[str, int], ec.EllipticCurvePublicKey] = {}
        self._closing = False
        #: Replies that arrived for no waiting call (a late reply after a timeout, or a
        #: second answer to a redelivered request); they are dropped.
        self.unmatched_replies = 0
        #: Requests sent again after a lost connection or a refusal (``retry=True``).
        self.resent_requests = 0
        #: Requests sent again after a ``throttled`` reply's retry-after (``retry=True``).
        self.throttled_retries = 0
        #: While the broker blocks the connection: since when (loop time) and why.
        self._blocked_since: float | None = None
        self._blocked_reason = ""
        #: The last block that ended, (start, end) in loop time: a timeout message names it.
        self._last_block: tuple[float, float] | None = None
        self._unblocked = asyncio.Event()
        self._unblocked.set()
        #: Confirms awaited without ``retry``: a block fails them with ``BrokerBlocked``.
        self._unconfirmed: set[asyncio.Future[bool]] = set()

    @classmethod
    async def connect(
        cls,
        url: str = DEFAULT_AMQP_URL,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        declare: bool = False,
        retry: bool = False,
        connect_timeout_s: float = 10.0,
    ) -> SigningClient:
        """Connect to the broker at ``url``; ``timeout_s`` is the default per-call timeout.

        ``declare=True`` declares the topology first (needs configure rights on the broker).
        ``retry=True`` resends calls interrupted by a lost connection (see ``call``) and calls
        answered ``throttled`` (after the reply's retry-after); without it they fail at once
        with the retryable ``BrokerUnavailable`` or ``Throttled``. A lost connection is
        reconnected in the background either way.
        """
        if declare:
            await _declare_topology(url, connect_timeout_s)
        client = cls(
            url, default_timeout_s=timeout_s, retry=retry, connect_timeout_s=connect_timeout_s
        )
        await client._open()
        client._supervisor = asyncio.get_running_loop().create_task(client._supervise())
        return client

    async def _open(self) -> None:
        """Connect, turn on publisher confirms, declare the reply queue and consume it."""
        wire = await Wire.connect(
            self._url, connection_name="zandd-client", timeout_s=self._connect_timeout_s
        )
        try:
            await wire.confirm_select()
            reply_queue = (await wire.declare_queue("", exclusive=True, auto_delete=True)).name
            await wire.consume(reply_queue, self._on_reply, no_ack=True)
        except WireClosed as exc:
            await wire.close()
            raise BrokerUnavailable(f"cannot set up the reply queue: {exc}") from exc
        except BaseException:
            wire.drop("setting up the client was interrupted")
            raise
        wire.on_return = self._on_return
        wire.on_blocked(lambda reason: self._on_blocked(wire, reason))
        self._end_block()  # a new connection is not blocked until the broker says so
        self._reply_queue = reply_queue
        self._wire = wire
        self._connected.set()

    async def _supervise(self) -> None:
        """After a lost connection: fail (or leave to ``retry``) the waiting calls, reconnect."""
        while not self._closing:
            wire = self._wire
            assert wire is not None  # set by _open before this task starts
            await wire.lost.wait()
            self._connected.clear()
            if self._closing:
                return
            log.warning("lost the broker connection (%s); reconnecting", wire.reason)
            self._fail_pending(BrokerUnavailable(f"the broker connection closed: {wire.reason}"))
            failures = 0
            while not self._closing:
                failures += 1
                await asyncio.sleep(_backoff_s(failures, _RECONNECT_MAX_DELAY_S))
                try:
                    await self._open()
                except ZanddError as exc:
                    log.info("reconnecting to the broker (attempt %d): %s", failures, exc.message)
                    continue
                log.info("reconnected to the broker")
                break

    async def close(self) -> None:
        """Fail calls still waiting and close the connection."""
        self._closing = True
        self._fail_pending(BrokerUnavailable("the client was closed"))
        if self._supervisor is not None:
            self._supervisor.cancel()
            with suppress(asyncio.CancelledError):
                await self._supervisor
        if self._wire is not None:
            await self._wire.close()

    async def __aenter__(self) -> SigningClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def principal(self) -> str:
        """The AMQP user this client's requests carry as ``user_id``."""
        return self._principal

    async def create_key(
        self,
        *,
        label: str | None = None,
        allowed_signers: Sequence[str] | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
        protection: Protection = "exportable",
    ) -> KeyCreateReply:
        """Create a key. Sending the same ``request_id`` again returns the same key.

        ``protection="tpm"`` makes a key that never leaves the TPM (sign it with
        ``sign_in_tpm``)."""
        request = _request(
            KeyCreateRequest,
            label=label,
            allowed_signers=list(allowed_signers) if allowed_signers is not None else None,
            protection=protection,
        )
        return await self.call(
            Operation.KEY_CREATE,
            request,
            KeyCreateReply,
            message_id=request_id,
            timeout_s=timeout_s,
        )

    async def sign(
        self,
        key_id: str,
        message: bytes | None = None,
        *,
        digest: bytes | None = None,
        encoding: Encoding = "der",
        version: int | None = None,
        timeout_s: float | None = None,
    ) -> SignReply:
        """Sign ``message`` (or a precomputed SHA-256 ``digest``) with the key."""
        request = _sign_request(key_id, message, digest, encoding, version)
        return await self.call(Operation.SIGN, request, SignReply, timeout_s=timeout_s)

    async def sign_in_tpm(
        self,
        key_id: str,
        message: bytes | None = None,
        *,
        digest: bytes | None = None,
        encoding: Encoding = "der",
        version: int | None = None,
        timeout_s: float | None = None,
    ) -> SignReply:
        """``sign.tpm``: sign with a key of protection ``tpm``, inside the TPM (keygen worker)."""
        request = _sign_request(key_id, message, digest, encoding, version)
        return await self.call(Operation.SIGN_TPM, request, SignReply, timeout_s=timeout_s)

    async def sign_batch(
        self,
        key_id: str,
        messages: Sequence[bytes] = (),
        *,
        digests: Sequence[bytes] = (),
        encoding: Encoding = "der",
        version: int | None = None,
        timeout_s: float | None = None,
    ) -> SignBatchReply:
        """Sign many messages (then many digests) with one key; signatures come in that order."""
        items = [_request(SignPayload, message=m) for m in messages] + [
            _request(SignPayload, digest=d) for d in digests
        ]
        request = _request(
            SignBatchRequest, key_id=key_id, version=version, items=items, encoding=encoding
        )
        return await self.call(Operation.SIGN_BATCH, request, SignBatchReply, timeout_s=timeout_s)

    async def public_key(
        self, key_id: str, version: int | None = None, *, timeout_s: float | None = None
    ) -> KeyPublicReply:
        """The key's public half (PEM and JWK)."""
        request = _request(KeyPublicRequest, key_id=key_id, version=version)
        return await self.call(Operation.KEY_PUBLIC, request, KeyPublicReply, timeout_s=timeout_s)

    async def verify(
        self,
        public_key: PublicKeySource,
        signature: bytes,
        *,
        message: bytes | None = None,
        digest: bytes | None = None,
        encoding: Encoding = "der",
    ) -> bool:
        """Verify locally against a public key the caller pinned: the ``create_key`` reply, a
        ``PinnedKey``, a ``cryptography`` public key, PEM or a JWK. Nothing is asked of the
        fleet, so a vault writer who swapped the key's stored public key cannot make a forged
        signature pass. A key id is refused: that is ``verify_trusting_fleet``."""
        pinned = PinnedKey.of(public_key)
        return pinned.verify(signature, message=message, digest=digest, encoding=encoding)

    async def verify_trusting_fleet(
        self,
        key_id: str,
        signature: bytes,
        *,
        message: bytes | None = None,
        digest: bytes | None = None,
        encoding: Encoding = "der",
        version: int | None = None,
    ) -> bool:
        """Verify against the public key ``key.public`` returns — as the vault says, so a vault
        writer who swapped it makes this accept its forgeries; pin the key instead (``verify``).

        The public key of a named ``version`` is fetched once and cached; without ``version``
        the key's current public key is asked for on every call (a rotation may have changed it).
        """
        key = await self._cached_public_key(key_id, version)
        return verify_signature(key, signature, message=message, digest=digest, encoding=encoding)

    async def _cached_public_key(
        self, key_id: str, version: int | None
    ) -> ec.EllipticCurvePublicKey:
        if version is not None and (key_id, version) in self._public_keys:
            return self._public_keys[key_id, version]
        reply = await self.public_key(key_id, version)
        key = load_public_key(reply.public_key_pem)
        self._public_keys[key_id, reply.version] = key
        return key

    async def call(
        self,
        operation: Operation,
        request: BaseModel,
        reply_model: type[ReplyT],
        *,
        message_id: str | None = None,
        timeout_s: float | None = None,
    ) -> ReplyT:
        """Send any v1 request and wait for its reply; errors come back as typed exceptions.

        With ``retry=True`` on the client, a call whose connection dropped (or whose request
        the broker refused) is sent again with the same ``message_id`` once the connection is
        back, and a call answered ``throttled`` is sent again after the reply's retry-after,
        until its timeout: every v1 operation is idempotent on its message id. A retry-after
        that ends beyond the timeout raises ``Throttled`` at once rather than waiting for it.
        """
        if SPECS[operation].reply is not reply_model:
            raise TypeError(f"{operation.value} replies with {SPECS[operation].reply.__name__}")
        timeout = self._default_timeout_s if timeout_s is None else timeout_s
        # The correlation id is per call; the message id is the request's identity, which a
        # caller repeats on purpose to make a retry idempotent.
        correlation_id = uuid.uuid4().hex
        request_id = message_id or correlation_id
        deadline_ms = int((time.time() + timeout) * 1000)
        body = request.model_dump_json(exclude_none=True).encode()
        ends_at = asyncio.get_running_loop().time() + timeout
        try:
            async with asyncio.timeout_at(ends_at):
                while True:
                    reply = await self._attempts(
                        operation, body, request_id, correlation_id, deadline_ms
                    )
                    if not self._retry or not await self._waited_out_throttle(reply, ends_at):
                        break
        except TimeoutError:
            raise RequestTimeout(
                f"no reply to {operation.value} within {timeout:g} s (request {request_id})"
                f"{self._blocked_note(ends_at - timeout)}"
            ) from None
        return _decode_reply(reply, reply_model)

    async def _waited_out_throttle(self, reply: Delivery, ends_at: float) -> bool:
        """For a ``throttled`` reply, wait its retry-after and say so (then send again).

        A hint that ends after the call's timeout is not waited for: the call fails now.
        """
        if reply.type != ERROR_REPLY_TYPE:
            return False
        error = _decode_error(reply)
        if not isinstance(error, Throttled):
            return False
        # Without a hint, the resend backoff's ceiling; a little jitter on top, so throttled
        # callers do not come back in lockstep.
        wait_s = _RESEND_MAX_DELAY_S if error.retry_after_s is None else error.retry_after_s
        wait_s *= random.uniform(1.0, 1.2)  # noqa: S311 - jitter, not a secret
        if asyncio.get_running_loop().time() + wait_s >= ends_at:
            raise error
        await asyncio.sleep(wait_s)
        self.throttled_retries += 1
        return True

    async def _attempts(
        self,
        operation: Operation,
        body: bytes,
        request_id: str,
        correlation_id: str,
        deadline_ms: int,
    ) -> Delivery:
        failures = 0
        while True:
            future: asyncio.Future[Delivery] = asyncio.get_running_loop().create_future()
            self._pending[correlation_id] = future
            try:
                await self._publish(operation, body, request_id, correlation_id, deadline_ms)
                return await future
            except BrokerUnavailable as exc:  # Refused (a nack) included
                if not self._retry or self._closing:
                    raise
                failures += 1
                log.info("resending %s %s after: %s", operation.value, request_id, exc.message)
            finally:
                self._pending.pop(correlation_id, None)
            # A lost connection fails a publish at once: back off (jittered, so a thousand
            # waiting calls do not come back in lockstep), then wait for the connection.
            await asyncio.sleep(_backoff_s(failures, _RESEND_MAX_DELAY_S))
            await self._connected.wait()
            self.resent_requests += 1

    async def _publish(
        self,
        operation: Operation,
        body: bytes,
        request_id: str,
        correlation_id: str,
        deadline_ms: int,
    ) -> None:
        with producer_span(
            exchange=EXCHANGE,
            routing_key=operation.value,
            message_id=request_id,
            correlation_id=correlation_id,
        ) as headers:
            headers[DEADLINE_HEADER] = deadline_ms
            properties = Properties(
                content_type=JSON_CONTENT_TYPE,
                headers=headers,
                persistent=True,
                correlation_id=correlation_id,
                reply_to=self._reply_queue,
                # The broker drops the request if it is still queued when the caller gives up.
                expiration=str(max(1, deadline_ms - int(time.time() * 1000))),
                message_id=request_id,
                type=operation.value,
                user_id=self._principal,
            )
            await self._send(body, properties, operation)

    async def _send(self, body: bytes, properties: Properties, operation: Operation) -> None:
        """Publish (mandatory) and wait for the broker's confirm: it has the request, or why not."""
        wire = self._wire
        if wire is None or not self._connected.is_set():
            raise BrokerUnavailable(f"not connected to the broker; {operation.value} was not sent")
        if self._blocked_since is not None:
            if not self._retry:
                raise BrokerBlocked(self._blocked_message(f"{operation.value} was not sent"))
            await self._until_unblocked(wire, operation.value)
        try:
            confirmed = wire.publish(
                body, properties, exchange=EXCHANGE, routing_key=operation.value, mandatory=True
            )
            assert confirmed is not None  # confirms are on from _open
            if self._retry:
                accepted = await confirmed
            else:
                self._unconfirmed.add(confirmed)
                try:
                    accepted = await confirmed
                finally:
                    self._unconfirmed.discard(confirmed)
        except WireClosed as exc:
            if exc.reply_code == _NOT_FOUND:  # a missing exchange closes the channel
                raise _not_routed(operation.value) from exc
            raise BrokerUnavailable(f"lost the broker while sending {operation.value}") from exc
        if not accepted:
            raise Refused(f"the broker refused {operation.value} (queue full?)")

    # -- the broker's back-pressure ------------------------------------------------------------

    def _on_blocked(self, wire: Wire, reason: str | None) -> None:
        """The broker blocked (``reason``) or unblocked (None) ``wire``."""
        if wire is not self._wire:
            return
        if reason is None:
            self._end_block()
            log.info("the broker unblocked this client's connection")
            return
        if self._blocked_since is not None:
            return
        self._blocked_since = asyncio.get_running_loop().time()
        self._blocked_reason = reason
        self._unblocked.clear()
        log.warning(
            "the broker blocks this client's connection (%s: a memory or disk alarm on the "
            "broker); new calls %s until it clears",
            reason,
            "wait" if self._retry else "fail with BrokerBlocked",
        )
        # Sent, not yet taken: the caller is told now rather than at its timeout. (The Wire
        # settles only confirms that are not done yet.)
        for confirmed in self._unconfirmed:
            if not confirmed.done():
                confirmed.set_exception(
                    BrokerBlocked(
                        self._blocked_message(
                            "the request was sent but not yet taken: the broker may still "
                            "deliver it when the alarm clears"
                        )
                    )
                )

    def _end_block(self) -> None:
        since, self._blocked_since = self._blocked_since, None
        self._unblocked.set()
        if since is not None:
            self._last_block = (since, asyncio.get_running_loop().time())

    async def _until_unblocked(self, wire: Wire, operation: str) -> None:
        """Wait (``retry``) until the broker unblocks ``wire``; raise if the connection goes."""
        waits = [
            asyncio.ensure_future(self._unblocked.wait()),
            asyncio.ensure_future(wire.lost.wait()),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        if wire.lost.is_set() or wire is not self._wire:
            raise BrokerUnavailable(f"lost the broker while it blocked {operation}")

    def _blocked_message(self, what: str) -> str:
        since = self._blocked_since
        blocked_s = 0.0 if since is None else asyncio.get_running_loop().time() - since
        return (
            f"the broker is refusing new messages ({self._blocked_reason}: a memory or disk "
            f"alarm on the broker, {blocked_s:.1f} s so far) — retry later; {what}"
        )

    def _blocked_note(self, started: float) -> str:
        """For a timeout message: whether the broker blocked the connection during the call."""
        now = asyncio.get_running_loop().time()
        if self._blocked_since is not None:
            return (
                f": the broker has blocked this client's connection for the last "
                f"{now - self._blocked_since:.1f} s ({self._blocked_reason}: a memory or disk "
                "alarm on the broker)"
            )
        if self._last_block is not None and self._last_block[1] > started:
            start, end = self._last_block
            return (
                f": the broker blocked this client's connection for {end - max(start, started):.1f}"
                " s of it (a memory or disk alarm on the broker)"
            )
        return ""

    def _on_return(self, _code: int, _text: str, message: Delivery) -> None:
        """A mandatory request no queue was bound for: its call fails now, not at its timeout."""
        future = self._pending.get(message.correlation_id or "")
        if future is not None and not future.done():
            future.set_exception(_not_routed(message.type or "the request"))

    def _on_reply(self, message: Delivery) -> None:
        future = self._pending.get(message.correlation_id or "")
        if future is None or future.done():
            self.unmatched_replies += 1
            return
        future.set_result(message)

    def _fail_pending(self, error: ZanddError) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)

    # -- key lifecycle (owner and admins only); without ``version``: every live version ------

    async def disable_key(
        self, key_id: str, version: int | None = None, *, timeout_s: float | None = None
    ) -> KeyStateReply:
        """Refuse all signing with the key until ``enable_key``; signers hear of it at once."""
        request = _request(KeyStateRequest, key_id=key_id, version=version)
        return await self.call(Operation.KEY_DISABLE, request, KeyStateReply, timeout_s=timeout_s)

    async def enable_key(
        self, key_id: str, version: int | None = None, *, timeout_s: float | None = None
    ) -> KeyStateReply:
        """Allow signing with a disabled key again."""
        request = _request(KeyStateRequest, key_id=key_id, version=version)
        return await self.call(Operation.KEY_ENABLE, request, KeyStateReply, timeout_s=timeout_s)

    async def destroy_key(
        self,
        key_id: str,
        version: int | None = None,
        *,
        pending_days: int = DEFAULT_PENDING_DAYS,
        timeout_s: float | None = None,
    ) -> KeyStateReply:
        """Stop signing now; erase the sealed key after ``pending_days`` unless cancelled."""
        request = _request(
            KeyDestroyRequest, key_id=key_id, version=version, pending_days=pending_days
        )
        return await self.call(Operation.KEY_DESTROY, request, KeyStateReply, timeout_s=timeout_s)

    async def cancel_key_destruction(
        self, key_id: str, version: int | None = None, *, timeout_s: float | None = None
    ) -> KeyStateReply:
        """Call off a scheduled destruction; the key comes back disabled."""
        request = _request(KeyStateRequest, key_id=key_id, version=version)
        return await self.call(
            Operation.KEY_CANCEL_DESTROY, request, KeyStateReply, timeout_s=timeout_s
        )


def _sign_request(
    key_id: str,
    message: bytes | None,
    digest: bytes | None,
    encoding: Encoding,
    version: int | None,
) -> SignRequest:
    """The body of ``sign`` and ``sign.tpm`` (the same request)."""
    return _request(
        SignRequest,
        key_id=key_id,
        version=version,
        message=message,
        digest=digest,
        encoding=encoding,
    )


def _request(model: type[RequestT], **fields: Any) -> RequestT:
    """Build a request model; a bad argument is ``InvalidRequest`` naming the field, never
    quoting the value (it may be the data to sign)."""
    try:
        return model(**fields)
    except ValidationError as exc:
        raise InvalidRequest(f"invalid {model.__name__}: {describe_errors(exc)}") from None


def _backoff_s(failures: int, max_delay_s: float) -> float:
    ceiling_s = min(max_delay_s, _RESEND_FIRST_DELAY_S * 2 ** (failures - 1))
    return random.uniform(ceiling_s / 2, ceiling_s)  # noqa: S311 - jitter, not a secret


def _not_routed(operation: str) -> NotDelivered:
    return NotDelivered(
        f"the broker could not route {operation}: is the ZANDD fleet running "
        "(its queues are declared when a worker starts)?"
    )


async def _declare_topology(url: str, timeout_s: float) -> None:
    """Declare the fleet's exchanges and queues (aio-pika, on a short connection of its own)."""
    connection = await connect_plain(url, connection_name="zandd-client", timeout_s=timeout_s)
    async with connection:
        try:
            await declare_topology(await connection.channel())
        except AMQPError as exc:
            raise BrokerUnavailable(f"cannot declare the topology: {exc}") from exc


def _decode_reply(message: Delivery, reply_model: type[ReplyT]) -> ReplyT:
    if message.type == ERROR_REPLY_TYPE:
        raise _decode_error(message)
    try:
        return reply_model.model_validate_json(message.body)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise _off_contract(exc) from exc


def _decode_error(message: Delivery) -> ZanddError:
    """The typed error an ``error`` reply stands for."""
    try:
        error = ErrorReply.model_validate_json(message.body)
    except ValueError as exc:
        off_contract = _off_contract(exc)
        off_contract.__cause__ = exc
        return off_contract
    return error_from_code(error.code, error.message, retry_after_ms=error.retry_after_ms)


def _off_contract(exc: ValueError) -> InternalError:
    return InternalError(f"the service sent a reply that does not follow the contract: {exc}")
