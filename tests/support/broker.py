"""The test broker: its URL, ``rabbitmqctl``, private vhosts and users with a producer's rights."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import pytest
from yarl import URL

from contracts.replyto import producer_permissions

BASE_AMQP_URL = os.environ.get("ZANDD_TEST_AMQP_URL", "amqp://guest:guest@localhost:5672/")
"""The test broker as an administrator (guest on the default vhost unless configured)."""


def rabbitmqctl(*args: str) -> str:
    """Run ``rabbitmqctl -q`` with ``args`` and return its output; raise if it fails."""
    result = subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=120
    )
    return result.stdout


@contextmanager
def private_vhost() -> Iterator[str]:
    """A vhost of our own on the test broker, removed afterwards; yields its AMQP URL."""
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is needed to create a test vhost (run the tests through ops/test)")
    vhost = f"zandd-test-{uuid.uuid4().hex[:12]}"
    user = URL(BASE_AMQP_URL).user or "guest"
    try:
        rabbitmqctl("add_vhost", vhost)
        rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"cannot create a test vhost: {exc.stderr.strip()}")
    try:
        yield str(URL(BASE_AMQP_URL).with_path("/" + vhost))
    finally:
        rabbitmqctl("delete_vhost", vhost)


def full_permissions(_user: str) -> tuple[str, str, str]:
    """Configure, write and read on everything in the vhost."""
    return ".*", ".*", ".*"


@contextmanager
def broker_users(
    amqp_url: str,
    names: Iterable[str],
    permissions: Callable[[str], tuple[str, str, str]] = producer_permissions,
) -> Iterator[dict[str, str]]:
    """Broker users ``names`` in the vhost of ``amqp_url``: name → AMQP URL, deleted afterwards.

    Each gets a random password and ``permissions(name)`` (by default the documented
    ``contracts.replyto.producer_permissions``).
    """
    base = URL(amqp_url)
    vhost = base.path.removeprefix("/")
    urls: dict[str, str] = {}
    try:
        for name in names:
            # Hex: rabbitmqctl takes a password that starts with "-" for an option (exit 64).
            password = secrets.token_hex(16)
            rabbitmqctl("add_user", name, password)
            urls[name] = str(base.with_user(name).with_password(password))
            rabbitmqctl("set_permissions", "-p", vhost, name, *permissions(name))
        yield urls
    finally:
        for name in urls:
            rabbitmqctl("delete_user", name)


@contextmanager
def producer_users(amqp_url: str, *roles: str) -> Iterator[dict[str, str]]:
    """Broker users with a producer's rights in the vhost of ``amqp_url``: role → AMQP URL.

    The rights are the documented ones (``contracts.replyto.producer_permissions``); the users
    are deleted afterwards.
    """
    names = {f"zt-{role}-{uuid.uuid4().hex[:8]}": role for role in roles}
    with broker_users(amqp_url, names) as urls:
        yield {names[name]: url for name, url in urls.items()}


async def close_connections_in(vhost: str, *, user: str | None = None) -> int:
    """Close every client connection to ``vhost`` (of ``user`` only, when given) from the
    broker's side; how many."""
    listing = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "list_connections", "-q", "--no-table-headers", "pid", "vhost", "user",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await listing.communicate()
    rows = [line.split("\t") for line in out.decode().splitlines()]
    pids = [
        row[0]
        for row in rows
        if len(row) == 3 and row[1] == vhost and (user is None or row[2] == user)
    ]
    for pid in pids:
        closing = await asyncio.create_subprocess_exec(
            "rabbitmqctl", "close_connection", pid, "test: connection lost",
            stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        await closing.wait()
    return len(pids)
