"""Inbound connections: a slot for each one while it is open, and warnings that cannot flood the log.

:class:`InboundGuard` replaces py-libp2p 0.8.1's inbound connection handler, which kept a
slot per connection for the life of the host, so that ~300 refused strangers locked the
peer out (docs/NETWORK-NOTES.md); a full listener closes new sockets at once and says so.
:class:`~silomesh.peer.mesh.Mesh` installs it and counts in :class:`MeshStatistics`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import version

import multiaddr
import trio
from libp2p.abc import IMuxedConn
from libp2p.io.abc import ReadWriteCloser
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.swarm import Swarm

log = logging.getLogger(__name__)

#: the py-libp2p release whose inbound handler :class:`InboundGuard` replaces
PATCHED_LIBP2P = "0.8.1"
#: inbound connections open at once (handshaking or established); more are closed at once.
#: A federation has tens of neighbours; the rest of the room absorbs strangers' handshakes.
MAX_INBOUND = 256
#: share of :data:`MAX_INBOUND` in use from which the peer warns that it is filling up
INBOUND_WARN_FRACTION = 0.8
#: a warning that could repeat for every connection is logged at most this often (seconds)
WARN_INTERVAL = 60.0


@dataclass
class MeshStatistics:
    refused_connections: int = 0
    refused_streams: int = 0
    handler_errors: int = 0
    #: inbound connections open now (handshaking or established), and the most at once
    inbound_open: int = 0
    inbound_peak: int = 0
    #: inbound connections closed unread because :data:`MAX_INBOUND` were open
    inbound_rejected: int = 0


class Throttle:
    """Lets a repeating warning through at most once per ``interval`` (trio clock) seconds."""

    def __init__(self, interval: float = WARN_INTERVAL) -> None:
        self.interval = interval
        self._next = -math.inf
        self._held = 0

    def ready(self) -> int | None:
        """The number of occurrences held back since the last one let through, or None: hold this one."""
        now = trio.current_time()
        if now < self._next:
            self._held += 1
            return None
        self._next = now + self.interval
        held, self._held = self._held, 0
        return held


async def close_quietly(conn: ReadWriteCloser | RawConnection) -> None:
    with trio.move_on_after(5):
        try:
            await conn.close()
        except Exception:  # closing a broken socket is not an error
            log.debug("closing an inbound connection failed", exc_info=True)


class InboundGuard:
    """py-libp2p's inbound connection handler, with a slot per connection that comes back.

    Why (py-libp2p 0.8.1, ``Swarm._handle_inbound_connection``): the swarm takes a slot of
    its ``_inbound_limiter`` (``max_connections - min_connections`` of them) for each
    accepted socket and gives it back when ``_do_handle_inbound_connection`` returns; after
    a successful Noise + Yamux upgrade that one awaits ``manager.wait_finished()``, the end
    of the whole host. So every inbound connection that completed its handshake keeps its
    slot after it closes; after 300 of them (250 with libp2p's default configuration)
    every new socket is closed unread, silently, until the host restarts. A stranger the
    trust gate refuses completes its handshake first, and so does every reconnect of a
    trusted neighbour.

    The handler must live as long as its connection (``trio.serve_listeners`` closes the
    socket when the handler returns). This one runs the same upgrade
    (``Swarm.upgrade_inbound_raw_conn``: Noise, Yamux, registration, the trust gate) and then
    waits for the muxed connection's ``event_closed`` instead, so a slot is held exactly
    while a connection is open. It counts what it turns away and logs a throttled warning
    when the listener fills up. Not reproduced from libp2p's handler: its IP allow/deny
    lists (silomesh configures none; trust is by PeerID) and its metric events (none are
    configured). tests/test_mesh_strangers.py pins both the libp2p behaviour and the fix,
    so a libp2p upgrade that changes them fails there.
    """

    def __init__(self, swarm: Swarm, stats: MeshStatistics, limit: int = MAX_INBOUND) -> None:
        self.swarm = swarm
        self.stats = stats
        self.limit = limit
        self.warn_at = max(1, int(limit * INBOUND_WARN_FRACTION))
        self._changed = trio.Event()
        self._full_warning = Throttle()
        self._busy_warning = Throttle()
        self._libp2p_handler: Callable[[ReadWriteCloser, multiaddr.Multiaddr], Awaitable[None]] | None = None

    def install(self) -> None:
        """Make the swarm's listeners hand their sockets to :meth:`handle`.

        Raises:
            RuntimeError: if this py-libp2p has no inbound handler to replace (its internals
                changed: review this class against docs/NETWORK-NOTES.md).
        """
        installed = version("libp2p")
        handler = getattr(self.swarm, "_handle_inbound_connection", None)
        if not callable(handler) or not callable(getattr(self.swarm, "upgrade_inbound_raw_conn", None)):
            raise RuntimeError(
                f"py-libp2p {installed} has no Swarm._handle_inbound_connection/upgrade_inbound_raw_conn: "
                f"peer/inbound.py's InboundGuard (written for {PATCHED_LIBP2P}) must be reviewed"
            )
        if installed != PATCHED_LIBP2P:
            log.warning(
                "py-libp2p %s: the inbound connection fix was written for %s; see docs/NETWORK-NOTES.md",
                installed,
                PATCHED_LIBP2P,
            )
        self._libp2p_handler = handler
        # the listener's callback looks the method up on the swarm for every socket
        setattr(self.swarm, "_handle_inbound_connection", self.handle)  # noqa: B010 - an instance patch, on purpose

    async def wait_idle(self) -> None:
        """Return once no inbound connection is open (or handshaking)."""
        while self.stats.inbound_open > 0:
            await self._changed.wait()

    async def wait_open(self, at_least: int) -> None:
        """Return once at least ``at_least`` inbound connections are open (or handshaking)."""
        while self.stats.inbound_open < at_least:
            await self._changed.wait()

    def _count(self, change: int) -> None:
        self.stats.inbound_open += change
        self.stats.inbound_peak = max(self.stats.inbound_peak, self.stats.inbound_open)
        self._changed.set()
        self._changed = trio.Event()

    async def handle(self, read_write_closer: ReadWriteCloser, maddr: multiaddr.Multiaddr) -> None:
        """Serve one accepted socket until its connection closes; never raises."""
        stats = self.stats
        if stats.inbound_open >= self.limit:
            stats.inbound_rejected += 1
            held = self._full_warning.ready()
            if held is not None:
                log.warning(
                    "inbound connection limit reached (%d open): closed a new connection unread "
                    "(%d more since the last warning, %d in all); trusted neighbours cannot reach us "
                    "until connections close",
                    self.limit,
                    held,
                    stats.inbound_rejected,
                )
            await close_quietly(read_write_closer)
            return
        self._count(+1)
        if stats.inbound_open >= self.warn_at and self._busy_warning.ready() is not None:
            log.warning(
                "%d of %d inbound connection slots in use (%d refused connections from untrusted peers so far)",
                stats.inbound_open,
                self.limit,
                stats.refused_connections,
            )
        try:
            await self._serve(read_write_closer, maddr)
        finally:
            self._count(-1)

    async def _serve(self, read_write_closer: ReadWriteCloser, maddr: multiaddr.Multiaddr) -> None:
        if isinstance(read_write_closer, IMuxedConn) and self._libp2p_handler is not None:
            # transports that arrive multiplexed (QUIC): silomesh listens on TCP only
            await self._libp2p_handler(read_write_closer, maddr)
            return
        raw = RawConnection(read_write_closer, False)
        try:
            muxed = await self.swarm.upgrade_inbound_raw_conn(raw, maddr)
        except Exception as exc:  # noqa: BLE001 - a failed handshake is the dialler's problem
            log.debug("inbound connection on %s not upgraded: %s", maddr, exc)
            await close_quietly(raw)
            return
        closed = getattr(muxed, "event_closed", None)
        if not isinstance(closed, trio.Event):
            log.error("%s has no event_closed: this inbound slot stays taken (see InboundGuard)", type(muxed))
            closed = trio.Event()
        await closed.wait()
