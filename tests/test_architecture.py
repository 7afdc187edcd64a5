"""The layout docs/architecture.md draws: rooms import downward only, no import cycle between
modules, no module over 600 lines. Read from the source, so a new module is checked too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "backdoorscan"
BOTTOM = {"_io", "_version", "onnx_graph", "runtime"}
# Room -> the rooms it may import (any import, lazy ones inside functions included).
ALLOWED = {
    "kernels": set(),
    "adapters": BOTTOM,
    "sandbox": BOTTOM | {"adapters"},
    "scanner": BOTTOM | {"adapters", "kernels", "sandbox"},
    "cli": BOTTOM | {"adapters", "scanner", "kernels", "sandbox", "cli_options", "cli_data"},
    "cli_options": BOTTOM | {"adapters", "scanner", "cli_data"},
    "cli_data": set(),
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "root"


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """The backdoorscan modules ``path`` imports (``TYPE_CHECKING`` blocks left out)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(nodes: list[ast.stmt], nested: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.startswith("backdoorscan"):
                    found.add(node.module)
                    found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("backdoorscan"))
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    inner = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                    if not (top_level_only and (nested or inner)):
                        visit([child], nested or inner)

    visit(tree.body, False)
    return found


MODULES = _modules()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_rooms_import_downward_only(name: str) -> None:
    room = _room(name)
    allowed = ALLOWED.get(room)
    if room in BOTTOM:
        allowed = BOTTOM
    if allowed is None:  # the package root and __main__ may reach anything
        return
    for target in _imports(MODULES[name], top_level_only=False):
        other = _room(target)
        if other in ("root", room):  # `from backdoorscan import x` names x's room as well
            continue
        assert other in allowed, f"{name} imports {target}: {room} may not import {other}"


def test_no_import_cycle_between_modules() -> None:
    graph = {
        name: {t for t in _imports(path, top_level_only=True) if t in MODULES and t != name}
        for name, path in MODULES.items()
    }
    state: dict[str, int] = {}

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):  # a package importing its own submodule
                continue
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt] if nxt in stack else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                walk(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_over_600_lines(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= 600, f"{name} has {lines} lines"
