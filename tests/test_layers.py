"""The shape of silomesh: which package may import which, no import cycles, no private reach-ins.

Every ``.py`` file of the packages mapped by pyproject.toml is parsed with :mod:`ast` (nothing
is imported, so the check is fast and cannot be fooled by import-time side effects). Every
``import silomesh...`` / ``from ... import`` is collected, relative imports resolved, including
imports inside functions: a lazy import is exactly how a cycle or an upward edge hides. An
import under ``if TYPE_CHECKING:`` counts for the layer direction (the code still *knows*
the layer above) but not for cycles (it never runs). A module named in a string literal such
as ``"silomesh.models.catheter:CatheterTask"`` (an ``importlib`` registry) or passed to
``importlib.import_module`` counts for the direction too.

The rules (DESIGN.md, "Layers"): each package may import only those listed for it.
``strategies`` may use ``models`` and ``protocol`` (the table's order; they must not do I/O or
know libp2p, which rules out ``peer``, ``simnet``, ``audit`` and ``cli``); ``models`` may use
``protocol`` only; ``protocol`` nothing of silomesh.
"""

from __future__ import annotations

import ast
import itertools
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: package -> the packages it may import (besides itself); ``None``: anything
ALLOWED: dict[str, frozenset[str] | None] = {
    "silomesh.cli": None,
    "silomesh.simnet": frozenset(
        {"silomesh.peer", "silomesh.strategies", "silomesh.models", "silomesh.protocol", "silomesh.audit"}
    ),
    "silomesh.peer": frozenset({"silomesh.audit", "silomesh.strategies", "silomesh.models", "silomesh.protocol"}),
    "silomesh.strategies": frozenset({"silomesh.models", "silomesh.protocol"}),
    "silomesh.models": frozenset({"silomesh.protocol"}),
    "silomesh.audit": frozenset({"silomesh.protocol"}),
    "silomesh.protocol": frozenset(),
}

#: a whole string like ``"silomesh.models.catheter:CatheterTask"``: a registry entry imported later
REGISTRY_ENTRY = re.compile(r"silomesh(?:\.[A-Za-z_]\w*)+:[A-Za-z_]\w*")


@dataclass(frozen=True)
class Edge:
    """One import of a silomesh module by another."""

    source: str
    target: str
    #: the imported name when it is not a module (``from silomesh.x import name``), else ``None``
    name: str | None
    path: str
    line: int
    #: only under ``if TYPE_CHECKING:`` or named in a string: never runs at import time
    static_only: bool = False

    def where(self) -> str:
        return f"{self.path}:{self.line}"


# --- collecting the graph ------------------------------------------------------------------


def package_dirs(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, Path]:
    """silomesh package name -> its folder, from ``[tool.setuptools.package-dir]``."""
    table = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    mapping: dict[str, str] = table["tool"]["setuptools"]["package-dir"]
    return {name: pyproject.parent / folder for name, folder in mapping.items()}


def module_files(packages: Mapping[str, Path]) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` directly in each mapped package folder."""
    modules: dict[str, Path] = {}
    for package, folder in packages.items():
        for path in sorted(folder.glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, type_checking: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    """Every node below ``node``, with whether it sits under ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            yield child, type_checking
            for stmt in child.body:
                yield stmt, True
                yield from _walk(stmt, True)
            for stmt in child.orelse:
                yield stmt, type_checking
                yield from _walk(stmt, type_checking)
        else:
            yield child, type_checking
            yield from _walk(child, type_checking)


def _name_of(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    return func.attr if isinstance(func, ast.Attribute) else None


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    if level == 0:
        return target or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def _owner(name: str, modules: Iterable[str]) -> str | None:
    """The longest known module that ``name`` is or lies in."""
    known = set(modules)
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in known:
            return candidate
    return None


def edges_of(module: str, path: Path, modules: Mapping[str, Path]) -> list[Edge]:
    """Every import of a silomesh module that ``module`` (the file at ``path``) makes."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    is_package = path.stem == "__init__"
    found: list[Edge] = []

    def add(target: str, name: str | None, line: int, static_only: bool) -> None:
        owner = _owner(target, modules)
        if owner is None:
            if target.startswith("silomesh"):
                found.append(Edge(module, target, name, rel, line, static_only))  # unknown: reported
            return
        found.append(Edge(module, owner, name, rel, line, static_only))

    for node, type_checking in _walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("silomesh"):
                    add(alias.name, None, node.lineno, type_checking)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            if not base.startswith("silomesh"):
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in modules:
                    add(submodule, None, node.lineno, type_checking)
                else:
                    add(base, alias.name, node.lineno, type_checking)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and REGISTRY_ENTRY.fullmatch(node.value):
            target, _, name = node.value.partition(":")
            add(target, name, node.lineno, True)
        elif (
            isinstance(node, ast.Call)
            and _name_of(node.func) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and node.args[0].value.startswith("silomesh.")
        ):
            add(node.args[0].value, None, node.lineno, True)
    return found


def collect(packages: Mapping[str, Path] | None = None) -> tuple[dict[str, Path], list[Edge]]:
    """All modules of the mapped packages and every silomesh import among them."""
    modules = module_files(packages if packages is not None else package_dirs())
    edges = [edge for module, path in modules.items() for edge in edges_of(module, path, modules)]
    return modules, edges


# --- the three checks -------------------------------------------------------------------------


def layer_of(module: str, rules: Mapping[str, object] = ALLOWED) -> str | None:
    """The ruled package a module belongs to (``silomesh.peer.dashboard.pages`` -> ``silomesh.peer``)."""
    for package in sorted(rules, key=len, reverse=True):
        if module == package or module.startswith(package + "."):
            return package
    return None


def direction_problems(edges: Iterable[Edge], rules: Mapping[str, frozenset[str] | None] = ALLOWED) -> list[str]:
    """Imports that go from a package to one it may not import (upward or sideways)."""
    problems = []
    for edge in edges:
        source, target = layer_of(edge.source, rules), layer_of(edge.target, rules)
        if source is None:
            problems.append(f"{edge.where()}: {edge.source} belongs to no package with a layer rule")
            continue
        if target is None:
            problems.append(f"{edge.where()}: {edge.source} -> {edge.target}: no such silomesh module or package")
            continue
        allowed = rules[source]
        if source == target or allowed is None or target in allowed:
            continue
        may = ", ".join(sorted(p.removeprefix("silomesh.") for p in allowed))
        rule = f"may import only {may}" if may else "may import nothing of silomesh"
        problems.append(f"{edge.where()}: {edge.source} -> {edge.target}: {source.removeprefix('silomesh.')} {rule}")
    return problems


def private_problems(edges: Iterable[Edge], packages: Iterable[str]) -> list[str]:
    """Private names (``_x``, a module or a name in one) imported from another package."""
    known = set(packages)

    def package_of(module: str) -> str:
        return module if module in known else module.rsplit(".", 1)[0]

    problems = []
    for edge in edges:
        leaf = edge.name if edge.name is not None else edge.target.rsplit(".", 1)[-1]
        if not leaf.startswith("_") or (leaf.startswith("__") and leaf.endswith("__")):
            continue
        owner = package_of(edge.target) if edge.name is not None else edge.target.rsplit(".", 1)[0]
        if package_of(edge.source) != owner:
            problems.append(
                f"{edge.where()}: {edge.source} imports the private {leaf!r} of {edge.target}: "
                "private names stay inside their package; make it public or move the caller"
            )
    return problems


def find_cycles(edges: Iterable[Edge]) -> list[list[str]]:
    """One cycle (as a closed path of modules) per strongly connected component of the
    import-time graph (``TYPE_CHECKING`` and string-named imports left out)."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        if edge.static_only or edge.source == edge.target:
            continue
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())

    # Tarjan's strongly connected components, iterative (no recursion limit to hit).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return [_cycle_through(component, graph) for component in components]


def _cycle_through(component: list[str], graph: Mapping[str, set[str]]) -> list[str]:
    """A shortest closed path from the component's first module back to itself."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {component}")  # a strongly connected component always has one


def cycle_problems(edges: list[Edge]) -> list[str]:
    problems = []
    for cycle in find_cycles(edges):
        hops = []
        for a, b in itertools.pairwise(cycle):
            where = next(e.where() for e in edges if e.source == a and e.target == b and not e.static_only)
            hops.append(f"{a} -> {b} ({where})")
        problems.append("import cycle: " + "; ".join(hops))
    return problems


# --- the checks on silomesh ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, Path], list[Edge]]:
    return collect()


def test_every_mapped_package_has_a_layer_rule() -> None:
    unruled = [name for name in package_dirs() if layer_of(name) is None]
    assert unruled == [], f"packages in pyproject.toml with no rule in {__name__}.ALLOWED: {unruled}"


def test_the_checker_sees_the_real_graph(graph: tuple[dict[str, Path], list[Edge]]) -> None:
    modules, edges = graph
    assert len(modules) > 80
    pairs = {(layer_of(e.source), layer_of(e.target)) for e in edges}
    assert ("silomesh.simnet", "silomesh.peer") in pairs  # absolute imports
    assert ("silomesh.protocol", "silomesh.protocol") in pairs  # relative imports
    assert any(e.static_only for e in edges)  # under TYPE_CHECKING, or a registry entry


def test_no_package_imports_one_it_may_not(graph: tuple[dict[str, Path], list[Edge]]) -> None:
    edges = graph[1]
    problems = direction_problems(edges)
    assert problems == [], "imports against the layer rules (DESIGN.md, 'Layers'):\n" + "\n".join(problems)


def test_no_import_cycles(graph: tuple[dict[str, Path], list[Edge]]) -> None:
    edges = graph[1]
    problems = cycle_problems(edges)
    assert problems == [], "\n".join(problems)


def test_no_private_names_imported_from_another_package(graph: tuple[dict[str, Path], list[Edge]]) -> None:
    edges = graph[1]
    problems = private_problems(edges, package_dirs())
    assert problems == [], "\n".join(problems)


# --- the checker catches what it is for (a synthetic graph) -------------------------------------

def _edge(source: str, target: str, name: str | None = None, static_only: bool = False) -> Edge:
    return Edge(source, target, name, f"{source.replace('.', '/')}.py", 7, static_only)


def test_checker_catches_a_planted_upward_edge() -> None:
    edges = [
        _edge("silomesh.peer.mesh", "silomesh.protocol.codec"),
        _edge("silomesh.protocol.codec", "silomesh.peer.store"),  # upward
    ]
    problems = direction_problems(edges)
    assert problems == [
        "silomesh/protocol/codec.py:7: silomesh.protocol.codec -> silomesh.peer.store: "
        "protocol may import nothing of silomesh"
    ]


def test_checker_counts_type_checking_imports_for_the_direction() -> None:
    assert direction_problems([_edge("silomesh.models.task", "silomesh.peer.store", static_only=True)]) != []


def test_checker_catches_a_planted_cycle_and_names_its_modules() -> None:
    edges = [
        _edge("silomesh.protocol.codec", "silomesh.protocol.frames"),
        _edge("silomesh.protocol.frames", "silomesh.peer.store"),
        _edge("silomesh.peer.store", "silomesh.protocol.codec"),
        _edge("silomesh.peer.mesh", "silomesh.peer.store"),
    ]
    assert find_cycles(edges) == [
        ["silomesh.peer.store", "silomesh.protocol.codec", "silomesh.protocol.frames", "silomesh.peer.store"]
    ]
    [problem] = cycle_problems(edges)
    assert "silomesh.protocol.frames -> silomesh.peer.store (silomesh/protocol/frames.py:7)" in problem


def test_checker_leaves_type_checking_imports_out_of_cycles() -> None:
    edges = [
        _edge("silomesh.peer.store", "silomesh.peer.mesh"),
        _edge("silomesh.peer.mesh", "silomesh.peer.store", static_only=True),
    ]
    assert find_cycles(edges) == []


def test_checker_catches_a_private_name_from_another_package() -> None:
    edges = [
        _edge("silomesh.peer.store", "silomesh.protocol.codec", name="_limits"),
        _edge("silomesh.protocol.frames", "silomesh.protocol.codec", name="_limits"),  # same package: fine
    ]
    [problem] = private_problems(edges, {"silomesh.peer", "silomesh.protocol"})
    assert problem.startswith("silomesh/peer/store.py:7: silomesh.peer.store imports the private '_limits'")


def test_collector_resolves_relative_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    package = tmp_path / "proto"
    package.mkdir()
    (package / "__init__.py").write_text("from .codec import encode\n", encoding="utf-8")
    (package / "codec.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from silomesh.peer import store\n"
        "def encode():\n"
        "    from . import frames\n"
        "    from ..peer.store import _secret\n"
        "    return 'silomesh.peer.store:Store'\n"
        "importlib.import_module('silomesh.peer.store')\n",
        encoding="utf-8",
    )
    (package / "frames.py").write_text("import silomesh.protocol.codec as codec\n", encoding="utf-8")
    peer = tmp_path / "peer"
    peer.mkdir()
    (peer / "store.py").write_text("", encoding="utf-8")
    _, edges = collect({"silomesh.protocol": package, "silomesh.peer": peer})
    found = {(e.source, e.target, e.name, e.line, e.static_only) for e in edges}
    assert found == {
        ("silomesh.protocol", "silomesh.protocol.codec", "encode", 1, False),
        ("silomesh.protocol.codec", "silomesh.peer.store", None, 3, True),
        ("silomesh.protocol.codec", "silomesh.protocol.frames", None, 5, False),
        ("silomesh.protocol.codec", "silomesh.peer.store", "_secret", 6, False),
        ("silomesh.protocol.codec", "silomesh.peer.store", "Store", 7, True),
        ("silomesh.protocol.codec", "silomesh.peer.store", None, 8, True),
        ("silomesh.protocol.frames", "silomesh.protocol.codec", None, 1, False),
    }
    assert len(direction_problems(edges)) == 4
    assert [c[:-1] for c in find_cycles(edges)] == [["silomesh.protocol.codec", "silomesh.protocol.frames"]]
    assert len(private_problems(edges, {"silomesh.protocol", "silomesh.peer"})) == 1
