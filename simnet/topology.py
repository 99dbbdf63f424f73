"""Who trusts whom in a simulated federation: undirected graphs over peer indices.

A topology spec is one of::

    ring                 each peer trusts its two ring neighbours
    regular:K            K-regular circulant graph (K even; K odd needs an even N)
    smallworld[:K[:P]]   Watts-Strogatz: ring lattice of degree K (default 4), each edge
                         rewired with probability P (default 0.1), kept connected
    full                 everyone trusts everyone
    tree[:K]             a K-ary tree in index order (default K = 2): peer i trusts its parent
                         (i - 1) // K and its children; the edges ``fedavg``'s ``reduce =
                         "tree"`` uses with ``fanout = K``
    FILE                 an edge list: one ``a b`` pair of peer indices per line
                         (``#`` starts a comment), or a JSON ``{"edges": [[a, b], ...]}``

Every edge is mutual trust: both peers list each other in ``[[trusted]]``. Pure Python
(no networkx); seeded where random.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUILTIN = ("ring", "regular", "smallworld", "full", "tree")


class TopologyError(ValueError):
    """A topology spec or file is invalid; the message says why."""


@dataclass(frozen=True)
class Topology:
    """An undirected simple graph over peers ``0 .. n-1``."""

    spec: str
    n: int
    edges: tuple[tuple[int, int], ...]  # (a, b) with a < b, sorted

    @property
    def neighbours(self) -> list[list[int]]:
        """Sorted neighbour indices of every peer."""
        out: list[list[int]] = [[] for _ in range(self.n)]
        for a, b in self.edges:
            out[a].append(b)
            out[b].append(a)
        return [sorted(x) for x in out]

    @property
    def degrees(self) -> list[int]:
        return [len(x) for x in self.neighbours]

    def is_connected(self) -> bool:
        if self.n == 0:
            return True
        nbrs = self.neighbours
        seen = {0}
        todo = [0]
        while todo:
            for j in nbrs[todo.pop()]:
                if j not in seen:
                    seen.add(j)
                    todo.append(j)
        return len(seen) == self.n

    def to_json(self) -> dict[str, Any]:
        """The graph plus its degree statistics (``report.json``'s ``graph``, ``plan.json``)."""
        degrees = self.degrees
        return {
            "spec": self.spec, "n": self.n, "edges": [list(e) for e in self.edges],
            "degree_min": min(degrees, default=0), "degree_max": max(degrees, default=0),
            "degree_mean": (sum(degrees) / self.n) if self.n else 0.0,
            "connected": self.is_connected(),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Topology:
        """The topology of :meth:`to_json` (the derived statistics are recomputed, not read)."""
        return cls(str(d["spec"]), int(d["n"]), tuple((int(a), int(b)) for a, b in d["edges"]))


def _make(spec: str, n: int, edges: set[tuple[int, int]]) -> Topology:
    norm = {(min(a, b), max(a, b)) for a, b in edges if a != b}
    return Topology(spec, n, tuple(sorted(norm)))


def ring(n: int) -> Topology:
    """Each peer linked to its predecessor and successor (one edge for n == 2)."""
    return _make("ring", n, {(i, (i + 1) % n) for i in range(n)} if n > 1 else set())


def regular(n: int, k: int) -> Topology:
    """A K-regular circulant graph: i is linked to i±1 .. i±K/2 (and i+n/2 when K is odd).

    Raises:
        TopologyError: if no such graph exists for ``n`` and ``k``.
    """
    if k < 1 or k > n - 1:
        raise TopologyError(f"regular:{k} needs 1 <= K <= peers-1 (peers = {n})")
    if k % 2 == 1 and n % 2 == 1:
        raise TopologyError(f"regular:{k}: an odd degree needs an even number of peers (peers = {n})")
    edges = {(i, (i + d) % n) for i in range(n) for d in range(1, k // 2 + 1)}
    if k % 2 == 1:
        edges |= {(i, (i + n // 2) % n) for i in range(n)}
    return _make(f"regular:{k}", n, edges)


def full(n: int) -> Topology:
    return _make("full", n, {(i, j) for i in range(n) for j in range(i + 1, n)})


def tree(n: int, k: int = 2) -> Topology:
    """Each peer ``i > 0`` linked to its parent ``(i - 1) // k`` (a K-ary tree, root 0).

    Raises:
        TopologyError: if ``k < 2``.
    """
    if k < 2:
        raise TopologyError(f"topology tree:{k}: K must be at least 2")
    return _make("tree" if k == 2 else f"tree:{k}", n, {((i - 1) // k, i) for i in range(1, n)})


def smallworld(n: int, k: int = 4, p: float = 0.1, seed: int = 0) -> Topology:
    """Watts-Strogatz small world: a degree-``k`` ring lattice with edges rewired at rate ``p``.

    Rewiring keeps the number of edges (mean degree ``k``) and never disconnects the
    graph (a rewire that would is skipped).

    Raises:
        TopologyError: for ``k`` odd, out of range, or ``p`` outside [0, 1].
    """
    if k % 2 or k < 2 or k > n - 1:
        raise TopologyError(f"smallworld:{k} needs an even K with 2 <= K <= peers-1 (peers = {n})")
    if not 0.0 <= p <= 1.0:
        raise TopologyError(f"smallworld rewiring probability must be in [0, 1], got {p}")
    rng = random.Random(f"silomesh-smallworld/{seed}/{n}/{k}/{p}")
    edges = set(regular(n, k).edges)
    for d in range(1, k // 2 + 1):
        for i in range(n):
            edge = (min(i, (i + d) % n), max(i, (i + d) % n))
            if edge not in edges or rng.random() >= p:
                continue
            choices = [j for j in range(n) if j != i and (min(i, j), max(i, j)) not in edges]
            if not choices:
                continue
            new = rng.choice(choices)
            trial = (edges - {edge}) | {(min(i, new), max(i, new))}
            if _make("", n, trial).is_connected():
                edges = trial
    spec = "smallworld" if (k, p) == (4, 0.1) else f"smallworld:{k}:{p:g}"
    return _make(spec, n, edges)


def from_file(path: Path, n: int | None = None) -> Topology:
    """Read an edge list (text ``a b`` per line, or JSON ``{"edges": [[a, b], ...]}``).

    Args:
        path: the file.
        n: the number of peers; defaults to the largest index + 1. Peers the file
            does not mention have no neighbours.

    Raises:
        TopologyError: if the file is unreadable or names an invalid edge.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TopologyError(f"topology file {path}: {exc.strerror or exc}") from None
    pairs: list[tuple[int, int]] = []
    if text.lstrip().startswith("{"):
        try:
            raw = json.loads(text)["edges"]
            pairs = [(int(a), int(b)) for a, b in raw]
        except (ValueError, KeyError, TypeError) as exc:
            raise TopologyError(f"topology file {path}: expected {{\"edges\": [[a, b], ...]}} ({exc})") from None
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.replace(",", " ").split()
            if len(parts) != 2 or not all(p.isdigit() for p in parts):
                raise TopologyError(f"topology file {path}, line {lineno}: expected two peer indices, "
                                    f"got {line!r}")
            pairs.append((int(parts[0]), int(parts[1])))
    if not pairs:
        raise TopologyError(f"topology file {path} holds no edges")
    top = max(max(a, b) for a, b in pairs)
    size = top + 1 if n is None else n
    for a, b in pairs:
        if a == b:
            raise TopologyError(f"topology file {path}: self-loop {a}-{b}")
        if max(a, b) >= size:
            raise TopologyError(f"topology file {path}: edge {a}-{b} names peer {max(a, b)}, "
                                f"but there are only {size} peers (0..{size - 1})")
    return _make(str(path), size, set(pairs))


def build_topology(spec: str, n: int | None, seed: int = 0) -> Topology:
    """Build a topology from its spec (see the module docstring).

    Raises:
        TopologyError: for an unknown spec or impossible parameters.
    """
    name, _, rest = spec.partition(":")
    if name in BUILTIN:
        if n is None or n < 2:
            raise TopologyError(f"topology {spec!r} needs at least 2 peers, got {n}")
        args = rest.split(":") if rest else []
        try:
            if name == "ring" and not args:
                return ring(n)
            if name == "full" and not args:
                return full(n)
            if name == "tree" and len(args) <= 1:
                return tree(n, int(args[0]) if args else 2)
            if name == "regular" and len(args) == 1:
                return regular(n, int(args[0]))
            if name == "smallworld" and len(args) <= 2:
                k = int(args[0]) if args else 4
                p = float(args[1]) if len(args) > 1 else 0.1
                return smallworld(n, min(k, n - 1 - (n - 1) % 2), p, seed) if not args else \
                    smallworld(n, k, p, seed)
        except ValueError as exc:
            if isinstance(exc, TopologyError):
                raise
            raise TopologyError(f"topology {spec!r}: bad number ({exc})") from None
        raise TopologyError(f"topology {spec!r}: use ring, regular:K, smallworld[:K[:P]], full, tree[:K] or a FILE")
    path = Path(spec)
    if not path.exists():
        raise TopologyError(f"unknown topology {spec!r}: use ring, regular:K, smallworld[:K[:P]], full, "
                            "tree[:K], or the path of an edge-list file")
    return from_file(path, n)
