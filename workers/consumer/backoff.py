"""Retrying with jittered exponential backoff until it works or the worker is told to stop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_random_exponential,
)

from contracts.errors import ZanddError

T = TypeVar("T")
log = logging.getLogger("zandd.backoff")


async def sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less when ``stop`` is set meanwhile."""
    with suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def every(
    step: Callable[[], Awaitable[object]],
    *,
    stop: asyncio.Event,
    interval_s: float,
    what: str,
    logger: logging.Logger = log,
) -> None:
    """Run ``step`` every ``interval_s`` until ``stop``; a failure is logged (on ``logger``),
    never fatal: a periodic sweep must outlive any one failure."""
    while not stop.is_set():
        try:
            await step()
        except ZanddError as exc:
            logger.warning("%s failed: %s", what, exc.message)
        except Exception:
            logger.exception("%s failed", what)
        await sleep_unless(stop, interval_s)


async def retry_until_stopped(
    operation: Callable[[], Awaitable[T]],
    *,
    stop: asyncio.Event,
    what: str,
    retry_on: tuple[type[BaseException], ...] = (ZanddError,),
    first_delay_s: float = 0.2,
    max_delay_s: float = 30.0,
) -> T | None:
    """Run ``operation`` until it succeeds (its result) or ``stop`` is set (None).

    Waits grow exponentially with full jitter (tenacity's ``wait_random_exponential``), so a
    fleet that lost the same dependency does not come back in lockstep.
    """

    def log_retry(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        message = error.message if isinstance(error, ZanddError) else type(error).__name__
        delay_s = state.next_action.sleep if state.next_action else 0.0
        log.warning("%s: %s; retry %d in %.1f s", what, message, state.attempt_number, delay_s)

    retrying = AsyncRetrying(
        wait=wait_random_exponential(multiplier=first_delay_s, max=max_delay_s),
        retry=retry_if_exception_type(retry_on),
        stop=lambda _state: stop.is_set(),
        sleep=lambda seconds: sleep_unless(stop, seconds),
        before_sleep=log_retry,
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                if stop.is_set():
                    return None
                return await operation()
    except retry_on:
        if stop.is_set():
            return None
        raise
    return None


async def serve_reconnecting(
    connect: Callable[[], Awaitable[T]],
    serve: Callable[[T], Awaitable[None]],
    *,
    stop: asyncio.Event,
    what: str,
    retry_on: tuple[type[BaseException], ...],
    max_delay_s: float = 30.0,
    on_lost: Callable[[], None] | None = None,
) -> None:
    """``serve`` what ``connect`` opened until ``stop``, reconnecting after every loss.

    ``serve`` returns when its connection is lost or ``stop`` is set. The first ``connect`` is
    not retried: a worker that cannot reach its broker at start says so and exits. After a
    loss, ``on_lost`` runs (whoever keeps state the gap made stale drops it there), then
    ``connect`` is retried with backoff (``retry_until_stopped``) until it works or ``stop``.
    """
    connection = await connect()
    while True:
        await serve(connection)
        if stop.is_set():
            return
        if on_lost is not None:
            on_lost()
        reconnected = await retry_until_stopped(
            connect, stop=stop, what=what, retry_on=retry_on, max_delay_s=max_delay_s
        )
        if reconnected is None:
            return
        connection = reconnected
