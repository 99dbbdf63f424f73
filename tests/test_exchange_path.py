"""The exchange path under concurrency: byte counts with several neighbours, pushes that cross.

Peers run over the in-memory transport under trio's MockClock (see test_round_loop.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from memnet import MemoryNetwork, StartTogether
from peerkit import configs, identity

from silomesh.peer import muxer
from silomesh.peer.context import InlineCompute
from silomesh.peer.daemon import Peer
from silomesh.peer.mesh import FramedStream, Mesh, open_mesh


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


async def _push_and_open(src: Mesh, dst: str, size: int, written: dict[str, int]) -> None:
    """Write ``size`` bytes on one stream to ``dst`` while opening a short stream every 5 ms."""

    async def open_streams() -> None:
        while True:
            s = await src.open_stream(dst)
            await s.write(b"p")
            await s.close()
            await trio.sleep(0.005)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_streams)
        stream = await src.open_stream(dst)
        block = b"x" * (1 << 20)
        for _ in range(size >> 20):
            await stream.write(block)
            written[dst] = written.get(dst, 0) + len(block)
        assert await stream.read_some() == b"ok"
        await stream.close()
        nursery.cancel_scope.cancel()


async def _drain(stream: FramedStream) -> None:
    """Read a whole push (answer ``ok``), or the one byte of a short stream."""
    got = len(await stream.read_some())
    if got > 1:
        while got < CROSS_BYTES:
            got += len(await stream.read_some())
        await stream.write(b"ok")
    await stream.close()


CROSS_BYTES = 48 << 20


async def cross_push(written: dict[str, int]) -> None:
    a_id, b_id = identity("cross-a"), identity("cross-b")
    async with open_mesh(b_id, "/ip4/127.0.0.1/tcp/0", {a_id.peer_id_text: "/ip4/127.0.0.1/tcp/1"}) as b:
        b.set_handler(_drain)
        address = b.addrs[0].split("/p2p/")[0]
        async with open_mesh(a_id, "/ip4/127.0.0.1/tcp/0", {b_id.peer_id_text: address}) as a:
            a.set_handler(_drain)
            assert await a.connect(b_id.peer_id_text)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_push_and_open, a, b_id.peer_id_text, CROSS_BYTES, written)
                nursery.start_soon(_push_and_open, b, a_id.peer_id_text, CROSS_BYTES, written)


@pytest.mark.slow
async def test_two_peers_pushing_to_each_other_over_one_connection_never_deadlock() -> None:
    """py-libp2p's Yamux reader writes ACKs and pongs under the connection's write lock; with
    large data both ways and streams opening, both readers blocked on it and the connection
    stopped for good (at 7-25 of 48 MiB here). silomesh.peer.muxer moves those writes off the
    reader; installed by silomesh.peer.exchange, which every peer imports."""
    muxer.install()
    written: dict[str, int] = {}
    with trio.move_on_after(60) as scope:
        await cross_push(written)
    assert not scope.cancelled_caught, f"stalled with {[v >> 20 for v in written.values()]} MiB written each way"
    assert sorted(written.values()) == [CROSS_BYTES, CROSS_BYTES]
