"""The module graph of polyft: no circles, and the layers only point down.

Every import counts, also those inside functions (polyft imports heavy libraries lazily, and
a lazy import that closes a circle hides the layers just as well as a top-level one).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "polyft"
# Lowest first. A module may import from its own layer and the layers below.
LAYERS = (
    ("base", ("polyft", "polyft.errors", "polyft.console", "polyft.checks", "polyft.runs")),
    ("libraries", ("polyft.data", "polyft.models", "polyft.adapters", "polyft.merge", "polyft.eval",
                   "polyft.training", "polyft.tracking", "polyft.sharding")),
    ("config", ("polyft.config",)),
    ("products", ("polyft.products",)),
    ("commands", ("polyft.commands",)),
    ("cli", ("polyft.cli",)),
)
HEAVY = ("torch", "transformers", "peft", "trl", "lm_eval", "vllm", "bitsandbytes", "deepspeed")


def layer_of(module: str) -> int:
    """The index in LAYERS of the longest prefix naming `module`."""
    best = max(((len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes
                if module == p or module.startswith(p + ".")), default=None)
    assert best is not None, f"{module} is in no layer of tests/test_layers.py"
    return best[1]


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


def test_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "polyft.errors" in graph["polyft.runs"]  # top level
    assert "polyft.commands.plan" in graph["polyft.cli.main"]  # inside a function
    assert "polyft.merge.io" in graph["polyft.merge.engine"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("polyft.commands.train") > layer_of("polyft.products") > layer_of("polyft.config.rules")


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_layers_only_point_down():
    up = sorted(f"{a} -> {b}" for a, targets in import_graph().items() for b in targets
                if layer_of(b) > layer_of(a))
    assert not up, up


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(top-level package imported, at module level?) of every import in a file."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body} | {id(c) for n in tree.body if isinstance(n, ast.Try) for c in n.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name.split(".")[0], id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.append(((node.module or "").split(".")[0], id(node) in top))
    return out


def test_only_the_cli_imports_hydra():
    users = sorted(module_name(p) for p in PACKAGE.rglob("*.py")
                   if any(pkg == "hydra" for pkg, _ in imports_of(p)) and not module_name(p).startswith("polyft.cli"))
    assert not users, users


def test_heavy_libraries_load_where_a_stage_needs_them():
    """torch and friends never at a module's top (every command's start-up would pay for them)."""
    eager = sorted(f"{module_name(p)}: {pkg}" for p in PACKAGE.rglob("*.py")
                   for pkg, top in imports_of(p) if top and pkg in HEAVY)
    assert not eager, eager
