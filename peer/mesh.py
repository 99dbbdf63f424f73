"""The libp2p :class:`~silomesh.peer.transport.Transport`: a Noise-only host that talks only to trusted peers.

The daemon never calls libp2p directly; it uses :func:`open_mesh` and the :class:`Mesh`
it yields (open a stream, set a handler, publish, subscribe). What this module enforces:

* security is Noise only (the libp2p default also offers plaintext and secio);
* stream muxing is Yamux; mDNS is off;
* a connection from a PeerID outside the trust list is closed as soon as it is
  established, and any stream it manages to open before that is reset unread;
* every stream handler is wrapped so an exception can never reach libp2p (which would
  tear down the whole host): it is logged, the stream is reset, serving goes on;
* reads are bounded (``read(n)``, see LIBP2P-NOTES.md) — :class:`FramedStream`;
* an inbound connection holds one of :data:`~silomesh.peer.inbound.MAX_INBOUND` slots only
  while it is open (:class:`~silomesh.peer.inbound.InboundGuard` replaces py-libp2p 0.8.1's
  inbound handler, which kept a slot per connection for the life of the host, so ~300 refused
  strangers locked the peer out: see docs/NETWORK-NOTES.md); a full listener closes new
  sockets at once and says so in the log.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.autonat.autonat import AutoNATService
from libp2p.io.exceptions import IOException
from libp2p.network.config import ConnectionConfig
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service

from silomesh.peer import muxer
from silomesh.peer.config import RelaySettings
from silomesh.peer.identity import PeerIdentity
from silomesh.peer.inbound import MAX_INBOUND, InboundGuard, MeshStatistics, Throttle
from silomesh.peer.relaying import RTT_INTERVAL, Links, Reachability, Relaying, check_reachability, is_circuit
from silomesh.peer.transport import Stream, StreamClosed, TransportStatistics
from silomesh.protocol import EXCHANGE_PROTOCOL_ID, RESUMABLE_EXCHANGE_PROTOCOL_ID, STREAMED_EXCHANGE_PROTOCOL_ID

log = logging.getLogger(__name__)

#: the exchange stream where a large envelope may travel streamed (PROTOCOL.md 4.2) and a
#: frame cut off by a broken link is resumed (4.1)
EXCHANGE_PROTOCOL = TProtocol(STREAMED_EXCHANGE_PROTOCOL_ID)
#: the same exchange without streamed envelopes, still served for peers that offer only it
RESUMABLE_EXCHANGE_PROTOCOL = TProtocol(RESUMABLE_EXCHANGE_PROTOCOL_ID)
#: the same exchange without resumable frames either
LEGACY_EXCHANGE_PROTOCOL = TProtocol(EXCHANGE_PROTOCOL_ID)
#: the exchange's ids, preferred first
EXCHANGE_PROTOCOLS = [EXCHANGE_PROTOCOL, RESUMABLE_EXCHANGE_PROTOCOL, LEGACY_EXCHANGE_PROTOCOL]
GOSSIP_PROTOCOLS = [TProtocol("/meshsub/1.1.0"), TProtocol("/meshsub/1.0.0")]
READ_CHUNK = 256 * 1024
StreamHandler = Callable[[Stream], Awaitable[None]]


class FramedStream:
    """A libp2p stream with bounded reads.

    ``read_some`` returns at most :data:`READ_CHUNK` bytes; the sans-I/O frame decoder
    of ``silomesh.protocol`` decides when a frame is complete and how large it may be.
    """

    def __init__(self, stream: INetStream, remote: str, protocol: TProtocol | None = None) -> None:
        self.stream = stream
        self.remote = remote
        #: negotiated /silomesh/exchange/1.1.0 or later: frames may be offered and resumed
        self.resumable = protocol in (EXCHANGE_PROTOCOL, RESUMABLE_EXCHANGE_PROTOCOL)
        #: negotiated /silomesh/exchange/1.2.0: envelopes may be streamed
        self.streamed = protocol == EXCHANGE_PROTOCOL

    async def read_some(self, max_bytes: int = READ_CHUNK) -> bytes:
        try:
            data = await self.stream.read(min(max_bytes, READ_CHUNK))
        except IOException as exc:  # EOF, reset, or any other error of a stream or its connection
            raise StreamClosed(f"stream from {self.remote} ended: {type(exc).__name__}") from None
        if not data:
            raise StreamClosed(f"stream from {self.remote} ended")
        return bytes(data)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.stream.write(bytes(data))
        except IOException as exc:  # a reset connection raises StreamError: one neighbour, not the round
            raise StreamClosed(f"stream to {self.remote} ended: {type(exc).__name__}") from None

    async def close(self) -> None:
        with trio.move_on_after(5) as scope:
            scope.shield = True
            try:
                await self.stream.close()
            except Exception:  # closing a dead stream is not an error
                log.debug("close of stream with %s failed", self.remote, exc_info=True)

    async def reset(self) -> None:
        with trio.move_on_after(5) as scope:
            scope.shield = True
            try:
                await self.stream.reset()
            except Exception:
                log.debug("reset of stream with %s failed", self.remote, exc_info=True)


class _TrustGate(INotifee):
    """Closes any connection whose authenticated PeerID is not trusted.

    A stranger gets one WARNING line per :data:`~silomesh.peer.inbound.WARN_INTERVAL` with the count of those held
    back (the others go to DEBUG), so a flood of fresh PeerIDs cannot flood the log too.
    """

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self._warning = Throttle()

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        peer = str(conn.muxed_conn.peer_id)
        if peer in self.mesh.trusted:
            self.mesh.connected.add(peer)
            self.mesh.links.connected(peer, conn)
            return
        self.mesh.stats.refused_connections += 1
        held = self._warning.ready()
        if held is None:
            log.debug("refused connection from untrusted peer %s", peer)
        else:
            log.warning(
                "refused connection from untrusted peer %s (%d more since the last such warning, %d in all)",
                peer,
                held,
                self.mesh.stats.refused_connections,
            )
        self.mesh.notify_refused(peer, "untrusted-connection")
        self.mesh.nursery.start_soon(self._close, conn)

    async def _close(self, conn: INetConn) -> None:
        with trio.move_on_after(5):
            try:
                await conn.close()
            except Exception:
                log.debug("closing refused connection failed", exc_info=True)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        peer_id = conn.muxed_conn.peer_id
        link = self.mesh.links.links.get(str(peer_id))
        self.mesh.links.disconnected(str(peer_id))
        if link is None or not link.connected:  # else another connection (DCUtR's direct one) stays
            self.mesh.connected.discard(str(peer_id))
        # The swarm notes every disconnect for the auto-connector's back-off (switched off in
        # _make_host), and only that auto-connector's run prunes the notes: without this,
        # one entry per stranger would stay for the life of the host.
        auto_connector = getattr(network, "auto_connector", None)
        if auto_connector is not None:
            auto_connector.clear_cooldown(peer_id)

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass


@dataclass
class Mesh:
    """A running host plus pubsub, restricted to ``trusted`` PeerIDs."""

    identity: PeerIdentity
    host: IHost
    pubsub: Pubsub
    trusted: dict[str, str]  # PeerID -> multiaddr (without /p2p/)
    nursery: trio.Nursery
    on_refused: Callable[[str, str], None] | None = None
    connected: set[str] = field(default_factory=set)
    stats: MeshStatistics = field(default_factory=MeshStatistics)
    inbound: InboundGuard | None = None
    links: Links = field(default=None)  # type: ignore[assignment]  # set in __post_init__
    relaying: Relaying | None = None
    _stream_warning: Throttle = field(default_factory=Throttle, repr=False)

    def __post_init__(self) -> None:
        if self.links is None:
            self.links = Links(self.host, self.trusted)

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id_text

    def network_status(self) -> dict[str, Any]:
        """Each neighbour's link (direct / relayed / upgraded, RTT, dials, reconnects), our
        relay reservations and what neighbours said about our reachability."""
        reach = self.links.reachability
        return {
            "links": self.links.snapshot(),
            "relay": {
                "serving": bool(self.relaying and self.relaying.settings.serve),
                "reservations": [vars(r).copy() for r in self.links.reservations.values()],
            },
            "reachability": {
                "status": reach.status,
                "verdicts": dict(reach.verdicts),
                "checked_at": reach.checked_at,
                "dialled_in_by": list(reach.dialled_in_by),
            },
        }

    @property
    def addrs(self) -> list[str]:
        return [str(a) for a in self.host.get_addrs()]

    def statistics(self) -> TransportStatistics:
        return TransportStatistics(
            self.stats.refused_connections, self.stats.refused_streams, self.stats.handler_errors
        )

    def forget(self, peer_id: str) -> None:
        self.connected.discard(peer_id)

    def drop_connection(self, peer_id: str) -> None:
        """Close our connection to ``peer_id`` (open but silent); the connect loop dials afresh.
        Closing it keeps dead connections from piling up against libp2p's per-peer limit."""
        self.connected.discard(peer_id)
        self.links.dropped(peer_id)
        self.nursery.start_soon(self._disconnect, peer_id)

    async def _disconnect(self, peer_id: str) -> None:
        with trio.move_on_after(5):
            try:
                await self.host.disconnect(ID.from_base58(peer_id))
            except Exception:  # already gone is fine
                log.debug("disconnect from %s failed", peer_id, exc_info=True)

    def notify_refused(self, peer: str, reason: str) -> None:
        if self.on_refused is not None:
            try:
                self.on_refused(peer, reason)
            except Exception:  # a logging hook must not break the gate
                log.exception("on_refused hook failed")

    def set_handler(self, handler: StreamHandler, protocol: TProtocol = EXCHANGE_PROTOCOL) -> None:
        """Serve ``protocol`` with ``handler``; untrusted streams never reach it.

        The exchange is served under all its ids: 1.2.0 (streamed envelopes), 1.1.0
        (resumable frames) and 1.0.0.
        """
        protocols = EXCHANGE_PROTOCOLS if protocol == EXCHANGE_PROTOCOL else [protocol]
        for served in protocols:
            self._set_handler(handler, served)

    def _set_handler(self, handler: StreamHandler, protocol: TProtocol) -> None:
        async def guarded(stream: INetStream) -> None:
            remote = str(stream.muxed_conn.peer_id)
            framed = FramedStream(stream, remote, protocol)
            if remote not in self.trusted:
                self.stats.refused_streams += 1
                held = self._stream_warning.ready()
                if held is None:
                    log.debug("reset stream from untrusted peer %s", remote)
                else:
                    log.warning(
                        "reset stream from untrusted peer %s (%d more since the last such warning)", remote, held
                    )
                self.notify_refused(remote, "untrusted-stream")
                await framed.reset()
                return
            try:
                await handler(framed)
            except StreamClosed as exc:
                log.info("%s", exc)
                await framed.reset()
            except Exception:  # an escaping error would kill the host
                self.stats.handler_errors += 1
                log.exception("handler for %s failed on a stream from %s", protocol, remote)
                await framed.reset()

        self.host.set_stream_handler(protocol, guarded)

    async def connect(self, peer_id: str, timeout: float = 10.0) -> bool:  # noqa: ASYNC109 - Transport.connect: a bounded dial, False on timeout
        """Dial a trusted peer at its configured address; False if it cannot be reached."""
        addr = self.trusted.get(peer_id)
        if addr is None:
            raise ValueError(f"{peer_id} is not a trusted peer")
        if peer_id in self.connected:
            return True
        error = "timed out"
        with trio.move_on_after(timeout):
            try:
                if is_circuit(addr):
                    if self.relaying is None:
                        raise ValueError("a relayed address needs relaying: add a [relay] table to peer.toml")
                    await self.relaying.dial(addr, peer_id)
                else:
                    # py-libp2p refuses to redial a peer for 60 s after a failed dial (its
                    # negative cache); our connect loop's backoff decides when to retry instead,
                    # so a neighbour whose link came back is redialled within seconds
                    network = self.host.get_network()
                    if isinstance(network, Swarm):
                        network.unblock_peer(ID.from_base58(peer_id))
                    # Dial the configured address only. Identify fills the peerstore with every
                    # address the neighbour listens on, 127.0.0.1 included (its 0.0.0.0 expanded),
                    # and libp2p's redial tries them all: measured in the test bed, a peer whose
                    # neighbour's link came back dialled its own loopback listener and failed the
                    # Noise handshake against itself on every retry.
                    self.host.get_peerstore().clear_addrs(ID.from_base58(peer_id))
                    await self.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(f"{addr}/p2p/{peer_id}")))
                self.connected.add(peer_id)
                self.links.dialled(peer_id, True)
                self.links.connected(peer_id)
                return True
            except Exception as exc:  # noqa: BLE001 - unreachable is a normal state
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                log.info("cannot reach %s at %s: %s", peer_id, addr, error)
        if error == "timed out":
            log.info("cannot reach %s at %s: no connection within %.0f s", peer_id, addr, timeout)
        self.links.dialled(peer_id, False, error)
        return False

    async def open_stream(self, peer_id: str, protocol: TProtocol = EXCHANGE_PROTOCOL) -> FramedStream:
        """Open a stream to a trusted peer.

        Raises:
            StreamClosed: if the stream cannot be opened or negotiated.
        """
        if peer_id not in self.trusted:
            raise ValueError(f"{peer_id} is not a trusted peer")
        offered = EXCHANGE_PROTOCOLS if protocol == EXCHANGE_PROTOCOL else [protocol]
        try:
            stream = await self.host.new_stream(ID.from_base58(peer_id), offered)
        except Exception as exc:  # noqa: BLE001 - libp2p raises many types for "could not open"
            raise StreamClosed(f"cannot open a stream to {peer_id}: {exc}") from None
        return FramedStream(stream, peer_id, stream.get_protocol())

    async def publish(self, topic: str, data: bytes) -> None:
        await self.pubsub.publish(topic, data)

    async def subscribe(self, topic: str) -> AsyncIterator[tuple[str, bytes]]:
        """Yield (sender PeerID, data) of messages on ``topic`` from trusted peers; others are ignored."""
        subscription = await self.pubsub.subscribe(topic)
        while True:
            message = await subscription.get()
            sender = str(ID(message.from_id))
            if sender == self.peer_id:
                continue
            if sender not in self.trusted:
                # GossipSub relays announces of the whole federation; a peer acts only on
                # its own neighbours' (unknown senders cannot connect to us at all).
                log.debug("ignored announce relayed from non-neighbour %s", sender)
                continue
            yield sender, bytes(message.data)


def _make_host(identity: PeerIdentity) -> IHost:
    muxer.install()  # every host, doctor's included, gets the Yamux deadlock fix
    security = {NOISE_ID: NoiseTransport(identity.key_pair, noise_privkey=new_x25519_key_pair().private_key)}
    host = new_host(
        key_pair=identity.key_pair,
        sec_opt=security,
        muxer_preference="YAMUX",
        enable_mDNS=False,
        connection_config=ConnectionConfig(min_connections=0, low_watermark=0),
    )
    # libp2p's auto-connector dials every peer in the peerstore (untrusted ones seen via
    # identify included) while the connection count is below a target of ~150. Our own
    # connect loop dials trusted neighbours only, so the auto-connector is switched off.

    async def no_auto_connect() -> None:
        return None

    host.get_network().auto_connector.maybe_connect = no_auto_connect  # type: ignore[attr-defined]
    return host


@asynccontextmanager
async def open_mesh(
    identity: PeerIdentity,
    listen: str,
    trusted: Mapping[str, str],
    *,
    on_refused: Callable[[str, str], None] | None = None,
    heartbeat_interval: int = 1,
    max_inbound: int = MAX_INBOUND,
    relay: RelaySettings | None = None,
    ping_interval: float = RTT_INTERVAL,
) -> AsyncIterator[Mesh]:
    """Start a host listening on ``listen`` that accepts only ``trusted`` peers.

    Args:
        identity: this peer's keys.
        listen: a TCP multiaddr, e.g. ``/ip4/127.0.0.1/tcp/0``.
        trusted: PeerID -> address of every neighbour this peer trusts.
        on_refused: called with (PeerID, reason) for every refused connection or message.
        heartbeat_interval: GossipSub heartbeat in seconds (libp2p's default is 120 s).
        max_inbound: inbound connections open at once (see :class:`InboundGuard`).
        relay: circuit relay and hole punching (``[relay]``; :mod:`silomesh.peer.relaying`).
        ping_interval: seconds between pings of each connected neighbour (round-trip time and
            liveness: three unanswered pings in a row close the connection, and it is redialled).
    """
    host = _make_host(identity)
    gossipsub = GossipSub(
        protocols=GOSSIP_PROTOCOLS,
        degree=4,
        degree_low=2,
        degree_high=8,
        heartbeat_initial_delay=0.2,
        heartbeat_interval=heartbeat_interval,
        spam_protection_enabled=False,
    )
    pubsub = Pubsub(host, gossipsub)
    network = host.get_network()
    if not isinstance(network, Swarm):
        raise RuntimeError(f"py-libp2p's host runs a {type(network).__name__}, not the Swarm peer/mesh.py patches")
    stats = MeshStatistics()
    inbound = InboundGuard(network, stats, max_inbound)
    inbound.install()
    async with trio.open_nursery() as nursery:
        mesh = Mesh(identity, host, pubsub, dict(trusted), nursery, on_refused, stats=stats, inbound=inbound)
        if relay is not None and relay.enabled:
            mesh.relaying = Relaying(host, relay, lambda p: p in mesh.trusted, mesh.links)
        network.register_notifee(_TrustGate(mesh))
        AutoNATService(host, serve=True)  # type: ignore[arg-type]  # answers neighbours' dial-back requests
        async with (
            host.run([multiaddr.Multiaddr(listen)]),
            background_trio_service(pubsub),
            background_trio_service(gossipsub),
            AsyncExitStack() as services,
        ):
            await pubsub.wait_until_ready()
            if mesh.relaying is not None:
                await services.enter_async_context(background_trio_service(mesh.relaying.protocol))
                await mesh.relaying.protocol.event_started.wait()
                mesh.relaying.guard_hop()
                if mesh.relaying.dcutr is not None:
                    await services.enter_async_context(background_trio_service(mesh.relaying.dcutr))
                nursery.start_soon(mesh.relaying.keep_reservations, nursery)
            nursery.start_soon(mesh.links.serve_rtt, lambda: set(mesh.connected), mesh.drop_connection, ping_interval)
            nursery.start_soon(_serve_reachability, mesh)
            try:
                yield mesh
            finally:
                # Leave topics and drop connections before the service contexts exit
                # (LIBP2P-NOTES.md: otherwise "Nursery is closed to new arrivals").
                with trio.move_on_after(5) as scope:
                    scope.shield = True
                    for topic in list(pubsub.topic_ids):
                        await pubsub.unsubscribe(topic)
                    for peer in list(host.get_connected_peers()):
                        await host.disconnect(peer)
        nursery.cancel_scope.cancel()


#: how often neighbours are asked whether they can dial us back (first after a short wait)
REACHABILITY_INTERVAL = 120.0
REACHABILITY_FIRST = 3.0


async def _serve_reachability(mesh: Mesh) -> Reachability:
    """Ask directly connected neighbours, now and then, whether they can dial us back."""
    await trio.sleep(REACHABILITY_FIRST)
    while True:
        direct = [p for p in sorted(mesh.connected) if mesh.links.kind_of(p) in ("direct", "upgraded")]
        if direct:
            await check_reachability(mesh.host, direct, mesh.links.reachability)
        await trio.sleep(REACHABILITY_INTERVAL if direct else REACHABILITY_FIRST)


__all__ = [
    "EXCHANGE_PROTOCOL",
    "LEGACY_EXCHANGE_PROTOCOL",
    "FramedStream",
    "Mesh",
    "PeerInfo",
    "StreamClosed",
    "open_mesh",
]
