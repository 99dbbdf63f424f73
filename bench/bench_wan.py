"""Four hospitals over rate-limited and lossy WAN links, against the same run with unlimited links.

Issue #14's benchmark. Each hospital is its own host in a network namespace of
``tests/netbed.py`` (its own ``silomesh peer run`` process, key and store), all four
with public addresses on one bridged WAN, every one trusting the other three (fedavg,
catheter). The same four hospitals run under each link condition:

* ``unlimited``: no rate limit, no loss (the baseline: the same namespaces and
  processes, so the ratios measure the links and nothing else);
* ``100mbit``: every hospital's WAN link limited to 100 Mbit/s each way (``tc tbf``);
* ``20mbit-1pct``: 20 Mbit/s each way and 1% of the frames in and out dropped
  (nftables ``numgen random``).

and with two models: the task's own U-Net at size ``small`` (about 0.48M parameters) and
MONAI's ``BasicUNet`` with wide features (about 30M parameters), float32 on the wire.

Per run it reads each hospital's ``rounds`` table: the time of each round
(``finished_at - started_at``) and the bytes it sent. Round 0 includes connecting and is
reported apart; "steady" is the mean over rounds 1.. of all four hospitals. The ratios
are against ``unlimited`` of the same model, measured in the same invocation.

Needs root, iproute2 and nftables (``make net-deps``). Every address stays inside the
namespaces the bench makes; they are removed at the end even when a run fails.

    sudo .venv/bin/python bench/bench_wan.py [--rounds 3] [--models unet-small,basicunet-30m]
        [--out bench/results/wan/bench_wan.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from netbed import Hospital, NetBed, missing_requirements, open_netbed, stop_processes

from silomesh.peer.identity import write_key_file

PORT = 4001
HOSPITALS = ("a", "b", "c", "d")

#: name -> [task] lines (besides name and options)
MODELS: dict[str, str] = {
    "unet-small": 'size = "small"\n',
    "basicunet-30m": (
        'model = "monai.networks.nets.BasicUNet"\n\n[task.model_args]\n'
        "spatial_dims = 2\nin_channels = 1\nout_channels = 3\nfeatures = [64, 128, 256, 512, 1024, 64]\n"
    ),
}
#: name -> (Mbit/s each way or None, loss in %)
CONDITIONS: dict[str, tuple[float | None, float]] = {
    "unlimited": (None, 0.0),
    "100mbit": (100.0, 0.0),
    "20mbit-1pct": (20.0, 1.0),
}
TASK_OPTIONS = "image_size = 32, n_train = 16, n_test = 8, n_test_source = 8"


def _config(h: Hospital, index: int, others: dict[str, tuple[str, str]], model: str, rounds: int) -> str:
    trusted = "".join(
        f'\n[[trusted]]\nname = "{name}"\npeer_id = "{peer_id}"\naddress = "{address}"\n'
        for name, (peer_id, address) in others.items()
    )
    # a deadline no link condition here reaches: every round waits for all four, so the
    # round time is the exchange's, not a timeout's
    return f"""federation = "bench-wan"
key_file = "peer.key"
listen = "/ip4/0.0.0.0/tcp/{PORT}"
data_dir = "state"

[task]
name = "catheter"
options = {{ {TASK_OPTIONS}, silos = {len(HOSPITALS)}, silo = {index}, seed = 0 }}
{MODELS[model]}
[rounds]
count = {rounds}
deadline_seconds = 1800
local_steps = 1
batch_size = 8

[network]
reply_timeout_seconds = 600
{trusted}"""


def _rounds(h: Hospital) -> list[dict[str, Any]]:
    if not h.store.exists():
        return []
    try:
        with sqlite3.connect(f"file:{h.store}?mode=ro", uri=True, timeout=5) as conn:
            rows = conn.execute(
                "SELECT round, status, started_at, finished_at, bytes_sent, contributors FROM rounds ORDER BY round"
            ).fetchall()
    except sqlite3.OperationalError:
        return []
    return [
        {"round": r, "status": s, "seconds": (f - t) if f and t else None, "bytes_sent": b or 0,
         "contributors": len(json.loads(c)) if c else 0}
        for r, s, t, f, b, c in rows
    ]


def run_one(bed: NetBed, root: Path, model: str, condition: str, rounds: int, timeout: float) -> dict[str, Any]:
    """One federation of four under one link condition; the per-round figures."""
    mbit, loss = CONDITIONS[condition]
    sites = {n: bed.add_public(n) for n in HOSPITALS}
    for site in sites.values():
        if mbit is not None:
            bed.rate_limit(site.name, mbit)
        if loss:
            bed.set_loss(site.name, loss)
    hospitals = {}
    for n in HOSPITALS:
        d = root / f"{model}-{condition}" / n
        d.mkdir(parents=True)
        hospitals[n] = Hospital(n, d, write_key_file(d / "peer.key").peer_id_text)
    for i, (n, h) in enumerate(hospitals.items()):
        others = {m: (o.peer_id, f"/ip4/{sites[m].address}/tcp/{PORT}") for m, o in hospitals.items() if m != n}
        (h.dir / "peer.toml").write_text(_config(h, i, others, model, rounds))
    parameters = _parameters(hospitals["a"].dir / "peer.toml")
    start = time.monotonic()
    error = None
    try:
        for n, h in hospitals.items():
            log = (h.dir / "peer.log").open("wb")
            h.proc = subprocess.Popen(
                bed.command(sites[n].name, [sys.executable, "-m", "silomesh.peer.cli", "peer", "run", "--config",
                                            str(h.dir / "peer.toml")]),
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=h.dir,
            )
        while True:
            done = {n: sum(r["status"] == "done" for r in _rounds(h)) for n, h in hospitals.items()}
            if all(v >= rounds for v in done.values()):
                break
            dead = [n for n, h in hospitals.items() if h.proc is not None and h.proc.poll() is not None]
            if dead:
                tail = (hospitals[dead[0]].dir / "peer.log").read_text(errors="replace").strip().splitlines()[-3:]
                error = f"{dead} exited early; {dead[0]}'s log ends: {' | '.join(tail)}"
                break
            if time.monotonic() - start > timeout:
                error = f"timed out after {timeout:.0f} s with rounds done {done}"
                break
            print(f"  {model} {condition}: rounds done {done} after {time.monotonic() - start:.0f} s", flush=True)
            time.sleep(5)
    finally:
        wall = time.monotonic() - start
        stop_processes((h.proc for h in hospitals.values()), wait=60)
    per = {n: [r for r in _rounds(h) if r["round"] < rounds] for n, h in hospitals.items()}
    steady = [r for rs in per.values() for r in rs if r["round"] >= 1 and r["status"] == "done"]
    first = [r for rs in per.values() for r in rs if r["round"] == 0 and r["status"] == "done"]

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    return {
        "model": model,
        "parameters": parameters,
        "condition": condition,
        "mbit": mbit,
        "loss_percent": loss,
        "error": error,
        "wall_seconds": round(wall, 1),
        "round0_seconds": mean([r["seconds"] for r in first if r["seconds"] is not None]),
        "steady_round_seconds": mean([r["seconds"] for r in steady if r["seconds"] is not None]),
        "steady_bytes_per_round": (sum(r["bytes_sent"] for r in steady) / len({r["round"] for r in steady})
                                   if steady else None),
        "full_rounds": sum(r["contributors"] == len(HOSPITALS) - 1 for r in steady + first),
        "peer_rounds": len(steady) + len(first),
        "rounds": per,
    }


def _parameters(config: Path) -> int:
    """The model's parameter count, built exactly as a peer with ``config`` builds it."""
    from silomesh.peer.config import load_config
    from silomesh.peer.learner import build_task

    task = load_config(config).task
    model = build_task(task).make_model(task.size, seed=0)
    return sum(p.numel() for p in model.parameters())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (round 0 includes connecting)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {sorted(MODELS)}")
    parser.add_argument("--conditions", default=",".join(CONDITIONS), help=f"comma-separated, of {sorted(CONDITIONS)}")
    parser.add_argument("--timeout", type=float, default=1500, help="seconds per run before it counts as failed")
    parser.add_argument("--out", type=Path, default=Path("bench/results/wan/bench_wan.json"))
    args = parser.parse_args()
    why = missing_requirements()
    if why:
        print(f"bench_wan needs network namespaces: {why}", file=sys.stderr)
        return 2
    models = [m for m in args.models.split(",") if m]
    conditions = [c for c in args.conditions.split(",") if c]
    unknown = [m for m in models if m not in MODELS] + [c for c in conditions if c not in CONDITIONS]
    if unknown or args.rounds < 2:
        print(f"unknown model or condition {unknown}, or --rounds below 2", file=sys.stderr)
        return 2
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-wan-") as tmp:
        for model in models:
            for condition in conditions:
                print(f"{model} under {condition} ...", flush=True)
                with open_netbed() as bed:
                    result = run_one(bed, Path(tmp), model, condition, args.rounds, args.timeout)
                results.append(result)
                print(f"  -> steady round {result['steady_round_seconds']} s, "
                      f"{result['steady_bytes_per_round']} B/round, error {result['error']}", flush=True)
    for r in results:
        base = next((b for b in results if b["model"] == r["model"] and b["condition"] == "unlimited"), None)
        ok = base is not None and base["steady_round_seconds"] and r["steady_round_seconds"]
        r["time_ratio"] = round(r["steady_round_seconds"] / base["steady_round_seconds"], 3) if ok else None
        okb = base is not None and base["steady_bytes_per_round"] and r["steady_bytes_per_round"]
        r["bytes_ratio"] = round(r["steady_bytes_per_round"] / base["steady_bytes_per_round"], 3) if okb else None
    report = {
        "bench": "bench_wan",
        "hospitals": len(HOSPITALS),
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print("| model | link | steady round s | x unlimited | MB sent per round | x unlimited | full rounds |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        mb = r["steady_bytes_per_round"] / 1e6 if r["steady_bytes_per_round"] else None
        secs = f"{r['steady_round_seconds']:.1f}" if r["steady_round_seconds"] else "-"
        print(f"| {r['model']} | {r['condition']} | {secs} | {r['time_ratio']} | "
              f"{mb and round(mb, 1)} | {r['bytes_ratio']} | {r['full_rounds']}/{r['peer_rounds']} |")
    print(f"wrote {args.out}")
    return 0 if all(r["error"] is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
