"""The exchange path under concurrency: byte counts with several neighbours, pushes that cross.

Peers run over the in-memory transport under trio's MockClock (see test_round_loop.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing
from memnet import MemoryNetwork, StartTogether
from peerkit import configs

from silomesh.peer.context import InlineCompute
from silomesh.peer.daemon import Peer


def full(n: int) -> list[list[int]]:
    return [[j for j in range(n) if j != i] for i in range(n)]


def make(tmp_path: Path, n: int, net: MemoryNetwork, **kwargs: object) -> list[Peer]:
    ids, cfgs = configs(tmp_path, n, neighbours=full(n), **kwargs)  # type: ignore[arg-type]
    faults = StartTogether(net, n)
    return [
        Peer(cfg, identity=identity, serve_control_api=False, transport=net.open, compute=InlineCompute(),
             faults=faults)
        for identity, cfg in zip(ids, cfgs, strict=True)
    ]


@asynccontextmanager
async def running(peers: Sequence[Peer]) -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        for p in peers:
            await nursery.start(p.run)
        yield nursery
        nursery.cancel_scope.cancel()


async def test_bytes_sent_of_a_round_count_every_neighbours_update(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """With 3 neighbours pushed to at once, the round's bytes are the sum over all three pushes
    (the audit log's sent updates), not the last push to finish."""
    net = MemoryNetwork()
    peers = make(tmp_path, 4, net, rounds=2)
    async with running(peers):
        for p in peers:
            await p.done.wait()
        seen = {p.peer_id: await p.operator.rounds() for p in peers}
        audit = {p.peer_id: p.store.audit_entries() for p in peers}
    for p in peers:
        entries = audit[p.peer_id]
        for row in seen[p.peer_id]:
            assert row["status"] == "done" and len(row["contributors"]) == 3
            updates = [e for e in entries if e["direction"] == "sent" and e["kind"] == "update"
                       and e["round"] == row["round"]]
            assert len(updates) == 3
            update_bytes = sum(e["size"] for e in updates)
            # bytes_sent also counts the dialer's hello on each of the 3 streams (a few hundred bytes)
            assert update_bytes <= row["bytes_sent"] <= update_bytes + 3 * 1024, (row["bytes_sent"], update_bytes)
