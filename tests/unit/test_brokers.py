"""Several brokers in one URL: the forms, the errors (never a password), connecting to one."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

import pytest

import contracts.brokers as brokers_module
from contracts.amqp import principal_of, with_heartbeat
from contracts.brokers import (
    MIN_ATTEMPT_S,
    BrokerURLs,
    brokers,
    connect_any,
    shown,
    single_urls,
    suspect,
)
from contracts.errors import BrokerUnavailable, ConfigurationError
from contracts.urls import redact_url, scrub, split_urls, url_secrets
from contracts.wire import (
    KEEPALIVE_IDLE_S,
    KEEPALIVE_INTERVAL_S,
    KEEPALIVE_PROBES,
    Wire,
    tcp_user_timeout_s,
    tune_socket,
)


@pytest.fixture(autouse=True)
def _no_suspects(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no broker suspected of failing (the module keeps them)."""
    monkeypatch.setattr(brokers_module, "_suspects", {})


SECRET = "s3cr%23t-pw"  # percent-encoded "#", so the unquoted form differs too
SECRET_FORMS = ("s3cr%23t-pw", "s3cr#t-pw")


@pytest.mark.parametrize(
    ("urls", "expected"),
    [
        ("amqp://u:p@mq/", ["amqp://u:p@mq/"]),
        ("amqp://u:p@h1:5681,h2:5682,h3/v?heartbeat=3",
         ["amqp://u:p@h1:5681/v?heartbeat=3", "amqp://u:p@h2:5682/v?heartbeat=3",
          "amqp://u:p@h3/v?heartbeat=3"]),
        ("amqp://u:p@a/,amqp://u:p@b/", ["amqp://u:p@a/", "amqp://u:p@b/"]),
        ("amqp://u:p@a/v amqp://u:p@b:1/v\n amqps://u:p@c/v",
         ["amqp://u:p@a/v", "amqp://u:p@b:1/v", "amqps://u:p@c/v"]),
        (["amqp://u:p@a/", "amqp://u:p@b,c/"], ["amqp://u:p@a/", "amqp://u:p@b/", "amqp://u:p@c/"]),
        ("amqp://u:p@[::1]:5681,[fe80::1]/", ["amqp://u:p@[::1]:5681/", "amqp://u:p@[fe80::1]/"]),
        # A password with "@", "," or "/" stays the password (split at the last "@").
        ("amqp://u:p@w,x/y@h1,h2/v", ["amqp://u:p@w,x/y@h1/v", "amqp://u:p@w,x/y@h2/v"]),
        ("amqp://h1,h2", ["amqp://h1", "amqp://h2"]),
    ],
)  # fmt: skip
def test_every_form_names_single_host_brokers_in_the_order_written(
    urls: BrokerURLs, expected: list[str]
) -> None:
    assert list(single_urls(urls)) == expected


def test_a_host_without_a_port_gets_the_schemes() -> None:
    found = brokers("amqp://h1,h2:5681/ amqps://h3/")
    assert [broker.address for broker in found] == ["h1:5672", "h2:5681", "h3:5671"]


@pytest.mark.parametrize(
    "url",
    [
        f"amqp://u:{SECRET}@h1:5681,h2:56x2/v",  # the traceback, as a typed error
        f"amqp://u:{SECRET}@h1:5681,h2:99999/v",
        f"amqp://u:{SECRET}@h1,,h2/v",
        f"amqp://u:{SECRET}@h1,:5672/v",
        f"amqp://u:{SECRET}@h 1/v",
        f"amqp://u:{SECRET}@[::1/v",
        f"amqp://u:{SECRET}@h1:/v",
        f"http://u:{SECRET}@h1/v",
        f"u:{SECRET}@h1/v",
        f"amqp://u:{SECRET}@h1/v, http://u:{SECRET}@h2/v",
        f"amqp://u:{SECRET}@h1/v amqp://other:{SECRET}@h2/v",  # two users
    ],
)
def test_a_malformed_broker_url_is_a_configuration_error_that_shows_no_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        brokers(url)
    for form in SECRET_FORMS:
        assert form not in refused.value.message
        assert form not in repr(refused.value)
    with pytest.raises(ConfigurationError):
        brokers([url])


def test_a_list_of_something_else_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="must be a string"):
        brokers([b"amqp://h/"])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError, match="no broker URL"):
        brokers([])


@pytest.mark.parametrize(
    "urls",
    [
        f"amqp://svc:{SECRET}@h1:5672,h2:5672/v",
        f"amqp://svc:{SECRET}@h1/v,amqp://svc:{SECRET}@h2/v",
        f"amqp://svc:{SECRET}@h1/v amqps://svc:{SECRET}@h2/v?certfile=/c.pem",
        [f"amqp://svc:{SECRET}@h1/v", f"amqp://svc:{SECRET}@h2,h3/v"],
    ],
)
def test_every_form_is_shown_redacted_and_names_its_user(urls: BrokerURLs) -> None:
    texts = [urls] if isinstance(urls, str) else list(urls)
    for text in (
        shown(urls),
        *(redact_url(t) for t in texts),
        *(scrub(f"x {t} y", t) for t in texts),
    ):
        for form in SECRET_FORMS:
            assert form not in text
        assert "svc:***@h" in text
    assert principal_of(urls) == "svc"
    for text in texts:
        assert set(SECRET_FORMS) <= set(url_secrets(text))


def test_two_urls_joined_by_a_comma_are_two_urls_not_one_with_a_vhost_of_the_other() -> None:
    assert split_urls("amqp://u:p@a/,amqp://u:p@b/") == ["amqp://u:p@a/", "amqp://u:p@b/"]
    # One URL's host list and a MongoDB replica set are one URL each.
    assert split_urls("amqp://u:p@a,b/") == ["amqp://u:p@a,b/"]
    assert split_urls("mongodb://u:p@db1,db2/z?replicaSet=rs0") == [
        "mongodb://u:p@db1,db2/z?replicaSet=rs0"
    ]
    assert redact_url("amqp://u:pw1@a/,amqp://u:pw2@b/") == "amqp://u:***@a/ amqp://u:***@b/"


def test_the_urls_heartbeat_wins_over_the_default() -> None:
    assert with_heartbeat("amqp://u:p@h/", 5) == "amqp://u:p@h/?heartbeat=5"
    assert with_heartbeat("amqp://u:p@h/?cafile=/c", 5) == "amqp://u:p@h/?cafile=/c&heartbeat=5"
    assert with_heartbeat("amqp://u:p@h/?heartbeat=30", 5) == "amqp://u:p@h/?heartbeat=30"
    # A "?" in the password is not the query.
    assert with_heartbeat("amqp://u:p?heartbeat=1@h/", 5) == "amqp://u:p?heartbeat=1@h/?heartbeat=5"


# -- connecting: shuffled, bounded per host, every host named -----------------------------------


class _Attempts:
    """An ``attempt`` for connect_any: records what was tried, fails the hosts it is told to."""

    def __init__(self, down: Sequence[str] = (), refusing: Sequence[str] = ()) -> None:
        self.down = set(down)
        self.refusing = set(refusing)
        self.tried: list[tuple[str, float]] = []

    async def __call__(self, url: str, timeout_s: float) -> str:
        self.tried.append((url, timeout_s))
        host = url.partition("://")[2].rpartition("@")[2].partition("/")[0]
        if host in self.refusing:
            raise ConfigurationError(f"the broker at {redact_url(url)} refused our credentials")
        if host in self.down:
            try:
                raise ConnectionRefusedError(111, "refused")
            except OSError as exc:
                raise BrokerUnavailable(f"cannot reach the broker at {redact_url(url)}") from exc
        return url


async def test_the_first_broker_that_answers_is_the_connection() -> None:
    attempts = _Attempts(down=["h1", "h2"])
    url = f"amqp://u:{SECRET}@h1,h2,h3/v"
    assert await connect_any(url, attempts, timeout_s=10) == f"amqp://u:{SECRET}@h3/v"
    # Each try is bounded by a share of the timeout: a hung node does not take all of it.
    assert all(timeout_s <= max(10 / 3, MIN_ATTEMPT_S) for _url, timeout_s in attempts.tried)


async def test_hosts_are_tried_in_shuffled_order() -> None:
    firsts = set()
    for _ in range(60):
        attempts = _Attempts()
        await connect_any("amqp://h1,h2,h3/", attempts, timeout_s=10)
        firsts.add(attempts.tried[0][0])
    assert firsts == {"amqp://h1/", "amqp://h2/", "amqp://h3/"}


async def test_when_none_answers_the_error_names_every_host_and_no_password() -> None:
    attempts = _Attempts(down=["h1", "h2:5681"])
    with pytest.raises(BrokerUnavailable) as failure:
        await connect_any(f"amqp://u:{SECRET}@h1,h2:5681/v", attempts, timeout_s=10)
    message = failure.value.message
    assert "h1:5672 (ConnectionRefusedError)" in message
    assert "h2:5681 (ConnectionRefusedError)" in message
    for form in SECRET_FORMS:
        assert form not in message
    # Several rounds (a rolling restart refuses for a moment), each over every host.
    assert len(attempts.tried) > 2
    assert len(attempts.tried) % 2 == 0


async def test_one_broker_is_tried_once_and_its_own_error_raised() -> None:
    attempts = _Attempts(down=["h1"])
    with pytest.raises(BrokerUnavailable, match=r"^cannot reach the broker at amqp://u:\*\*\*@h1/"):
        await connect_any("amqp://u:p@h1/", attempts, timeout_s=10)
    assert [timeout_s for _url, timeout_s in attempts.tried] == [pytest.approx(10, abs=0.5)]


async def test_a_refusal_is_not_retried_on_the_next_node() -> None:
    attempts = _Attempts(refusing=["h1", "h2"])
    with pytest.raises(ConfigurationError, match="refused our credentials"):
        await connect_any("amqp://h1,h2/", attempts, timeout_s=10)
    assert len(attempts.tried) == 1


async def test_a_hung_broker_costs_its_share_and_the_next_one_answers() -> None:
    # A broker that accepts TCP and never speaks (a SIGSTOPped node): the Wire's own timeout
    # per try, then the next host. Real sockets, no sleeping beyond the share.
    hung_up = asyncio.Event()

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and closes its end
        writer.close()
        await writer.wait_closed()
        hung_up.set()

    hung = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    async with hung:
        port = hung.sockets[0].getsockname()[1]
        with pytest.raises(BrokerUnavailable) as failure:
            await Wire.connect(
                f"amqp://u:{SECRET}@127.0.0.1:{port},127.0.0.1:1/", connection_name="t",
                timeout_s=2.5,
            )  # fmt: skip
        await asyncio.wait_for(hung_up.wait(), 5)  # and the hung broker's socket was closed
    message = failure.value.message
    assert f"127.0.0.1:{port} (TimeoutError)" in message
    assert "127.0.0.1:1 (ConnectionRefusedError)" in message
    for form in SECRET_FORMS:
        assert form not in message


# -- failure detection on the lean connection's socket -----------------------------------------


def test_the_socket_gets_keepalive_and_a_user_timeout_as_long_as_the_heartbeats() -> None:
    with socket.socket() as sock:
        tune_socket(sock, 5)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE_S
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == (
                KEEPALIVE_INTERVAL_S
            )
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == KEEPALIVE_PROBES
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 10_000
    tune_socket(None, 5)  # a test's transport has no socket: nothing to do


def test_detection_stays_well_inside_the_default_call_timeout() -> None:
    from contracts.client import DEFAULT_TIMEOUT_S
    from contracts.wire import DEFAULT_HEARTBEAT_S

    # Missed heartbeats are judged every half interval: at most 2.5 intervals of silence.
    worst_heartbeat_detection_s = DEFAULT_HEARTBEAT_S * 2.5
    assert tcp_user_timeout_s(DEFAULT_HEARTBEAT_S) <= worst_heartbeat_detection_s
    # Detection, then a reconnect and a resend, inside the caller's patience.
    assert worst_heartbeat_detection_s <= DEFAULT_TIMEOUT_S / 2
    assert tcp_user_timeout_s(0) > 0  # heartbeats off: the kernel still gives up


async def test_a_broker_that_failed_lately_is_tried_after_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    urls = "amqp://u:p@bad:5672,good1:5672,good2:5672/"
    tried: list[str] = []

    async def attempt(url: str, _timeout_s: float) -> str:
        tried.append(url)
        raise BrokerUnavailable("down")

    firsts = set()
    for _ in range(20):
        monkeypatch.setattr(brokers_module, "_suspects", {})
        suspect("amqp://u:p@bad:5672/")
        tried.clear()
        with pytest.raises(BrokerUnavailable):
            await connect_any(urls, attempt, timeout_s=0.01)
        assert tried[2] == "amqp://u:p@bad:5672/", tried
        firsts.add(tried[0])
    assert len(firsts) == 2, "the others are still tried in shuffled order"


async def test_a_broker_that_answers_is_no_longer_suspect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(brokers_module, "_suspects", {})
    suspect("amqp://u:p@only-one:5672,other:5672/")
    tried: list[str] = []

    async def attempt(url: str, _timeout_s: float) -> str:
        tried.append(url)
        return url

    await connect_any("amqp://u:p@only-one:5672/", attempt, timeout_s=1)
    tried.clear()
    for _ in range(30):
        await connect_any("amqp://u:p@only-one:5672,other:5672/", attempt, timeout_s=1)
    # "other" is still suspect, so it is never first; "only-one" answered and is not.
    assert tried == ["amqp://u:p@only-one:5672/"] * 30


def test_a_lost_lean_connection_makes_its_broker_suspect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(brokers_module, "_suspects", {})

    class Transport(asyncio.Transport):
        def write(self, data: bytes | bytearray | memoryview) -> None:
            pass

        def close(self) -> None:
            pass

    async def lose(*, ours: bool) -> None:
        wire = Wire.for_testing(Transport())
        wire._handshake_done = True
        wire._closing = ours
        wire.connection_lost(None if ours else ConnectionResetError())

    asyncio.run(lose(ours=True))
    assert brokers_module._suspects == {}, "a connection we closed says nothing of its broker"
    asyncio.run(lose(ours=False))
    assert set(brokers_module._suspects) == {"localhost:5672"}
