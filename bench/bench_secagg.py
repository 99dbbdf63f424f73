"""Secure aggregation against plain fedavg: the same metrics over seeds, and what it costs.

Two parts, each a list of real simnet runs (``python -m silomesh.simnet.cli run --json`` in a
fresh process; catheter, fedavg, ``regular:4``; the arms differ only in
``--strategy-param secure_aggregation=true``):

* **metrics**: 8 peers, for each seed and for each fault spec (none, and one peer crashing in
  round 1 and restarting), plain and secure. Reports the federated Dice of each run, the
  per-seed paired difference (secure - plain), and their mean and standard deviation beside
  the spread across seeds of plain itself (the noise the difference is compared with).
* **cost**: 8 and 16 peers, no faults, one seed: mean round seconds (all rounds, and the
  rounds after the first, which also pays for start-up) and bytes sent per round, and the
  ratios secure / plain. The issue's goal: <= 1.3x the round time and <= 1.2x the bytes of
  plain full-snapshot averaging. The 8-peer runs of the metrics part (seed ``--seeds``'
  first, no faults) are reused.

Every pair of arms runs back to back in one invocation on the same machine. Prints one JSON
document (and writes it to ``--out`` if given)::

    python bench/bench_secagg.py --out bench/results/secagg/bench_secagg.json
    python bench/bench_secagg.py --seeds 0 --cost-peers 8 --rounds 2      # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CRASH = "crash=1@1,restart=after:1"


def run_one(peers: int, seed: int, secure: bool, faults: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One simnet in a subprocess, condensed."""
    cmd = [sys.executable, "-m", "silomesh.simnet.cli", "run", "--peers", str(peers), "--topology", "regular:4",
           "--strategy", "fedavg", "--task", "catheter", "--size", args.size, "--rounds", str(args.rounds),
           "--seed", str(seed), "--deadline", str(args.deadline), "--out", str(out), "--json", "--quiet"]
    if faults != "none":
        cmd += ["--faults", faults]
    if secure:
        cmd += ["--strategy-param", "secure_aggregation=true"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)
    row: dict[str, Any] = {"peers": peers, "seed": seed, "secure": secure, "faults": faults,
                           "command_seconds": round(time.time() - t0, 2)}
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return row
    r = json.loads(proc.stdout)
    seconds = [h["seconds"] for h in r["history"] if h["seconds"] is not None]
    observed = r["faults"]["observed"]
    row.update({
        "round_success_rate": r["round_success_rate"],
        "federated_dice": r["final"]["federated_mean"],
        "dice_per_peer": r["final"]["federated_per_peer"],
        "round_seconds": [round(s, 3) for s in seconds],
        "round_seconds_mean": round(statistics.fmean(seconds), 3) if seconds else None,
        "round_seconds_mean_after_first": round(statistics.fmean(seconds[1:]), 3) if len(seconds) > 1 else None,
        "bytes_per_round": r["bytes_sent_total"] // args.rounds,
        "wall_seconds": r["wall_seconds"],
        "skipped_neighbours": observed["skipped_neighbours"],
        "skipped_by_reason": observed["skipped_by_reason"],
        "crashed_peers": observed["crashed_peers"],
        "recovered_peers": observed["recovered_peers"],
        "peer_errors": observed["peer_errors"],
    })
    return row


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def summarise_metrics(rows: list[dict[str, Any]], seeds: list[int], fault_specs: list[str]) -> list[dict[str, Any]]:
    """Per fault spec: Dice per seed for both arms, paired differences, and the seeds' spread."""
    out = []
    for faults in fault_specs:
        def dice(secure: bool, seed: int, faults: str = faults) -> float | None:
            hit = [r for r in rows if r["secure"] == secure and r["seed"] == seed and r["faults"] == faults]
            return hit[0].get("federated_dice") if hit else None

        plain = {s: dice(False, s) for s in seeds}
        secure = {s: dice(True, s) for s in seeds}
        diffs = [secure[s] - plain[s] for s in seeds if secure[s] is not None and plain[s] is not None]
        plain_values = [v for v in plain.values() if v is not None]
        secure_values = [v for v in secure.values() if v is not None]
        out.append({
            "faults": faults,
            "plain_dice": plain, "secure_dice": secure,
            "plain_mean": round(statistics.fmean(plain_values), 4) if plain_values else None,
            "plain_std": round(statistics.stdev(plain_values), 4) if len(plain_values) > 1 else None,
            "secure_mean": round(statistics.fmean(secure_values), 4) if secure_values else None,
            "secure_std": round(statistics.stdev(secure_values), 4) if len(secure_values) > 1 else None,
            "paired_diff_mean": round(statistics.fmean(diffs), 4) if diffs else None,
            "paired_diff_std": round(statistics.stdev(diffs), 4) if len(diffs) > 1 else None,
        })
    return out


def summarise_cost(rows: list[dict[str, Any]], peer_counts: list[int], seed: int) -> list[dict[str, Any]]:
    """Per peer count: round seconds and bytes per round of both arms and their ratios."""
    out = []
    for n in peer_counts:
        pick = {r["secure"]: r for r in rows if r["peers"] == n and r["seed"] == seed and r["faults"] == "none"}
        plain, secure = pick.get(False, {}), pick.get(True, {})
        out.append({
            "peers": n,
            "plain_round_seconds_mean": plain.get("round_seconds_mean"),
            "secure_round_seconds_mean": secure.get("round_seconds_mean"),
            "round_seconds_ratio": _ratio(secure.get("round_seconds_mean"), plain.get("round_seconds_mean")),
            "round_seconds_ratio_after_first": _ratio(secure.get("round_seconds_mean_after_first"),
                                                      plain.get("round_seconds_mean_after_first")),
            "plain_bytes_per_round": plain.get("bytes_per_round"),
            "secure_bytes_per_round": secure.get("bytes_per_round"),
            "bytes_ratio": _ratio(secure.get("bytes_per_round"), plain.get("bytes_per_round")),
            "goal_time_met": (_ratio(secure.get("round_seconds_mean"), plain.get("round_seconds_mean")) or 99) <= 1.3,
            "goal_bytes_met": (_ratio(secure.get("bytes_per_round"), plain.get("bytes_per_round")) or 99) <= 1.2,
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the metrics part")
    parser.add_argument("--cost-peers", default="8,16", help="peer counts of the cost part")
    parser.add_argument("--no-crash", action="store_true", help="skip the crash-fault arm of the metrics part")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", default="small")
    parser.add_argument("--deadline", type=float, default=30.0, help="simnet's default")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one simnet may take")
    parser.add_argument("--out", type=Path, help="also write the JSON document here")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    cost_peers = [int(n) for n in args.cost_peers.split(",") if n]
    fault_specs = ["none"] if args.no_crash else ["none", CRASH]
    plan = [(8, seed, faults) for faults in fault_specs for seed in seeds]
    plan += [(n, seeds[0], "none") for n in cost_peers if (n, seeds[0], "none") not in plan]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-secagg-") as tmp:
        for i, (peers, seed, faults) in enumerate(plan):
            for secure in (False, True):
                name = f"n{peers}-s{seed}-{'crash' if faults != 'none' else 'clean'}-{'secure' if secure else 'plain'}"
                rows.append(run_one(peers, seed, secure, faults, args, Path(tmp) / name))
                brief = {k: rows[-1].get(k) for k in ("peers", "seed", "faults", "secure", "federated_dice",
                                                       "round_seconds_mean", "bytes_per_round", "error")}
                print(f"[{2 * i + secure + 1}/{2 * len(plan)}] {json.dumps(brief)}", file=sys.stderr, flush=True)
    doc = {
        "bench": "secagg", "topology": "regular:4", "strategy": "fedavg", "task": "catheter", "size": args.size,
        "rounds": args.rounds, "deadline": args.deadline, "crash_faults": CRASH, "seeds": seeds,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "metrics": summarise_metrics(rows, seeds, fault_specs),
        "cost": summarise_cost(rows, cost_peers, seeds[0]),
        "runs": rows,
    }
    text = json.dumps(doc, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
