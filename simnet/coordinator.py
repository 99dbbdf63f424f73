"""Drive a whole simnet run: lay it out, run the shares, watch progress, write the report.

With ``procs == 1`` every peer runs in this process (one trio task per peer). With
``procs > 1`` the peers are split over worker processes (``python -m
silomesh.simnet.worker``), which still talk to each other over 127.0.0.1. Either way
progress comes from the peers' own stores: the coordinator counts committed rounds,
shows a progress bar, and, once every peer that is still meant to run has committed
all rounds, tells the shares to stop (so finished peers stop lingering).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from silomesh.simnet.plan import Plan, build_plan
from silomesh.simnet.results import ShareResult
from silomesh.simnet.runtime import STOP_FILE, limit_torch_threads, quiet_expected_dial_errors
from silomesh.simnet.scenario import Scenario, SimnetError, default_out_dir
from silomesh.simnet.watcher import ProgressCallback, Watcher

log = logging.getLogger(__name__)

POLL = 0.5


def run_simnet(scenario: Scenario, *, progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Run ``scenario`` end to end and return the report (also written under ``out``).

    Raises:
        ScenarioError: if the scenario cannot be laid out (bad topology, ``out`` in use).
        SimnetError: if the run could not complete.
    """
    from silomesh.simnet.report import build_report, write_outputs

    out = scenario.out if scenario.out is not None else default_out_dir()
    t_setup = time.time()
    if scenario.backend == "ray":
        from silomesh.simnet.raybackend import run_on_ray

        plan, shares, t0 = run_on_ray(scenario, out, progress)
    else:
        plan = build_plan(scenario, out)
        log.info("simnet: %d peers, %s, %s/%s, %d rounds -> %s", plan.n, scenario.topology, scenario.strategy,
                 scenario.task, scenario.rounds, plan.out)
        t0 = time.time()
        if plan.shares == 1:
            shares = [_run_in_process(plan, progress, scenario.effective_timeout)]
        else:
            shares = _run_processes(plan, progress, scenario.effective_timeout)
    wall = time.time() - t0
    errors = [slot.error for share in shares for slot in share.slots.values() if slot.error]
    if errors and len(errors) == plan.n:
        raise SimnetError(f"no peer could run: {errors[0]} (logs in {plan.run_dir})")
    local = None
    if scenario.compare_local:
        from silomesh.simnet.local import compare_local

        local = compare_local(plan)
    report = build_report(plan, shares, local, wall_seconds=wall, setup_seconds=t0 - t_setup)
    write_outputs(plan, report)
    return report


# -- one process -------------------------------------------------------------------------


@contextlib.contextmanager
def peer_logs_to(path: Path) -> Iterator[None]:
    """Send the peers' logs (``silomesh.peer``, ``silomesh.simnet``) to a file during a run.

    Peers of a simnet warn about things the run provokes on purpose (refused intruders,
    crashed neighbours); on the terminal that would drown the progress bar. Worker
    processes log to ``run/worker-N.log`` the same way.
    """
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = []
    for name in ("silomesh.peer", "silomesh.simnet.runner", "silomesh.simnet.intruder"):
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        yield
    finally:
        for logger, level, propagate in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
        handler.close()


def _run_in_process(plan: Plan, progress: ProgressCallback | None, timeout: float) -> ShareResult:
    import trio

    from silomesh.simnet.runner import ShareRunner, describe_stuck, read_progress

    limit_torch_threads()
    quiet_expected_dial_errors()
    watcher = Watcher(plan, progress)
    complete = False
    runner = ShareRunner(plan, 0, stop=lambda: complete)

    async def main() -> bool:
        nonlocal complete
        with trio.move_on_after(timeout) as scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(runner.run)
                while not complete:
                    await trio.sleep(POLL)
                    complete = await trio.to_thread.run_sync(watcher.poll)
                    if complete:
                        break
                    if all(s.returned for s in runner.slots.values()):
                        break
                    if watcher.stalled:
                        raise watcher.stall_error(runner.progress_snapshot())
        if scope.cancelled_caught:  # the peers have stopped by now: their last snapshot says where they were
            log.warning("simnet run stopped by its %.0f s timeout; unfinished peers:\n%s", timeout,
                        describe_stuck(read_progress(plan.run_dir, 1)))
        return not scope.cancelled_caught

    with peer_logs_to(plan.run_dir / "peers.log"):
        try:
            finished = trio.run(main)
        except BaseExceptionGroup as group:  # a SimnetError raised inside the nursery: one line
            match, _ = group.split(SimnetError)
            if match is None:
                raise
            first: BaseException = match
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
    watcher.poll()
    return replace(runner.results(), timed_out=not finished)


# -- several processes -------------------------------------------------------------------


def _run_processes(plan: Plan, progress: ProgressCallback | None, timeout: float) -> list[ShareResult]:
    from silomesh.simnet.runner import describe_stuck, read_progress

    run_dir = plan.run_dir
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    for share in range(plan.shares):
        log_file = open(run_dir / f"worker-{share}.log", "wb")  # noqa: SIM115 - closed below
        logs.append(log_file)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "silomesh.simnet.worker", str(plan.path), str(share)],
            stdout=log_file, stderr=subprocess.STDOUT, env=env))
    watcher = Watcher(plan, progress)
    deadline = time.monotonic() + timeout
    timed_out = False
    stall: SimnetError | None = None
    try:
        while True:
            time.sleep(POLL)
            if watcher.poll():
                break
            if all(p.poll() is not None for p in procs):
                break
            if watcher.stalled:
                stall = watcher.stall_error(read_progress(run_dir, plan.shares))
                break
            if time.monotonic() > deadline:
                timed_out = True
                log.warning("simnet run stopped by its %.0f s timeout; unfinished peers:\n%s", timeout,
                            describe_stuck(read_progress(run_dir, plan.shares)))
                break
        (run_dir / STOP_FILE).write_text(str(time.time()))
        for p in procs:
            try:
                p.wait(timeout=max(30.0, plan.scenario.deadline + 15))
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop; terminating it", p.pid)
                p.terminate()
                p.wait(timeout=10)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    if stall is not None:
        raise stall
    watcher.poll()
    results = []
    for share, p in enumerate(procs):
        path = run_dir / f"worker-{share}.json"
        if not path.exists():
            raise SimnetError(f"worker {share} exited with status {p.returncode} without results; "
                              f"see {run_dir / f'worker-{share}.log'}")
        result = ShareResult.from_json(json.loads(path.read_text(encoding="utf-8")))
        results.append(replace(result, timed_out=timed_out))
    return results
