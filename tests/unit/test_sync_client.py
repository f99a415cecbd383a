"""The blocking client's surface: every public coroutine method of ``SigningClient``, blocking."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from contracts.client import SigningClient
from contracts.errors import KeyNotFound
from contracts.sync_client import SyncSigningClient
from contracts.testing import FakeFleet


def _public_coroutine_methods() -> set[str]:
    return {
        name
        for name, member in vars(SigningClient).items()
        if not name.startswith("_")
        and (inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member))
        and name not in {"connect", "close"}
    }


def test_every_coroutine_method_of_the_async_client_is_there_and_blocking() -> None:
    methods = _public_coroutine_methods()
    assert {"sign", "sign_batch", "create_key", "public_key", "verify", "iter_keys"} <= methods
    for name in methods:
        forwarded = getattr(SyncSigningClient, name, None)
        assert forwarded is not None, f"SyncSigningClient lacks {name}"
        assert not inspect.iscoroutinefunction(forwarded), name
        # Same parameters, same docstring: help() and IDEs show the async client's own.
        assert inspect.signature(forwarded) == inspect.signature(getattr(SigningClient, name))
        assert forwarded.__doc__ == getattr(SigningClient, name).__doc__


def test_the_lifecycle_methods_are_its_own() -> None:
    assert not inspect.iscoroutinefunction(SyncSigningClient.connect)
    assert not inspect.iscoroutinefunction(SyncSigningClient.close)


def _run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
        check=False,
    )


def test_errors_come_back_typed_in_the_calling_thread_and_close_ends_the_thread() -> None:
    before = threading.active_count()
    fleet = FakeFleet()
    client = fleet.sync_client()
    assert threading.active_count() == before + 1
    with pytest.raises(KeyNotFound):
        client.sign("zk-missing", b"m")
    client.close()
    client.close()
    assert client.closed
    assert threading.active_count() == before
    with pytest.raises(RuntimeError, match="closed"):
        client.create_key()


def test_a_client_never_closed_is_closed_at_exit_without_holding_it_up() -> None:
    result = _run(
        """
        from contracts.testing import FakeFleet, FakeWire
        closing = FakeWire.close
        async def close(self):
            print("connection closed", flush=True)
            await closing(self)
        FakeWire.close = close
        client = FakeFleet().sync_client()
        print(client.create_key().key_id, flush=True)
        """
    )
    assert result.returncode == 0, result.stderr
    key_id, closed = result.stdout.splitlines()
    assert key_id.startswith("zk-")
    assert closed == "connection closed"  # by the finalizer, at exit
    assert result.stderr == ""


def test_a_forked_child_opens_its_own_connection() -> None:
    result = _run(
        """
        import os, warnings
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with a thread running
        from contracts.testing import FakeFleet
        client = FakeFleet().sync_client()
        key = client.create_key()
        parent_thread = client._runner.thread
        pid = os.fork()
        if pid == 0:
            reply = client.sign(key.key_id, b"in the child")
            ok = reply.key_id == key.key_id and client._runner.thread is not parent_thread
            client.close()
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert client.sign(key.key_id, b"in the parent").key_id == key.key_id
        client.close()
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_a_call_from_the_clients_own_loop_is_refused_not_deadlocked() -> None:
    with FakeFleet().sync_client() as client:

        async def on_the_loop() -> None:
            with pytest.raises(RuntimeError, match="its own event loop thread"):
                client.create_key()

        client._runner.run(on_the_loop())
        assert client.create_key().key_id  # still serving
