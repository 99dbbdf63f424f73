"""Benchmark: a raw py-libp2p stream between two processes, the bound for an update between two peers.

``bench_exchange.py`` runs both peers in one process, so one trio loop carries both ends of
every transfer. Between hospitals each peer is its own process: this script times the same
raw transfer (Noise + Yamux from ``silomesh.peer.mesh.open_mesh``, a new stream, an 8-byte
length, the payload in 1 MiB writes, a 1-byte acknowledgement) from this process to a
receiver subprocess, and each side's process CPU seconds during it. Prints one JSON object::

    .venv/bin/python bench/bench_raw_procs.py --mb 50 --repeats 6

With the protocol's own work per update (``bench_exchange.py``'s ``components``), the sum
of both sides' CPU tells whether a target ratio to this transfer can fit on the machine's
cores at all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio
from bench_exchange import (  # this script's folder is on sys.path
    RAW_PROTOCOL,
    _free_port,
    _identity,
    raw_receive,
    raw_send,
)

WRITE = 1 << 20


def _addresses(ports: tuple[int, int]) -> dict[str, str]:
    a, b = _identity("raw-a"), _identity("raw-b")
    return {a.peer_id_text: f"/ip4/127.0.0.1/tcp/{ports[0]}", b.peer_id_text: f"/ip4/127.0.0.1/tcp/{ports[1]}"}


async def receiver(ports: tuple[int, int], transfers: int) -> None:
    """Serve ``transfers`` raw transfers, then print the CPU seconds each took (one JSON line)."""
    from libp2p.custom_types import TProtocol

    from silomesh.peer.mesh import FramedStream, open_mesh

    a, b = _identity("raw-a"), _identity("raw-b")
    addr = _addresses(ports)
    cpu: list[float] = []
    done = trio.Event()

    async def handler(stream: FramedStream) -> None:
        c0 = time.process_time()
        await raw_receive(stream)
        cpu.append(time.process_time() - c0)
        if len(cpu) == transfers:
            done.set()

    async with open_mesh(b, addr[b.peer_id_text], {a.peer_id_text: addr[a.peer_id_text]}) as mesh:
        mesh.set_handler(handler, TProtocol(RAW_PROTOCOL))
        print(json.dumps({"ready": True}), flush=True)
        with trio.fail_after(600):
            await done.wait()
    print(json.dumps({"cpu_s": cpu}), flush=True)


async def sender(ports: tuple[int, int], mb: float, repeats: int) -> list[dict[str, float]]:

    from silomesh.peer.mesh import open_mesh

    a, b = _identity("raw-a"), _identity("raw-b")
    addr = _addresses(ports)
    payload = memoryview(os.urandom(int(mb * 1e6)))
    out = []
    async with open_mesh(a, addr[a.peer_id_text], {b.peer_id_text: addr[b.peer_id_text]}) as mesh:
        if not await mesh.connect(b.peer_id_text):  # the receiver listens before it says ready
            raise SystemExit("cannot connect to the receiver")
        for _ in range(repeats + 1):  # the first one warms up
            t0, c0 = time.perf_counter(), time.process_time()
            await raw_send(mesh, b.peer_id_text, payload, WRITE)
            out.append({"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0})
    return out[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50.0, help="transfer size in MB")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--receiver", nargs=3, type=int, metavar=("PORT_A", "PORT_B", "TRANSFERS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receiver:
        trio.run(receiver, (args.receiver[0], args.receiver[1]), args.receiver[2])
        return
    ports = (_free_port(), _free_port())
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--receiver", str(ports[0]), str(ports[1]),
         str(args.repeats + 1)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout is not None
        if json.loads(child.stdout.readline()).get("ready") is not True:
            sys.exit("the receiver did not start")
        sent = trio.run(sender, ports, args.mb, args.repeats)
        received = json.loads(child.stdout.readline())["cpu_s"][1:]
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    best = min(range(len(sent)), key=lambda i: sent[i]["wall_s"])
    median = sorted(s["wall_s"] for s in sent)[len(sent) // 2]
    doc: dict[str, Any] = {
        "bench": "raw_procs",
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "mb": args.mb,
        "repeats": args.repeats,
        "wall_best_s": round(sent[best]["wall_s"], 4),
        "wall_median_s": round(median, 4),
        "sender_cpu_s": [round(s["cpu_s"], 4) for s in sent],
        "receiver_cpu_s": [round(c, 4) for c in received],
    }
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
