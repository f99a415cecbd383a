"""The AsyncAPI 3.0 document: in the repo as the models make it, well formed, complete."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from contracts.asyncapi import ASYNCAPI_FILE, asyncapi_document, asyncapi_json
from contracts.models import SPECS
from contracts.operations import ERROR_REPLY_TYPE, Operation
from contracts.schemas import SCHEMA_DIR
from contracts.topology import EXCHANGE, QUEUE_OPERATIONS


def _on_disk() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((SCHEMA_DIR / ASYNCAPI_FILE).read_text(encoding="utf-8"))
    return loaded


def _refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                assert isinstance(value, str)
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _pointer(document: Any, ref: str) -> Any:
    """The node ``ref`` (``#/a/b``) points at in ``document``; KeyError when it is not there."""
    assert ref.startswith("#/"), ref
    node = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _resolve(document: dict[str, Any], ref: str) -> Any:
    """Follow ``ref`` (and the ``$ref``s it lands on) to the node it names."""
    node = _pointer(document, ref)
    while isinstance(node, dict) and set(node) == {"$ref"}:
        node = _pointer(document, node["$ref"])
    return node


def test_the_document_in_the_repo_matches_the_models() -> None:
    on_disk = (SCHEMA_DIR / ASYNCAPI_FILE).read_text(encoding="utf-8")
    assert on_disk == asyncapi_json(), "drifted from the models: run python -m contracts.schemas"


def test_it_is_asyncapi_3_and_every_ref_resolves() -> None:
    document = _on_disk()
    assert document["asyncapi"] == "3.0.0"
    assert document["info"]["title"]
    assert document["info"]["version"]
    refs = list(_refs(document))
    local = [ref for ref in refs if ref.startswith("#/")]
    files = {ref for ref in refs if not ref.startswith("#")}
    assert local
    for ref in local:
        _resolve(document, ref)  # KeyError names a dangling one
    # Payloads point at the JSON Schemas beside it, whose own refs resolve in themselves.
    assert files
    for name in files:
        schema = json.loads((SCHEMA_DIR / name).read_text(encoding="utf-8"))
        for ref in _refs(schema):
            _pointer(schema, ref)


def test_every_operation_has_its_request_and_its_replies() -> None:
    document = asyncapi_document()
    queue_of = {op: queue for queue, ops in QUEUE_OPERATIONS.items() for op in ops}
    assert set(SPECS) <= {Operation(name) for name in document["operations"] if name != "events"}
    for operation in SPECS:
        entry = document["operations"][operation.value]
        assert entry["action"] == "send"
        channel = _resolve(document, entry["channel"]["$ref"])
        assert channel["address"] == operation.value
        assert channel["bindings"]["amqp"]["exchange"]["name"] == EXCHANGE
        assert channel["x-zandd-queue"] == queue_of[operation]
        [request_ref] = entry["messages"]
        request = _resolve(document, request_ref["$ref"])
        assert request["payload"]["schema"]["$ref"] == f"{operation.value}.request.json"
        assert request["bindings"]["amqp"]["messageType"] == operation.value
        trait = _resolve(document, request["traits"][0]["$ref"])
        assert {"reply_to", "user_id", "message_id", "correlation_id", "expiration"} <= set(
            trait["x-amqp-properties"]
        )
        assert "x-deadline-ms" in trait["headers"]["properties"]
        reply = entry["reply"]
        assert reply["address"]["location"] == "$message.header#/reply_to"
        types = [_resolve(document, ref["$ref"])["name"] for ref in reply["messages"]]
        assert types == [operation.reply_type, ERROR_REPLY_TYPE]
        assert {
            _resolve(document, ref["$ref"])["payload"]["schema"]["$ref"]
            for ref in reply["messages"]
        } == {f"{operation.value}.reply.json", "error.reply.json"}
