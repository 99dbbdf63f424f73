"""What outlives one exchange stream: the bytes held for each neighbour, and what a broken transfer left.

* :class:`BufferBudget`: received bytes not yet processed, per neighbour and for all
  together, charged by every :class:`~silomesh.peer.exchange.Wire` after each read
  (PROTOCOL.md section 12);
* :class:`Transfers`: the partial frame or streamed envelope a broken stream left, kept
  per neighbour so that its next offer resumes where the stream stopped (sections 4.1, 4.2).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import trio

from silomesh.protocol import ErrorCode, FrameOffer, PartialFrame, PartialStream, RemoteProtocolError, StreamOffer
from silomesh.protocol.frames import stream_chunks

log = logging.getLogger(__name__)

#: a kept partial frame is dropped after this long (an envelope older than the default
#: clock skew of 15 minutes would be refused as STALE anyway)
PARTIAL_TTL = 15 * 60.0
#: partial frames kept for all neighbours together (the oldest go first)
MAX_PARTIAL_BYTES = 1 << 30

#: the per-neighbour and total buffer budgets never go below these
MIN_PEER_BUDGET = 64 << 20
MIN_TOTAL_BUDGET = 256 << 20


class BufferBudget:
    """Received bytes not yet processed, per neighbour and for all together.

    A stream charges what its session holds after every read; a neighbour that would go
    over its share (or all of them over the total) has the stream refused ``TOO_LARGE``.
    """

    def __init__(self, per_peer: int, total: int) -> None:
        self.per_peer = per_peer
        self.total = total
        self.held: Counter[str] = Counter()
        self.held_total = 0

    @classmethod
    def for_model(cls, model_bytes: int) -> BufferBudget:
        """Room for three copies of the model per neighbour and eight in all (at least 64 / 256 MiB)."""
        return cls(max(MIN_PEER_BUDGET, 3 * model_bytes), max(MIN_TOTAL_BUDGET, 8 * model_bytes))

    def charge(self, peer: str, delta: int) -> None:
        """Add ``delta`` bytes (negative: release) to ``peer``'s share.

        Raises:
            RemoteProtocolError: TOO_LARGE when a positive charge would exceed a budget;
                nothing is charged then.
        """
        if delta > 0:
            if self.held[peer] + delta > self.per_peer:
                raise RemoteProtocolError(
                    ErrorCode.TOO_LARGE,
                    f"{self.held[peer] + delta} buffered bytes from one neighbour > budget {self.per_peer}",
                )
            if self.held_total + delta > self.total:
                raise RemoteProtocolError(
                    ErrorCode.TOO_LARGE, f"{self.held_total + delta} buffered bytes in all > budget {self.total}"
                )
        self.held[peer] += delta
        self.held_total += delta
        if self.held[peer] <= 0:
            del self.held[peer]


@dataclass
class TransferStatistics:
    """What resumable frames saved, since the peer started (status and dashboard show it)."""

    #: envelopes we offered, and how many of them the receiver had partly
    offered: int = 0
    resumed_sends: int = 0
    #: bytes of our offered envelopes the receiver already held (not sent again)
    bytes_not_resent: int = 0
    #: partial frames we kept when a neighbour's stream broke, and how many were resumed
    partials_kept: int = 0
    resumed_receives: int = 0
    #: bytes of kept partial frames that a resumed transfer did not need again
    bytes_resumed: int = 0
    #: kept partial frames dropped unused (expired, replaced, or over the memory cap)
    partials_dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class Transfers:
    """Frames cut off mid-transfer, kept per neighbour (the latest one each), so that the
    neighbour's next offer of the same frame resumes where the broken stream stopped."""

    def __init__(self, ttl: float = PARTIAL_TTL, max_bytes: int = MAX_PARTIAL_BYTES) -> None:
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.stats = TransferStatistics()
        self._kept: dict[str, tuple[float, PartialFrame | PartialStream]] = {}

    @property
    def held_bytes(self) -> int:
        return sum(held_bytes(p) for _, p in self._kept.values())

    def keep(self, peer: str, partial: PartialFrame | PartialStream | None) -> None:
        """Keep what arrived of ``peer``'s offered frame or streamed envelope (replacing an
        older one of ``peer``)."""
        if partial is None or not held_bytes(partial):
            return
        if self._kept.pop(peer, None) is not None:
            self.stats.partials_dropped += 1
        self._kept[peer] = (trio.current_time(), partial)
        self.stats.partials_kept += 1
        while self.held_bytes > self.max_bytes:
            oldest = min(self._kept, key=lambda p: self._kept[p][0])
            del self._kept[oldest]
            self.stats.partials_dropped += 1
        if isinstance(partial, PartialStream):
            log.info("kept %d of %d chunks of a streamed envelope from %s, to resume", partial.opened,
                     stream_chunks(partial.payload_len), peer)
        else:
            log.info("kept %d of %d bytes of a frame from %s, to resume", len(partial.data), partial.length, peer)

    def take_stream(self, peer: str, offer: StreamOffer) -> PartialStream | None:
        """The chunks kept of the streamed envelope ``offer`` names, if any (handed over once)."""
        partial = self._take(
            peer,
            lambda p: isinstance(p, PartialStream)
            and (p.stream_header, p.payload_len) == (offer.stream_header, offer.payload_len),
        )
        assert partial is None or isinstance(partial, PartialStream)
        return partial

    def take(self, peer: str, offer: FrameOffer) -> bytes | None:
        """The bytes kept of the frame ``offer`` names, if any (they are handed over once)."""
        partial = self._take(
            peer,
            lambda p: isinstance(p, PartialFrame)
            and (p.digest, p.length) == (offer.digest, offer.length)
            and len(p.data) < offer.length,
        )
        assert partial is None or isinstance(partial, PartialFrame)
        return partial.data if partial is not None else None

    def _take(
        self, peer: str, fits: Callable[[PartialFrame | PartialStream], bool]
    ) -> PartialFrame | PartialStream | None:
        """``peer``'s kept partial if it is young enough and ``fits`` the offer; dropped otherwise."""
        entry = self._kept.pop(peer, None)
        if entry is None:
            return None
        at, partial = entry
        if trio.current_time() - at > self.ttl or not fits(partial):
            self.stats.partials_dropped += 1
            return None
        self.stats.resumed_receives += 1
        self.stats.bytes_resumed += (
            partial.ciphertext_bytes if isinstance(partial, PartialStream) else len(partial.data)
        )
        return partial


def held_bytes(partial: PartialFrame | PartialStream) -> int:
    return len(partial.plaintext) if isinstance(partial, PartialStream) else len(partial.data)
