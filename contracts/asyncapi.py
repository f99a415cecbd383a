"""The AsyncAPI 3.0 document of wire contract v1, generated from the models and the topology.

``contracts/schemas/asyncapi.json`` describes, for producers in any language (AsyncAPI tools
generate clients and docs from it): every operation as a request/reply pair — the request
published to the ``zandd`` exchange with the operation as routing key, its reply (or an
``error`` reply) published by the fleet to the request's ``reply_to`` queue — the AMQP
properties and headers each message carries, the queue each operation lands in, and the key
lifecycle events on ``zandd.events``. Message payloads reference the JSON Schemas beside it
(``sign.request.json`` …; JSON Schema 2020-12), so the two never disagree. It is written with
the schemas (``python -m contracts.schemas``) and the same test fails when either drifts.
"""

from __future__ import annotations

import json
from typing import Any

from contracts.amqp import DEADLINE_HEADER, JSON_CONTENT_TYPE
from contracts.models import SPECS
from contracts.operations import (
    AUDIT_CHECKPOINT_EVENT,
    AUDIT_HEAD_EVENT,
    ERROR_REPLY_TYPE,
    KEY_ALIAS_CHANGED_EVENT,
    KEY_STATE_CHANGED_EVENT,
    Operation,
)
from contracts.topology import EVENTS_EXCHANGE, EXCHANGE, QUEUE_OPERATIONS

ASYNCAPI_FILE = "asyncapi.json"
_AMQP_BINDING = "0.3.0"
_SCHEMA_FORMAT = "application/schema+json;version=draft-2020-12"
_REPLIES = "replies"
_EVENTS = "events"
#: The event ``type``s on ``zandd.events`` and their schema files.
_EVENT_SCHEMAS = {
    KEY_STATE_CHANGED_EVENT: "key.state_changed.event.json",
    KEY_ALIAS_CHANGED_EVENT: "key.alias_changed.event.json",
    AUDIT_HEAD_EVENT: "audit.head.event.json",
    AUDIT_CHECKPOINT_EVENT: "audit.checkpoint.event.json",
}

_REQUEST_PROPERTIES: dict[str, dict[str, Any]] = {
    "type": {"required": True, "description": "The operation name (also the routing key)."},
    "content_type": {"required": True, "const": JSON_CONTENT_TYPE},
    "message_id": {
        "required": False,
        "description": "The request id: unique per request, the idempotency key (repeat it "
        "to retry; required for key.create and key.rotate to be idempotent).",
    },
    "correlation_id": {
        "required": False,
        "description": "Copied to the reply (the reply carries the message_id when absent).",
    },
    "reply_to": {
        "required": True,
        "description": "Where the reply goes: a queue the producer reads itself — direct "
        "reply-to (amq.rabbitmq.reply-to), a server-named queue (amq.gen-…) or "
        "zandd.reply.<user_id>.<suffix>. Without it the request is served and answered "
        "nowhere; with any other name it is refused.",
    },
    "user_id": {
        "required": True,
        "description": "The producer's AMQP user name: the broker checks it against the "
        "connection's user, and the fleet authorizes by it (refused when absent).",
    },
    "expiration": {
        "required": False,
        "description": "Milliseconds, as a string: the broker drops the request if it is "
        "still queued then (set it to the caller's timeout).",
    },
    "delivery_mode": {"required": False, "description": "2 (persistent) recommended."},
}

_REPLY_PROPERTIES: dict[str, dict[str, Any]] = {
    "type": {
        "required": True,
        "description": "<operation>.reply on success, 'error' on failure (an ErrorReply body).",
    },
    "content_type": {"required": True, "const": JSON_CONTENT_TYPE},
    "correlation_id": {
        "required": True,
        "description": "The request's correlation_id, or its message_id when it had none.",
    },
}

_REQUEST_HEADERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        DEADLINE_HEADER: {
            "type": "integer",
            "description": "The request's absolute deadline in Unix milliseconds; a worker "
            "does not start a request whose deadline has passed (deadline_exceeded).",
        },
        "traceparent": {"type": "string", "description": "W3C trace context (optional)."},
        "tracestate": {"type": "string", "description": "W3C trace state (optional)."},
    },
}


def _queue_of(operation: Operation) -> str:
    return next(queue for queue, ops in QUEUE_OPERATIONS.items() if operation in ops)


def _payload(schema_file: str) -> dict[str, Any]:
    return {"schemaFormat": _SCHEMA_FORMAT, "schema": {"$ref": schema_file}}


def _message(name: str, schema_file: str, summary: str, trait: str | None) -> dict[str, Any]:
    """A message: its payload schema and AMQP type; ``trait`` adds the shared properties."""
    message: dict[str, Any] = {
        "name": name,
        "title": name,
        "summary": summary,
        "contentType": JSON_CONTENT_TYPE,
        "payload": _payload(schema_file),
        "bindings": {"amqp": {"messageType": name, "bindingVersion": _AMQP_BINDING}},
    }
    if trait is not None:
        message["traits"] = [{"$ref": f"#/components/messageTraits/{trait}"}]
    return message


def _traits() -> dict[str, Any]:
    """What every request, and every reply, carries: AMQP properties and headers."""
    correlation = {"$ref": "#/components/correlationIds/correlation_id"}
    return {
        "request": {
            "headers": _REQUEST_HEADERS,
            "correlationId": correlation,
            "x-amqp-properties": _REQUEST_PROPERTIES,
        },
        "reply": {"correlationId": correlation, "x-amqp-properties": _REPLY_PROPERTIES},
    }


def _operation_entries(operation: Operation) -> tuple[dict[str, Any], dict[str, Any]]:
    """The request channel and the operation object of ``operation``."""
    name = operation.value
    queue = _queue_of(operation)
    channel = {
        "address": name,
        "title": f"{name} requests",
        "description": f"Published to the {EXCHANGE!r} exchange with routing key {name!r}; "
        f"bound to queue {queue!r}.",
        "messages": {
            "request": {"$ref": f"#/components/messages/{name}.request"},
        },
        "bindings": {
            "amqp": {
                "is": "routingKey",
                "exchange": {
                    "name": EXCHANGE,
                    "type": "direct",
                    "durable": True,
                    "autoDelete": False,
                },
                "bindingVersion": _AMQP_BINDING,
            }
        },
        "x-zandd-queue": queue,
    }
    entry = {
        "action": "send",
        "title": name,
        "summary": (SPECS[operation].request.__doc__ or name).strip().splitlines()[0],
        "channel": {"$ref": f"#/channels/{name}"},
        "messages": [{"$ref": f"#/channels/{name}/messages/request"}],
        "reply": {
            "address": {
                "location": "$message.header#/reply_to",
                "description": "The request's AMQP reply_to property.",
            },
            "channel": {"$ref": f"#/channels/{_REPLIES}"},
            "messages": [
                {"$ref": f"#/channels/{_REPLIES}/messages/{name}.reply"},
                {"$ref": f"#/channels/{_REPLIES}/messages/{ERROR_REPLY_TYPE}"},
            ],
        },
        "bindings": {
            "amqp": {
                "mandatory": True,
                "deliveryMode": 2,
                "userId": "the producer's AMQP user",
                "bindingVersion": _AMQP_BINDING,
            }
        },
    }
    return channel, entry


def asyncapi_document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of wire contract v1, as a JSON-ready dict."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    reply_messages: dict[str, Any] = {}
    for operation in SPECS:
        name = operation.value
        channel, entry = _operation_entries(operation)
        channels[name] = channel
        operations[name] = entry
        messages[f"{name}.request"] = _message(
            name, f"{name}.request.json", f"{name} request", "request"
        )
        messages[f"{name}.reply"] = _message(
            operation.reply_type, f"{name}.reply.json", f"{name} reply", "reply"
        )
        reply_messages[f"{name}.reply"] = {"$ref": f"#/components/messages/{name}.reply"}
    messages[ERROR_REPLY_TYPE] = _message(
        ERROR_REPLY_TYPE,
        "error.reply.json",
        "A failed request: code (invalid_request, key_not_found, key_disabled, forbidden, "
        "throttled, …), message, retryable (and retry_after_ms for throttled).",
        "reply",
    )
    reply_messages[ERROR_REPLY_TYPE] = {"$ref": f"#/components/messages/{ERROR_REPLY_TYPE}"}
    channels[_REPLIES] = {
        "address": None,
        "title": "replies",
        "description": "The producer's own reply queue, named by each request's reply_to; "
        "the fleet publishes replies to the default exchange with routing key = reply_to.",
        "messages": reply_messages,
        "bindings": {
            "amqp": {
                "is": "queue",
                "queue": {"name": "amq.gen-…", "exclusive": True, "autoDelete": True},
                "bindingVersion": _AMQP_BINDING,
            }
        },
    }
    event_messages = {}
    for event, schema_file in _EVENT_SCHEMAS.items():
        messages[event] = _message(event, schema_file, f"{event} event", None)
        event_messages[event] = {"$ref": f"#/components/messages/{event}"}
    channels[_EVENTS] = {
        "address": EVENTS_EXCHANGE,
        "title": "key lifecycle and audit events",
        "description": f"The fanout exchange {EVENTS_EXCHANGE!r}: bind a queue of your own.",
        "messages": event_messages,
        "bindings": {
            "amqp": {
                "is": "routingKey",
                "exchange": {"name": EVENTS_EXCHANGE, "type": "fanout", "durable": True},
                "bindingVersion": _AMQP_BINDING,
            }
        },
    }
    operations[_EVENTS] = {
        "action": "receive",
        "title": "events",
        "channel": {"$ref": f"#/channels/{_EVENTS}"},
        "messages": [
            {"$ref": f"#/channels/{_EVENTS}/messages/{event}"} for event in _EVENT_SCHEMAS
        ],
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "ZANDD HSM wire contract",
            "version": "1",
            "description": "Request/reply over RabbitMQ: publish a request to the "
            f"{EXCHANGE!r} exchange (routing key and type = the operation), receive its reply "
            "on your reply_to queue. Payload schemas are the JSON Schemas in this directory; "
            "binary values are standard base64. docs/design.md, 'Wire contract v1'.",
        },
        "defaultContentType": JSON_CONTENT_TYPE,
        "servers": {
            "broker": {
                "host": "localhost:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "Your RabbitMQ (amqps on 5671 with TLS).",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": messages,
            "messageTraits": _traits(),
            "correlationIds": {
                "correlation_id": {
                    "description": "The AMQP correlation_id property (a reply carries the "
                    "request's, or its message_id when it had none).",
                    "location": "$message.header#/correlation_id",
                }
            },
        },
    }


def asyncapi_json() -> str:
    """The document as the file holds it."""
    return json.dumps(asyncapi_document(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
