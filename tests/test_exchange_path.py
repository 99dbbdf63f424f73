"""The exchange path under concurrency: byte counts with several neighbours, pushes that cross.

Peers run over the in-memory transport under trio's MockClock (see test_round_loop.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from memnet import MemoryNetwork, StartTogether
from peerkit import configs, identity
from test_round_loop import running

from silomesh.peer import muxer
from silomesh.peer.config import PeerConfig
from silomesh.peer.context import InlineCompute
from silomesh.peer.daemon import Peer
from silomesh.peer.exchange import Silent, Timeouts, Wire
from silomesh.peer.mesh import FramedStream, Mesh, open_mesh
from silomesh.peer.rounds import waiting_report
from silomesh.protocol import Hello, Identity, Role, Session
from silomesh.simnet.runner import describe_stuck


def full(n: int) -> list[list[int]]:
    return [[j for j in range(n) if j != i] for i in range(n)]


def make(
    tmp_path: Path, n: int, net: MemoryNetwork, *, adjust: Callable[[int, PeerConfig], PeerConfig] | None = None,
    **kwargs: object,
) -> list[Peer]:
    """``n`` peers, each the neighbour of all others; ``adjust(i, config)`` may change peer i's config."""
    ids, cfgs = configs(tmp_path, n, neighbours=full(n), **kwargs)  # type: ignore[arg-type]
    if adjust is not None:
        cfgs = [adjust(i, cfg) for i, cfg in enumerate(cfgs)]
    faults = StartTogether(net, n)
    return [
        Peer(cfg, identity=identity, serve_control_api=False, transport=net.open, compute=InlineCompute(),
             faults=faults)
        for identity, cfg in zip(ids, cfgs, strict=True)
    ]


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


class _NeverTaken:
    """A stream whose neighbour never takes what we write."""

    remote = "12D3KooWstuck"

    async def read_some(self, max_bytes: int = 1 << 16) -> bytes:
        await trio.sleep_forever()
        raise AssertionError

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        await trio.sleep_forever()

    async def close(self) -> None:
        pass

    async def reset(self) -> None:
        self.was_reset = True


async def test_a_write_the_neighbour_never_takes_ends_after_the_stall_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A push into a connection that stopped reading fails after ``stall`` seconds (it used to
    wait forever, silently), so the round goes on without that neighbour."""
    alice, bob = Identity.from_seed(b"a" * 32), Identity.from_seed(b"b" * 32)
    stream = _NeverTaken()
    session = Session(Role.DIALER, identity=alice, peer=bob.public_key, federation="f")
    wire = Wire(session, stream, lambda record: None, timeouts=Timeouts(stall=60.0))
    hello = Hello(federation="f", sender=alice.public_key, recipient=bob.public_key, round=0, sequence=1)
    start = trio.current_time()
    with pytest.raises(Silent, match="accepted no data for 60 s"):
        await wire.send(hello)
    assert trio.current_time() - start == pytest.approx(60.0)
    assert stream.was_reset


async def test_a_round_waiting_on_a_neighbour_says_which_and_why(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """While a round waits for a neighbour's update, the peer's progress names it (what the
    simnet watchdog prints for a stuck run); once the round ends nothing is waited for."""
    net = MemoryNetwork()

    class Silent1(StartTogether):
        async def before_send(self, peer_id: str, neighbour: str, kind: str, round: int) -> bool:
            return peer_id != silent  # the second peer never delivers its update

    ids, cfgs = configs(tmp_path, 2, rounds=1, deadline=30.0)
    silent = ids[1].peer_id_text
    faults = Silent1(net, 2)
    a, b = peers = [
        Peer(cfg, identity=i, serve_control_api=False, transport=net.open, compute=InlineCompute(), faults=faults)
        for i, cfg in zip(ids, cfgs, strict=True)
    ]
    async with running(peers):
        await trio.sleep(10.0)
        assert a.context.progress.phase == "exchanging"
        assert waiting_report(a.context) == {silent: "its update of round 0 has not arrived"}
        assert waiting_report(b.context) == {}  # it has a's update; its own push was dropped
        await a.done.wait()
        assert waiting_report(a.context) == {}
        rows = await a.operator.rounds()
    assert rows[0]["skipped"] == [{"peer": silent, "reason": "missed the deadline"}]


def test_a_stuck_run_is_described_peer_by_peer() -> None:
    text = describe_stuck([
        {"peer": "p03", "round": 1, "phase": "exchanging", "phase_seconds": 412.0,
         "waiting_on": {"p07": "push: sealing and sending our update", "p09": "its update of round 1 has not arrived"}},
        {"peer": "p04", "round": 1, "phase": "training", "phase_seconds": 3.0, "waiting_on": {}},
    ])
    assert text.splitlines() == [
        "  p03: round 1, exchanging for 412 s, waiting on p07: push: sealing and sending our update; "
        "p09: its update of round 1 has not arrived",
        "  p04: round 1, training for 3 s",
    ]


async def test_a_push_that_fails_while_the_link_comes_back_is_sent_again_within_the_round(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The link between two peers is down for 0.5 s just as round 0's pushes start: each push
    fails, the link is back by the retry 1 s later, and both rounds use the other's update
    instead of skipping it (a connection broken mid-push used to cost the neighbour's round)."""
    net = MemoryNetwork()

    class Blip(StartTogether):
        done = False

        async def round_start(self, peer_id: str, round: int) -> None:
            await super().round_start(peer_id, round)
            if round == 0 and not self.done:
                self.done = True
                net.cut(*net.hosts)
                net.hosts[peer_id].nursery.start_soon(self.heal)

        async def heal(self) -> None:
            await trio.sleep(0.5)
            net.heal(*net.hosts)

    ids, cfgs = configs(tmp_path, 2, rounds=1, deadline=30.0)
    faults = Blip(net, 2)
    a, b = peers = [
        Peer(cfg, identity=i, serve_control_api=False, transport=net.open, compute=InlineCompute(), faults=faults)
        for i, cfg in zip(ids, cfgs, strict=True)
    ]
    async with running(peers):
        await a.done.wait()
        await b.done.wait()
        seen = {p.peer_id: await p.operator.rounds() for p in peers}
    failed_dials = [d for d in net.dials if not d[3]]
    assert failed_dials, "the link was never down when a push dialled: the test tests nothing"
    for p, other in ((a, b), (b, a)):
        (row,) = seen[p.peer_id]
        assert row["contributors"] == [other.peer_id], row
        assert row["skipped"] == []


def test_yamux_window_updates_are_batched_once_the_muxer_fix_is_installed() -> None:
    """silomesh.peer.muxer turns off py-libp2p's window update on every read (the relay-only
    failure: docs/NETWORK-NOTES.md, "Relay-only: the cause, and the fix"). The switch is an
    environment variable py-libp2p reads at every read; if an upgrade renames or drops it,
    this fails instead of the relay silently slowing down again."""
    import os

    from libp2p.stream_muxer.yamux import yamux

    muxer.install()
    assert os.environ[muxer.RELEASE_ON_READ] == "0"
    assert yamux._yamux_release_on_read() is False
