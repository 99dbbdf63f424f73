"""Read-only views of the peers' SQLite stores (progress, restarts, the final report).

The harness never writes to a peer's store: it opens ``file:...?mode=ro`` connections
of its own (SQLite WAL lets readers run beside the peer's writer, in this process or
another), so what it reports is what the peers themselves committed and audited.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@contextmanager
def open_ro(path: Path) -> Iterator[sqlite3.Connection | None]:
    """A read-only connection, or None while the store does not exist yet."""
    if not path.exists():
        yield None
        return
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error:
        yield None
        return
    with closing(conn):
        conn.row_factory = sqlite3.Row
        yield conn


def committed_rounds(path: Path) -> int:
    """How many rounds this peer has committed (0 if none or not readable yet)."""
    with open_ro(path) as conn:
        if conn is None:
            return 0
        try:
            row = conn.execute("SELECT count(*) FROM rounds WHERE status = 'done'").fetchone()
        except sqlite3.Error:  # table not created yet, or busy: report no progress
            return 0
        return int(row[0])


def committed_counts(paths: Iterable[Path]) -> list[int]:
    return [committed_rounds(p) for p in paths]


@dataclass
class PeerRecord:
    """What one peer's store says about the run."""

    rounds: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    audit: list[dict[str, Any]] = field(default_factory=list)


def read_store(path: Path) -> PeerRecord:
    """Rounds, metrics and the audit entries (without signatures) of one store."""
    rec = PeerRecord()
    with open_ro(path) as conn:
        if conn is None:
            return rec
        for r in conn.execute("SELECT round, status, started_at, finished_at, contributors, skipped, "
                              "bytes_sent FROM rounds ORDER BY round"):
            row = dict(r)
            for key in ("contributors", "skipped"):
                row[key] = json.loads(row[key]) if row[key] else []
            rec.rounds.append(row)
        for m in conn.execute("SELECT round, name, value FROM metrics ORDER BY round, name"):
            rec.metrics.setdefault(int(m["round"]), {})[m["name"]] = float(m["value"])
        rec.audit = [dict(a) for a in conn.execute(
            "SELECT seq, direction, peer, round, kind, size, reason FROM audit ORDER BY seq")]
    return rec
