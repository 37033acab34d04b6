"""The module graph of polyft: no circles, and the layers only point down.

Every import counts, also those inside functions (polyft imports heavy libraries lazily, and
a lazy import that closes a circle hides the layers just as well as a top-level one).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "polyft"
# Lowest first. A module may import from its own layer and the layers below.
COMMANDS = ("polyft.commands.train", "polyft.commands.merge", "polyft.commands.eval", "polyft.commands.run", "polyft.commands.report",
            "polyft.commands.plan", "polyft.cli.launchers", "polyft.cli")
BELOW_COMMANDS = ("polyft.config.schema", "polyft.config.experiment")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            graph[mod] |= {t for t in targets if t in files and t != mod}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def test_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "polyft.errors" in graph["polyft.config.schema"]  # top level
    assert "polyft.commands.train" in graph["polyft.commands.merge"]  # inside a function
    assert "polyft.merge.io" in graph["polyft.merge.engine"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_config_and_experiment_import_no_command():
    graph = import_graph()
    for low in BELOW_COMMANDS:
        above = sorted(reachable(graph, low) & set(COMMANDS))
        assert not above, f"{low} reaches the command modules {above}"
