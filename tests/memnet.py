"""An in-memory :class:`~silomesh.peer.transport.Transport` for unit tests of the round loop.

Peers of one trio loop talk through ``trio.testing`` memory streams instead of libp2p,
so deadlines, stragglers, backoff, reconnects and approval expiry can be tested exactly
and instantly under trio's ``MockClock``. Not used outside tests: production and simnet
use libp2p (:mod:`silomesh.peer.mesh`).

    net = MemoryNetwork()
    peer = Peer(config, identity=..., transport=net.open, compute=InlineCompute())
    net.cut(a, b)        # partition two peers (dials fail, streams break)
    net.dials            # [(virtual time, dialler, dialled, succeeded), ...]
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing

from silomesh.peer.faults import FaultHooks
from silomesh.peer.identity import PeerIdentity
from silomesh.peer.transport import Stream, StreamClosed, StreamHandler, TransportStatistics

log = logging.getLogger(__name__)


class MemoryStream:
    """One end of an in-memory stream pair."""

    def __init__(self, inner: trio.abc.Stream, remote: str, resumable: bool = True, streamed: bool = True) -> None:
        self._inner = inner
        self.remote = remote
        self.resumable = resumable or streamed
        self.streamed = streamed
        self.closed = False
        self.written = 0
        #: the link breaks once this many bytes were written (MemoryNetwork.break_next_stream)
        self.cut_at: int | None = None
        self.on_cut: Callable[[], None] | None = None

    async def read_some(self, max_bytes: int = 256 * 1024) -> bytes:
        if self.closed:
            raise StreamClosed(f"stream with {self.remote} closed")
        try:
            data = await self._inner.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise StreamClosed(f"stream with {self.remote} ended: {exc}") from None
        if not data:
            raise StreamClosed(f"stream with {self.remote} ended")
        return bytes(data)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        data = bytes(data)
        if self.cut_at is not None and self.written + len(data) > self.cut_at:
            data = data[: self.cut_at - self.written]  # what got through before the link broke
        try:
            await self._inner.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise StreamClosed(f"stream with {self.remote} ended: {exc}") from None
        self.written += len(data)
        if self.cut_at is not None and self.written >= self.cut_at:
            await trio.testing.wait_all_tasks_blocked()  # the other end reads what got through
            assert self.on_cut is not None
            self.on_cut()
            raise StreamClosed(f"link to {self.remote} broke after {self.written} bytes")

    async def close(self) -> None:
        self.closed = True
        with trio.CancelScope(shield=True):
            await self._inner.aclose()

    async def reset(self) -> None:
        await self.close()


@dataclass
class MemoryTransport:
    """One peer's host on a :class:`MemoryNetwork` (implements the Transport protocol)."""

    network: MemoryNetwork
    peer_id: str
    trusted: dict[str, str]
    nursery: trio.Nursery
    on_refused: Callable[[str, str], None] | None = None
    connected: set[str] = field(default_factory=set)
    handler: StreamHandler | None = None
    subscriptions: dict[str, trio.MemorySendChannel[tuple[str, bytes]]] = field(default_factory=dict)
    streams: list[MemoryStream] = field(default_factory=list)
    refused_connections: int = 0
    handler_errors: int = 0
    #: per neighbour: connections made and lost (network_status reports them like the mesh)
    connects: Counter[str] = field(default_factory=Counter)
    disconnects: Counter[str] = field(default_factory=Counter)

    @property
    def addrs(self) -> list[str]:
        return [f"/memory/{self.peer_id}"]

    async def connect(self, peer_id: str, timeout: float = 10.0) -> bool:  # noqa: ASYNC109 - Transport.connect: a bounded dial, False on timeout
        if peer_id not in self.trusted:
            raise ValueError(f"{peer_id} is not a trusted peer")
        if peer_id in self.connected:
            return True
        await trio.lowlevel.checkpoint()
        remote = self.network.reachable(self.peer_id, peer_id)
        ok = remote is not None and remote.accept(self.peer_id)
        self.network.dials.append((trio.current_time(), self.peer_id, peer_id, ok))
        if ok:
            self._up(peer_id)
        return ok

    def _up(self, peer_id: str) -> None:
        if peer_id not in self.connected:
            self.connects[peer_id] += 1
        self.connected.add(peer_id)

    def accept(self, dialler: str) -> bool:
        if dialler not in self.trusted:
            self.refused_connections += 1
            if self.on_refused is not None:
                self.on_refused(dialler, "untrusted-connection")
            return False
        self._up(dialler)
        return True

    def forget(self, peer_id: str) -> None:
        self.connected.discard(peer_id)

    async def open_stream(self, peer_id: str) -> Stream:
        await trio.lowlevel.checkpoint()
        remote = self.network.reachable(self.peer_id, peer_id)
        if peer_id not in self.connected or remote is None or self.peer_id not in remote.connected:
            raise StreamClosed(f"cannot open a stream to {peer_id}")
        if remote.handler is None:
            raise StreamClosed(f"{peer_id} serves no exchange protocol")
        ours, theirs = trio.testing.memory_stream_pair()
        mine, other = MemoryStream(ours, peer_id), MemoryStream(theirs, self.peer_id)
        trip = self.network.tripwires.pop((self.peer_id, peer_id), None)
        if trip is not None:
            after, down_for = trip
            mine.cut_at = after
            mine.on_cut = functools.partial(self.network.cut_for, self.peer_id, peer_id, down_for)
        self.streams.append(mine)
        remote.streams.append(other)
        remote.nursery.start_soon(remote.serve, other)
        return mine

    async def serve(self, stream: MemoryStream) -> None:
        assert self.handler is not None
        try:
            await self.handler(stream)
        except StreamClosed as exc:
            log.info("%s", exc)
            await stream.reset()
        except Exception:  # as the libp2p mesh: an escaping error must not kill the host
            self.handler_errors += 1
            log.exception("handler failed on a stream from %s", stream.remote)
            await stream.reset()

    def set_handler(self, handler: StreamHandler) -> None:
        self.handler = handler

    async def publish(self, topic: str, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        for peer in sorted(self.connected):
            remote = self.network.reachable(self.peer_id, peer)
            if remote is not None and topic in remote.subscriptions:
                remote.subscriptions[topic].send_nowait((self.peer_id, data))

    async def subscribe(self, topic: str) -> AsyncIterator[tuple[str, bytes]]:
        send, receive = trio.open_memory_channel[tuple[str, bytes]](1000)
        self.subscriptions[topic] = send
        async for sender, data in receive:
            if sender in self.trusted:
                yield sender, data

    def statistics(self) -> TransportStatistics:
        return TransportStatistics(self.refused_connections, 0, self.handler_errors)

    def network_status(self) -> dict[str, Any]:
        links = [{"peer_id": p, "connected": p in self.connected, "kind": "direct" if p in self.connected else None,
                  "reconnects": max(0, self.connects[p] - 1), "disconnects": self.disconnects[p]}
                 for p in self.trusted]
        return {"links": links, "relay": {"serving": False, "reservations": []},
                "reachability": {"status": "unknown", "verdicts": {}, "checked_at": None}}

    def drop_connection(self, peer_id: str) -> None:
        """The link to ``peer_id`` broke: forget it and break its open streams."""
        if peer_id in self.connected:
            self.disconnects[peer_id] += 1
        self.connected.discard(peer_id)
        for s in self.streams:
            if s.remote == peer_id and not s.closed:
                self.nursery.start_soon(s.close)


@dataclass
class MemoryNetwork:
    """Hosts of one trio loop, and the links between them."""

    hosts: dict[str, MemoryTransport] = field(default_factory=dict)
    cuts: set[frozenset[str]] = field(default_factory=set)
    #: every dial: (virtual time, dialler, dialled, succeeded)
    dials: list[tuple[float, str, str, bool]] = field(default_factory=list)
    #: (dialler, dialled) -> (bytes, seconds): break_next_stream's pending breaks
    tripwires: dict[tuple[str, str], tuple[int, float]] = field(default_factory=dict)
    #: every break: (virtual time, a, b, seconds down)
    outages: list[tuple[float, str, str, float]] = field(default_factory=list)
    _joined: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)

    async def wait_for_hosts(self, count: int) -> None:
        """Return once at least ``count`` hosts are on the network."""
        while len(self.hosts) < count:
            await self._joined.park()

    def reachable(self, a: str, b: str) -> MemoryTransport | None:
        if frozenset((a, b)) in self.cuts:
            return None
        return self.hosts.get(b)

    def cut(self, a: str, b: str) -> None:
        """Partition ``a`` from ``b``: connections drop, dials fail until :meth:`heal`."""
        self.cuts.add(frozenset((a, b)))
        for x, y in ((a, b), (b, a)):
            if x in self.hosts:
                self.hosts[x].drop_connection(y)

    def heal(self, a: str, b: str) -> None:
        self.cuts.discard(frozenset((a, b)))

    def break_next_stream(self, a: str, b: str, after: int, down_for: float) -> None:
        """The next stream ``a`` opens to ``b`` breaks after ``after`` bytes written: the link
        goes down (connections drop, dials fail) for ``down_for`` seconds, then comes back."""
        self.tripwires[(a, b)] = (after, down_for)

    def cut_for(self, a: str, b: str, down_for: float) -> None:
        self.cut(a, b)
        self.outages.append((trio.current_time(), a, b, down_for))
        host = self.hosts.get(a)
        if host is not None:
            host.nursery.start_soon(self._heal_after, a, b, down_for)

    async def _heal_after(self, a: str, b: str, down_for: float) -> None:
        await trio.sleep(down_for)
        self.heal(a, b)

    @asynccontextmanager
    async def open(
        self,
        identity: PeerIdentity,
        listen: str,
        trusted: Mapping[str, str],
        *,
        on_refused: Callable[[str, str], None] | None = None,
        relay: object = None,
        ping_interval: float = 15.0,
    ) -> AsyncIterator[MemoryTransport]:
        """A :class:`~silomesh.peer.transport.TransportFactory` (pass ``net.open`` to ``Peer``)."""
        peer_id = identity.peer_id_text
        async with trio.open_nursery() as nursery:
            host = MemoryTransport(self, peer_id, dict(trusted), nursery, on_refused)
            self.hosts[peer_id] = host
            self._joined.unpark_all()
            try:
                yield host
            finally:
                del self.hosts[peer_id]
                for other in self.hosts.values():
                    other.drop_connection(peer_id)
                nursery.cancel_scope.cancel()


class StartTogether(FaultHooks):
    """A peer's rounds wait until ``count`` hosts are on the network.

    With inline compute a peer started first would otherwise run its first round before
    its neighbours exist. No virtual time passes while it waits when the peers start
    together, so a round's deadline still counts from its start.
    """

    def __init__(self, network: MemoryNetwork, count: int) -> None:
        self.network = network
        self.count = count

    async def round_start(self, peer_id: str, round: int) -> None:
        await self.network.wait_for_hosts(self.count)
