"""Where the fleet may deliver a reply: the wire contract's ``reply_to`` rule, in one place.

A worker publishes each reply to the default exchange with routing key = ``reply_to``, with
the worker's own broker rights. Unchecked, any producer could have the fleet drop messages
into any queue of the vhost (a confused deputy). So a request is served only when its
``reply_to`` names a queue its producer can read itself:

- direct reply-to, ``amq.rabbitmq.reply-to.<pid>.<key>``: the broker rewrites the bare name
  ``amq.rabbitmq.reply-to`` into this form on publish and delivers only to the requesting
  channel, whose random key must match;
- a server-named queue, ``amq.gen-<22 characters>``: clients cannot declare an ``amq.``
  name (the broker refuses with 403), so only the broker made it; its 128 random bits keep it
  out of reach of a producer that does not know it;
- a queue named for the request's principal, ``zandd.reply.<user_id>.<suffix>``, where
  ``user_id`` is the one the broker validated and ``suffix`` has no ``.`` (so a principal
  ``alice`` cannot claim ``zandd.reply.alice.evil.x``, which belongs to ``alice.evil``). Each
  producer's broker permissions allow exactly these names (``producer_permissions``);
- for producers on a ``SigningClient`` from before this rule: its exclusive queue
  ``zandd.reply.<32 hex digits>`` (a uuid4, 122 random bits), accepted with the same residual
  as a server-named queue — reachable only by a producer that learns the name.

Anything else is not served: the request is dead-lettered unanswered.

Direct reply-to names are checked to the byte: on RabbitMQ 3.10 (Erlang 25) a reply routed to
a malformed one (a pid of another node, a pid number past the local bounds, base64 that is not
a pid) crashes the publishing channel and closes the worker's whole connection with 541
INTERNAL_ERROR, and every unknown node name becomes a permanent atom in the broker. Hence the
node segment must be one the broker itself minted (``learn_direct_reply_node``).

In a cluster every node mints its own segment, and a producer connected to another node than
the worker's gets that node's: a worker learns the segment of every node its URL names
(``learn_direct_reply_nodes``), and the broker it replies through routes the reply to the
requester's node.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import struct
import uuid
from collections.abc import Collection

import aio_pika
from aio_pika.abc import AbstractConnection
from aio_pika.exceptions import AMQPError

from contracts.amqp import connect_plain
from contracts.brokers import BrokerURLs, brokers
from contracts.errors import InvalidRequest, ZanddError
from contracts.topology import EXCHANGE, REPLY_QUEUE_PREFIX

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
SERVER_NAMED_PREFIX = "amq.gen-"
#: An AMQP short string: no queue name, and so no ``reply_to``, is longer.
MAX_REPLY_TO_BYTES = 255
_MAX_SHOWN_CHARS = 80
_PROBE_TIMEOUT_S = 10.0
#: How long the probes of a cluster's other nodes may take together (a hung node is skipped).
NODE_PROBES_TIMEOUT_S = 3.0
log = logging.getLogger("zandd.replyto")

_SERVER_NAMED = re.compile(r"amq\.gen-[A-Za-z0-9_-]+")
_PRINCIPAL_SUFFIX = re.compile(r"[A-Za-z0-9_-]+")
#: The reply queue of a SigningClient from before the rule: the prefix and a uuid4's hex.
_LEGACY_CLIENT = re.compile(r"zandd\.reply\.[0-9a-f]{32}")
_LEGACY_CLIENT_PERMISSION = "zandd\\.reply\\.[0-9a-f]{32}"
_DIRECT = re.compile(r"amq\.rabbitmq\.reply-to\.([A-Za-z0-9+/]+={0,2})\.([A-Za-z0-9+/]{22}==)")
# The pid as the broker encodes it (pid_recomposition:to_binary): external term format
# version 131, NEW_PID_EXT 88, ATOM_UTF8_EXT 118, a 16-bit node name length, then the node
# name and 32-bit id, serial and creation.
_PID_HEAD = struct.Struct(">BBBH")
_PID_TAIL = struct.Struct(">III")
_PID_MAGIC = (131, 88, 118)
# Local pid numbers on Erlang 25: a larger id or serial makes binary_to_term fail in the
# broker (measured on RabbitMQ 3.10.8: id 32768 or serial 8192 close the connection).
_PID_ID_LIMIT = 1 << 15
_PID_SERIAL_LIMIT = 1 << 13
_NODE = re.compile(r"reply@[0-9]{1,10}")


class ReplyToRefused(InvalidRequest):
    """A ``reply_to`` the fleet will not deliver to: the request is dead-lettered unanswered."""


def principal_reply_prefix(principal: str) -> str:
    """The start of the reply queue names that belong to ``principal``."""
    return f"{REPLY_QUEUE_PREFIX}{principal}."


def producer_permissions(user: str) -> tuple[str, str, str]:
    """The broker permissions (configure, write, read) of producer ``user``, as regexes.

    RabbitMQ 3.10 does not expand ``{username}`` in resource permissions (only in topic
    permissions), so each producer user gets its own line naming it.
    """
    own = (
        f"^({_regex_literal(principal_reply_prefix(user))}[A-Za-z0-9_-]+"
        f"|{_LEGACY_CLIENT_PERMISSION}|amq\\.gen-.+)$"
    )
    return own, f"^{_regex_literal(EXCHANGE)}$", own


def check_reply_to(
    reply_to: str, principal: str | None, *, direct_reply_nodes: Collection[str] = ()
) -> None:
    """Raise ``ReplyToRefused`` unless a reply to ``reply_to`` reaches only ``principal``.

    ``principal`` is the request's broker-validated ``user_id`` (None without one: such a
    request can use only direct reply-to and server-named queues). ``direct_reply_nodes``
    are the node segments the broker mints in direct reply-to names.
    """
    if not reply_to or len(reply_to.encode("utf-8", "surrogatepass")) > MAX_REPLY_TO_BYTES:
        raise ReplyToRefused(f"reply_to {_shown(reply_to)} is empty or too long")
    if reply_to.startswith(SERVER_NAMED_PREFIX):
        if _SERVER_NAMED.fullmatch(reply_to) is None:
            raise ReplyToRefused(f"reply_to {_shown(reply_to)} is no server-named queue")
    elif reply_to.startswith(f"{DIRECT_REPLY_TO}."):
        _check_direct(reply_to, direct_reply_nodes)
    elif _LEGACY_CLIENT.fullmatch(reply_to) is None and not _is_principals_queue(
        reply_to, principal
    ):
        raise ReplyToRefused(
            f"reply_to {_shown(reply_to)} is none of direct reply-to, a server-named queue "
            f"or {_shown(principal_reply_prefix(principal or '<user_id>') + '<suffix>')}"
        )


def direct_reply_node(reply_to: str) -> str | None:
    """The node segment of a well-formed direct reply-to name, or None."""
    matched = _DIRECT.fullmatch(reply_to)
    if matched is None:
        return None
    encoded = matched.group(1)
    try:
        raw = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        return None
    # Canonical base64 only: the broker must decode exactly the bytes checked here.
    if base64.b64encode(raw).decode() != encoded or len(raw) < _PID_HEAD.size:
        return None
    *magic, node_length = _PID_HEAD.unpack_from(raw)
    tail = _PID_HEAD.size + node_length
    if tuple(magic) != _PID_MAGIC or len(raw) != tail + _PID_TAIL.size:
        return None
    pid_id, serial, _creation = _PID_TAIL.unpack_from(raw, tail)
    node = raw[_PID_HEAD.size : tail].decode("ascii", "replace")
    if pid_id >= _PID_ID_LIMIT or serial >= _PID_SERIAL_LIMIT or not _NODE.fullmatch(node):
        return None
    return node


async def learn_direct_reply_node(connection: AbstractConnection) -> str | None:
    """Ask the broker for the node segment of its direct reply-to names (None: no answer).

    On a channel of its own, publishes one empty message with ``reply_to`` =
    ``amq.rabbitmq.reply-to`` to a routing key no queue has, ``mandatory``: the broker returns
    it with ``reply_to`` rewritten as it rewrites every producer's. Needs no right but write
    on ``amq.default``, which a worker has to reply at all.
    """
    try:
        async with connection.channel(publisher_confirms=True) as channel:
            queue = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
            await queue.consume(_ignore, no_ack=True)
            returned = await channel.default_exchange.publish(
                aio_pika.Message(b"", reply_to=DIRECT_REPLY_TO, message_id=uuid.uuid4().hex),
                routing_key=f"zandd.no-such-queue.{uuid.uuid4().hex}",
                mandatory=True,
                timeout=_PROBE_TIMEOUT_S,
            )
    except (AMQPError, TimeoutError):
        return None
    header = getattr(returned, "header", None)
    reply_to = getattr(getattr(header, "properties", None), "reply_to", None)
    return direct_reply_node(reply_to) if isinstance(reply_to, str) else None


async def learn_direct_reply_nodes(
    urls: BrokerURLs,
    connection: AbstractConnection,
    *,
    connection_name: str,
    timeout_s: float = NODE_PROBES_TIMEOUT_S,
) -> frozenset[str]:
    """The direct reply-to node segments of ``connection``'s broker and of every other broker
    ``urls`` names: one short probe each, on a connection of its own, all at once.

    A broker that does not answer within ``timeout_s`` (down, hung) is left out: its segment
    is learned at the next reconnect. With one broker, only ``connection`` is asked.
    """
    own = await learn_direct_reply_node(connection)
    learned = {own} if own is not None else set()
    others = brokers(urls)
    if len(others) < 2:
        return frozenset(learned)

    async def probe(url: str) -> str | None:
        probe_connection = await connect_plain(
            url, connection_name=f"{connection_name}/reply-node", timeout_s=timeout_s
        )
        async with probe_connection:
            return await learn_direct_reply_node(probe_connection)

    tasks = [asyncio.ensure_future(probe(broker.url)) for broker in others]
    try:
        done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    finally:
        for task in tasks:
            task.cancel()  # those still probing (a hung node); no-op for the rest
    await asyncio.gather(*pending, return_exceptions=True)
    for broker, task in zip(others, tasks, strict=True):
        if task in done and not task.cancelled() and task.exception() is None:
            node = task.result()
            if node is not None:
                learned.add(node)
                continue
        why = "no answer in time" if task in pending else _failure(task)
        log.info("no direct reply-to node learned from %s (%s)", broker.address, why)
    return frozenset(learned)


def _failure(task: asyncio.Future[str | None]) -> str:
    error = task.exception()
    if isinstance(error, ZanddError):
        return error.message
    return "no node named" if error is None else type(error).__name__


async def _ignore(_message: object) -> None:
    """Nothing is ever delivered to the probe's consumer: its message is returned."""


def _check_direct(reply_to: str, known_nodes: Collection[str]) -> None:
    node = direct_reply_node(reply_to)
    if node is None:
        raise ReplyToRefused(f"reply_to {_shown(reply_to)} is no direct reply-to name")
    if node not in known_nodes:
        raise ReplyToRefused(
            f"reply_to {_shown(reply_to)} names direct reply-to node {node!r}, not one this "
            "worker's broker mints"
        )


def _is_principals_queue(reply_to: str, principal: str | None) -> bool:
    if not principal:
        return False
    prefix = principal_reply_prefix(principal)
    suffix = reply_to[len(prefix) :]
    return reply_to.startswith(prefix) and _PRINCIPAL_SUFFIX.fullmatch(suffix) is not None


def _regex_literal(text: str) -> str:
    """``text`` as a regex matching only itself, in PCRE (RabbitMQ's) as in Python."""
    return "".join(char if char.isalnum() or char == "_" else f"\\{char}" for char in text)


def _shown(text: str) -> str:
    """Hostile text for a log line: escaped (no control characters or ANSI codes), cut short."""
    cut = text[:_MAX_SHOWN_CHARS]
    return ascii(cut) + ("..." if len(text) > _MAX_SHOWN_CHARS else "")
