"""What one share of a run (the peers of one process) observed, on its way to the report.

A :class:`~silomesh.simnet.runner.ShareRunner` returns a :class:`ShareResult`; worker
processes write it to ``run/worker-N.json`` with :meth:`ShareResult.to_json` and the
coordinator reads it back with :meth:`ShareResult.from_json`, so the report is built
from the same typed objects whether the peers ran in one process or several.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CrashEvent:
    """One injected crash, filled in by the runner as the peer goes down and comes back."""

    peer: int
    round: int  # the round the crash was scheduled in
    phase: str = ""  # what the peer was doing when it was cancelled
    crashed_at: float = 0.0
    committed_before: int = 0  # rounds committed when it went down
    restarted_at: float | None = None
    resumed_round: int | None = None  # first round of the new incarnation
    committed_after: int = 0

    def to_json(self) -> dict[str, Any]:
        """The crash as ``report.json`` lists it under ``faults.crashes`` (less the name)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CrashEvent:
        return cls(**d)


@dataclass(frozen=True)
class SlotResult:
    """One simulated peer over all its incarnations."""

    error: str | None = None  # why it failed, if it did
    incarnations: int = 1
    mesh: dict[str, int] = field(default_factory=dict)  # refused connections/streams, handler errors
    crash: CrashEvent | None = None

    def to_json(self) -> dict[str, Any]:
        return {"error": self.error, "incarnations": self.incarnations, "mesh": dict(self.mesh),
                "crash": self.crash.to_json() if self.crash is not None else None}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SlotResult:
        return cls(d["error"], int(d["incarnations"]), {k: int(v) for k, v in d["mesh"].items()},
                   CrashEvent.from_json(d["crash"]) if d["crash"] is not None else None)


@dataclass(frozen=True)
class ShareResult:
    """What one share injected and observed, and the resources its process used."""

    share: int
    pid: int
    rss_bytes: int
    counters: dict[str, int]  # injected faults by name (dropped_messages, crashes, ...)
    barrier_released_at: float | None  # when every share's peers were listening
    started_at: float
    finished_at: float
    slots: dict[int, SlotResult]  # peer index -> its result
    #: one ``report.json`` ``faults.intruders`` row per intruder (its counts and target names,
    #: or its index and error)
    intruders: tuple[dict[str, Any], ...] = ()
    timed_out: bool = False  # the coordinator stopped the run at its timeout
    #: CPU seconds (all threads) this process used from the start of its peers to the end
    cpu_seconds: float = 0.0
    #: round r (from 1) -> this process's CPU seconds, counted as ``cpu_seconds``, when the
    #: first of its peers began round r (the watch loop polls, so a mark is up to 0.25 s late)
    cpu_round_marks: dict[int, float] = field(default_factory=dict)

    @property
    def steady_cpu_per_round(self) -> float | None:
        """CPU seconds a round costs once under way: between the first and the last mark,
        per round (None with fewer than two marks, i.e. fewer than 3 rounds)."""
        if len(self.cpu_round_marks) < 2:
            return None
        first, last = min(self.cpu_round_marks), max(self.cpu_round_marks)
        return (self.cpu_round_marks[last] - self.cpu_round_marks[first]) / (last - first)
    #: the process's peak resident set size (``ru_maxrss``; 0 where unknown)
    peak_rss_bytes: int = 0

    @property
    def peers(self) -> list[int]:
        return sorted(self.slots)

    def to_json(self) -> dict[str, Any]:
        return {
            "share": self.share, "pid": self.pid, "rss_bytes": self.rss_bytes, "counters": dict(self.counters),
            "barrier_released_at": self.barrier_released_at, "started_at": self.started_at,
            "finished_at": self.finished_at, "slots": {str(i): s.to_json() for i, s in sorted(self.slots.items())},
            "intruders": [dict(x) for x in self.intruders], "timed_out": self.timed_out,
            "cpu_seconds": self.cpu_seconds, "peak_rss_bytes": self.peak_rss_bytes,
            "cpu_round_marks": {str(r): c for r, c in self.cpu_round_marks.items()},
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ShareResult:
        return cls(
            share=int(d["share"]), pid=int(d["pid"]), rss_bytes=int(d["rss_bytes"]),
            counters={k: int(v) for k, v in d["counters"].items()},
            barrier_released_at=d["barrier_released_at"], started_at=float(d["started_at"]),
            finished_at=float(d["finished_at"]),
            slots={int(i): SlotResult.from_json(s) for i, s in d["slots"].items()},
            intruders=tuple(dict(x) for x in d["intruders"]), timed_out=bool(d["timed_out"]),
            cpu_seconds=float(d.get("cpu_seconds", 0.0)), peak_rss_bytes=int(d.get("peak_rss_bytes", 0)),
            cpu_round_marks={int(r): float(c) for r, c in d.get("cpu_round_marks", {}).items()},
        )
