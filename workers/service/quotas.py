"""Per-principal quotas: requests/s and signatures/s, refused with ``throttled`` before parsing.

Each principal (the AMQP ``user_id``) has two token buckets in each worker: one for requests
(every operation costs 1) and one for signatures (``sign`` costs 1, ``sign.batch`` one per
item). The checks run before the request body is parsed, so refusing a flooder costs a
dictionary lookup, an audit entry and a reply — not its batch's validation or signing:

- requests: a request is admitted when its principal's bucket holds a whole token;
- signatures: the item count is only known after parsing, so the bucket may go into debt — a
  signing request is admitted unless the bucket is below zero, and charged its item count
  once parsed; a principal in debt is refused, before parsing, until the debt is paid back.

A refusal carries the time until the bucket would admit the request again (``retry_after_ms``);
the runtime holds the reply 1 s and shortens the hint by that (``workers/consumer/runtime.py``).

**Shared across the workers, approximately.** The fleet has no shared counter (that would be
a round trip per request); instead each of the N workers consuming a queue enforces 1/N of
every rate, where N is the queue's consumer count, read by a passive declare every
``CONSUMER_POLL_S`` (``follow_consumers``). The broker spreads a principal's requests over the
consumers by their free prefetch slots, so with even spreading the fleet admits the quota. The
error is on the safe side in steady state: a worker that gets less than 1/N of a principal's
requests leaves part of its share unused, so the fleet admits at most the quota (plus each
worker's burst of one second's share, i.e. one second of the whole rate, and per worker one
batch of signature debt), and less when the spreading is uneven. For up to ``CONSUMER_POLL_S`` after a worker joins or leaves, the others
still use the old N: a fleet that grew from N to M admits up to M/N of the quota until they
have read it. The keygen queue has a single active consumer, so its count is 1 and its
worker enforces the whole quota.

Memory is bounded: at most ``MAX_TRACKED_PRINCIPALS`` principals have buckets; the least
recently seen is forgotten first (a forgotten bucket starts full again: its debt is forgiven).
Principals are broker users, which only the operator creates, so the bound is generous.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass

from aio_pika.abc import AbstractConnection
from aio_pika.exceptions import AMQPError
from pydantic import BaseModel

from contracts.amqp import connect_plain
from contracts.errors import Throttled, ZanddError
from contracts.models import MAX_RETRY_AFTER_MS, SignBatchRequest, SignRequest
from contracts.operations import Operation
from contracts.topology import consumer_count
from contracts.wire import Delivery
from workers.observability.metrics import Metrics
from workers.service.config import QuotaOverride, Settings
from workers.service.policy import ANONYMOUS_PRINCIPAL

log = logging.getLogger("zandd.quotas")

#: A bucket holds this many seconds of its rate: a burst after a quiet second is admitted.
BURST_S = 1.0
MAX_TRACKED_PRINCIPALS = 10_000
#: How often a worker re-reads how many workers share its queue's quotas (one passive
#: declare on a connection kept open: a round trip, nothing the broker has to write).
CONSUMER_POLL_S = 2.0
#: At most one "is being throttled" log line per principal in this many seconds.
_LOG_EVERY_S = 60.0
_SIGNING = frozenset({Operation.SIGN, Operation.SIGN_BATCH, Operation.SIGN_TPM})
QUOTA_REQUESTS = "requests"
QUOTA_SIGNATURES = "signatures"

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Rates:
    """One principal's quotas, fleet-wide; None is no limit."""

    requests_per_s: float | None = None
    signatures_per_s: float | None = None

    @property
    def unlimited(self) -> bool:
        """Neither rate is limited."""
        return self.requests_per_s is None and self.signatures_per_s is None


class TokenBucket:
    """Tokens flow in at ``rate_per_s`` up to ``capacity``; the level may go below zero (debt)."""

    __slots__ = ("capacity", "level", "rate_per_s", "updated_s")

    def __init__(self, rate_per_s: float, now_s: float, *, burst_s: float = BURST_S) -> None:
        self.rate_per_s = rate_per_s
        self.capacity = max(1.0, rate_per_s * burst_s)
        self.level = self.capacity
        self.updated_s = now_s

    def _refill(self, now_s: float) -> None:
        elapsed_s = max(0.0, now_s - self.updated_s)
        self.level = min(self.capacity, self.level + elapsed_s * self.rate_per_s)
        self.updated_s = now_s

    def take(self, count: float, now_s: float) -> float:
        """Take ``count`` tokens if the bucket holds them: returns 0.0; else takes nothing and
        returns the seconds until it will hold them."""
        self._refill(now_s)
        if self.level >= count:
            self.level -= count
            return 0.0
        return (count - self.level) / self.rate_per_s

    def overdrawn_s(self, now_s: float) -> float:
        """0.0 unless the bucket is in debt; else the seconds until the debt is paid."""
        self._refill(now_s)
        return 0.0 if self.level >= 0 else -self.level / self.rate_per_s

    def charge(self, count: float, now_s: float) -> None:
        """Take ``count`` tokens, going into debt if needed."""
        self._refill(now_s)
        self.level -= count

    def full(self, now_s: float) -> bool:
        """The bucket is full: forgetting it loses nothing."""
        self._refill(now_s)
        return self.level >= self.capacity

    def retune(self, rate_per_s: float, now_s: float, *, burst_s: float = BURST_S) -> None:
        """Change the rate (the worker's share changed); debt is kept, a surplus is capped."""
        self._refill(now_s)
        self.rate_per_s = rate_per_s
        self.capacity = max(1.0, rate_per_s * burst_s)
        self.level = min(self.level, self.capacity)


@dataclass(slots=True)
class _Buckets:
    rates: Rates
    requests: TokenBucket | None
    signatures: TokenBucket | None
    warned_s: float = -math.inf


def rates_from(settings: Settings) -> tuple[Rates, dict[str, Rates]]:
    """The default rates and the per-principal ones that ``ZANDD_QUOTA_*`` set."""
    default = Rates(settings.quota_requests_per_s, settings.quota_signatures_per_s)
    return default, {
        name: _overridden(default, override) for name, override in settings.quota_overrides.items()
    }


def _overridden(default: Rates, override: QuotaOverride | str) -> Rates:
    if isinstance(override, str):  # "unlimited"
        return Rates()
    given = override.model_fields_set
    return Rates(
        override.requests_per_s if "requests_per_s" in given else default.requests_per_s,
        override.signatures_per_s if "signatures_per_s" in given else default.signatures_per_s,
    )


class Quotas:
    """The admission hook of one worker's ``ConsumerRuntime``: refuses ``throttled``.

    ``admit`` runs before the request is parsed, ``charge`` after; both raise ``Throttled``.
    """

    def __init__(
        self,
        default: Rates,
        overrides: Mapping[str, Rates] | None = None,
        *,
        clock: Clock = time.monotonic,
        max_principals: int = MAX_TRACKED_PRINCIPALS,
        metrics: Metrics | None = None,
    ) -> None:
        self._default = default
        self._overrides = dict(overrides or {})
        self._clock = clock
        self._max_principals = max_principals
        self._metrics = metrics
        self._workers = 1
        self._buckets: OrderedDict[str, _Buckets] = OrderedDict()

    @classmethod
    def from_settings(cls, settings: Settings, *, metrics: Metrics | None = None) -> Quotas | None:
        """The quotas ``ZANDD_QUOTA_*`` set, or None when they limit nobody (the default)."""
        default, overrides = rates_from(settings)
        if default.unlimited and all(rates.unlimited for rates in overrides.values()):
            return None
        return cls(default, overrides, metrics=metrics)

    @property
    def workers(self) -> int:
        """How many workers share each principal's quota (each enforces 1/workers of it)."""
        return self._workers

    @property
    def tracked(self) -> int:
        """How many principals have buckets now."""
        return len(self._buckets)

    def share_with(self, workers: int) -> None:
        """Enforce 1/``workers`` of every rate from now on (at least one worker: this one)."""
        workers = max(1, workers)
        if workers == self._workers:
            return
        log.info("quotas: shared by %d workers (was %d)", workers, self._workers)
        self._workers = workers
        now_s = self._clock()
        for buckets in self._buckets.values():
            for bucket, rate in (
                (buckets.requests, buckets.rates.requests_per_s),
                (buckets.signatures, buckets.rates.signatures_per_s),
            ):
                if bucket is not None and rate is not None:
                    bucket.retune(rate / workers, now_s)

    def admit(self, message: Delivery, operation: Operation) -> None:
        """Before parsing: refuse a principal out of requests, or in signature debt."""
        principal = message.user_id or ANONYMOUS_PRINCIPAL
        buckets = self._buckets_of(principal)
        if buckets is None:
            return
        now_s = self._clock()
        if buckets.signatures is not None and operation in _SIGNING:
            wait_s = buckets.signatures.overdrawn_s(now_s)
            if wait_s > 0:
                self._refuse(principal, buckets, QUOTA_SIGNATURES, wait_s, now_s)
        if buckets.requests is not None:
            wait_s = buckets.requests.take(1, now_s)
            if wait_s > 0:
                self._refuse(principal, buckets, QUOTA_REQUESTS, wait_s, now_s)

    def charge(self, message: Delivery, request: BaseModel) -> None:
        """After parsing: charge the signatures the request asks for (into debt if need be)."""
        count = signatures_in(request)
        if count == 0:
            return
        buckets = self._buckets_of(message.user_id or ANONYMOUS_PRINCIPAL)
        if buckets is not None and buckets.signatures is not None:
            buckets.signatures.charge(count, self._clock())

    def _buckets_of(self, principal: str) -> _Buckets | None:
        buckets = self._buckets.get(principal)
        if buckets is not None:
            self._buckets.move_to_end(principal)
            return buckets
        rates = self._overrides.get(principal, self._default)
        if rates.unlimited:
            return None
        now_s = self._clock()
        buckets = _Buckets(
            rates,
            _bucket(rates.requests_per_s, self._workers, now_s),
            _bucket(rates.signatures_per_s, self._workers, now_s),
        )
        self._buckets[principal] = buckets
        while len(self._buckets) > self._max_principals:
            self._buckets.popitem(last=False)
        return buckets

    def _refuse(
        self, principal: str, buckets: _Buckets, quota: str, wait_s: float, now_s: float
    ) -> None:
        if self._metrics is not None:
            self._metrics.throttled(quota)
        rates = buckets.rates
        rate = rates.requests_per_s if quota == QUOTA_REQUESTS else rates.signatures_per_s
        if now_s - buckets.warned_s >= _LOG_EVERY_S:
            buckets.warned_s = now_s
            # One line per principal per minute: a flood must not flood the log as well.
            log.warning("principal %r is throttled: over its %g %s/s", principal, rate, quota)
        retry_after_ms = min(MAX_RETRY_AFTER_MS, max(1, math.ceil(wait_s * 1000)))
        raise Throttled(
            f"over the quota of {rate:g} {quota}/s; send again after retry_after_ms",
            retry_after_s=retry_after_ms / 1000.0,
        )


def _bucket(rate_per_s: float | None, workers: int, now_s: float) -> TokenBucket | None:
    return None if rate_per_s is None else TokenBucket(rate_per_s / workers, now_s)


def signatures_in(request: BaseModel) -> int:
    """How many signatures a parsed request asks for."""
    if isinstance(request, SignBatchRequest):
        return len(request.items)
    return 1 if isinstance(request, SignRequest) else 0


async def follow_consumers(
    quotas: Quotas,
    amqp_url: str,
    queue: str,
    stop: asyncio.Event,
    *,
    interval_s: float = CONSUMER_POLL_S,
) -> None:
    """Until ``stop``: every ``interval_s``, share the quotas by ``queue``'s consumer count.

    One connection, kept open: a poll is one passive declare (no broker permission needed).
    A failed read keeps the last count and reconnects at the next poll.
    """
    connection: AbstractConnection | None = None
    try:
        while not stop.is_set():
            try:
                if connection is None or connection.is_closed:
                    connection = await connect_plain(amqp_url, connection_name="zandd-quotas")
                quotas.share_with(await consumer_count(connection, queue))
            except (AMQPError, ConnectionError, ZanddError, TimeoutError) as exc:
                log.debug("quotas: cannot read the consumer count of %s (%s)", queue, exc)
                if connection is not None:
                    await _close_quietly(connection)
                connection = None
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
    finally:
        if connection is not None:
            await _close_quietly(connection)


async def _close_quietly(connection: AbstractConnection) -> None:
    with suppress(AMQPError, ConnectionError, TimeoutError):
        await connection.close()
