"""simnet on Ray: hundreds of peers over 1, 2 and 3 Ray nodes of this machine (issue 20).

Each Ray node is its own network namespace of the test bed (tests/netbed.py: root only), with
its own address, started with ``ray start``; the simnet driver runs on the head node with
``--backend ray --ray-address HEAD:6379``. For every (nodes, peers) configuration it prints one
JSON line on stderr and, at the end, one JSON document on stdout:

    {"bench": "ray", "configs": [{"nodes": 2, "peers": 200, "procs": 2, "round_success_rate": ...,
      "round_seconds_mean": ..., "setup_seconds": ..., "actor_rss_per_peer_mib": ...,
      "actor_pss_peak_mib": ..., "all_pss_peak_mib": ..., "all_pss_per_peer_mib": ...}, ...],
     "granularity": [...]}

* ``actor_*``: the share actors only (the processes that hold the peers), RSS as the actors
  report it and PSS sampled every 2 s from /proc (peak of the sum);
* ``all_pss_*``: every process in the nodes' namespaces (Ray's GCS, raylets, idle workers,
  the driver and the actors): what the run costs this machine;
* ``granularity``: the same small run with one actor per peer (``--procs N``) and with one
  actor for all (``--procs 1``), to show what an actor per peer would cost.

Usage (as root)::

    python bench/bench_ray.py                          # N = 100, 200 over 1, 2, 3 nodes
    python bench/bench_ray.py --peers 256 --nodes 2    # one configuration
    python bench/bench_ray.py --nodes "" --flower /tmp/flwr/bin/python   # Flower's simulation only

``flower``: the same N, rounds and local steps in Flower 1.42's simulation (bench/flower_sim.py,
in a venv of its own; Flower's FedAvg over all clients), with the peak PSS of every process in
its namespace (the driver, Ray's processes and its client actors), per simulated client.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from netbed import NetBed, missing_requirements, open_netbed

BIN = Path(sys.executable).parent
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text(encoding="utf-8").splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def ns_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


class PssSampler(threading.Thread):
    """Peak PSS (KiB) of every process in some namespaces, and of a set of pids, every 2 s."""

    def __init__(self, namespaces: list[str]) -> None:
        super().__init__(daemon=True)
        self.namespaces = namespaces
        self.actor_pids: set[int] = set()
        self.peak_all = 0
        self.peak_actors = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(2.0):
            pids = [p for ns in self.namespaces for p in ns_pids(ns)]
            self.peak_all = max(self.peak_all, sum(pss_kib(p) for p in pids))
            self.peak_actors = max(self.peak_actors, sum(pss_kib(p) for p in self.actor_pids))


def start_cluster(bed: NetBed, nodes: int, temp: Path) -> tuple[str, list[subprocess.Popen[bytes]], float]:
    """``nodes`` Ray nodes, one per namespace; the head's address, the processes, seconds it took."""
    t0 = time.time()
    procs: list[subprocess.Popen[bytes]] = []
    sites = [bed.add_public(f"n{i}") for i in range(nodes)]
    head = sites[0].address
    for i, site in enumerate(sites):
        log = temp / f"node{i}.log"
        args = ["--head", "--port=6379", "--include-dashboard=false", f"--temp-dir={temp}/h"] if i == 0 \
            else [f"--address={head}:6379"]
        cmd = [str(BIN / "ray"), "start", "--block", f"--node-ip-address={site.address}", "--num-cpus=1",
               "--disable-usage-stats", *args]
        procs.append(subprocess.Popen(bed.command(site.name, cmd), env=ENV, stdout=log.open("wb"),
                                      stderr=subprocess.STDOUT, cwd=temp))
        end = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text(encoding="utf-8", errors="replace"):
            if time.monotonic() > end or procs[-1].poll() is not None:
                raise RuntimeError(f"ray node {i} did not start: {log.read_text(encoding='utf-8')[-2000:]}")
            time.sleep(0.5)
    return head, procs, time.time() - t0


def run_one(bed: NetBed, head: str, peers: int, procs: int, args: argparse.Namespace, out: Path,
            sampler: PssSampler) -> dict[str, Any]:
    cmd = [str(BIN / "silomesh"), "simnet", "run", "--backend", "ray", "--ray-address", f"{head}:6379",
           "--peers", str(peers), "--procs", str(procs), "--topology", "ring", "--strategy", "fedavg",
           "--task", "catheter", "--size", "tiny", "--rounds", str(args.rounds), "--local-steps",
           str(args.local_steps), "--deadline", str(args.deadline), "--seed", "0", "--out", str(out),
           "--json", "--quiet", "--timeout", str(args.timeout)]
    sampler.peak_all = sampler.peak_actors = 0
    sampler.actor_pids = set()
    t0 = time.time()
    driver = subprocess.Popen(bed.command("n0", cmd), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    nodes_file = out / "run" / "ray-nodes.json"
    while driver.poll() is None and not sampler.actor_pids:
        if nodes_file.is_file():
            sampler.actor_pids = {int(n["pid"]) for n in json.loads(nodes_file.read_text(encoding="utf-8"))}
        time.sleep(0.5)
    stdout, stderr = driver.communicate(timeout=args.timeout + 600)
    elapsed = time.time() - t0
    base = {"peers": peers, "procs": procs}
    if driver.returncode != 0:
        return {**base, "error": (stderr.strip().splitlines() or ["?"])[-1], "command_seconds": round(elapsed, 1)}
    r = json.loads(stdout)
    hist = r["history"]
    means = [h["seconds"] for h in hist if h["seconds"] is not None]
    placed = json.loads(nodes_file.read_text(encoding="utf-8"))
    return {
        **base,
        "rounds": args.rounds,
        "hosts": sorted({n["host"] for n in placed}),
        "round_success_rate": r["round_success_rate"],
        "skipped_neighbours": r["faults"]["observed"]["skipped_neighbours"],
        "round_seconds_mean": round(sum(means) / len(means), 2) if means else None,
        "round_seconds_max": round(max(h["seconds_max"] for h in hist if h["seconds_max"]), 2) if means else None,
        "setup_seconds": r["setup_seconds"],
        "wall_seconds": r["wall_seconds"],
        "command_seconds": round(elapsed, 1),
        "actor_rss_total_mib": round(r["resources"]["rss_total_bytes"] / 2**20, 1),
        "actor_rss_per_peer_mib": round(r["resources"]["rss_per_peer_bytes"] / 2**20, 2),
        "actor_pss_peak_mib": round(sampler.peak_actors / 1024, 1),
        "actor_pss_per_peer_mib": round(sampler.peak_actors / 1024 / peers, 2),
        "all_pss_peak_mib": round(sampler.peak_all / 1024, 1),
        "all_pss_per_peer_mib": round(sampler.peak_all / 1024 / peers, 2),
        "bytes_per_round": r["bytes_sent_total"] // args.rounds,
        "final_metric_mean": r["final"]["federated_mean"],
    }


def run_flower(python: str, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    """bench/flower_sim.py with ``clients`` in a namespace of its own; peak PSS of everything in it."""
    site_dir = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    cmd = [python, str(Path(__file__).with_name("flower_sim.py")), "--clients", str(clients), "--rounds",
           str(args.rounds), "--local-steps", str(args.local_steps), "--silomesh-site", site_dir]
    with open_netbed() as bed:
        bed.add_public("flower")
        sampler = PssSampler(list(bed.namespaces))
        sampler.start()
        t0 = time.time()
        proc = subprocess.run(bed.command("flower", cmd), env=ENV, capture_output=True, text=True,
                              timeout=args.timeout, check=False)
        sampler.done.set()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"clients": clients, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return {**json.loads(lines[-1]), "command_seconds": round(time.time() - t0, 1),
            "all_pss_peak_mib": round(sampler.peak_all / 1024, 1),
            "all_pss_per_client_mib": round(sampler.peak_all / 1024 / clients, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default="100,200", help="comma-separated peer counts")
    parser.add_argument("--nodes", default="1,2,3", help="comma-separated Ray node counts")
    parser.add_argument("--procs-per-node", type=int, default=1, help="share actors per node")
    parser.add_argument("--granularity-peers", type=int, default=8, help="0: skip the actor-per-peer comparison")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--deadline", type=float, default=120.0)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--keep", type=Path, help="keep every run's folder under this directory")
    parser.add_argument("--flower", metavar="PYTHON",
                        help="also run bench/flower_sim.py at each --peers with this interpreter (a venv with "
                             "flwr[simulation]==1.42.0)")
    args = parser.parse_args()
    missing = missing_requirements()
    if missing:
        sys.exit(f"bench_ray needs the network test bed (root, ip, tc, nft): {missing}")
    configs, granularity = [], []
    node_counts = [int(x) for x in args.nodes.split(",") if x]
    for nodes in node_counts:
        temp = Path(tempfile.mkdtemp(prefix="smrb"))  # short: Ray's socket paths must fit 107 bytes
        runs_dir = args.keep / f"nodes{nodes}" if args.keep else temp
        try:
            with open_netbed() as bed:
                head, ray_procs, started = start_cluster(bed, nodes, temp)
                sampler = PssSampler(list(bed.namespaces))
                sampler.start()
                try:
                    runs = []
                    if args.granularity_peers and nodes == node_counts[0]:
                        g = args.granularity_peers
                        for procs in (1, g):
                            row = run_one(bed, head, g, procs, args, runs_dir / f"g{procs}", sampler)
                            granularity.append({"nodes": nodes, **row})
                            print(json.dumps(granularity[-1]), file=sys.stderr, flush=True)
                    for peers in [int(x) for x in args.peers.split(",") if x]:
                        row = run_one(bed, head, peers, nodes * args.procs_per_node, args,
                                      runs_dir / f"n{peers}", sampler)
                        runs.append({"nodes": nodes, "cluster_start_seconds": round(started, 1), **row})
                        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
                    configs += runs
                finally:
                    sampler.done.set()
                    for p in ray_procs:
                        p.kill()
                    for p in ray_procs:
                        p.wait(timeout=30)
        finally:
            shutil.rmtree(temp, ignore_errors=True)
    flower = []
    for peers in [int(x) for x in args.peers.split(",") if x] if args.flower else []:
        flower.append(run_flower(args.flower, peers, args))
        print(json.dumps(flower[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"bench": "ray", "topology": "ring", "strategy": "fedavg", "task": "catheter", "size": "tiny",
                      "local_steps": args.local_steps, "rounds": args.rounds, "cpus": os.cpu_count(),
                      "configs": configs, "granularity": granularity,
                      "flower": flower}, indent=1))


if __name__ == "__main__":
    main()
