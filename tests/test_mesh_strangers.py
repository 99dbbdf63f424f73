"""A peer exposed to the network is not locked out by strangers, nor by a neighbour's reconnects.

py-libp2p 0.8.1 kept one inbound slot for every connection that completed its handshake, for
the life of the host: after 300 of them (250 with libp2p's defaults) the listener closed
every new socket unread. ``peer/inbound.py``'s :class:`InboundGuard` holds a slot only while a
connection is open. docs/NETWORK-NOTES.md has the measurements.

The dialler here is the cheapest client that reaches the bug: a TCP connection, the Noise
handshake with a fresh key, the Yamux negotiation, nothing else (a full libp2p host per
dial costs ~0.5 s). A bare TCP connect that closes before the handshake does not reach it:
a failed upgrade always gave its slot back.
"""

from __future__ import annotations

import hashlib
import logging
import random
from importlib.metadata import version
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.io.trio import TrioTCPStream
from libp2p.network.config import ConnectionConfig
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.upgrader import TransportUpgrader
from trio.testing import MockClock

from silomesh.audit.verify import verify_chain
from silomesh.peer.audit import AuditLog
from silomesh.peer.identity import PeerIdentity
from silomesh.peer.inbound import PATCHED_LIBP2P
from silomesh.peer.mesh import FramedStream, Mesh, open_mesh
from silomesh.peer.store import Store
from silomesh.peer.strangers import Strangers, serve_strangers

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
#: the measured lock-out point of an unpatched silomesh peer (docs/NETWORK-NOTES.md)
LOCKOUT_AT = 300


def _identity(name: str) -> PeerIdentity:
    return PeerIdentity.from_seed(hashlib.sha256(name.encode()).digest())


A, B = _identity("a"), _identity("b")


def _stranger_keys(n: int, seed: int = 0) -> list[KeyPair]:
    """``n`` fresh, distinct Ed25519 identities (deterministic: seeded)."""
    return [PeerIdentity.from_seed(hashlib.sha256(f"stranger-{seed}-{i}".encode()).digest()).key_pair for i in range(n)]


def _port(mesh: Mesh) -> int:
    return int(multiaddr.Multiaddr(mesh.addrs[0]).value_for_protocol("tcp"))


def _addr(mesh: Mesh) -> str:
    return mesh.addrs[0].split("/p2p/")[0]


async def _handshake(port: int, listener: ID, key_pair: KeyPair, *, wait_for_close: bool) -> None:
    """Dial 127.0.0.1:``port`` as ``key_pair``'s PeerID: Noise, Yamux, then hang up.

    With ``wait_for_close`` the dialler waits for the listener to close the connection (what
    the trust gate does to a stranger); without it, it closes first (a neighbour leaving).
    """
    noise = NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
    upgrader = TransportUpgrader({TProtocol(NOISE_ID): noise}, {TProtocol(YAMUX_ID): Yamux})
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        secured = await upgrader.upgrade_security(RawConnection(TrioTCPStream(sock), True), True, listener)
        await upgrader.upgrade_connection(secured, listener)
        while wait_for_close and await sock.receive_some(65536):
            pass  # whatever the listener sends before it hangs up (identify, gossip) is not read
    finally:
        await sock.aclose()


class _Count(INotifee):
    """Counts connections a host registered and dropped; wakes a waiter at a target."""

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.changed = trio.Event()

    async def wait_closed(self, n: int) -> None:
        while self.closed < n:
            await self.changed.wait()

    def _bump(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self.opened += 1
        self._bump()

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self.closed += 1
        self._bump()

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass


def test_the_inbound_fix_was_written_for_the_installed_libp2p() -> None:
    # Upgrading libp2p? Re-measure (docs/NETWORK-NOTES.md), re-read Swarm._handle_inbound_connection
    # against InboundGuard, then move PATCHED_LIBP2P. The pin in pyproject.toml says the same.
    assert version("libp2p") == PATCHED_LIBP2P


async def test_unpatched_libp2p_keeps_an_inbound_slot_for_every_closed_connection() -> None:
    # The bug itself, pinned: when a libp2p release gives slots back, this fails, and
    # InboundGuard can go.
    n = 12
    host = new_host(
        key_pair=A.key_pair,
        sec_opt={NOISE_ID: NoiseTransport(A.key_pair, noise_privkey=new_x25519_key_pair().private_key)},
        muxer_preference="YAMUX",
        enable_mDNS=False,
        connection_config=ConnectionConfig(min_connections=0, low_watermark=0),
    )
    swarm = host.get_network()
    assert isinstance(swarm, Swarm)
    count = _Count()
    swarm.register_notifee(count)
    with trio.fail_after(30):
        async with host.run([multiaddr.Multiaddr(LOOPBACK)]):
            port = int(host.get_addrs()[0].value_for_protocol("tcp"))
            for key_pair in _stranger_keys(n):
                await _handshake(port, host.get_id(), key_pair, wait_for_close=False)
            await count.wait_closed(n)
            assert count.opened == n
            await trio.sleep(0.5)  # ample time to give slots back, were they given back
            assert swarm.get_connections() == []
            assert swarm._inbound_limiter.borrowed_tokens == n
            assert swarm._inbound_limiter.total_tokens == 300 - 0  # max_connections - min_connections


async def test_inbound_slots_come_back_when_strangers_are_refused_and_neighbours_leave() -> None:
    refused: list[str] = []
    with trio.fail_after(60):
        async with open_mesh(
            B, LOOPBACK, {A.peer_id_text: "/ip4/127.0.0.1/tcp/1"}, on_refused=lambda p, r: refused.append(p)
        ) as b:
            assert b.inbound is not None
            keys = _stranger_keys(20)
            for key_pair in keys:
                await _handshake(_port(b), B.peer_id, key_pair, wait_for_close=True)
            for _ in range(20):  # a trusted neighbour connecting and leaving
                await _handshake(_port(b), B.peer_id, A.key_pair, wait_for_close=False)
            await b.inbound.wait_idle()
            swarm = b.host.get_network()
            assert isinstance(swarm, Swarm)
            assert b.stats.inbound_open == 0
            assert b.stats.inbound_peak >= 1
            assert b.stats.inbound_rejected == 0
            assert swarm._inbound_limiter.borrowed_tokens == 0  # libp2p's own handler no longer runs
            assert b.stats.refused_connections == 20
            assert sorted(refused) == sorted(str(ID.from_pubkey(k.public_key)) for k in keys)


async def test_a_full_listener_closes_new_sockets_counts_them_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="silomesh.peer.inbound")
    with trio.fail_after(30):
        async with open_mesh(B, LOOPBACK, {A.peer_id_text: "/ip4/127.0.0.1/tcp/1"}, max_inbound=2) as b:
            assert b.inbound is not None
            # two sockets that never start a handshake hold both slots (until the 10 s upgrade timeout)
            held = [await trio.open_tcp_stream("127.0.0.1", _port(b)) for _ in range(2)]
            await b.inbound.wait_open(2)
            turned_away = await trio.open_tcp_stream("127.0.0.1", _port(b))
            assert await turned_away.receive_some(1) == b""  # closed unread
            await turned_away.aclose()
            assert b.stats.inbound_rejected == 1
            messages = [r.getMessage() for r in caplog.records]
            assert any("inbound connection limit reached (2 open)" in m for m in messages)
            assert any("of 2 inbound connection slots in use" in m for m in messages)
            for sock in held:
                await sock.aclose()
            await b.inbound.wait_idle()
            # room again: a neighbour gets in
            async with open_mesh(A, LOOPBACK, {B.peer_id_text: _addr(b)}) as a:
                assert await a.connect(B.peer_id_text)


async def _echo_upper(stream: FramedStream) -> None:
    data = await stream.read_some(5)
    await stream.write(data.upper())
    await stream.close()


@pytest.mark.slow
async def test_thousands_of_strangers_and_reconnects_leave_room_for_a_trusted_neighbour(tmp_path: Path) -> None:
    strangers, reconnects = 8 * LOCKOUT_AT, 2 * LOCKOUT_AT
    refused: set[str] = set()
    store = Store(tmp_path / "peer.sqlite")
    counted = Strangers(store, AuditLog(store, B.signing_key))  # as the daemon counts them

    def on_refused(peer: str, reason: str) -> None:
        refused.add(peer)
        counted.refused(peer, reason)

    with trio.fail_after(240):
        async with open_mesh(B, LOOPBACK, {A.peer_id_text: "/ip4/127.0.0.1/tcp/1"}, on_refused=on_refused) as b:
            assert b.inbound is not None
            b.set_handler(_echo_upper)
            for key_pair in _stranger_keys(strangers, seed=1):
                with trio.fail_after(10):
                    await _handshake(_port(b), B.peer_id, key_pair, wait_for_close=True)
            for _ in range(reconnects):
                with trio.fail_after(10):
                    await _handshake(_port(b), B.peer_id, A.key_pair, wait_for_close=False)
            await b.inbound.wait_idle()
            assert len(refused) == strangers
            assert b.stats.refused_connections == strangers
            assert b.stats.inbound_rejected == 0
            assert b.stats.inbound_open == 0
            async with open_mesh(A, LOOPBACK, {B.peer_id_text: _addr(b)}) as a:
                assert await a.connect(B.peer_id_text)
                stream = await a.open_stream(B.peer_id_text)
                await stream.write(b"hello")
                assert await stream.read_some(5) == b"HELLO"
            swarm = b.host.get_network()
            assert isinstance(swarm, Swarm)
            assert swarm._inbound_limiter.borrowed_tokens == 0
    counted.summarize()  # what the daemon's serve_strangers does when the peer stops
    assert store.stranger_totals().refused == strangers
    assert store.db.table("strangers").count == 256
    assert store.neighbours() == []
    assert len(store.audit_entries()) == 32 + 1
    store.close()


# --- what the store and the audit log keep of strangers -----------------------------------


def _stranger_id(i: int) -> str:
    return str(ID.from_pubkey(_stranger_keys(1, seed=i)[0].public_key))


async def test_thousands_of_refused_strangers_leave_a_bounded_store_and_audit_log(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    store = Store(tmp_path / "peer.sqlite")
    audit_log = AuditLog(store, B.signing_key)
    strangers = Strangers(store, audit_log, keep=50, clock=lambda: 1_700_000_000 + trio.current_time())
    rng = random.Random(16)
    persistent = _stranger_id(-1)  # one stranger that keeps coming back
    fresh = [f"12D3KooWfresh{i:06d}" for i in range(5000)]  # as many PeerIDs as refusals: a key per dial
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_strangers, strangers)  # every 10 s to the store, a summary every 600 s
        for i, peer in enumerate(fresh):
            strangers.refused(peer, "untrusted-connection")
            if i % 10 == 0:
                strangers.refused(persistent, "untrusted-stream")
            await trio.sleep(rng.uniform(0.0, 0.72))  # about 30 simulated minutes in all
        elapsed = trio.current_time()
        nursery.cancel_scope.cancel()  # the peer stops: what is left is written and summed up
    assert 1500 < elapsed < 2100
    totals = store.stranger_totals()
    assert totals.refused == 5000 + 500
    assert totals.peers == 5001
    assert totals.since == 1_700_000_000 and totals.last_at is not None
    assert store.db.table("strangers").count == 50
    assert store.neighbours() == []  # strangers get no neighbour row
    rows = {r["peer_id"]: r for r in store.strangers(limit=100)}
    assert persistent in rows and rows[persistent]["refused"] == 500
    assert rows[persistent]["last_reason"] == "untrusted-stream"
    assert fresh[-1] in rows and fresh[0] not in rows
    entries = audit_log.entries()
    named = [e for e in entries if e["kind"] == "connection"]
    summaries = [e for e in entries if e["kind"] == "strangers"]
    windows = int(elapsed // 600) + 1  # ten-minute audit windows, the last one cut by the stop
    assert len(named) + len(summaries) == len(entries) <= windows * (32 + 1)
    assert len(named) >= 32 * (windows - 1) and len(summaries) >= windows - 1
    assert all(e["direction"] == "refused" and e["peer"] != "" for e in named)
    assert all(e["direction"] == "refused" and e["peer"] == "" for e in summaries)
    # every refusal is in the log: one by one, or in its window's "refused K more connections"
    assert len(named) + sum(int(e["reason"].split()[1]) for e in summaries) == 5500
    assert verify_chain(entries, bytes(B.signing_key.verify_key)) == []
    store.close()


def test_strangers_between_writes_are_held_in_bounded_memory(tmp_path: Path) -> None:
    store = Store(tmp_path / "peer.sqlite")
    strangers = Strangers(store, AuditLog(store, B.signing_key), keep=8, clock=lambda: 1_700_000_000.0)
    for i in range(1000):
        strangers.refused(f"12D3KooWflood{i:04d}", "untrusted-connection")
    assert len(strangers._pending) == 8
    assert strangers.pending == 1000
    strangers.flush()
    assert strangers.pending == 0
    totals = store.stranger_totals()
    assert (totals.refused, totals.peers) == (1000, 1000)
    assert store.db.table("strangers").count == 8
    assert len(store.audit_entries()) == 32  # named one by one; the summary waits for the window's end
    strangers.summarize()
    entries = store.audit_entries()
    assert [e["peer"] for e in entries[:32]] == [f"12D3KooWflood{i:04d}" for i in range(32)]
    assert entries[32]["reason"] == (
        "refused 968 more connections from untrusted peers since 2023-11-14T22:13:20Z than the 32 audited "
        "one by one (1000 PeerIDs new to this peer; latest 12D3KooWflood0999)"
    )
    assert len(entries) == 33
    store.close()
