"""The ``reply_to`` rule: the fleet delivers only into queues the requesting producer can read."""

from __future__ import annotations

import base64
import re
import struct

import pytest

from contracts.errors import ErrorCode
from contracts.replyto import (
    MAX_REPLY_TO_BYTES,
    ReplyToRefused,
    check_reply_to,
    direct_reply_node,
    producer_permissions,
)

ALICE = "alice"
#: A direct reply-to name as RabbitMQ 3.10.8 minted it for a requesting channel.
MINTED = "amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AAAEBgAAAABrDIS9.I/6YZ6+e9D/SlXrh8nPXoA=="
NODE = "reply@9248884"
NODES = frozenset({NODE})
SERVER_NAMED = "amq.gen-Lj47WP1eYOHeRBztvFuKmQ"


def direct(
    node: bytes = NODE.encode(),
    *,
    pid_id: int = 1030,
    serial: int = 0,
    creation: int = 0x6B0C84BD,
    head: bytes = bytes([131, 88, 118]),
    key: str = "I/6YZ6+e9D/SlXrh8nPXoA==",
) -> str:
    pid = head + struct.pack(">H", len(node)) + node + struct.pack(">III", pid_id, serial, creation)
    return f"amq.rabbitmq.reply-to.{base64.b64encode(pid).decode()}.{key}"


def allowed(reply_to: str, principal: str | None = ALICE) -> bool:
    try:
        check_reply_to(reply_to, principal, direct_reply_nodes=NODES)
    except ReplyToRefused:
        return False
    return True


@pytest.mark.parametrize(
    ("reply_to", "principal"),
    [
        (MINTED, ALICE),
        (MINTED, None),  # direct reply-to needs no principal: the broker routes by channel
        (direct(creation=0), ALICE),
        (SERVER_NAMED, ALICE),
        (SERVER_NAMED, None),
        ("zandd.reply.alice.0f3c9a1e8b7d4c2a9e6f5b4a3c2d1e0f", ALICE),
        ("zandd.reply.alice.x", ALICE),
        ("zandd.reply.alice.evil.x", "alice.evil"),
        ("zandd.reply.jürgen.inbox", "jürgen"),
        # A SigningClient from before the rule: its uuid4 queue, with or without a user_id.
        ("zandd.reply.0f3c9a1e8b7d4c2a9e6f5b4a3c2d1e0f", ALICE),
        ("zandd.reply.0f3c9a1e8b7d4c2a9e6f5b4a3c2d1e0f", None),
    ],
)
def test_a_producers_own_queues_are_served(reply_to: str, principal: str | None) -> None:
    assert allowed(reply_to, principal)


@pytest.mark.parametrize(
    "reply_to",
    [
        "",
        "zandd.reply.bob.x",  # another principal's queue
        "zandd.dead",
        "zandd.sign",
        "zandd.keygen",
        "zandd.events.host-1.4242.0a1b2c3d",  # a signer's event queue: forged key events
        "billing.invoices",  # another application's queue
        "zandd.reply.0f3c9a1e8b7d4c2a",  # not the old client's uuid4: too short
        "zandd.reply.0F3C9A1E8B7D4C2A9E6F5B4A3C2D1E0F",
        "zandd.reply.0f3c9a1e8b7d4c2a9e6f5b4a3c2d1e0f0",
        "zandd.reply.0f3c9a1e8b7d4c2a9e6f5b4a3c2d1e0f.x",
        "zandd.reply.alice",
        "zandd.reply.alice.",
        "zandd.reply.alice.evil.x",  # alice.evil's, not alice's
        "zandd.reply.alicex.y",
        "zandd.reply.alic.e",
        "zandd.reply.ALICE.x",
        "zandd.reply.alice.x\n",
        "zandd.reply.alice.\x1b[31mred",
        "zandd.reply.alice.é",
        "zandd.reply.alice.x y",
        "zandd.reply.alice." + "x" * (MAX_REPLY_TO_BYTES - len("zandd.reply.alice.") + 1),
        "amq.gen-",
        "amq.gen-abc\x00",
        "amq.gen-abc.def",
        "amq.genx-abc",
        "amq.rabbitmq.reply-to",
        "amq.rabbitmq.reply-to.",
        "amq.rabbitmq.reply-to.garbage",
        "amq.rabbitmq.reply-to.g2gD.xyz",  # a tuple, not a pid: closed the worker's connection
        MINTED + ".x",
        MINTED.replace("==", ""),
        direct(b"reply@1"),  # a node the broker did not mint: connection closed, atom made
        direct(b"rabbit@localhost"),
        direct(pid_id=1 << 15),  # past Erlang 25's local pid numbers: connection closed
        direct(serial=1 << 13),
        direct(head=bytes([131, 103, 118])),  # PID_EXT, not NEW_PID_EXT
        direct(head=bytes([131, 88, 119])),
        direct(key="short=="),
        direct(key="I/6YZ6+e9D/SlXrh8nPXoA"),
        MINTED.replace("g1h2", "g1h2\n"),
    ],
)
def test_everything_else_is_refused(reply_to: str) -> None:
    assert not allowed(reply_to)


def test_the_principal_form_needs_a_validated_user_id() -> None:
    assert not allowed("zandd.reply.alice.x", None)
    assert not allowed("zandd.reply..x", "")
    assert allowed("zandd.reply.alice.x", ALICE)


def test_a_dotted_principal_cannot_be_confused_with_a_shorter_one() -> None:
    # The suffix has no ".", so a name has exactly one owner: everything between the prefix
    # and the last ".".
    name = "zandd.reply.a.b.c"
    owners = [p for p in ("a", "a.b", "a.b.c", "b.c", "b") if allowed(name, p)]
    assert owners == ["a.b"]


def test_direct_reply_to_needs_a_node_learned_from_the_broker() -> None:
    with pytest.raises(ReplyToRefused, match="not one this worker's broker mints"):
        check_reply_to(MINTED, ALICE, direct_reply_nodes=())
    check_reply_to(MINTED, ALICE, direct_reply_nodes={NODE})


def test_direct_reply_node_reads_what_the_broker_minted() -> None:
    assert direct_reply_node(MINTED) == NODE
    assert direct_reply_node(direct(b"reply@1")) == "reply@1"
    assert direct_reply_node(direct(b"rabbit@host")) is None
    assert direct_reply_node(SERVER_NAMED) is None


@pytest.mark.parametrize("hostile", ["\x1b[2J\x1b[H", "line\nforged log line", "\u202eevil"])
def test_the_refusal_names_the_reply_to_escaped(hostile: str) -> None:
    with pytest.raises(ReplyToRefused) as refused:
        check_reply_to(f"zandd.sign{hostile}", ALICE)
    assert hostile not in refused.value.message
    assert refused.value.message.isprintable()
    assert refused.value.message.isascii()


def test_a_long_reply_to_is_cut_short_in_the_refusal() -> None:
    with pytest.raises(ReplyToRefused) as refused:
        check_reply_to("q" * MAX_REPLY_TO_BYTES, ALICE)
    assert len(refused.value.message) < 300


def test_the_refusal_is_an_invalid_request_nobody_is_told_about() -> None:
    assert ReplyToRefused.code is ErrorCode.INVALID_REQUEST
    assert not ReplyToRefused.retryable


def _matches(pattern: str, name: str) -> bool:
    # RabbitMQ matches permission regexes like re.search (PCRE, unanchored by itself).
    return re.search(pattern, name) is not None


@pytest.mark.parametrize("user", ["producer", "alice", "alice.evil", "a-b_c", "jürgen", "x+y"])
def test_producer_permissions_allow_what_the_rule_serves_and_nothing_more(user: str) -> None:
    configure, write, read = producer_permissions(user)
    assert configure == read
    assert _matches(write, "zandd")
    assert not any(_matches(write, x) for x in ("amq.default", "zandd.events", "xzandd", "zandd."))
    names = [
        f"zandd.reply.{user}.0f3c9a1e",
        f"zandd.reply.{user}.x",
        f"zandd.reply.{user}.x.y",
        f"zandd.reply.{user}.",
        f"zandd.reply.{user}",
        f"zandd.reply.{user}x.y",
        "zandd.reply.other.x",
        "zandd.reply.alice.evil.x",
        "zandd.reply.aXb.c",
        "zandd.reply.0f3c9a1e8b7d4c2a9e6f5b4a3c2d1e0f",
        "zandd.reply.0f3c9a1e8b7d4c2a9e6f5b4a3c2d1e0f0",
        "zandd.sign",
        "zandd.dead",
        "zandd.keygen",
        "zandd.events.host.1.a",
    ]
    for name in names:
        # A producer may declare and read exactly the principal-form names it may reply to.
        assert _matches(read, name) == allowed(name, user), name
    assert _matches(read, SERVER_NAMED)
