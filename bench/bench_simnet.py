"""How simnet scales with the number of peers: ring, fedavg, catheter, tiny model.

Each configuration runs in a fresh process (``python -m silomesh.simnet.cli run --json``)
so memory figures are not polluted by earlier runs. Prints one JSON document:

    {"configs": [{"peers": 8, "procs": 1, "wall_seconds": ..., "round_seconds_mean": ...,
                  "round_seconds_max": ..., "rss_per_peer_mib": ..., "bytes_per_round": ...,
                  "round_success_rate": ...}, ...]}

Usage::

    python bench/bench_simnet.py                       # N = 8, 16, 32, 48 and 48 with --procs 2
    python bench/bench_simnet.py --peers 8,16 --no-procs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def run_one(peers: int, procs: int, rounds: int, local_steps: int, deadline: float, out: Path) -> dict[str, Any]:
    """Run one simnet in a subprocess and condense its report."""
    cmd = [sys.executable, "-m", "silomesh.simnet.cli", "run", "--peers", str(peers), "--procs", str(procs),
           "--topology", "ring", "--strategy", "fedavg", "--task", "catheter", "--size", "tiny",
           "--rounds", str(rounds), "--local-steps", str(local_steps), "--deadline", str(deadline),
           "--seed", "0", "--out", str(out), "--json", "--quiet"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    elapsed = time.time() - t0
    if proc.returncode != 0:
        return {"peers": peers, "procs": procs, "error": proc.stderr.strip().splitlines()[-1:]}
    r = json.loads(proc.stdout)
    hist = r["history"]
    means = [h["seconds"] for h in hist if h["seconds"] is not None]
    maxes = [h["seconds_max"] for h in hist if h["seconds_max"] is not None]
    return {
        "peers": peers,
        "procs": procs,
        "rounds": rounds,
        "wall_seconds": r["wall_seconds"],
        "command_seconds": round(elapsed, 2),
        "round_seconds_mean": round(sum(means) / len(means), 3) if means else None,
        "round_seconds_max": round(max(maxes), 3) if maxes else None,
        "round_seconds_per_round": [round(m, 3) for m in means],
        "rss_total_mib": round(r["resources"]["rss_total_bytes"] / 2**20, 1),
        "rss_per_peer_mib": round(r["resources"]["rss_per_peer_bytes"] / 2**20, 2),
        "bytes_per_round": r["bytes_sent_total"] // rounds,
        "round_success_rate": r["round_success_rate"],
        "skipped_neighbours": r["faults"]["observed"]["skipped_neighbours"],
        "final_metric_mean": r["final"]["federated_mean"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default="8,16,32,48", help="comma-separated peer counts")
    parser.add_argument("--no-procs", action="store_true", help="skip the multi-process run")
    parser.add_argument("--procs-peers", type=int, default=48, help="peers of the multi-process run")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--deadline", type=float, default=60.0)
    args = parser.parse_args()
    configs = [(int(n), 1) for n in args.peers.split(",") if n]
    if not args.no_procs:
        configs.append((args.procs_peers, args.procs))
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-simnet-") as tmp:
        for peers, procs in configs:
            out = Path(tmp) / f"n{peers}-p{procs}"
            results.append(run_one(peers, procs, args.rounds, args.local_steps, args.deadline, out))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"bench": "simnet", "topology": "ring", "strategy": "fedavg", "task": "catheter",
                      "size": "tiny", "local_steps": args.local_steps, "configs": results}, indent=1))


if __name__ == "__main__":
    main()
