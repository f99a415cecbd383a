"""Broker users with exactly a producer's rights, for tests that need two principals."""

from __future__ import annotations

import secrets
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from yarl import URL

from contracts.replyto import producer_permissions


def rabbitmqctl(*args: str) -> None:
    """Run ``rabbitmqctl -q`` with ``args``; raise if it fails."""
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


@contextmanager
def producer_users(amqp_url: str, *roles: str) -> Iterator[dict[str, str]]:
    """Broker users with a producer's rights in the vhost of ``amqp_url``: role → AMQP URL.

    The rights are the documented ones (``contracts.replyto.producer_permissions``); the users
    are deleted afterwards.
    """
    base = URL(amqp_url)
    vhost = base.path.removeprefix("/")
    urls: dict[str, str] = {}
    try:
        for role in roles:
            name = f"zt-{role}-{uuid.uuid4().hex[:8]}"
            # Hex: rabbitmqctl takes a password that starts with "-" for an option.
            password = secrets.token_hex(16)
            rabbitmqctl("add_user", name, password)
            urls[role] = str(base.with_user(name).with_password(password))
            rabbitmqctl("set_permissions", "-p", vhost, name, *producer_permissions(name))
        yield urls
    finally:
        for url in urls.values():
            rabbitmqctl("delete_user", URL(url).user or "")
