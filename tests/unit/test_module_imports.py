"""Imports between the project's own modules, read from the source (nothing is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("contracts", "vault", "workers")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Each module and the project modules it names in any import (TYPE_CHECKING ones too)."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            named: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    named.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    named.add(node.module)
                    named.update(f"{node.module}.{alias.name}" for alias in node.names)
            graph[_module_name(path)] = named
    return {module: {name for name in named if name in graph} for module, named in graph.items()}


def test_metrics_and_telemetry_do_not_import_each_other() -> None:
    graph = _imports()
    assert "workers.observability.telemetry" not in graph["workers.observability.metrics"]
    assert "workers.observability.metrics" not in graph["workers.observability.telemetry"]
