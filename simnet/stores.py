"""Read-only views of the peers' stores (progress, restarts, the final report).

The harness never writes to a peer's store: it opens it with
:meth:`silomesh.peer.store.Store.open_readonly` (SQLite WAL lets readers run beside the
peer's writer, in this process or another) and uses the store's own read methods, so
what it reports is what the peers themselves committed and audited.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from silomesh.peer.store import Store, StoreError

#: the audit columns the report uses (no signatures, hashes or envelope headers)
AUDIT_COLUMNS = ("seq", "direction", "peer", "round", "kind", "size", "reason")


@contextmanager
def open_ro(path: Path) -> Iterator[Store | None]:
    """A read-only store, or None while the store does not exist (or cannot be opened) yet."""
    try:
        store = Store.open_readonly(path)
    except StoreError:
        yield None
        return
    with closing(store):
        yield store


def committed_rounds(path: Path) -> int:
    """How many rounds this peer has committed (0 if none or not readable yet)."""
    with open_ro(path) as store:
        if store is None:
            return 0
        try:
            return store.committed_round_count()
        except sqlite3.Error:  # table not created yet, or busy: report no progress
            return 0


def committed_counts(paths: Iterable[Path]) -> list[int]:
    return [committed_rounds(p) for p in paths]


def budget_exhausted(path: Path) -> bool:
    """True once this peer stopped for its privacy budget (a ``budget-exhausted`` round row)."""
    with open_ro(path) as store:
        if store is None:
            return False
        try:
            return any(r["status"] == "budget-exhausted" for r in store.rounds())
        except sqlite3.Error:
            return False


@dataclass
class PeerRecord:
    """What one peer's store says about the run."""

    rounds: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    audit: list[dict[str, Any]] = field(default_factory=list)


def read_store(path: Path) -> PeerRecord:
    """Rounds, metrics and the audit entries (without signatures) of one store."""
    rec = PeerRecord()
    with open_ro(path) as store:
        if store is None:
            return rec
        rec.rounds = store.rounds()
        for m in store.metrics():
            rec.metrics.setdefault(int(m["round"]), {})[m["name"]] = float(m["value"])
        rec.audit = [{k: a.get(k) for k in AUDIT_COLUMNS} for a in store.audit_entries()]
    return rec
