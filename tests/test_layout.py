"""The layout is the architecture: producer -> vision_queue <- worker, no cycles, small modules.

Read from the source (every import, those under TYPE_CHECKING and inside functions
included), so a shortcut that only type hints take still counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("producer", "vision_queue", "worker")
MAX_MODULE_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {
    _module_name(path): path
    for package in PACKAGES
    for path in sorted((ROOT / package).rglob("*.py"))
}


def _imports(name: str, path: Path) -> set[str]:
    """The project modules `name` imports, resolved to modules (not the names in them)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from a import b` imports the module a.b when there is one, else names of a.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            ]
        else:
            continue
        found.update(target for target in targets if target in MODULES and target != name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("vision_queue", {"producer", "worker"}), ("worker", {"producer"}), ("producer", {"worker"})],
)
def test_dependencies_point_at_the_contract(package: str, forbidden: set[str]) -> None:
    # Given every module of a package, then none imports the packages it must not know:
    # producer -> vision_queue <- worker, and the contract imports neither side.
    wrong = sorted(
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        if _top(name) == package
        for target in targets
        if _top(target) in forbidden
    )
    assert wrong == []


def test_no_import_cycles_not_even_for_type_hints() -> None:
    # Tarjan's strongly connected components: any component of two or more is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            visit(node)
    assert cycles == []


def test_no_module_is_over_the_size_where_it_should_be_split() -> None:
    too_long = {
        name: lines
        for name, path in MODULES.items()
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert too_long == {}


def test_the_worker_keeps_its_rooms() -> None:
    # The worker's concerns each have a folder a reader can find them by.
    rooms = {
        name.split(".")[1] for name in MODULES if name.count(".") >= 2 and _top(name) == "worker"
    }
    assert {"broker", "inference", "delivery", "model"} <= rooms
