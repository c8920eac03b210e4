"""No import cycle among the modules of ``lbkernels/`` and ``bench/``.

The graph is read from the sources with ``ast``, nothing imported: an edge ``m -> n``
for every ``import`` in ``m`` of a module ``n`` of these packages, at module level or
inside a function (a function-level import only defers a cycle to the first call).
Relative imports are resolved against ``m``'s package. ``from pkg import name`` is an
edge to ``pkg.name`` when that is a module, else to ``pkg`` (its ``__init__``);
``import a.b.c`` is an edge to ``a.b.c`` and to the packages ``a.b`` and ``a`` it
executes first, except those ``m`` lies in (a submodule's own packages are under way
when it runs). Imports under ``if TYPE_CHECKING:`` never run and are left out.

``python python_tests/test_import_graph.py`` prints the graph's size and its cycles
("no cycle" when it is acyclic); ``pytest python_tests/test_import_graph.py`` checks it.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lbkernels", "bench")


def modules(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Every module of ``packages`` under ``root``: dotted name -> file."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """The nodes of ``tree`` outside ``if TYPE_CHECKING:`` blocks (their ``else`` runs)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(node: ast.AST, name: str, is_package: bool, known: dict) -> list[str]:
    """The modules of ``known`` that ``node`` (in module ``name``) imports by name."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = name.split(".") if is_package else name.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    return [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
            for alias in node.names]


def import_graph(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the modules of ``packages`` it imports (see the module docstring)."""
    known = modules(root, packages)
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        is_package = path.name == "__init__.py"
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        edges = set()
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            for target in _imported(node, name, is_package, known):
                parts = target.split(".")
                # The module, then the packages its import executes on the way.
                for i in range(len(parts), 0, -1):
                    step = ".".join(parts[:i])
                    if step in known and (step == target or step not in own):
                        edges.add(step)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a list of modules, each importing the next, the last the first) per
    strongly connected component of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                components.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return [_cycle_in(graph, set(c), c[0]) for c in sorted(components)]


def _cycle_in(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """A shortest cycle through ``start`` within ``component`` (breadth first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return path[::-1]
                if w not in parent:
                    parent[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"{start} is on no cycle of its component")


def describe(cycles: list[list[str]]) -> str:
    return "\n".join(" -> ".join(c + [c[0]]) for c in cycles)


def test_lbkernels_and_bench_have_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (each module imports the next):\n" + describe(cycles)


# -- the check itself, on small packages written for it ---------------------------------------
def _package(root: Path, files: dict[str, str]) -> dict[str, set[str]]:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return import_graph(root, sorted({name.split("/")[0] for name in files}))


def test_a_cycle_through_a_function_level_relative_import_is_found(tmp_path):
    graph = _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .b import f\n",
        "pkg/b.py": "def f():\n    from . import a\n    return a\n",
        "pkg/c.py": "import pkg.a\n",
        "other/__init__.py": "",
        "other/d.py": "import pkg.a\n",
    })
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}
    assert graph["pkg.c"] == {"pkg.a"}  # pkg, its own package, is under way already
    assert graph["other.d"] == {"pkg", "pkg.a"}  # import pkg.a runs pkg's __init__ first
    assert find_cycles(graph) == [["pkg.a", "pkg.b"]]
    assert describe(find_cycles(graph)) == "pkg.a -> pkg.b -> pkg.a"


def test_a_name_from_a_package_is_an_edge_to_its_init(tmp_path):
    graph = _package(tmp_path, {
        "pkg/__init__.py": "from .sub.x import y\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/x.py": "from .. import CONSTANT\ny = CONSTANT\n",
    })
    assert graph["pkg.sub.x"] == {"pkg"}
    assert graph["pkg"] == {"pkg.sub", "pkg.sub.x"}  # pkg.sub's __init__ runs first
    assert find_cycles(graph) == [["pkg", "pkg.sub.x"]]


def test_submodules_and_type_checking_imports_are_no_cycle(tmp_path):
    graph = _package(tmp_path, {
        "pkg/__init__.py": "from .plan import Plan\nfrom . import method\n",
        "pkg/plan.py": ("from typing import TYPE_CHECKING\n"
                        "if TYPE_CHECKING:\n    from .method import run\nelse:\n    import json\n"
                        "class Plan: ...\n"),
        "pkg/method.py": "from . import plan\nfrom .plan import Plan\nimport torch\n",
    })
    assert graph == {"pkg": {"pkg.plan", "pkg.method"}, "pkg.plan": set(), "pkg.method": {"pkg.plan"}}
    assert find_cycles(graph) == []


if __name__ == "__main__":
    graph = import_graph()
    cycles = find_cycles(graph)
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports among them")
    print(describe(cycles) if cycles else "no cycle")
    sys.exit(1 if cycles else 0)
