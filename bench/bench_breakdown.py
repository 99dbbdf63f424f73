"""Where a simnet's CPU goes: py-spy samples of one run, sorted into what a round does.

Runs ``silomesh simnet run --topology full --strategy fedavg`` (the settings and options
of ``bench_lean.py``) under ``py-spy record`` and sorts every sampled stack into one category,
the first that matches, in this order:

* ``idle``: threads blocked on a lock, a condition or epoll (py-spy counts some as busy); left out;
* ``start-up``: imports, generating the synthetic data, building peers;
* ``training`` and ``evaluation``: torch work of the local steps and of the test metric;
* ``transfer``: py-libp2p (Noise, Yamux, multistream, the swarm) and trio's socket calls,
  including the kernel time of the socket system calls they make;
* ``store and audit``: SQLite (``peer/store.py``, the audit log, sqlite-utils);
* ``serialisation and crypto``: silomesh's own protocol layer (tensor codec, envelopes,
  XSalsa20-Poly1305, BLAKE2b digests, deltas), the update guard and aggregation;
* ``scheduling``: trio's run loop and thread hand-offs;
* ``other``.

Shares are of sampled thread time, not of CPU: py-spy also counts a thread that waits for
the GIL as busy, so with several threads the samples add up to more than the CPU seconds.
py-spy is not a silomesh dependency: install it anywhere (``pip install py-spy``) and pass
its path. Prints one JSON document (samples and shares per category, with and without
start-up) and, with ``--out FILE``, writes it there::

    python bench/bench_breakdown.py --py-spy /tmp/spy/bin/py-spy --peers 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from bench_lean import add_run_options, simnet_command  # this script's folder is on sys.path

IDLE_LEAVES = ("_thread_cache.py:211", "Condition.wait", "Event.wait", "get_events", "lock.acquire")
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("start-up", ("_bootstrap>", "_warm_data", "build_plan", "Learner.__init__", "make_federation")),
    ("training", ("train_local", "run_steps", "Learner.train")),
    ("evaluation", ("evaluate (",)),
    ("transfer", ("libp2p/", "noise/", "yamux", "multiaddr/", "trio/_socket.py", "trio/_highlevel_socket.py")),
    ("store and audit", ("sqlite", "peer/store.py", "peer/audit.py", "audit/")),
    ("serialisation and crypto", ("protocol/", "nacl/", "peer/safety.py", "strategies/", "peer/dialer.py",
                                  "peer/handlers.py")),
    ("scheduling", ("trio/",)),
)


def classify(raw: str) -> dict[str, int]:
    """Samples per category of py-spy's raw (collapsed-stack) output."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack or not n.isdigit():
            continue
        if any(k in stack.split(";")[-1] for k in IDLE_LEAVES):
            counts["idle"] += int(n)
            continue
        for name, keys in CATEGORIES:
            if any(k in stack for k in keys):
                counts[name] += int(n)
                break
        else:
            counts["other"] += int(n)
    return dict(counts)


def shares(counts: dict[str, int], leave_out: tuple[str, ...]) -> dict[str, float]:
    kept = {k: v for k, v in counts.items() if k not in leave_out}
    total = sum(kept.values()) or 1
    return {k: round(v / total, 4) for k, v in sorted(kept.items(), key=lambda kv: -kv[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--py-spy", default="py-spy", help="the py-spy executable")
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--procs", type=int, default=1)
    add_run_options(parser)
    parser.add_argument("--reduce", choices=["neighbours", "tree"], default="neighbours",
                        help="fedavg's reduce: every peer averages all the others, or along a tree")
    parser.add_argument("--rate", type=int, default=50, help="samples per second")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-breakdown-") as tmp:
        raw = Path(tmp) / "profile.txt"
        cmd = [args.py_spy, "record", "--subprocesses", "-r", str(args.rate), "-f", "raw", "-o", str(raw), "--",
               *simnet_command(args, args.peers, args.procs, Path(tmp) / "run", args.reduce)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not raw.is_file():
            sys.exit(f"the profiled run failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        report, _ = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index("{"):])  # py-spy prints too
        counts = classify(raw.read_text(encoding="utf-8"))
    doc: dict[str, Any] = {
        "bench": "breakdown", "peers": args.peers, "procs": args.procs, "reduce": args.reduce, "size": args.size,
        "rounds": args.rounds,
        "local_steps": args.local_steps, "batch_size": args.batch_size, "n_train": args.n_train,
        "rate_hz": args.rate, "wall_seconds": report["wall_seconds"],
        "cpu_seconds": report["resources"]["cpu_seconds"], "bytes_sent_total": report["bytes_sent_total"],
        "samples": counts,
        "share_of_busy": shares(counts, ("idle",)),
        "share_of_rounds": shares(counts, ("idle", "start-up")),
    }
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
