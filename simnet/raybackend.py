"""Run a simnet's shares as Ray actors across the nodes of a Ray cluster (``--backend ray``).

The plan and the peers are the same as with worker processes (:mod:`~silomesh.simnet.worker`):
each share of ``procs`` is one Ray actor that runs its peers with a
:class:`~silomesh.simnet.runner.ShareRunner`, and every peer is a real peer with its own key,
trust list, store, audit log and libp2p host. What changes is where they run:

1. The coordinator starts ``procs`` actors, pinned round-robin to the alive nodes, and asks each for
   its node's address and free ports there; the plan is then laid out with those endpoints,
   so peers on different nodes dial each other over the network as in production.
2. Each actor receives the plan and its peers' folders (key and ``peer.toml``) and unpacks
   them into a folder of its own on its node: no shared file system is assumed.
3. The start barrier, the stop signal and progress go through actor calls instead of files
   in ``DIR/run`` (the actor mirrors them into its own run folder, where the runner looks).
4. At the end each actor returns its result and a tar of its peers' folders (stores, audit
   logs) and its log; the coordinator unpacks them into ``DIR``, so the report, metrics and
   plots are built exactly as for a local run.

An actor that dies (its node was killed, its process crashed) shows up as its peers
having failed with that reason, not as a hung run: the rest of the federation goes on.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import socket
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

from silomesh.simnet.plan import Plan, build_plan, free_ports, share_of
from silomesh.simnet.results import ShareResult, SlotResult
from silomesh.simnet.scenario import Scenario, SimnetError
from silomesh.simnet.watcher import STALL_GRACE, ProgressCallback, Watcher

log = logging.getLogger(__name__)

POLL = 0.5
#: seconds to wait for the actors to start (a cold node may have to start worker processes)
START_TIMEOUT = 300.0
#: seconds one status call may take before the actor counts as unreachable this time
CALL_TIMEOUT = 30.0
#: seconds without any answer to status calls after which an actor counts as lost (a node
#: cut off from the cluster may not be declared dead by Ray for much longer)
UNREACHABLE_AFTER = 90.0


def _pack(root: Path, names: Sequence[str]) -> bytes:
    """A tar (in memory) of ``root/name`` for each name that exists."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in names:
            if (root / name).exists():
                tar.add(root / name, arcname=name)
    return buf.getvalue()


def _unpack(data: bytes, dest: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        tar.extractall(dest, filter="data")  # refuses absolute paths, links out of dest, devices


def _relocate(plan_json: dict[str, Any], root: Path) -> dict[str, Any]:
    """The plan with its folders moved under ``root`` (peer configs hold only relative paths)."""
    out = dict(plan_json)
    out["out"] = str(root)
    out["peers"] = [{**p, "folder": str(root / "peers" / p["name"])} for p in plan_json["peers"]]
    return out


class ShareActor:
    """One share of a simnet on some node of the Ray cluster (made a Ray actor at run time).

    Methods are called from the coordinator; ``run`` blocks for the whole run while
    ``status``, ``touch`` and ``collect`` are served by the actor's other threads.
    """

    def __init__(self, share: int) -> None:
        self.share = share
        self.root: Path | None = None
        self.plan: Plan | None = None

    def endpoint(self, count: int, host: str | None) -> dict[str, Any]:
        """This node's address (or ``host``) and ``count`` ports free on it, for the plan."""
        import ray

        node = ray.get_runtime_context().get_node_id()
        if host is None:  # the address this node was started with (--node-ip-address), as the cluster knows it
            host = next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node)
        return {"host": host, "ports": free_ports(count, host), "node": node,
                "hostname": socket.gethostname(), "pid": os.getpid()}

    def setup(self, plan_json: dict[str, Any], files: bytes) -> str:
        """Unpack this share's peer folders into a folder of this node; returns its path."""
        self.root = Path(tempfile.mkdtemp(prefix=f"silomesh-simnet-share{self.share}-"))
        _unpack(files, self.root)
        (self.root / "run").mkdir(exist_ok=True)
        self.plan = Plan.from_json(_relocate(plan_json, self.root))
        self.plan.save()
        return str(self.root)

    def run(self) -> dict[str, Any]:
        """Run the share's peers until told to stop; its :class:`ShareResult` as JSON."""
        import trio

        from silomesh.simnet.runner import ShareRunner
        from silomesh.simnet.runtime import STOP_FILE, limit_torch_threads, quiet_expected_dial_errors

        plan = self._plan()
        handler = logging.FileHandler(plan.run_dir / f"worker-{self.share}.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root_logger = logging.getLogger()
        root_logger.addHandler(handler)
        root_logger.setLevel(logging.INFO)
        for noisy in ("libp2p", "multiaddr", "async_service"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        limit_torch_threads()
        quiet_expected_dial_errors()
        stop_file = plan.run_dir / STOP_FILE
        runner = ShareRunner(plan, self.share, stop=stop_file.exists)
        try:
            trio.run(runner.run)
        finally:
            root_logger.removeHandler(handler)
            handler.close()
        return runner.results().to_json()

    def touch(self, names: list[str]) -> None:
        """Create ``run/<name>`` files (the start barrier's ready files, the stop file)."""
        run_dir = self._plan().run_dir
        for name in names:
            (run_dir / name).write_text(str(time.time()), encoding="utf-8")

    def status(self) -> dict[str, Any]:
        """Ready or not, committed rounds and budget stops of this share's peers, their progress."""
        from silomesh.simnet.runner import read_progress
        from silomesh.simnet.stores import budget_exhausted, committed_rounds

        plan = self._plan()
        mine = [p for p in plan.peers if p.share == self.share]
        counts = {p.index: committed_rounds(p.store_path) for p in mine}
        return {
            "ready": (plan.run_dir / f"ready-{self.share}").exists(),
            "counts": counts,
            "exhausted": {p.index: counts[p.index] < plan.rounds and budget_exhausted(p.store_path) for p in mine},
            "progress": read_progress(plan.run_dir, plan.shares),
            "rss_bytes": _rss_bytes(),
        }

    def collect(self) -> bytes:
        """A tar of this share's peer folders (stores, audit logs) and its log, for the coordinator."""
        plan = self._plan()
        names = [f"peers/{p.name}" for p in plan.peers if p.share == self.share]
        return _pack(plan.out, [*names, f"run/worker-{self.share}.log", f"run/progress-{self.share}.json"])

    def cleanup(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def _plan(self) -> Plan:
        if self.plan is None:
            raise RuntimeError("setup() first")
        return self.plan


def _rss_bytes() -> int:
    from silomesh.simnet.runner import rss_bytes

    return rss_bytes()


def _lost(share: int, peers: Sequence[int], reason: str, started_at: float) -> ShareResult:
    """The result of a share whose actor died: each of its peers failed with ``reason``."""
    return ShareResult(share=share, pid=0, rss_bytes=0, counters={}, barrier_released_at=None,
                       started_at=started_at, finished_at=time.time(),
                       slots={i: SlotResult(error=reason) for i in peers})


def run_on_ray(scenario: Scenario, out: Path, progress: ProgressCallback | None
               ) -> tuple[Plan, list[ShareResult], float]:
    """Lay out and run ``scenario`` on Ray; the plan, every share's result and when the run began.

    Raises:
        SimnetError: if Ray cannot be reached or the actors do not start, or the run stalls.
    """
    try:
        import ray
    except ImportError:
        raise SimnetError("--backend ray needs Ray: pip install 'silomesh[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=scenario.ray_address, log_to_driver=False, include_dashboard=False,
                     logging_level=logging.WARNING, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = scenario.ray_address or "a new local instance"
            raise SimnetError(f"cannot start or join Ray at {where}: {exc}") from None
    try:
        return _run(ray, scenario, out, progress)
    finally:
        if started_here:
            ray.shutdown()


def _run(ray: ModuleType, scenario: Scenario, out: Path, progress: ProgressCallback | None
         ) -> tuple[Plan, list[ShareResult], float]:
    from silomesh.simnet.runner import describe_stuck
    from silomesh.simnet.runtime import STOP_FILE

    n, shares = scenario.peers, scenario.procs
    members = [[i for i in range(n) if share_of(i, n, shares) == s] for s in range(shares)]
    actor_class = ray.remote(ShareActor)
    # round-robin over the alive nodes, pinned: Ray's SPREAD is a preference and was seen to put
    # both shares of a two-node cluster on one node
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    alive = sorted((n["NodeManagerAddress"], n["NodeID"]) for n in ray.nodes() if n.get("Alive"))
    if not alive:
        raise SimnetError("the Ray cluster has no alive node")
    actors = [actor_class.options(num_cpus=0, max_concurrency=4, scheduling_strategy=NodeAffinitySchedulingStrategy(
        alive[s % len(alive)][1], soft=False)).remote(s) for s in range(shares)]
    errors = (ray.exceptions.RayError,)
    try:
        try:
            # a Ray instance of this machine only: its peers stay on loopback
            host = None if scenario.ray_address else "127.0.0.1"
            where = ray.get([a.endpoint.remote(len(members[s]), host) for s, a in enumerate(actors)],
                            timeout=START_TIMEOUT)
        except errors as exc:
            raise SimnetError(f"the Ray actors did not start within {START_TIMEOUT:.0f} s: {exc}") from None
        endpoints: list[tuple[str, int]] = [("", 0)] * n
        for s, w in enumerate(where):
            for i, port in zip(members[s], w["ports"], strict=True):
                endpoints[i] = (w["host"], port)
        plan = build_plan(scenario, out, endpoints)
        nodes = sorted({w["node"] for w in where})
        log.info("simnet on Ray: %d peers in %d actors on %d node(s) (%s), %s, %s/%s, %d rounds -> %s", n, shares,
                 len(nodes), ", ".join(sorted({w["host"] for w in where})), scenario.topology, scenario.strategy,
                 scenario.task, scenario.rounds, plan.out)
        plan_json = plan.to_json()
        try:
            folders = ray.get([a.setup.remote(plan_json, _pack(plan.out, [f"peers/{plan.peers[i].name}"
                                                                          for i in members[s]]))
                               for s, a in enumerate(actors)], timeout=START_TIMEOUT)
        except errors as exc:
            raise SimnetError(f"the Ray actors could not set up their peers: {exc}") from None
        # where each share runs: node, address, process and its folder there (for operators and tests)
        (plan.out / "run" / "ray-nodes.json").write_text(
            json.dumps([{**w, "share": s, "peers": len(members[s]), "folder": folders[s]}
                        for s, w in enumerate(where)], indent=1), encoding="utf-8")
        t0 = time.time()
        runs = {s: a.run.remote() for s, a in enumerate(actors)}
        results: dict[int, ShareResult] = {}
        lost: dict[int, str] = {}
        status: dict[int, dict[str, Any]] = {}
        answered = dict.fromkeys(range(shares), time.monotonic())

        def lose(s: int, exc: BaseException) -> None:
            if s in lost or s in results:
                return
            reason = f"lost with its Ray actor (share {s} on {where[s]['host']}): {type(exc).__name__}: " \
                     f"{str(exc).splitlines()[0] if str(exc) else ''}"
            log.warning("simnet: %s", reason)
            lost[s] = reason
            results[s] = _lost(s, members[s], reason, t0)

        def live() -> list[int]:
            return [s for s in range(shares) if s not in lost]

        def poll_status() -> None:
            asked = {s: actors[s].status.remote() for s in live()}
            ray.wait(list(asked.values()), num_returns=len(asked), timeout=CALL_TIMEOUT)
            for s, ref in asked.items():
                try:
                    status[s] = ray.get(ref, timeout=0)
                    answered[s] = time.monotonic()
                except (ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
                    # no answer this time (busy, or its node briefly unreachable); dead only after a while
                    silent = time.monotonic() - answered[s]
                    if silent > UNREACHABLE_AFTER:
                        lose(s, TimeoutError(f"no answer to status calls for {silent:.0f} s"))
                except errors as exc:
                    lose(s, exc)

        def collect_finished() -> None:
            pending = [runs[s] for s in live() if s not in results]
            if not pending:
                return
            done, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
            for s in [s for s in live() if runs[s] in done]:
                try:
                    results[s] = ShareResult.from_json(ray.get(runs[s]))
                except errors as exc:
                    lose(s, exc)

        def counts() -> tuple[list[int], list[bool]]:
            c, e = [0] * n, [False] * n
            for st in status.values():
                for i, v in st["counts"].items():
                    c[int(i)] = int(v)
                for i, v in st["exhausted"].items():
                    e[int(i)] = bool(v)
            return c, e

        def snapshot() -> list[dict[str, Any]]:
            rows = [row for s, st in status.items() if s not in lost for row in st["progress"]]
            return sorted(rows, key=lambda p: str(p.get("peer")))

        # start barrier: round 0 begins once every share's peers listen
        start_by = time.monotonic() + START_TIMEOUT
        while True:
            time.sleep(POLL)
            poll_status()
            collect_finished()
            if all(status.get(s, {}).get("ready") for s in live()):
                break
            if time.monotonic() > start_by:
                raise SimnetError(f"the peers of shares {[s for s in live() if not status.get(s, {}).get('ready')]} "
                                  f"did not start within {START_TIMEOUT:.0f} s (logs in {plan.run_dir})")
        ready = [f"ready-{s}" for s in range(shares)]
        for s in live():
            actors[s].touch.remote(ready)

        watcher = Watcher(plan, progress, counts)
        timeout = scenario.effective_timeout
        deadline = time.monotonic() + timeout
        timed_out = False
        stall: SimnetError | None = None
        while True:
            time.sleep(POLL)
            poll_status()
            collect_finished()
            watcher.expected = [i for i in watcher.expected if share_of(i, n, shares) not in lost]
            if watcher.poll() or all(s in results for s in range(shares)):
                break
            if watcher.stalled:
                stall = watcher.stall_error(snapshot())
                break
            if time.monotonic() > deadline:
                timed_out = True
                log.warning("simnet run stopped by its %.0f s timeout; unfinished peers:\n%s", timeout,
                            describe_stuck(snapshot()))
                break
        for a in actors:  # a lost actor too: it may only have been cut off
            a.touch.remote([STOP_FILE])
        stop_by = time.monotonic() + max(30.0, scenario.deadline + 15) + STALL_GRACE / 4
        while any(s not in results for s in range(shares)) and time.monotonic() < stop_by:
            time.sleep(POLL)
            collect_finished()
        for s in range(shares):
            if s not in results:
                lose(s, TimeoutError("did not stop when told to"))
        for s in range(shares):  # a lost actor's stores come back too if it can still be reached
            try:
                _unpack(ray.get(actors[s].collect.remote(), timeout=CALL_TIMEOUT if s in lost else START_TIMEOUT),
                        plan.out)
            except errors as exc:
                log.warning("simnet: could not collect share %d's stores from %s (left in %s there): %s", s,
                            where[s]["host"], folders[s], str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        if stall is not None:
            raise stall
        return plan, [replace(results[s], timed_out=timed_out) for s in range(shares)], t0
    finally:
        for a in actors:
            with contextlib.suppress(ray.exceptions.RayError):
                ray.get(a.cleanup.remote(), timeout=CALL_TIMEOUT)
            ray.kill(a)
