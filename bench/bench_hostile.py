"""Benchmark: what a trusted but hostile neighbour can make a peer hold in memory.

Prints one JSON object. Not a test: memory is measured in one run on one machine.

    .venv/bin/python bench/bench_hostile.py [--streams 16] [--mb-per-stream 32]

A real peer (libp2p on 127.0.0.1, the tiny catheter model, participation ``manual`` so
no round runs) and a trusted neighbour that opens ``--streams`` exchange streams, says
hello on each, announces a frame of 400 MiB (under the 512 MiB frame limit) and sends
``--mb-per-stream`` MiB of it, then holds every stream open. The attack runs twice in
one process, in this order:

* ``unbounded``: the peer's buffer budget raised out of reach (as before the budget);
* ``budget``: the default budget (3 x the model, at least 64 MiB per neighbour; 8 x, at
  least 256 MiB, in all).

For each: the peer process's RSS growth while the streams are held (VmRSS), the bytes the
budget says are held, how many streams the peer refused (its audit log), the RSS after the streams closed,
and whether a fresh, valid update is still acknowledged afterwards.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from handkit import Neighbour
from peerkit import configs

from silomesh.peer.daemon import Peer
from silomesh.peer.mesh import Mesh, open_mesh
from silomesh.peer.transport import StreamClosed
from silomesh.protocol import Ack, OpenedEnvelope

MiB = 1 << 20


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _budget_refusals(victim: Peer) -> int:
    return sum(1 for e in victim.audit_log.entries() if e["direction"] == "refused" and "budget" in str(e["reason"]))


async def attack(victim: Peer, hand: Neighbour, mesh: Mesh, streams: int, mb: int) -> dict[str, Any]:
    victim_id = victim.peer_id
    budget = victim.context.endpoint.budget
    assert budget is not None
    gc.collect()
    before = rss()
    chunk = bytes(MiB)
    opened = []
    refusals = _budget_refusals(victim)
    for _ in range(streams):
        stream = await mesh.open_stream(victim_id)
        await hand.hello(stream)
        try:
            await stream.write((400 * MiB).to_bytes(4, "big"))
            for _ in range(mb):
                await stream.write(chunk)
        except StreamClosed:
            continue
        opened.append(stream)
    await trio.sleep(2)  # let the peer read what is in flight
    held_rss = rss() - before
    held_budget = budget.held_total
    for s in opened:
        await s.reset()
    await trio.sleep(2)
    gc.collect()
    after = rss() - before
    stream = await mesh.open_stream(victim_id)
    session, _ = await hand.hello(stream)
    state = {k: v.copy() for k, v in victim.learner.state().items()}
    await stream.write(session.send(hand.update(state)).to_frame())
    reply = await hand.next(session, stream)
    await stream.close()
    return {
        "sent_mb": streams * mb,
        "rss_growth_held_mb": round(held_rss / MiB, 1),
        "budget_held_mb": round(held_budget / MiB, 1),
        "streams_refused": _budget_refusals(victim) - refusals,
        "rss_growth_after_close_mb": round(after / MiB, 1),
        "still_serves": isinstance(reply, OpenedEnvelope) and isinstance(reply.message, Ack),
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ids, cfgs = configs(Path(tmp), 2, rounds=1, participation="manual")
        victim = Peer(cfgs[0], identity=ids[0], serve_control_api=False)
        hand = Neighbour(ids[1].seed, ids[0].public_key, cfgs[0].federation)
        async with trio.open_nursery() as nursery:
            await nursery.start(victim.run)
            budget = victim.context.endpoint.budget
            assert budget is not None
            limits = (budget.per_peer, budget.total)
            addr = victim.transport.addrs[0].split("/p2p/")[0]
            async with open_mesh(ids[1], "/ip4/127.0.0.1/tcp/0", {ids[0].peer_id_text: addr}) as mesh:
                assert await mesh.connect(ids[0].peer_id_text)
                budget.per_peer = budget.total = 1 << 40
                results["unbounded"] = await attack(victim, hand, mesh, args.streams, args.mb_per_stream)
                budget.per_peer, budget.total = limits
                results["budget"] = await attack(victim, hand, mesh, args.streams, args.mb_per_stream)
            nursery.cancel_scope.cancel()
    results["budget_limits_mb"] = {"per_peer": limits[0] // MiB, "total": limits[1] // MiB}
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--mb-per-stream", type=int, default=32)
    args = parser.parse_args()
    out = trio.run(main, args)
    out["machine"] = {"python": platform.python_version(), "platform": platform.platform()}
    print(json.dumps(out, indent=2))
