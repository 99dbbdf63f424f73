"""The simnet's watchdog: counts committed rounds across all peers, ends a complete or stalled run."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from silomesh.simnet.plan import Plan
from silomesh.simnet.scenario import SimnetError
from silomesh.simnet.stores import budget_exhausted, committed_counts

#: seconds beyond the round deadline without any committed round before the watchdog ends the run
STALL_GRACE = 120.0

ProgressCallback = Callable[[int, int, list[int]], None]
#: ``() -> (committed rounds, stopped for its privacy budget)`` of every peer, in plan order
CountSource = Callable[[], tuple[list[int], list[bool]]]


class Watcher:
    """Counts committed rounds across all peers and decides when the run is complete.

    By default it reads the peers' stores here; ``source`` replaces that where the stores
    live on other machines (the Ray backend asks its actors).
    """

    def __init__(self, plan: Plan, progress: ProgressCallback | None, source: CountSource | None = None) -> None:
        self.plan = plan
        self.progress = progress
        self.paths = [p.store_path for p in plan.peers]
        self.source = source or self._read_stores
        self.expected = [i for i in range(plan.n) if i not in plan.faults.never_restarted]
        self.counts = [0] * plan.n
        #: when a peer last committed a round (or the run started)
        self.last_commit = time.monotonic()
        #: no commit anywhere for this long is a stall: a round cannot legitimately take
        #: longer than its deadline plus training and evaluation (STALL_GRACE)
        self.stall_after = plan.scenario.deadline + STALL_GRACE

    def poll(self) -> bool:
        """Refresh the counts; True when every peer still meant to run has finished."""
        counts, exhausted = self.source()
        if counts != self.counts:
            self.last_commit = time.monotonic()
        self.counts = counts
        if self.progress is not None:
            self.progress(sum(self.counts), self.plan.n * self.plan.rounds, self.counts)
        # a peer that stopped for its privacy budget has finished too (docs/PRIVACY.md)
        return all(self.counts[i] >= self.plan.rounds or exhausted[i] for i in self.expected)

    def _read_stores(self) -> tuple[list[int], list[bool]]:
        counts = committed_counts(self.paths)
        # only a peer that has not finished can have stopped early (and reading costs a query)
        return counts, [c < self.plan.rounds and budget_exhausted(p) for c, p in zip(counts, self.paths, strict=True)]

    @property
    def stalled(self) -> bool:
        return time.monotonic() - self.last_commit > self.stall_after

    def stall_error(self, peers: list[dict[str, Any]]) -> SimnetError:
        """Which peers are stuck, in which phase, waiting on whom and why (one line each)."""
        from silomesh.simnet.runner import describe_stuck

        return SimnetError(
            f"stalled: no peer committed a round for {time.monotonic() - self.last_commit:.0f} s "
            f"(deadline {self.plan.scenario.deadline:.0f} s + {STALL_GRACE:.0f} s); committed rounds per peer "
            f"{self.counts}; unfinished peers:\n{describe_stuck(peers)}\n(logs in {self.plan.run_dir})"
        )
