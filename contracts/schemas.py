"""JSON Schemas of wire contract v1, generated from the models into ``contracts/schemas/``.

Non-Python producers build requests from these files, and AsyncAPI tools generate clients
from ``asyncapi.json`` (``contracts/asyncapi.py``). Regenerate after changing a model:

    python -m contracts.schemas
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from contracts.asyncapi import ASYNCAPI_FILE, asyncapi_json
from contracts.models import (
    SPECS,
    AuditCheckpointEvent,
    AuditHeadEvent,
    ErrorReply,
    KeyAliasChangedEvent,
    KeyStateChangedEvent,
)

SCHEMA_DIR = Path(__file__).parent / "schemas"
_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _schema(model: type[BaseModel], title: str, mode: str) -> str:
    schema = model.model_json_schema(mode="validation" if mode == "request" else "serialization")
    schema = {"$schema": _SCHEMA_DIALECT, **schema, "title": title}
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def expected_schemas() -> dict[str, str]:
    """File name → content of every schema the models define."""
    files: dict[str, str] = {}
    for operation, spec in SPECS.items():
        name = operation.value
        files[f"{name}.request.json"] = _schema(spec.request, f"{name} request", "request")
        files[f"{name}.reply.json"] = _schema(spec.reply, f"{name}.reply", "reply")
    files["error.reply.json"] = _schema(ErrorReply, "error reply", "reply")
    files["key.state_changed.event.json"] = _schema(
        KeyStateChangedEvent, "key.state_changed event (zandd.events)", "reply"
    )
    files["audit.head.event.json"] = _schema(
        AuditHeadEvent, "audit.head event (zandd.events)", "reply"
    )
    files["audit.checkpoint.event.json"] = _schema(
        AuditCheckpointEvent, "audit.checkpoint event (zandd.events)", "reply"
    )
    # ---- issue 15, aliases ----
    files["key.alias_changed.event.json"] = _schema(
        KeyAliasChangedEvent, "key.alias_changed event (zandd.events)", "reply"
    )
    # The AsyncAPI 3.0 document, whose payloads are the files above (contracts/asyncapi.py).
    files[ASYNCAPI_FILE] = asyncapi_json()
    return files


def write_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    """(Re)write every schema file; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in expected_schemas().items():
        path = directory / name
        path.write_text(content, encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_schemas():
        sys.stdout.write(f"wrote {path}\n")
