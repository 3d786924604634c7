"""The import rules of docs/ARCHITECTURE.md: no cycles, probes never imported by guard
(outside the CLI), the API imported by nobody in guard but the CLI, light result types."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("guard", "probes")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Every module of both packages and the package modules it imports (any depth:
    function-level and TYPE_CHECKING imports count, so the graph is the honest one)."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = _module_name(path)
            found: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module)
                elif isinstance(node, ast.Import):
                    found.update(alias.name for alias in node.names)
            graph[name] = {m for m in found if m.split(".")[0] in PACKAGES and m != name}
    return graph


def _resolve(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Edges to modules of the graph (``from guard import __version__`` is the package)."""
    return {name: {m for m in deps if m in graph} for name, deps in graph.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_no_import_cycles_in_guard_or_probes() -> None:
    graph = _resolve(_imports())
    # a package's __init__ importing nothing is not a cycle; drop edges to parents
    for name, deps in graph.items():
        deps.difference_update({d for d in deps if name.startswith(d + ".")})
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"


def test_guard_imports_probes_only_from_the_cli_and_the_api_only_from_itself() -> None:
    for name, deps in _imports().items():
        if not name.startswith("guard"):
            continue
        if name != "guard.cli":
            assert not any(d.startswith("probes") for d in deps), f"{name} imports probes"
        if name != "guard.cli" and not name.startswith("guard.api"):
            assert not any(d.startswith("guard.api") for d in deps), f"{name} imports the API"


@pytest.mark.parametrize("module", ["guard.results", "guard.policy", "guard.probe"])
def test_plain_types_import_no_framework(module: str) -> None:
    code = f"import sys, {module}; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "False"], out.stdout
