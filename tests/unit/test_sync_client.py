"""The blocking client's surface: every public coroutine method of ``SigningClient``, blocking."""

from __future__ import annotations

import inspect

from contracts.client import SigningClient
from contracts.sync_client import SyncSigningClient


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
