"""``SyncSigningClient``: the signing client for threaded code (Flask, Django, Celery, scripts).

    client = SyncSigningClient.connect("amqp://app:secret@mq/")   # once, at start
    reply = client.sign(key_id, b"hello")                          # from any thread
    client.close()                                                 # or use it as ``with``

It is ``SigningClient`` run on an event loop of its own, in one background thread, with one
persistent connection that every calling thread shares: a call hands its coroutine to that loop
(``asyncio.run_coroutine_threadsafe``) and blocks until the reply. Per-call ``asyncio.run``
pays a connection, a channel and a reply queue on every call; this pays them once.

Same methods, arguments, replies and errors as ``SigningClient`` (the ``ZanddError`` types,
raised in the calling thread): each method below is the async client's own, made blocking by
``_blocking`` — the unit tests check that none is missing. ``async_client`` is the client
underneath (its counters, ``principal``).

Lifetime: ``close()`` (or leaving ``with``) closes the connection and ends the thread. One that
is never closed is closed when it is collected or at interpreter exit (``weakref.finalize``):
the thread is a daemon, so it never holds the interpreter up. After ``os.fork()`` (Celery's
prefork pool, gunicorn) the child does not touch the parent's connection: its first call opens
one of its own.

Calls from the client's own loop thread (code running on that loop) are refused with a
``RuntimeError``: they would wait for themselves. Async code has ``SigningClient`` itself.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import suppress
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

from contracts.amqp import DEFAULT_AMQP_URL
from contracts.brokers import BrokerURLs
from contracts.client import DEFAULT_TIMEOUT_S, SigningClient
from contracts.client_wire import WireSource
from contracts.limits import DEFAULT_LIMITS, Limits

__all__ = ["SyncSigningClient"]

P = ParamSpec("P")
R = TypeVar("R")
#: How long ``close`` waits for the connection to close and the thread to end.
_CLOSE_TIMEOUT_S = 10.0


class _LoopThread:
    """An event loop running forever in a daemon thread; ``run`` blocks on a coroutine there."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, name="zandd-client-loop", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.run_until_complete(asyncio.sleep(0))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def run(self, coroutine: Coroutine[Any, Any, R], timeout_s: float | None = None) -> R:
        """Run ``coroutine`` on the loop and return its result (or raise its error) here."""
        if threading.current_thread() is self.thread:
            coroutine.close()
            raise RuntimeError("SyncSigningClient called from its own event loop thread")
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout_s)
        except BaseException:
            future.cancel()  # a KeyboardInterrupt in the caller: the call stops too
            raise

    def stop(self) -> None:
        """Stop the loop and wait (briefly) for the thread; never from the thread itself."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join(_CLOSE_TIMEOUT_S)


def _shutdown(runner: _LoopThread, client: SigningClient) -> None:
    """Close the client and end its thread (from ``close``, collection or interpreter exit)."""
    if runner.pid != os.getpid() or not runner.thread.is_alive():
        return  # a forked child: the parent's connection and thread are not ours to touch
    if threading.current_thread() is not runner.thread:
        with suppress(Exception):  # closing anyway: the thread must end
            runner.run(client.close(), _CLOSE_TIMEOUT_S)
    runner.stop()


def _blocking(
    method: Callable[Concatenate[SigningClient, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[SyncSigningClient, P], R]:
    """``SigningClient.method``, blocking: runs on the client's loop, returns its result."""

    @functools.wraps(method)
    def call(self: SyncSigningClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        client, runner = self._current()
        return runner.run(method(client, *args, **kwargs))

    return call


def _blocking_iter(
    method: Callable[Concatenate[SigningClient, P], AsyncIterator[R]],
) -> Callable[Concatenate[SyncSigningClient, P], Iterator[R]]:
    """An async iterator method of ``SigningClient``, as a blocking iterator."""

    @functools.wraps(method)
    def call(self: SyncSigningClient, /, *args: P.args, **kwargs: P.kwargs) -> Iterator[R]:
        client, runner = self._current()
        iterator = method(client, *args, **kwargs)
        try:
            while True:
                try:
                    yield runner.run(_next(iterator))
                except StopAsyncIteration:
                    return
        finally:
            if runner.thread.is_alive():
                runner.run(_aclose(iterator))

    return call


async def _next(iterator: AsyncIterator[R]) -> R:
    return await anext(iterator)


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


class SyncSigningClient:
    """``SigningClient`` for threads: one persistent connection on a background event loop.

    Create it with ``SyncSigningClient.connect(url, ...)`` (the arguments of
    ``SigningClient.connect``); thread-safe; close it (or use ``with``).
    """

    def __init__(self, connect: Callable[[], Coroutine[Any, Any, SigningClient]]) -> None:
        self._connect = connect
        self._lock = threading.Lock()
        self._runner, self._client, self._finalizer = self._start()

    @classmethod
    def connect(
        cls,
        url: BrokerURLs | WireSource = DEFAULT_AMQP_URL,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        declare: bool = False,
        retry: bool = False,
        connect_timeout_s: float = 10.0,
        limits: Limits = DEFAULT_LIMITS,
    ) -> SyncSigningClient:
        """Start the loop thread and connect there (``SigningClient.connect``'s arguments;
        a caller's aio-pika connection belongs to its own loop: use ``SigningClient``)."""
        return cls(
            functools.partial(
                SigningClient.connect,
                url,
                timeout_s=timeout_s,
                declare=declare,
                retry=retry,
                connect_timeout_s=connect_timeout_s,
                limits=limits,
            )
        )

    def _start(self) -> tuple[_LoopThread, SigningClient, weakref.finalize[Any, Any]]:
        runner = _LoopThread()
        try:
            client = runner.run(self._connect())
        except BaseException:
            runner.stop()
            raise
        return runner, client, weakref.finalize(self, _shutdown, runner, client)

    def _current(self) -> tuple[SigningClient, _LoopThread]:
        """The client of this process: after a fork, a new connection (and thread) of its own."""
        runner = self._runner
        if runner.pid != os.getpid():
            with self._lock:
                if self._runner.pid != os.getpid():
                    self._finalizer.detach()
                    self._runner, self._client, self._finalizer = self._start()
            runner = self._runner
        if not self._finalizer.alive:
            raise RuntimeError("this SyncSigningClient is closed")
        return self._client, runner

    @property
    def async_client(self) -> SigningClient:
        """The ``SigningClient`` underneath (it lives on the background loop: read, don't await)."""
        return self._client

    @property
    def principal(self) -> str:
        """The AMQP user this client's requests carry as ``user_id``."""
        return self._client.principal

    @property
    def closed(self) -> bool:
        """Whether ``close`` ran (or the client was finalized)."""
        return not self._finalizer.alive

    def close(self) -> None:
        """Fail calls still waiting, close the connection and end the loop thread."""
        self._finalizer()

    def __enter__(self) -> SyncSigningClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # Every public coroutine method of SigningClient, blocking (tests/unit checks the list).
    create_key = _blocking(SigningClient.create_key)
    sign = _blocking(SigningClient.sign)
    sign_in_tpm = _blocking(SigningClient.sign_in_tpm)
    sign_batch = _blocking(SigningClient.sign_batch)
    public_key = _blocking(SigningClient.public_key)
    verify = _blocking(SigningClient.verify)
    verify_trusting_fleet = _blocking(SigningClient.verify_trusting_fleet)
    call = _blocking(SigningClient.call)
    disable_key = _blocking(SigningClient.disable_key)
    enable_key = _blocking(SigningClient.enable_key)
    destroy_key = _blocking(SigningClient.destroy_key)
    cancel_key_destruction = _blocking(SigningClient.cancel_key_destruction)
    verify_on_fleet = _blocking(SigningClient.verify_on_fleet)
    verify_batch_on_fleet = _blocking(SigningClient.verify_batch_on_fleet)
    list_keys = _blocking(SigningClient.list_keys)
    iter_keys = _blocking_iter(SigningClient.iter_keys)
    describe_key = _blocking(SigningClient.describe_key)
    rotate_key = _blocking(SigningClient.rotate_key)
    update_key = _blocking(SigningClient.update_key)
    set_alias = _blocking(SigningClient.set_alias)
    delete_alias = _blocking(SigningClient.delete_alias)
