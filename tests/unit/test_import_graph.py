"""The import graph of `cluster/` and `actors/` (read with ast, nothing imported): no cycle between modules.

Every import statement counts, also those under `if TYPE_CHECKING:` and inside functions: a cycle hidden by a
lazy import is still two modules that each need the other (the HTTP routes and request handling once were).
An import of a module counts as an edge to that module, not to the packages above it.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {"cluster": "llama4serve.cluster", "actors": "llama4serve.actors"}


def modules(root: Path, packages: dict[str, str]) -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package) of every .py file under the package folders."""
    found = {}
    for folder, package in packages.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            found[".".join([package, *(parts[:-1] if is_package else parts)])] = (path, is_package)
    return found


def imported(name: str, known: dict[str, tuple[Path, bool]]) -> set[str]:
    """The modules of `known` that module `name` imports anywhere in its file."""
    path, is_package = known[name]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = alias.name
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target:
                    out.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            for alias in node.names:
                if f"{module}.{alias.name}" in known:
                    out.add(f"{module}.{alias.name}")
                elif module in known:
                    out.add(module)
    out.discard(name)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def import_graph(root: Path, packages: dict[str, str]) -> dict[str, set[str]]:
    known = modules(root, packages)
    return {name: imported(name, known) for name in known}


def test_no_import_cycle_in_cluster_and_actors():
    graph = import_graph(REPO, PACKAGES)
    assert len(graph) > 50, sorted(graph)  # the walk found the package
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(
        " -> ".join(c) + " ({})".format(", ".join(f"{m} imports {sorted(graph[m] & set(c))}" for m in c))
        for c in found)


def test_the_check_sees_cycles_hidden_by_type_checking_and_lazy_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "routes.py").write_text("from top.pkg.sub.handling import Server\n")
    (pkg / "sub" / "handling.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .routes import Context\n")
    (pkg / "a.py").write_text("def f():\n    import top.pkg.b\n")
    (pkg / "b.py").write_text("from top.pkg import a\n")
    (pkg / "c.py").write_text("from top.pkg.sub import routes\n")  # imports, no cycle
    found = cycles(import_graph(tmp_path, {"pkg": "top.pkg"}))
    assert sorted(found) == [["top.pkg.a", "top.pkg.b"], ["top.pkg.sub.handling", "top.pkg.sub.routes"]]
