"""Reaching neighbours without an inbound port: circuit relay v2, DCUtR, AutoNAT, link records.

This is the network part of :mod:`silomesh.peer.mesh` that is not about trust: py-libp2p
0.8.1's own pieces, wired for a federation (docs/PEER.md section 5, docs/NETWORK-NOTES.md):

* a peer with ``[relay] serve = true`` runs ``CircuitV2Protocol`` with hop enabled. Only
  trusted neighbours can use it: the trust gate closes every other connection, and the
  hop handler is wrapped so a stream from an untrusted PeerID is reset unread;
* a peer with ``[relay] via = [...]`` keeps a reservation on each of those relays (renewed
  when the connection to the relay drops), so neighbours can dial it at
  ``<relay>/p2p/<relay id>/p2p-circuit``; the relayed connection runs Noise end to end
  between the two hospitals: the relay forwards ciphertext only;
* ``DCUtRProtocol`` runs on every peer with relaying configured: it tries to turn a relayed
  connection into a direct one;
* :class:`Links` records, per neighbour, what the connection is (direct, relayed or
  upgraded), its round-trip time, and every dial and failure, for status and
  ``silomesh doctor``;
* :func:`check_reachability` asks connected neighbours to dial us back (AutoNAT v1).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import multiaddr
import trio
from libp2p.abc import IHost, INetConn, INetStream
from libp2p.host.autonat.autonat import AutoNATService
from libp2p.host.ping import ID as PING_PROTOCOL_ID
from libp2p.host.ping import perform_ping_roundtrip
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.utils.address_validation import expand_wildcard_address

from silomesh.peer.config import RelaySettings

log = logging.getLogger(__name__)

DIRECT, RELAYED, UPGRADED = "direct", "relayed", "upgraded"
#: a reservation that failed, or whose relay connection dropped, is retried after this (doubling)
RESERVE_FIRST_BACKOFF = 1.0
RESERVE_MAX_BACKOFF = 30.0
#: how often a held reservation's relay connection is checked
RESERVE_POLL = 1.0
#: a neighbour's round-trip time is measured this often while connected
RTT_INTERVAL = 15.0
PING_TIMEOUT = 10.0
#: unanswered pings in a row after which a neighbour's connection is closed and redialled.
#: Each ping may take a whole interval: a busy peer on 2 shared cores answered pings after
#: 1-3 s in the test bed, and two misses of 10 s each closed live connections mid-update.
PINGS_TO_DROP = 3


def is_circuit(address: str) -> bool:
    return address.rstrip("/").endswith("/p2p-circuit")


def connection_is_relayed(conn: INetConn) -> bool:
    """True if ``conn`` runs over a circuit relay (either side of it)."""
    try:
        if str(conn.get_connection_type().value) == RELAYED:
            return True
    except Exception:  # noqa: BLE001 - older connection objects have no type
        pass
    try:
        addrs = conn.get_transport_addresses()
    except Exception:  # noqa: BLE001
        return False
    return any("/p2p-circuit" in str(a) for a in addrs)


@dataclass
class Link:
    """What we know about the connection to one neighbour."""

    peer_id: str
    address: str
    connected: bool = False
    kind: str | None = None
    rtt_ms: float | None = None
    dials: int = 0
    dial_failures: int = 0
    failures_in_a_row: int = 0
    last_error: str | None = None
    connects: int = 0
    disconnects: int = 0
    last_connected_at: float | None = None
    last_disconnected_at: float | None = None
    ever_relayed: bool = False
    unanswered_pings: int = 0

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d.pop("ever_relayed")
        d.pop("unanswered_pings")
        d["reconnects"] = max(0, self.connects - 1)
        return d


@dataclass
class Reservation:
    relay: str
    peer_id: str
    held: bool = False
    expires_at: float | None = None
    attempts: int = 0
    last_error: str | None = None


@dataclass
class Reachability:
    """What neighbours said when asked to dial us back (AutoNAT v1)."""

    status: str = "unknown"  # public | private | unknown
    #: neighbour PeerID -> True (dialled us back) / False
    verdicts: dict[str, bool] = field(default_factory=dict)
    checked_at: float | None = None
    #: neighbours that opened a direct (not relayed) connection to us: proof that we are reachable
    dialled_in_by: list[str] = field(default_factory=list)


class Links:
    """Per-neighbour link records, kept current from the swarm's connections."""

    def __init__(self, host: IHost, trusted: dict[str, str]) -> None:
        self.host = host
        self.links = {p: Link(p, a) for p, a in trusted.items()}
        self.reservations: dict[str, Reservation] = {}
        self.reachability = Reachability()

    def kind_of(self, peer_id: str) -> str | None:
        """direct, relayed or upgraded (direct after having been relayed); None: not connected."""
        conns = self.host.get_network().get_connections(ID.from_base58(peer_id))
        live = [c for c in conns if not getattr(c, "is_closed", False)]
        if not live:
            return None
        link = self.links.get(peer_id)
        relayed = [connection_is_relayed(c) for c in live]
        if all(relayed):
            if link is not None:
                link.ever_relayed = True
            return RELAYED
        return UPGRADED if link is not None and (link.ever_relayed or any(relayed)) else DIRECT

    def dialled(self, peer_id: str, ok: bool, error: str | None = None) -> None:
        link = self.links[peer_id]
        link.dials += 1
        if ok:
            link.failures_in_a_row = 0
        else:
            link.dial_failures += 1
            link.failures_in_a_row += 1
            link.last_error = error

    def connected(self, peer_id: str, conn: INetConn | None = None) -> None:
        link = self.links.get(peer_id)
        if link is None:
            return
        if conn is not None and connection_is_relayed(conn):
            link.ever_relayed = True
        elif conn is not None and not link.ever_relayed:
            # a direct connection the neighbour opened, not one punched after a relayed one (DCUtR)
            initiator = getattr(conn.muxed_conn, "is_initiator_value", None)
            if initiator is False and peer_id not in self.reachability.dialled_in_by:
                self.reachability.dialled_in_by.append(peer_id)
        if not link.connected:
            link.connects += 1
            link.last_connected_at = time.time()
            if link.connects > 1:
                log.info("neighbour %s connected again (reconnect %d)", peer_id, link.connects - 1)
        link.connected = True
        link.failures_in_a_row = 0
        link.kind = self.kind_of(peer_id)

    def disconnected(self, peer_id: str) -> None:
        link = self.links.get(peer_id)
        if link is None:
            return
        if self.host.get_network().get_connections(ID.from_base58(peer_id)):
            link.kind = self.kind_of(peer_id)  # another connection (the upgraded one) stays
            return
        if link.connected:
            link.disconnects += 1
            link.last_disconnected_at = time.time()
        link.connected = False
        link.kind = None

    def dropped(self, peer_id: str) -> None:
        """We closed the connection to ``peer_id`` (silent): it counts as gone from now on."""
        link = self.links.get(peer_id)
        if link is not None and link.connected:
            link.connected, link.kind = False, None
            link.disconnects += 1
            link.last_disconnected_at = time.time()

    def snapshot(self) -> list[dict[str, object]]:
        for p, link in self.links.items():
            if link.connected:
                link.kind = self.kind_of(p)
        return [link.as_dict() for link in self.links.values()]

    async def measure_rtt(self, peer_id: str, timeout: float = PING_TIMEOUT) -> float | None:  # noqa: ASYNC109 - None on timeout
        """One ping round trip to ``peer_id`` in milliseconds; None if it fails."""
        with trio.move_on_after(timeout):
            stream: INetStream | None = None
            try:
                stream = await self.host.new_stream(ID.from_base58(peer_id), [PING_PROTOCOL_ID])
                start = time.perf_counter()
                await perform_ping_roundtrip(stream)
                rtt = round((time.perf_counter() - start) * 1000, 2)
                self.links[peer_id].rtt_ms = rtt
                return rtt
            except Exception as exc:  # noqa: BLE001 - an unanswered ping is a measurement
                log.info("ping to %s failed: %s: %s", peer_id, type(exc).__name__, exc)
            finally:
                if stream is not None:
                    with trio.move_on_after(2) as scope:
                        scope.shield = True
                        with contextlib.suppress(Exception):
                            await stream.close()
        return None

    async def serve_rtt(
        self, connected: Callable[[], set[str]], drop: Callable[[str], None], interval: float = RTT_INTERVAL
    ) -> None:
        """Ping every connected neighbour every ``interval`` s (its round-trip time; each
        ping may take ``interval`` s); after
        :data:`PINGS_TO_DROP` unanswered pings in a row, ``drop`` its connection: a link that
        went down without a reset looks open to TCP for many minutes, and only a closed
        connection makes the connect loop redial it."""
        while True:
            for p in sorted(connected()):
                link = self.links.get(p)
                if link is None:
                    continue
                if await self.measure_rtt(p, timeout=interval) is not None:
                    link.unanswered_pings = 0
                    continue
                link.unanswered_pings += 1
                log.info("neighbour %s did not answer a ping within %.1f s (%d in a row)", p, interval,
                         link.unanswered_pings)
                if link.unanswered_pings >= PINGS_TO_DROP:
                    log.warning("neighbour %s answered none of %d pings: closing the connection to redial it",
                                p, link.unanswered_pings)
                    link.unanswered_pings = 0
                    link.last_error = "stopped answering pings"
                    drop(p)
            await trio.sleep(interval)


class Relaying:
    """The relay pieces of one host (see the module docstring)."""

    def __init__(self, host: IHost, settings: RelaySettings, is_trusted: Callable[[str], bool], links: Links) -> None:
        self.host = host
        self.settings = settings
        self.is_trusted = is_trusted
        self.links = links
        limits = RelayLimits(
            duration=settings.max_circuit_seconds,
            data=settings.max_circuit_bytes,
            max_circuit_conns=settings.max_reservations,
            max_reservations=settings.max_reservations,
        )
        self.protocol = CircuitV2Protocol(host, limits=limits, allow_hop=settings.serve)
        roles = RelayRole.STOP
        if settings.serve:
            roles |= RelayRole.HOP
        if settings.via:
            roles |= RelayRole.CLIENT
        self.transport = CircuitV2Transport(host, self.protocol, RelayConfig(roles=roles, limits=limits))
        self.dcutr = DCUtRProtocol(host) if settings.hole_punch else None
        for addr in settings.via:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
            links.reservations[addr] = Reservation(addr, str(info.peer_id))

    def guard_hop(self) -> None:
        """Serve the hop protocol to trusted neighbours only (call after the protocol started)."""
        if not self.settings.serve:
            return
        inner = self.protocol._handle_hop_stream

        async def trusted_only(stream: INetStream) -> None:
            remote = str(stream.muxed_conn.peer_id)
            if not self.is_trusted(remote):
                log.info("relay: reset a hop stream from untrusted peer %s", remote)
                with trio.move_on_after(5):
                    with contextlib.suppress(Exception):
                        await stream.reset()
                return
            await inner(stream)

        self.host.set_stream_handler(HOP_PROTOCOL_ID, trusted_only)

    async def dial(self, address: str, peer_id: str) -> INetConn:
        """Connect to ``peer_id`` through the relay in ``address`` (``.../p2p-circuit``)."""
        relay_addr = multiaddr.Multiaddr(address.rstrip("/").removesuffix("/p2p-circuit"))
        relay_info = info_from_p2p_addr(relay_addr)
        await self.host.connect(relay_info)
        return await self.transport.dial(multiaddr.Multiaddr(f"{address.rstrip('/')}/p2p/{peer_id}"))

    async def keep_reservations(self, nursery: trio.Nursery) -> None:
        """Hold a reservation on every relay of ``[relay] via``; renew it when the relay's
        connection drops; back off while a relay cannot be reached."""
        if not self.settings.via:
            return
        async with trio.open_nursery() as inner:
            for res in self.links.reservations.values():
                inner.start_soon(self._keep_one, res, nursery)

    async def _keep_one(self, res: Reservation, nursery: trio.Nursery) -> None:
        info = info_from_p2p_addr(multiaddr.Multiaddr(res.relay))
        backoff = RESERVE_FIRST_BACKOFF
        while True:
            if res.held and self.host.get_network().get_connections(info.peer_id):
                await trio.sleep(RESERVE_POLL)
                continue
            if res.held:
                log.warning("relay %s: connection lost, reserving again", res.relay)
            res.held = False
            res.attempts += 1
            error = await self._reserve(info.peer_id, info, nursery)
            if error is None:
                res.held, res.last_error = True, None
                expiry = self.transport._reservations.get(info.peer_id)
                res.expires_at = float(expiry) if expiry else None
                log.info("relay %s: reservation held", res.relay)
                backoff = RESERVE_FIRST_BACKOFF
                continue
            res.last_error = error
            log.info("relay %s: no reservation (%s); retrying in %.0f s", res.relay, error, backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, RESERVE_MAX_BACKOFF)

    async def _reserve(self, relay_id: ID, info: object, nursery: trio.Nursery) -> str | None:
        with trio.move_on_after(15):
            try:
                await self.host.connect(info)  # type: ignore[arg-type]
                stream = await self.host.new_stream(relay_id, [HOP_PROTOCOL_ID])
                ok = await self.transport.reserve(stream, relay_id, nursery)
                return None if ok else "the relay refused the reservation"
            except Exception as exc:  # noqa: BLE001 - an unreachable relay is a normal state
                return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return "timed out"


async def check_reachability(host: IHost, neighbours: list[str], record: Reachability) -> Reachability:
    """Ask each of ``neighbours`` (connected, direct) to dial us back at our listen addresses.

    A verdict from one neighbour is enough here (AutoNAT's spec asks for more than three
    servers; a federation often has fewer neighbours): public if any dialled back, private
    if all failed. Caveat (py-libp2p 0.8.1, docs/NETWORK-NOTES.md): the neighbour's dial-back
    is ``host.connect``, which returns at once over the connection we asked on, so a "yes"
    only says that the address we listen on is the one the neighbour sees us from (no NAT in
    between), not that a firewall lets new connections in. :attr:`Reachability.dialled_in_by`
    is the stronger proof.
    """
    service = AutoNATService(host, serve=False)  # type: ignore[arg-type]
    # a wildcard listen address (0.0.0.0) would be refused by the neighbour's observed-IP
    # check: send the concrete interface addresses instead
    addrs = [a.to_bytes() for listen in host.get_addrs() for a in expand_wildcard_address(listen)]
    for peer in neighbours:
        with trio.move_on_after(20):
            try:
                status, _addr = await service.query_server(ID.from_base58(peer), addrs)
                record.verdicts[peer] = status == 0
            except Exception as exc:  # noqa: BLE001 - no verdict from this neighbour
                log.debug("AutoNAT query to %s failed: %s", peer, exc)
    if record.verdicts:
        record.status = "public" if any(record.verdicts.values()) else "private"
    record.checked_at = time.time()
    return record


__all__ = [
    "DIRECT",
    "HOP_PROTOCOL_ID",
    "RELAYED",
    "UPGRADED",
    "Link",
    "Links",
    "Reachability",
    "Relaying",
    "Reservation",
    "check_reachability",
    "connection_is_relayed",
    "is_circuit",
]
