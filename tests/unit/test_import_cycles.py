"""No import cycles among the package's modules, counting function-level imports too: a cycle
hidden behind an import inside a function is still a cycle (api <-> quantize was one)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "qtale_export"

# Cycles still dodged by a function-level import (none left: every cycle fails the test).
KNOWN: set[frozenset[str]] = set()


def modules() -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its body (`from . import x` names the
    submodule x when x is one)."""
    mods = modules()
    graph = {}
    for name, (path, is_package) in mods.items():
        here = name.split(".") if is_package else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: `from .. import x` climbs one package per extra dot
                    base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods}
                targets |= subs
                if base in mods and len(subs) < len(node.names):
                    targets.add(base)
        graph[name] = targets - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: set[frozenset[str]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_sees_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == {frozenset("abc")}
    assert cycles({"a": {"b"}, "b": set()}) == set()


def test_graph_reads_relative_and_function_level_imports():
    graph = import_graph()
    assert "qtale_export.quantize" in graph["qtale_export.api"]  # from .quantize import ...
    assert "qtale_export.deploy.manifest" in graph["qtale_export.checkpoint"]
    assert "qtale_export.data" in graph["qtale_export.tasks"]  # inside a function
    assert "qtale_export.safe_write" in graph["qtale_export.export.main"]  # from .. import safe_write


def test_no_new_import_cycles():
    new = cycles(import_graph()) - KNOWN
    assert not new, f"import cycles: {[sorted(c) for c in new]}"
