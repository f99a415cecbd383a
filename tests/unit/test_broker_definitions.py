"""ops/rabbitmq/definitions.json declares exactly the topology of ``contracts.topology``."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

from contracts.replyto import producer_permissions
from contracts.topology import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    EVENTS_EXCHANGE,
    EXCHANGE,
    MAX_SIGN_SHARDS,
    QUEUE_BOUNDS,
    QUEUE_OPERATIONS,
    REPLY_QUEUE_PREFIX,
    dead_letter_arguments,
    queue_arguments,
    sign_shard,
)

ROOT = Path(__file__).parents[2]
DEFINITIONS: dict[str, Any] = json.loads(
    (ROOT / "ops" / "rabbitmq" / "definitions.json").read_text()
)
VHOST = "zandd"


def _without_vhost(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    assert {entry["vhost"] for entry in entries} == {VHOST}
    return [{k: v for k, v in entry.items() if k != "vhost"} for entry in entries]


def test_queues_carry_the_exact_arguments_the_workers_declare() -> None:
    expected = {
        DEAD_LETTER_QUEUE: dict(dead_letter_arguments()),
        **{name: dict(queue_arguments(name)) for name in QUEUE_OPERATIONS},
    }
    queues = _without_vhost(DEFINITIONS["queues"])
    assert {q["name"]: q["arguments"] for q in queues} == expected
    assert all(q["durable"] and not q["auto_delete"] for q in queues)


def test_a_policy_bounds_each_work_queue_as_its_arguments_do() -> None:
    # For queues declared before the bounds were: an import keeps an existing queue's
    # arguments, so only a policy bounds it.
    policies = {p["pattern"]: p for p in _without_vhost(DEFINITIONS["policies"])}
    for queue, (length, size) in QUEUE_BOUNDS.items():
        policy = policies["^" + re.escape(queue) + "$"]
        assert policy["apply-to"] == "queues"
        assert policy["definition"] == {"max-length": length, "max-length-bytes": size}
        assert queue_arguments(queue)["x-overflow"] == "reject-publish"


def test_a_policy_bounds_the_dead_letter_queue_as_its_arguments_do() -> None:
    # zandd.dead declared before it was bounded keeps its arguments: the policy bounds it.
    policies = {p["pattern"]: p for p in _without_vhost(DEFINITIONS["policies"])}
    policy = policies["^" + re.escape(DEAD_LETTER_QUEUE) + "$"]
    arguments = dead_letter_arguments()
    assert policy["apply-to"] == "queues"
    assert policy["definition"] == {
        "max-length": arguments["x-max-length"],
        "overflow": arguments["x-overflow"],
        "message-ttl": arguments["x-message-ttl"],
    }
    assert arguments["x-overflow"] == "drop-head"  # the newest letters stay to inspect


def test_exchanges_and_bindings_match_the_topology() -> None:
    exchanges = {e["name"]: e["type"] for e in _without_vhost(DEFINITIONS["exchanges"])}
    assert exchanges == {
        EXCHANGE: "direct",
        EVENTS_EXCHANGE: "fanout",
        DEAD_LETTER_EXCHANGE: "fanout",
    }
    bindings = {
        (b["source"], b["destination"], b["routing_key"])
        for b in _without_vhost(DEFINITIONS["bindings"])
    }
    expected = {(DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, "")} | {
        (EXCHANGE, queue, operation.value)
        for queue, operations in QUEUE_OPERATIONS.items()
        for operation in operations
    }
    assert bindings == expected


def _rights(user: str) -> dict[str, re.Pattern[str]]:
    (entry,) = [p for p in DEFINITIONS["permissions"] if p["user"] == user]
    assert entry["vhost"] == VHOST
    return {kind: re.compile(entry[kind]) for kind in ("configure", "write", "read")}


def _allowed(pattern: re.Pattern[str], name: str) -> bool:
    # RabbitMQ matches permission regexes anywhere in the name (re:run), like re.search.
    return pattern.search(name) is not None


def test_producers_may_use_their_reply_queues_and_write_only_to_the_request_exchange() -> None:
    (entry,) = [p for p in DEFINITIONS["permissions"] if p["user"] == "producer"]
    assert (entry["configure"], entry["write"], entry["read"]) == producer_permissions("producer")
    rights = _rights("producer")
    own = f"{REPLY_QUEUE_PREFIX}producer.{uuid.uuid4().hex}"
    for reply_queue in (own, "amq.gen-Lj47WP1eYOHeRBztvFuKmQ"):
        assert _allowed(rights["configure"], reply_queue)
        assert _allowed(rights["read"], reply_queue)
    # Another producer's reply queues are out of reach, as the workers' reply_to rule says.
    for other in (f"{REPLY_QUEUE_PREFIX}app2.x", f"{REPLY_QUEUE_PREFIX}producer.evil.x"):
        assert not _allowed(rights["read"], other), other
        assert not _allowed(rights["configure"], other), other
    assert _allowed(rights["write"], EXCHANGE)
    for other in (EVENTS_EXCHANGE, "amq.default", "zandd.sign", "zandd.keygen", "xzandd"):
        assert not _allowed(rights["write"], other), other
    for queue in (*QUEUE_OPERATIONS, DEAD_LETTER_QUEUE):
        assert not _allowed(rights["read"], queue)
        assert not _allowed(rights["configure"], queue)


def test_workers_read_only_their_queue_and_configure_no_shared_entity() -> None:
    shared = (EXCHANGE, EVENTS_EXCHANGE, DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, *QUEUE_OPERATIONS)
    for user, own_queue in (("signer", "zandd.sign"), ("keygen", "zandd.keygen")):
        rights = _rights(user)
        assert _allowed(rights["read"], own_queue)
        assert _allowed(rights["write"], "amq.default"), "replies go through the default exchange"
        assert not _allowed(rights["write"], EXCHANGE)
        assert not any(_allowed(rights["configure"], name) for name in shared), user
        others = [q for q in (*QUEUE_OPERATIONS, DEAD_LETTER_QUEUE) if q != own_queue]
        assert not any(_allowed(rights["read"], q) for q in others), user
    # Sign shards (ZANDD_SIGN_SHARDS): a signer reads every one, the keygen worker none.
    for shard in (sign_shard(0), sign_shard(MAX_SIGN_SHARDS - 1)):
        assert _allowed(_rights("signer")["read"], shard)
        assert not _allowed(_rights("keygen")["read"], shard)
        assert not _allowed(_rights("producer")["read"], shard)
    assert not _allowed(_rights("signer")["read"], "zandd.sign.hash")
    assert _allowed(_rights("keygen")["write"], EVENTS_EXCHANGE)
    assert not _allowed(_rights("signer")["write"], EVENTS_EXCHANGE)
    # A signer follows key state changes through an exclusive queue of its own.
    events_queue = f"{EVENTS_EXCHANGE}.host-1.4242.{uuid.uuid4().hex[:8]}"
    signer = _rights("signer")
    assert all(_allowed(signer[kind], events_queue) for kind in ("configure", "write", "read"))
    assert _allowed(signer["read"], EVENTS_EXCHANGE), "binding needs read on the exchange"
