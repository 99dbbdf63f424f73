"""The transport seam: what the peer needs of the network, and nothing more.

The daemon, its stream handlers and its round loop talk to neighbours only through a
:class:`Transport`: dial a trusted neighbour, open a stream to it, serve streams it
opens, publish and receive small announces. Two implementations exist:

* :class:`silomesh.peer.mesh.Mesh` over py-libp2p (Noise, Yamux, GossipSub, the trust
  gate): production and simnet;
* ``tests/memnet.py``: in-memory streams between peers of one trio loop, used only by
  unit tests of the round loop (deadlines, stragglers, backoff and approval expiry
  under trio's ``MockClock``).

A transport is opened by a :data:`TransportFactory` (``open_mesh`` for libp2p) as an
async context manager, and closed when the peer stops.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from silomesh.peer.config import RelaySettings
    from silomesh.peer.identity import PeerIdentity


@dataclass(frozen=True)
class TransportStatistics:
    """What the transport refused or contained, since it was opened."""

    refused_connections: int = 0
    refused_streams: int = 0
    handler_errors: int = 0


class StreamClosed(Exception):
    """The remote end closed or reset the stream before a whole frame arrived."""


class Stream(Protocol):
    """One bidirectional byte stream with a trusted, authenticated neighbour."""

    @property
    def remote(self) -> str:
        """The neighbour's PeerID."""

    @property
    def resumable(self) -> bool:
        """The stream speaks ``/silomesh/exchange/1.1.0`` or later: a frame may be offered and resumed."""

    @property
    def streamed(self) -> bool:
        """The stream speaks ``/silomesh/exchange/1.2.0``: an envelope may be streamed."""

    async def read_some(self, max_bytes: int = ...) -> bytes:
        """At most ``max_bytes`` bytes (never empty).

        Raises:
            StreamClosed: if the stream ended.
        """

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data``.

        Raises:
            StreamClosed: if the stream ended.
        """

    async def close(self) -> None:
        """Close cleanly (bounded in time, never raises)."""

    async def reset(self) -> None:
        """Abort the stream (bounded in time, never raises)."""


#: serves one stream a neighbour opened; exceptions are the transport's to contain
StreamHandler = Callable[[Stream], Awaitable[None]]


class Transport(Protocol):
    """A host that talks only to trusted neighbours (see module docstring)."""

    @property
    def peer_id(self) -> str:
        """Our own PeerID."""

    @property
    def addrs(self) -> list[str]:
        """The addresses we listen on."""

    @property
    def connected(self) -> set[str]:
        """PeerIDs of trusted neighbours with a live connection."""

    async def connect(self, peer_id: str, timeout: float = 10.0) -> bool:  # noqa: ASYNC109 - answers False, not Cancelled
        """Dial a trusted neighbour (no-op if connected); False if it cannot be reached.

        ``timeout`` bounds the one dial, which py-libp2p may leave hanging on a dead address;
        running out is one way of "cannot be reached", so the answer is False, not an exception
        from a caller's cancel scope.
        """

    def forget(self, peer_id: str) -> None:
        """Treat the connection to ``peer_id`` as gone (it broke, or the neighbour left)."""

    def drop_connection(self, peer_id: str) -> None:
        """Close the connection to ``peer_id``: it stays open but the neighbour never answers
        on it. The next dial starts afresh."""

    async def open_stream(self, peer_id: str) -> Stream:
        """A new exchange stream to a trusted neighbour.

        Raises:
            StreamClosed: if the stream cannot be opened.
        """

    def set_handler(self, handler: StreamHandler) -> None:
        """Serve exchange streams that trusted neighbours open with ``handler``."""

    async def publish(self, topic: str, data: bytes) -> None:
        """Publish a small announce on ``topic`` (best effort)."""

    def subscribe(self, topic: str) -> AsyncIterator[tuple[str, bytes]]:
        """(sender PeerID, data) of announces on ``topic`` from trusted neighbours."""

    def statistics(self) -> TransportStatistics:
        """Counts of refused connections and streams, and of contained handler errors."""

    def network_status(self) -> dict[str, Any]:
        """How each neighbour is reached (``links``: PeerID, connected, kind direct / relayed /
        upgraded, rtt_ms, dials, failures, reconnects, last_error), our relay reservations
        (``relay``) and what neighbours said about our reachability (``reachability``)."""


class TransportFactory(Protocol):
    """Opens a transport (``open_mesh`` for libp2p) for the lifetime of a peer."""

    def __call__(
        self,
        identity: PeerIdentity,
        listen: str,
        trusted: Mapping[str, str],
        *,
        on_refused: Callable[[str, str], None] | None = None,
        relay: RelaySettings | None = None,
        ping_interval: float = 15.0,
    ) -> AbstractAsyncContextManager[Transport]:
        """Listen on ``listen``; talk only to ``trusted`` (PeerID -> address, which may be a
        relayed ``.../p2p-circuit`` one); call ``on_refused(peer, reason)`` for every refused
        connection or stream; relay and hole-punch as ``relay`` says (``[relay]``); ping every
        connected neighbour every ``ping_interval`` seconds and close a connection that leaves
        two pings in a row unanswered."""
