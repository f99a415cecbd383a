"""Which brokers a URL names, and connecting to the first of them that answers.

Every broker URL ZANDD takes (``ZANDD_AMQP_URL``, ``SigningClient.connect``, the CLI) may name
one broker or a cluster's nodes, in any of these forms:

- ``amqp://user:password@h1:5672,h2:5672,h3/vhost?options``: one URL, several hosts (the form
  other AMQP clients take; a host without a port gets the scheme's, 5672 or 5671);
- several full URLs in one string, separated by commas or whitespace
  (``amqp://u:p@h1/v, amqp://u:p@h2/v``);
- a Python sequence of URLs (each may itself be of the forms above).

``brokers`` turns each into single-host URLs, in the order written; a malformed one is a
``ConfigurationError`` that shows it redacted. Every URL must authenticate as the same user:
the client's requests carry that user as ``user_id``, which the broker checks against the
connection's user, whichever node it reached.

``connect_any`` tries them in shuffled order (so a fleet spreads over the nodes and does not
all land on the first one), each try bounded by a share of the connect timeout (a hung node,
which accepts TCP but never answers, costs that share, not the whole timeout), with a
jittered back-off between rounds, until one answers or the timeout is spent. When none
answers, the error names every host tried and why (no credentials: only ``host:port``).
A broker that failed lately — a try that did not answer, or a connection lost without our
closing it (``suspect``: the lean connection calls it) — is tried after the others for
``SUSPECT_S``: a worker whose node hung must not spend its reconnect on that node again
(measured on a 3-node cluster: a signer that picked the hung node again answered its
stranded requests after their 30 s deadline).
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import unquote

from contracts.errors import BrokerUnavailable, ConfigurationError
from contracts.text import printable
from contracts.urls import REDACTED, redact_url, split_urls

#: One broker URL, several in a string, or a sequence of them.
BrokerURLs = str | Sequence[str]
T = TypeVar("T")

_SCHEMES = {"amqp": 5672, "amqps": 5671}
#: A host name or IPv4 address as a URL may spell it (percent-escapes allowed).
_HOST = re.compile(r"[A-Za-z0-9._~%-]+")
_IPV6 = re.compile(r"\[[0-9A-Fa-f:.]+(%[A-Za-z0-9._~%-]+)?\]")
_PORT = re.compile(r"[0-9]{1,5}")
#: A try gets at least this long (a broker's handshake under load), whatever the share.
MIN_ATTEMPT_S = 2.0
#: Rounds over all hosts at most (each within the connect timeout).
MAX_ROUNDS = 3
_FIRST_BACKOFF_S = 0.1
_MAX_BACKOFF_S = 1.0
#: How long a broker that failed is tried after the others.
SUSPECT_S = 60.0
#: ``host:port`` -> when it last failed (``time.monotonic``), for this process.
_suspects: dict[str, float] = {}


def suspect(url: str) -> None:
    """Every broker ``url`` names failed just now: try it after the others for a while."""
    now = time.monotonic()
    for broker in brokers(url):
        _suspects[broker.address] = now


def _suspected(broker: Broker) -> bool:
    failed_at = _suspects.get(broker.address)
    return failed_at is not None and time.monotonic() - failed_at < SUSPECT_S


@dataclass(frozen=True, slots=True)
class Broker:
    """One broker to connect to: a single-host URL (with its credentials: never shown)."""

    url: str
    host: str
    port: int

    @property
    def address(self) -> str:
        """``host:port``: names the broker in messages without anything secret."""
        return f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"Broker({redact_url(self.url)!r})"


def brokers(urls: BrokerURLs) -> tuple[Broker, ...]:
    """The single-host brokers ``urls`` names, in the order written."""
    texts = [urls] if isinstance(urls, str) else list(urls)
    found: list[Broker] = []
    for text in texts:
        if not isinstance(text, str):
            raise ConfigurationError(f"a broker URL must be a string, not {type(text).__name__}")
        for url in split_urls(text):
            found.extend(_hosts_of(url))
    if not found:
        raise ConfigurationError("no broker URL given")
    users = {_user_of(broker.url) for broker in found}
    if len(users) > 1:
        raise ConfigurationError(
            f"the broker URLs name different users ({', '.join(sorted(users))}): "
            "every node must be reached as the same user"
        )
    return tuple(found)


def single_urls(urls: BrokerURLs) -> tuple[str, ...]:
    """``brokers(urls)``, as single-host URLs."""
    return tuple(broker.url for broker in brokers(urls))


def principal_of(urls: BrokerURLs) -> str:
    """The AMQP user a connection to ``urls`` authenticates as (RabbitMQ's default: guest)."""
    return _user_of(brokers(urls)[0].url)


def shown(urls: BrokerURLs) -> str:
    """``urls`` as it may be shown (passwords redacted), whatever its form."""
    texts = [urls] if isinstance(urls, str) else [str(url) for url in urls]
    return " ".join(redact_url(text) for text in texts)


async def connect_any(
    urls: BrokerURLs,
    attempt: Callable[[str, float], Awaitable[T]],
    *,
    timeout_s: float,
) -> T:
    """``await attempt(url, timeout_s)`` on each broker in shuffled order until one connects.

    ``attempt`` raises ``BrokerUnavailable`` for a broker that does not answer (the next is
    tried) and ``ConfigurationError`` for one that refuses us (raised at once: every node of a
    cluster shares users and TLS settings, so the next would refuse too). Each try gets
    ``timeout_s`` divided among the hosts (at least ``MIN_ATTEMPT_S``, at most what is left);
    with several brokers, up to ``MAX_ROUNDS`` rounds with a jittered back-off between them,
    all within ``timeout_s``. A single broker is tried once and its failure raised as
    ``attempt`` raised it.
    """
    candidates = brokers(urls)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    share_s = max(timeout_s / len(candidates), MIN_ATTEMPT_S)
    failures: dict[str, str] = {}
    last: BrokerUnavailable | None = None
    # One broker: one try, as a plain connect; its caller's reconnect loop does the rest.
    for round_number in range(MAX_ROUNDS if len(candidates) > 1 else 1):
        if round_number:
            backoff_s = min(_MAX_BACKOFF_S, _FIRST_BACKOFF_S * 2 ** (round_number - 1))
            pause_s = random.uniform(backoff_s / 2, backoff_s)  # noqa: S311 - jitter
            if deadline - loop.time() <= pause_s:
                break
            await asyncio.sleep(pause_s)
        # Shuffled, then the brokers that failed lately last (a stable sort keeps the shuffle).
        order = sorted(random.sample(candidates, len(candidates)), key=_suspected)
        for broker in order:
            left_s = deadline - loop.time()
            if left_s <= 0:
                break
            try:
                connected = await attempt(broker.url, min(left_s, share_s))
            except BrokerUnavailable as exc:
                last = exc
                failures[broker.address] = _why(exc)
                _suspects[broker.address] = time.monotonic()
                continue
            _suspects.pop(broker.address, None)
            return connected
        if deadline - loop.time() <= 0:
            break
    if last is None:  # no time at all to try
        raise BrokerUnavailable(f"no time left to connect to {shown(urls)}")
    if len(candidates) == 1:
        raise last
    tried = "; ".join(f"{address} ({why})" for address, why in failures.items())
    raise BrokerUnavailable(
        f"cannot reach any of the {len(candidates)} brokers ({shown(urls)}): {tried}"
    ) from last


#: AMQP reply codes a broker refuses a connection with: the user or password is wrong, or the
#: vhost does not exist, the user has no permission on it, or its connection limit is reached.
ACCESS_REFUSED = 403
NOT_ALLOWED = 530
REFUSAL_CODES = (ACCESS_REFUSED, NOT_ALLOWED)


def refusal(url: str, reply_code: int | None, reply_text: str = "") -> ConfigurationError:
    """The one sentence for a broker that refused us at connect: the cause and the fix.

    Every connection path (the lean ``contracts.wire``, aio-pika's and aiormq's) raises this,
    so each command says it the same way. ``reply_code`` is None when the client library did
    not keep it (aiormq reports a ``connection.close`` answering ``connection.open`` only as
    an unexpected frame): a refusal at ``connection.open`` is about the vhost. The broker's
    text is shown escaped and cut (it is the broker's, not ours); the URL redacted.
    """
    where = redact_url(url)
    user = _user_of(url)
    vhost = _vhost_of(url)
    said = f" ({printable(reply_text, 200)})" if reply_text else ""
    if reply_code == ACCESS_REFUSED:
        return ConfigurationError(
            f"the broker at {where} refused our credentials (user {user!r}){said}: check the "
            "user and password in the URL"
        )
    if "not found" in reply_text:
        return ConfigurationError(
            f"the broker at {where} has no vhost {vhost!r}{said}: create it (rabbitmqctl "
            f"add_vhost {vhost}) or fix the vhost in the URL"
        )
    return ConfigurationError(
        f"the broker at {where} refused user {user!r} on vhost {vhost!r}{said}: check that "
        f"the vhost exists and the user may use it (rabbitmqctl list_vhosts; rabbitmqctl "
        f"list_user_permissions {user}) or fix the URL"
    )


def _vhost_of(url: str) -> str:
    """The vhost a single-host URL names, as aiormq and ``contracts.wire`` read it."""
    rest = url.rpartition("@")[2] if "@" in url.partition("://")[2] else url.partition("://")[2]
    path = rest.partition("?")[0].partition("#")[0]
    slash = path.find("/")
    vhost = path[slash + 1 :] if slash != -1 else ""
    return unquote(vhost) if vhost else "/"


def _why(exc: BrokerUnavailable) -> str:
    """Why one broker did not answer, in a word (the cause's type: never a URL or secret)."""
    cause = exc.__cause__
    return type(cause).__name__ if cause is not None else type(exc).__name__


def _shown(url: str) -> str:
    """A URL for a message: redacted, and without scheme everything up to its last "@" too."""
    if "://" in url:
        return redact_url(url)
    _userinfo, at, rest = url.rpartition("@")
    return f"{REDACTED}@{rest}" if at else url


def _user_of(url: str) -> str:
    _scheme, _sep, remainder = url.partition("://")
    userinfo, at, _rest = remainder.rpartition("@")
    return unquote(userinfo.partition(":")[0]) if at and userinfo else "guest"


def _hosts_of(url: str) -> list[Broker]:
    """One URL (possibly with several hosts) as single-host brokers."""
    scheme, sep, remainder = url.partition("://")
    default_port = _SCHEMES.get(scheme.lower()) if sep else None
    if default_port is None:
        raise ConfigurationError(f"not an AMQP URL (amqp:// or amqps://): {_shown(url)}")
    # Split at the last "@", as redact_url does: a password's "@", "/" or "#" stays in it.
    userinfo, at, rest = remainder.rpartition("@")
    authority_end = len(rest)
    for delimiter in "/?#":
        found = rest.find(delimiter)
        if found != -1:
            authority_end = min(authority_end, found)
    authority, tail = rest[:authority_end], rest[authority_end:]
    prefix = f"{scheme}://{userinfo}{at}"
    if not authority:
        return [Broker(url, "localhost", default_port)]  # amqp:/// : the local default
    found_hosts: list[Broker] = []
    for entry in authority.split(","):
        host, port = _host_and_port(entry, url, default_port)
        found_hosts.append(Broker(f"{prefix}{entry}{tail}", host, port))
    return found_hosts


def _host_and_port(entry: str, url: str, default_port: int) -> tuple[str, int]:
    if entry.startswith("["):
        close = entry.find("]")
        host, after = entry[: close + 1], entry[close + 1 :]
        valid_host = close != -1 and _IPV6.fullmatch(host) is not None
    else:
        host, colon, port_text = entry.partition(":")
        after = colon + port_text
        valid_host = _HOST.fullmatch(host) is not None
    if not valid_host:
        raise ConfigurationError(
            f"a broker host is empty or malformed in {redact_url(url)} "
            "(hosts are separated by commas: amqp://user:password@h1:5672,h2:5672/vhost)"
        )
    if not after:
        return host, default_port
    port_text = after[1:]
    if after[0] != ":" or _PORT.fullmatch(port_text) is None or not 0 < int(port_text) < 65536:
        raise ConfigurationError(f"a broker port is not a port number in {redact_url(url)}")
    return host, int(port_text)
