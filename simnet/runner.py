"""Run one process's share of a simnet: real :class:`~silomesh.peer.daemon.Peer` objects.

Each simulated peer is a *slot*: one trio task in a flat nursery that starts a Peer
from the peer's own ``peer.toml`` and key file (the production path), and — when the
fault plan says so — cancels it in the middle of a round (a crash: the peer's scope
is cancelled, its store closes in the Peer's shielded cleanup) and later starts a new
Peer with the same config and key, which resumes from its store.

The peers of a process share one compute limiter with one slot per CPU core (each
Peer's own limiter has one slot): with dozens of peers each training in its own
thread, the trio thread that runs all their networking was starved of the GIL.

The share ends when every peer of the run has finished (``stop`` says so: the
coordinator watches all stores) or when its own peers have all returned.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from silomesh.simnet.faultspec import CrashPlan, IntruderPlan
from silomesh.simnet.hooks import Counters, SimFaults
from silomesh.simnet.plan import PeerPlan, Plan
from silomesh.simnet.results import CrashEvent, ShareResult, SlotResult
from silomesh.simnet.scenario import SimnetError
from silomesh.simnet.stores import committed_counts, committed_rounds

if TYPE_CHECKING:  # trio-typing's stubs, when installed, shadow trio's own TaskStatus
    from trio_typing import TaskStatus

    from silomesh.peer.daemon import Peer

log = logging.getLogger(__name__)


def _setter(event: trio.Event) -> Callable[[int], None]:
    """A crash hook that sets ``event`` (bound now, not to the loop's variable)."""
    return lambda _round: event.set()

POLL = 0.25
#: peers of one process that may train or evaluate at the same time (see ShareRunner)
COMPUTE_SLOTS = max(1, os.cpu_count() or 1)


@dataclass
class SlotState:
    plan: PeerPlan
    incarnation: int = 0
    done: bool = False  # its current incarnation finished all rounds (or it is down for good)
    returned: bool = False
    error: str | None = None
    mesh_stats: dict[str, int] = field(default_factory=lambda: {
        "refused_connections": 0, "refused_streams": 0, "handler_errors": 0})
    crash: CrashEvent | None = None
    faults: SimFaults | None = None
    #: the running incarnation (for the watchdog's progress snapshot)
    peer: Peer | None = None


class StartBarrier:
    """Round 0 starts once every share's peers listen (one ready file per share)."""

    def __init__(self, run_dir: Path, shares: int, share: int) -> None:
        self.files = [run_dir / f"ready-{s}" for s in range(shares)]
        self.mine = self.files[share]
        self.released_at: float | None = None

    def arrive(self) -> None:
        self.mine.write_text(str(time.time()))

    async def wait(self) -> None:
        while self.released_at is None:
            if all(f.exists() for f in self.files):
                self.released_at = time.time()
                break
            await trio.sleep(0.05)


class ShareRunner:
    """Runs the peers of ``plan`` whose ``share`` is ``share`` (plus intruders on share 0)."""

    def __init__(self, plan: Plan, share: int, *, stop: Callable[[], bool] | None = None) -> None:
        self.plan = plan
        self.share = share
        self.stop = stop or (lambda: False)
        self.slots = {p.index: SlotState(p) for p in plan.peers if p.share == share}
        self.counters: Counters = Counters()
        self.index_of = {p.peer_id: p.index for p in plan.peers}
        self.barrier = StartBarrier(plan.run_dir, plan.shares, share)
        self.intruders: list[dict[str, Any]] = []
        self.started_at = time.time()
        self.finished_at = 0.0
        self.cpu_started = time.process_time()
        self.cpu_finished = 0.0
        #: round r (1, 2, ...) -> the process's CPU time when the first peer of the share began
        #: it. From one mark to the next each peer does one round's work (shifted in phase),
        #: so their differences are what a round costs, without start-up and round 0
        self.cpu_marks: dict[int, float] = {}
        self.compute: trio.CapacityLimiter | None = None

    # -- whole share -----------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.compute = trio.CapacityLimiter(COMPUTE_SLOTS)
        try:
            await trio.to_thread.run_sync(self._warm_data)
        except (ValueError, TypeError) as exc:  # bad task options: every peer would fail alike
            raise SimnetError(f"task {self.plan.scenario.task}: cannot generate its data: {exc}") from None
        async with trio.open_nursery() as nursery:
            for index in self.slots:
                await nursery.start(self._slot, index)
            self.barrier.arrive()
            task_status.started()
            if self.share == 0 and self.plan.faults.intruders:
                nursery.start_soon(self._intruders)
            nursery.start_soon(self._watch, nursery.cancel_scope)
        self.finished_at = time.time()
        self.cpu_finished = time.process_time()

    def _warm_data(self) -> None:
        """Generate the synthetic federation once per process (peers then hit the cache)."""
        from silomesh.peer.learner import synthetic_silo

        sc = self.plan.scenario
        synthetic_silo(sc.task, self.plan.n, 0, sc.seed, **sc.effective_task_options)

    async def _watch(self, scope: trio.CancelScope) -> None:
        own_done_only = self.plan.shares == 1
        next_snapshot = 0.0
        while True:
            await trio.sleep(POLL)
            if trio.current_time() >= next_snapshot:  # for the coordinator's watchdog
                write_progress(self.plan.run_dir, self.share, self.progress_snapshot())
                next_snapshot = trio.current_time() + PROGRESS_EVERY
            began = max((s.peer.progress.round for s in self.slots.values() if s.peer is not None), default=-1)
            if began >= 1 and began not in self.cpu_marks:
                self.cpu_marks[began] = time.process_time()
            if self.stop():
                break
            if all(s.returned for s in self.slots.values()):
                break
            if own_done_only and all(s.done for s in self.slots.values()):
                break
        scope.cancel()

    async def _intruders(self) -> None:
        from silomesh.simnet.intruder import run_intruder

        await self.barrier.wait()
        peers = self.plan.peers
        seed = self.plan.scenario.seed

        async def one(ip: IntruderPlan) -> None:
            targets = {peers[i].peer_id: f"/ip4/127.0.0.1/tcp/{peers[i].port}" for i in ip.targets}
            try:
                report = await run_intruder(ip, targets, self.plan.federation, seed)
                self.intruders.append({**asdict(report), "targets": [peers[i].name for i in ip.targets]})
            except Exception as exc:  # a broken intruder must not stop the run
                log.exception("intruder %d failed", ip.index)
                self.intruders.append({"index": ip.index, "error": repr(exc)})

        async with trio.open_nursery() as nursery:
            for ip in self.plan.faults.intruders:
                nursery.start_soon(one, ip)

    def progress_snapshot(self) -> list[dict[str, Any]]:
        """Each peer of this share that has not finished: its round, its phase and for how
        long, and what it waits for from which neighbour (by name)."""
        from silomesh.peer.rounds import waiting_report

        names = {p.peer_id: p.name for p in self.plan.peers}
        now = time.time()
        out = []
        for slot in self.slots.values():
            peer = slot.peer
            if slot.done or peer is None or getattr(peer, "context", None) is None:
                continue
            progress = peer.context.progress
            out.append({
                "peer": slot.plan.name,
                "round": progress.round,
                "phase": progress.phase,
                "phase_seconds": round(now - progress.since, 1),
                "waiting_on": {names.get(n, n): why for n, why in waiting_report(peer.context).items()},
            })
        return out

    # -- one simulated peer ----------------------------------------------------------

    async def _slot(self, index: int, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from silomesh.peer.config import load_config
        from silomesh.peer.context import ThreadCompute
        from silomesh.peer.daemon import Peer

        slot = self.slots[index]
        pp = slot.plan
        crash_plan = self.plan.faults.crash_of(index)
        started = False
        while True:
            crash_due = trio.Event()
            faults = SimFaults(index, slot.incarnation, self.plan.faults, self.index_of, self.counters,
                               self.plan.scenario.seed, wait_start=self.barrier.wait,
                               on_crash_due=_setter(crash_due))
            slot.faults = faults
            try:
                compute = ThreadCompute(self.compute) if self.compute is not None else None
                peer = slot.peer = Peer(load_config(pp.config_path), faults=faults, serve_control_api=False,
                                        compute=compute)
            except Exception as exc:  # noqa: BLE001 - a peer that cannot start is reported
                self._failed(slot, exc)
                if not started:
                    task_status.started()
                return
            try:
                with trio.CancelScope() as scope:
                    async with trio.open_nursery() as inner:
                        await inner.start(self._run_peer, peer, slot, inner.cancel_scope)
                        if not started:
                            started = True
                            task_status.started()
                        if crash_plan is not None and slot.incarnation == 0 and slot.error is None:
                            inner.start_soon(self._crash_timer, crash_due, crash_plan, scope, peer, slot)
            finally:
                self._add_mesh_stats(slot, peer)
            if not (slot.crash is not None and slot.incarnation == 0 and scope.cancelled_caught):
                slot.returned = slot.done = True
                return
            assert crash_plan is not None
            slot.crash.committed_before = committed_rounds(pp.store_path)
            self.counters["crashes"] += 1
            log.info("%s crashed in %s; %d rounds committed", pp.name, slot.crash.phase,
                     slot.crash.committed_before)
            if crash_plan.restart is None:
                slot.done = slot.returned = True
                return
            await self._wait_restart(index, crash_plan)
            slot.incarnation += 1
            slot.crash.restarted_at = time.time()
            self.counters["restarts"] += 1
            log.info("%s restarts", pp.name)

    @staticmethod
    def _failed(slot: SlotState, exc: BaseException) -> None:
        slot.error = f"{type(exc).__name__}: {exc}"
        slot.done = slot.returned = True
        log.error("%s failed: %s", slot.plan.name, slot.error, exc_info=exc)

    async def _run_peer(self, peer: Peer, slot: SlotState, done_scope: trio.CancelScope, *,
                        task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run one incarnation; errors are recorded, never propagated to the other peers."""
        started = False
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(peer.run)
                started = True
                task_status.started()
                await peer.done.wait()
                slot.done = True
        except Exception as exc:  # noqa: BLE001 - one broken peer must not end the run
            self._failed(slot, exc)
            if not started:
                task_status.started()
        done_scope.cancel()  # peer.run returned (after lingering): stop the crash timer

    async def _crash_timer(self, due: trio.Event, crash: CrashPlan, scope: trio.CancelScope,
                           peer: Peer, slot: SlotState) -> None:
        await due.wait()
        await trio.sleep(crash.delay)
        if peer.done.is_set():  # it finished its rounds before the crash was due: nothing to crash
            self.counters["crashes_skipped"] += 1
            return
        slot.crash = CrashEvent(slot.plan.index, crash.round, phase=f"round {peer.round}: {peer.phase}",
                                crashed_at=time.time())
        scope.cancel()

    async def _wait_restart(self, index: int, crash: CrashPlan) -> None:
        restart = crash.restart
        assert restart is not None
        if restart.kind == "seconds":
            await trio.sleep(restart.after)
            return
        target = min(crash.round + int(restart.after), self.plan.rounds)
        others = [p.store_path for p in self.plan.peers
                  if p.index != index and p.index not in self.plan.faults.never_restarted]
        if not others:
            return
        with trio.move_on_after(self.plan.scenario.deadline * (restart.after + 1) + 30):
            # the other peers' stores are files of other processes, with no event to wait on
            while max(await trio.to_thread.run_sync(committed_counts, others)) < target:  # noqa: ASYNC110 - other processes' files
                await trio.sleep(POLL)

    @staticmethod
    def _add_mesh_stats(slot: SlotState, peer: Peer) -> None:
        context = getattr(peer, "context", None)  # absent if the peer never got as far as its transport
        if context is None:
            return
        stats = asdict(context.transport.statistics())
        for key in slot.mesh_stats:
            slot.mesh_stats[key] += int(stats.get(key, 0))

    # -- results ---------------------------------------------------------------------

    def _slot_result(self, slot: SlotState) -> SlotResult:
        crash = None
        if slot.crash is not None:
            resumed = slot.crash.resumed_round
            if slot.incarnation > 0 and slot.faults is not None:
                resumed = slot.faults.first_round
            crash = replace(slot.crash, resumed_round=resumed,
                            committed_after=committed_rounds(slot.plan.store_path))
        return SlotResult(slot.error, slot.incarnation + 1, dict(slot.mesh_stats), crash)

    def results(self) -> ShareResult:
        """What this share observed (merged by the coordinator)."""
        return ShareResult(
            share=self.share,
            pid=os.getpid(),
            rss_bytes=rss_bytes(),
            counters={k: int(v) for k, v in self.counters.items()},
            barrier_released_at=self.barrier.released_at,
            started_at=self.started_at,
            finished_at=self.finished_at or time.time(),
            slots={i: self._slot_result(s) for i, s in self.slots.items()},
            intruders=tuple(self.intruders),
            cpu_seconds=round((self.cpu_finished or time.process_time()) - self.cpu_started, 3),
            cpu_round_marks={r: round(c - self.cpu_started, 3) for r, c in sorted(self.cpu_marks.items())},
            peak_rss_bytes=peak_rss_bytes(),
        )


PROGRESS_EVERY = 5.0


def progress_path(run_dir: Path, share: int) -> Path:
    return run_dir / f"progress-{share}.json"


def write_progress(run_dir: Path, share: int, snapshot: list[dict[str, Any]]) -> None:
    """``run/progress-<share>.json``: the share's unfinished peers (written whole, then renamed)."""
    path = progress_path(run_dir, share)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"at": time.time(), "peers": snapshot}, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def read_progress(run_dir: Path, shares: int) -> list[dict[str, Any]]:
    """Every share's latest snapshot of its unfinished peers (a missing or torn file: none)."""
    out: list[dict[str, Any]] = []
    for share in range(shares):
        try:
            out.extend(json.loads(progress_path(run_dir, share).read_text(encoding="utf-8"))["peers"])
        except (OSError, ValueError, KeyError):
            continue
    return sorted(out, key=lambda p: str(p.get("peer")))


def describe_stuck(peers: list[dict[str, Any]]) -> str:
    """One line per unfinished peer: which round, which phase for how long, waiting on whom and why."""
    if not peers:
        return "  (none in the last progress snapshot)"
    lines = []
    for p in peers:
        waits = "; ".join(f"{n}: {why}" for n, why in sorted(p.get("waiting_on", {}).items()))
        lines.append(f"  {p['peer']}: round {p['round']}, {p['phase']} for {p['phase_seconds']:.0f} s"
                     + (f", waiting on {waits}" if waits else ""))
    return "\n".join(lines)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (``ru_maxrss``, KiB on Linux)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def rss_bytes() -> int:
    """This process's resident set size (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()
