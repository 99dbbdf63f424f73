"""Side by side: a plain FedAvg loop (the compute floor) and silomesh's simnet, N = 4, 8, 16, 24.

Both sides train the same model (``--size``, default the 0.48M-parameter ``small`` U-Net) from
the same initial weights on the same seeded synthetic silos (``--task``, ``n_train`` images per
silo), ``--local-steps`` optimiser steps of batch ``--batch-size`` per round (a fresh AdamW each
round, as a peer does), for ``--rounds`` rounds:

* ``floor``: one process, no framework, no network: for every silo in turn load the global
  weights, train, keep the state; the global model is the sample-weighted mean. What the
  federation costs at the least.
* ``silomesh``: ``silomesh simnet run --strategy fedavg``, each peer a real libp2p peer with its
  store and audit log, in one process or ``--procs`` worker processes, for each ``--reduce``:
  ``neighbours`` (``--topology full``: every peer averages all the others, ``n (n - 1)`` model
  transfers a round) and ``tree`` (``--topology tree --strategy-param reduce=tree``: each peer
  trusts its parent and children; the subtree means go up the tree and the federation's mean
  comes down, ``2 (n - 1)`` transfers). Both are decentralised FedAvg, so their final metric
  should match the floor's.

Every run is its own subprocess. Measured per run: wall and CPU seconds per round (the rounds
only: the floor times its loop, simnet reports its share processes' CPU from the start of
their peers), total CPU of the command, peak PSS of the process tree (sampled every second
from ``/proc/PID/smaps_rollup``), and the final metric. The JSON also gives, per N, the ratios
to the floor, the peak PSS per peer above an idle interpreter that imported the same modules
(``import_pss``), and what a peer must hold that depends on the model (``model_state``: its
model, gradients and AdamW state, its data, the last model received from each neighbour
and the one of ours they all acknowledged) so that the rest, ``excess_per_peer``, is what
silomesh adds.

Prints one JSON document on stdout and, with ``--out DIR``, writes ``DIR/bench_lean.json``
and ``DIR/bench_lean.md``::

    python bench/bench_lean.py                               # N = 4, 8, 16, 24
    python bench/bench_lean.py --peers 4,8 --procs 2 --out /tmp/lean
    python bench/bench_lean.py --reduce tree --out /tmp/lean-tree
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: seconds between two PSS samples of a run (reading smaps_rollup costs the sampler CPU)
SAMPLE_EVERY = 1.0


# -- the floor (runs in a child process) ---------------------------------------------------


def floor_run(args: argparse.Namespace) -> dict[str, Any]:
    """Sequential FedAvg over ``args.peers`` silos; the same data and initial model as simnet."""
    import numpy as np
    import torch

    from silomesh.models.registry import get_task
    from silomesh.models.train import train_local
    from silomesh.peer.learner import federation_seed, synthetic_silo
    from silomesh.simnet.runtime import limit_torch_threads

    limit_torch_threads()
    options = task_options(args)
    task = get_task(args.task, **options)
    init_seed = federation_seed(f"simnet-{args.seed}")
    silos = [synthetic_silo(args.task, args.peers, i, args.seed, **options) for i in range(args.peers)]
    model = task.make_model(args.size, seed=init_seed)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    weights = np.array([len(s.train) for s in silos], dtype=np.float64)
    weights /= weights.sum()
    rounds = []
    for r in range(args.rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        total = {k: torch.zeros_like(v) for k, v in global_state.items()}
        for w, silo in zip(weights, silos, strict=True):
            model.load_state_dict(global_state)
            train_local(task, model, silo.train, args.local_steps, args.batch_size, args.lr, seed=init_seed + r + 1)
            for k, v in model.state_dict().items():
                total[k] += float(w) * v.detach()
        global_state = total
        rounds.append({"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0})
    model.load_state_dict(global_state)
    metric = task.metric
    finals = [float(task.evaluate(model, s.test)[metric]) for s in silos]
    return {"rounds": rounds, "metric": metric, "final_metric_mean": float(np.mean(finals)),
            "seconds": sum(r["seconds"] for r in rounds), "cpu_seconds": sum(r["cpu_seconds"] for r in rounds)}


def import_run(args: argparse.Namespace) -> dict[str, Any]:
    """An interpreter that imported what a simnet process imports, and its own PSS."""
    import silomesh.models.registry
    import silomesh.peer.daemon
    import silomesh.simnet.coordinator
    import silomesh.simnet.runner  # noqa: F401

    time.sleep(0.5)
    return {"pss_bytes": pss_bytes(os.getpid())}


def task_options(args: argparse.Namespace) -> dict[str, Any]:
    """The task options simnet's peers get (its small defaults: 32-pixel images), ``n_train`` set."""
    from silomesh.simnet.scenario import SMALL_TASK_OPTIONS

    return {**SMALL_TASK_OPTIONS.get(args.task, {}), "n_train": args.n_train}


# -- measuring a child -------------------------------------------------------------------


def pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text(encoding="utf-8").splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return out


def measured(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run ``cmd``; its stdout (JSON), exit status, CPU seconds and the peak PSS of its tree."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT)
        peak = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(SAMPLE_EVERY):
                peak = max(peak, sum(pss_bytes(p) for p in tree(proc.pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            done.set()
            sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.perf_counter() - t0
        if elapsed > timeout:
            raise RuntimeError(f"{cmd[2:5]} took {elapsed:.0f} s")
        out.seek(0)
        err.seek(0)
        text = out.read().decode()
        result: dict[str, Any] = {"rc": proc.returncode, "command_seconds": round(elapsed, 2),
                                  "command_cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
                                  "peak_pss_bytes": peak}
        if proc.returncode != 0 or not text.strip():
            result["error"] = err.read().decode().strip().splitlines()[-12:]
            return result
    result["output"] = json.loads(text)
    return result


def floor_side(args: argparse.Namespace, n: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", "floor", "--peers", str(n), *shared_args(args)]
    m = measured(cmd, args.timeout)
    if "error" in m:
        return {"error": m["error"], "rc": m["rc"]}
    o = m["output"]
    rounds = o["rounds"]
    return {
        "seconds_per_round": round(o["seconds"] / len(rounds), 3),
        "cpu_per_round": round(o["cpu_seconds"] / len(rounds), 3),
        "steady_round_seconds": round(sum(r["seconds"] for r in rounds[1:]) / max(1, len(rounds) - 1), 3),
        "steady_cpu_per_round": round(sum(r["cpu_seconds"] for r in rounds[1:]) / max(1, len(rounds) - 1), 3),
        "command_seconds": m["command_seconds"], "command_cpu_seconds": m["command_cpu_seconds"],
        "peak_pss_bytes": m["peak_pss_bytes"], "final_metric_mean": o["final_metric_mean"],
    }


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The model, data and training options both sides share (bench_breakdown.py uses them too)."""
    parser.add_argument("--task", default="catheter")
    parser.add_argument("--size", default="small")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-train", type=int, default=64, help="training images per silo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--codec", default="float32")
    parser.add_argument("--deadline", type=float, default=600.0, help="simnet's per-round deadline (s)")


def simnet_command(args: argparse.Namespace, n: int, procs: int, out: Path, reduce: str = "neighbours") -> list[str]:
    """``silomesh simnet run`` as decentralised FedAvg with the run options: over a full topology
    (``neighbours``), or over the tree's edges only (``tree``: each peer trusts its parent and children)."""
    return [sys.executable, "-m", "silomesh.simnet.cli", "run", "--peers", str(n), "--procs", str(procs),
            "--topology", "tree" if reduce == "tree" else "full", "--strategy", "fedavg",
            "--strategy-param", f"reduce={reduce}",
            "--task", args.task, "--size", args.size,
            "--rounds", str(args.rounds), "--local-steps", str(args.local_steps),
            "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed),
            "--deadline", str(args.deadline), "--codec", args.codec,
            "--task-option", f"n_train={args.n_train}", "--out", str(out), "--json", "--quiet"]


def silomesh_side(args: argparse.Namespace, n: int, procs: int, out: Path, reduce: str) -> dict[str, Any]:
    m = measured(simnet_command(args, n, procs, out, reduce), args.timeout)
    if "error" in m:
        return {"procs": procs, "reduce": reduce, "error": m["error"], "rc": m["rc"]}
    r = m["output"]
    rounds = args.rounds
    hist = r["history"]
    return {
        "procs": procs,
        "reduce": reduce,
        "seconds_per_round": round(r["wall_seconds"] / rounds, 3),
        # reports from before simnet measured its CPU: the whole command's (imports and set-up too)
        "cpu_per_round": round(r["resources"].get("cpu_seconds", m["command_cpu_seconds"]) / rounds, 3),
        "steady_round_seconds": round(sum(h["seconds_max"] or 0 for h in hist[1:]) / max(1, len(hist) - 1), 3),
        # the rounds after round 0, without start-up (None from a simnet that did not measure it)
        "steady_cpu_per_round": r["resources"].get("steady_cpu_seconds_per_round"),
        "setup_seconds": r["setup_seconds"],
        "command_seconds": m["command_seconds"], "command_cpu_seconds": m["command_cpu_seconds"],
        "peak_pss_bytes": m["peak_pss_bytes"],
        "final_metric_mean": r["final"]["federated_mean"],
        "round_success_rate": r["round_success_rate"],
        "skipped_neighbours": r["faults"]["observed"]["skipped_neighbours"],
        "bytes_per_round": r["bytes_sent_total"] // rounds,
    }


def shared_args(args: argparse.Namespace) -> list[str]:
    return ["--task", args.task, "--size", args.size, "--rounds", str(args.rounds),
            "--local-steps", str(args.local_steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
            "--seed", str(args.seed), "--n-train", str(args.n_train)]


def model_sizes(args: argparse.Namespace, n: int) -> dict[str, int]:
    """Bytes of the model's parameters and of one silo's data (train and test)."""
    from silomesh.models.registry import get_task
    from silomesh.peer.learner import synthetic_silo

    task = get_task(args.task, **task_options(args))
    params = sum(v.numel() * v.element_size() for v in task.make_model(args.size, seed=0).state_dict().values())
    silo = synthetic_silo(args.task, n, 0, args.seed, **task_options(args))
    return {"params": params, "data": sum(a.nbytes for part in (silo.train, silo.test) for a in part.arrays.values())}


def derive(doc: dict[str, Any]) -> None:
    """(Re)compute each run's model state, excess per peer and CPU ratio from what was measured."""
    for row in doc["configs"]:
        n, params = row["peers"], row["params_bytes"]
        # model + gradients + AdamW's two moments, its data; the last model received from each
        # neighbour, and the last of ours they acknowledged (one, when they are in step); in a
        # tree round the neighbours are the parent and up to ``fanout`` (2) children
        row["model_state_per_peer_bytes"] = params * 4 + row["data_per_silo_bytes"] + n * params
        for s in row["silomesh"]:
            ties = min(n - 1, 3) if s.get("reduce") == "tree" else n - 1
            s["model_state_per_peer_bytes"] = params * 4 + row["data_per_silo_bytes"] + (ties + 1) * params
            if "error" in s:
                continue
            if "cpu_per_round" in row["floor"]:
                s["cpu_ratio"] = round(s["cpu_per_round"] / row["floor"]["cpu_per_round"], 3)
            if s.get("steady_cpu_per_round") and row["floor"].get("steady_cpu_per_round"):
                s["steady_cpu_ratio"] = round(s["steady_cpu_per_round"] / row["floor"]["steady_cpu_per_round"], 3)
            s["excess_per_peer_bytes"] = ((s["peak_pss_bytes"] - s["procs"] * doc["import_pss_bytes"]) // n
                                          - s["model_state_per_peer_bytes"])


def markdown(doc: dict[str, Any]) -> str:
    mib = 2**20
    lines = [
        f"# Lean peers: floor and silomesh side by side ({doc['task']}/{doc['size']}, "
        f"{doc['rounds']} rounds of {doc['local_steps']} steps, batch {doc['batch_size']}, "
        f"{doc['n_train']} images per silo, {doc['cpus']} CPUs)",
        "",
        f"Idle interpreter with silomesh's imports: {doc['import_pss_bytes'] / mib:.0f} MiB PSS. "
        "Round: wall s / CPU-s per round, start-up included (ratio to the floor's CPU) / peak PSS of the whole "
        "run; steady: CPU-s per round after round 0, without start-up (ratio to the floor's); excess: peak PSS "
        "above the idle interpreter and the model state, per peer.",
        "",
        "| N | floor | silomesh | steady CPU-s floor / silomesh | reduce | procs | metric floor / silomesh "
        "| model state per peer | excess per peer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in doc["configs"]:
        f = row["floor"]
        floor = ("failed" if "error" in f else f"{f['seconds_per_round']:.2f} s / {f['cpu_per_round']:.1f} CPU-s / "
                 f"{f['peak_pss_bytes'] / mib:,.0f} MiB")
        for s in row["silomesh"]:
            if "error" in s:
                lines.append(f"| {row['peers']} | {floor} | failed: {' '.join(s['error'][-1:])} | | "
                             f"{s.get('reduce', 'neighbours')} | {s['procs']} | | | |")
                continue
            ratio = f" ({s['cpu_ratio']:.2f}x)" if s.get("cpu_ratio") else ""
            metric = f"{f.get('final_metric_mean', float('nan')):.4f} / {s['final_metric_mean']:.4f}"
            steady = (f"{f['steady_cpu_per_round']:.2f} / {s['steady_cpu_per_round']:.2f} "
                      f"({s['steady_cpu_ratio']:.2f}x)" if s.get("steady_cpu_ratio") else "")
            lines.append(
                f"| {row['peers']} | {floor} | {s['seconds_per_round']:.2f} s / "
                f"{s['cpu_per_round']:.1f} CPU-s{ratio} / {s['peak_pss_bytes'] / mib:,.0f} MiB | {steady} | "
                f"{s.get('reduce', 'neighbours')} | {s['procs']} | {metric} | "
                f"{s.get('model_state_per_peer_bytes', row['model_state_per_peer_bytes']) / mib:.1f} MiB | "
                f"{s['excess_per_peer_bytes'] / mib:.1f} MiB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default="4,8,16,24", help="comma-separated peer counts")
    parser.add_argument("--procs", default="1", help="comma-separated simnet process counts per N")
    parser.add_argument("--reduce", default="neighbours,tree",
                        help="comma-separated fedavg reduce settings per N: neighbours (every peer averages all "
                             "the others) and/or tree (the mean goes up a tree and comes down)")
    add_run_options(parser)
    parser.add_argument("--timeout", type=float, default=3600.0, help="fail a run that takes longer (s)")
    parser.add_argument("--out", type=Path, help="also write bench_lean.json and bench_lean.md here")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="only recompute the derived figures of a bench_lean.json and rewrite its .md")
    parser.add_argument("--child", choices=["floor", "imports"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.render:
        doc = json.loads(args.render.read_text(encoding="utf-8"))
        derive(doc)
        args.render.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        args.render.with_suffix(".md").write_text(markdown(doc), encoding="utf-8")
        return
    if args.child:
        args.peers = int(args.peers.split(",")[0])
        print(json.dumps(floor_run(args) if args.child == "floor" else import_run(args)))
        return
    peers = [int(n) for n in args.peers.split(",") if n]
    procs = [int(p) for p in args.procs.split(",") if p]
    reduces = [r for r in args.reduce.split(",") if r]
    if not reduces or set(reduces) - {"neighbours", "tree"}:
        parser.error(f"--reduce takes neighbours and/or tree, got {args.reduce!r}")
    imports = measured([sys.executable, __file__, "--child", "imports"], 300)
    base = imports["output"]["pss_bytes"] if "output" in imports else 0
    configs = []
    with tempfile.TemporaryDirectory(prefix="bench-lean-") as tmp:
        for n in peers:
            sizes = model_sizes(args, n)
            row: dict[str, Any] = {"peers": n, "model_state_per_peer_bytes": 0,
                                   "params_bytes": sizes["params"], "data_per_silo_bytes": sizes["data"],
                                   "floor": floor_side(args, n), "silomesh": []}
            print(json.dumps({"peers": n, "floor": row["floor"]}), file=sys.stderr, flush=True)
            for p, reduce in ((p, r) for p in procs for r in reduces):
                s = silomesh_side(args, n, p, Path(tmp) / f"n{n}-p{p}-{reduce}", reduce)
                row["silomesh"].append(s)
                derive({"configs": [row], "import_pss_bytes": base})
                print(json.dumps({"peers": n, "silomesh": s}), file=sys.stderr, flush=True)
            derive({"configs": [row], "import_pss_bytes": base})
            configs.append(row)
    doc = {"bench": "lean", "task": args.task, "size": args.size, "rounds": args.rounds,
           "local_steps": args.local_steps, "batch_size": args.batch_size, "n_train": args.n_train,
           "lr": args.lr, "seed": args.seed, "codec": args.codec, "cpus": os.cpu_count(),
           "import_pss_bytes": base, "configs": configs}
    print(json.dumps(doc, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_lean.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        (args.out / "bench_lean.md").write_text(markdown(doc), encoding="utf-8")


if __name__ == "__main__":
    main()
