"""The import graph of solvers/ and grape/, read from the source (ast): no module of solvers/ or
grape/ is part of an import cycle, and no library module of grape/ imports the facade (grape.api)
or the command line (grape.cli.main, grape.cli.commands) — the facade and the verbs import the library,
never the reverse.

Every import counts, those inside functions too (a lazy import is still a dependency, and a
cycle through one breaks the moment it runs at import time); imports under
``if TYPE_CHECKING:`` do not, since they never run. A cycle is broken by moving the shared piece
into the lower module, not by hiding an import inside a function.

No edge may close a cycle: LEFT_EDGES lists the ones still to remove (none now); the test
fails on any other cycle, and on an entry that no longer exists.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("solvers", "grape")
# the facade and the command line: library modules must not import them
FRONT = ("grape.api", "grape.cli")
# entry points that are allowed to (and must) import the command line
ENTRY_POINTS = ("grape.__main__", "grape.api", "grape.cli")
# importer -> imported: the imports that still close a cycle in grape/ (remove them, then the entry)
LEFT_EDGES: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the statements under `if TYPE_CHECKING:` (they never run)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `module` imports (the most specific module each names)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node, path.name == "__init__.py")
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                     for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import grape.x.y` names grape.x.y, else its package
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_the_graph_reader_sees_lazy_imports_and_skips_type_checking_ones(tmp_path):
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from solvers.problem import Problem\n"
              "def f():\n    from solvers.plan import Plan\n    from . import scores\n")
    path = tmp_path / "example.py"
    path.write_text(source)
    known = {"solvers", "solvers.plan", "solvers.problem", "solvers.scores", "solvers.example"}
    assert imports_of("solvers.example", path, known) == {"solvers.plan", "solvers.scores"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_solvers_has_no_import_cycle():
    graph = import_graph()
    found = [c for c in cycles(graph) if any(m.split(".")[0] == "solvers" for m in c)]
    assert found == [], f"import cycles in solvers/: {found}"


def test_solvers_never_imports_grape_or_torch():
    # the optimisation package stands alone: numpy, scipy, OR-Tools, CVXPY
    for name, path in all_modules().items():
        if not name.startswith("solvers"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
        roots |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom) and not node.level}
        assert not roots & {"grape", "torch", "transformers"}, f"{name} imports {roots & {'grape', 'torch'}}"


def test_no_library_module_imports_the_facade_or_the_command_line():
    graph = import_graph()
    bad = {name: sorted(t for t in targets if t.startswith(FRONT))
           for name, targets in graph.items()
           if name.startswith("grape") and not name.startswith(ENTRY_POINTS) and name != "grape"}
    bad = {name: targets for name, targets in bad.items() if targets}
    assert bad == {}, f"library modules importing grape.api / grape.cli.main / grape.cli.commands: {bad}"


def test_grape_has_no_import_cycle():
    graph = import_graph()
    stale = sorted(edge for edge in LEFT_EDGES if edge[1] not in graph.get(edge[0], ()))
    assert stale == [], f"LEFT_EDGES lists imports that are gone; remove them from the list: {stale}"
    without = {name: targets - {t for s, t in LEFT_EDGES if s == name} for name, targets in graph.items()}
    found = [c for c in cycles(without) if any(m.split(".")[0] == "grape" for m in c)]
    assert found == [], f"import cycles in grape/: {[' <-> '.join(c) for c in found]}"
