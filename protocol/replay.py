"""Replay guard: accept each (sender, round, sequence) at most once, in bounded memory.

Per sender the guard keeps a *low-water mark* and the set of accepted ``(round,
sequence)`` pairs at or above it, compared lexicographically. Pairs below the mark are
refused as too old; when the set grows past ``window`` entries its smallest entries
are dropped and the mark moves up past them. Senders should therefore number
messages so that ``(round, sequence)`` increases over time (a per-peer counter that
survives restarts, or a fresh round after a restart); within a window of ``window``
messages, out-of-order delivery is fine.

Across restarts (PROTOCOL.md section 11, a MUST): persist :meth:`ReplayGuard.low_water_marks`
(one past each sender's newest accepted pair) and seed the next guard with them, through
the constructor or :meth:`ReplayGuard.restore`.
"""

from __future__ import annotations

import heapq
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = ["ReplayGuard", "ReplayStatistics"]

logger = logging.getLogger(__name__)

Key = tuple[int, int]


@dataclass
class _SenderWindow:
    low: Key = (0, 0)
    seen: set[Key] = field(default_factory=set)
    heap: list[Key] = field(default_factory=list)


@dataclass(frozen=True)
class ReplayStatistics:
    """Memory use of a :class:`ReplayGuard`.

    Attributes:
        senders: Senders with a full window.
        compact_senders: Senders remembered by their low-water mark only.
        remembered: Accepted pairs held in all windows.
    """

    senders: int
    compact_senders: int
    remembered: int


class ReplayGuard:
    """Sans-I/O replay filter shared by all sessions of one peer.

    Memory is bounded by ``max_senders * window`` pairs. When more than ``max_senders``
    senders are tracked, the least recently seen one is forgotten except for its
    low-water mark set past its newest message (a compact entry), so its old messages
    stay refused.
    """

    def __init__(
        self,
        window: int = 4096,
        max_senders: int = 1024,
        low_water_marks: Mapping[bytes, Key] | None = None,
    ) -> None:
        """Create a guard.

        Args:
            window: Accepted pairs remembered per sender above its low-water mark.
            max_senders: Senders with a full window; others keep only their mark.
            low_water_marks: Marks restored from :meth:`low_water_marks` (persistence).
        """
        if window < 1 or max_senders < 1:
            raise LocalProtocolError(ErrorCode.BAD_TYPE, "window and max_senders must be >= 1")
        self._window = window
        self._max_senders = max_senders
        self._senders: OrderedDict[bytes, _SenderWindow] = OrderedDict()
        self._compact: dict[bytes, Key] = dict(low_water_marks or {})

    def __contains__(self, item: tuple[bytes, int, int]) -> bool:
        """True if ``(sender, round, sequence)`` would be refused."""
        sender, rnd, seq = item
        return self._refused(sender, (rnd, seq))

    def _refused(self, sender: bytes, key: Key) -> bool:
        state = self._senders.get(sender)
        if state is None:
            low = self._compact.get(sender)
            return low is not None and key < low
        return key < state.low or key in state.seen

    def check(self, sender: bytes, round: int, sequence: int) -> None:
        """Raise if the triple would be refused; record nothing.

        Raises:
            RemoteProtocolError: REPLAY.
        """
        if self._refused(sender, (round, sequence)):
            raise RemoteProtocolError(
                ErrorCode.REPLAY,
                f"{sender.hex()[:16]} round {round} seq {sequence}: already seen or too old",
            )

    def accept(self, sender: bytes, round: int, sequence: int) -> None:
        """Record the triple, or raise if it was seen before or is below the mark.

        Raises:
            RemoteProtocolError: REPLAY.
        """
        self.check(sender, round, sequence)
        key = (round, sequence)
        state = self._senders.get(sender)
        if state is None:
            state = _SenderWindow(low=self._compact.pop(sender, (0, 0)))
            self._senders[sender] = state
            if len(self._senders) > self._max_senders:
                self._evict()
        else:
            self._senders.move_to_end(sender)
        state.seen.add(key)
        heapq.heappush(state.heap, key)
        while len(state.seen) > self._window:
            oldest = heapq.heappop(state.heap)
            state.seen.discard(oldest)
            state.low = (oldest[0], oldest[1] + 1)

    def _evict(self) -> None:
        sender, state = self._senders.popitem(last=False)
        newest = max(state.seen) if state.seen else state.low
        self._compact[sender] = (newest[0], newest[1] + 1) if state.seen else newest
        logger.debug("replay window of %s compacted to %s", sender.hex()[:16], newest)

    def statistics(self) -> ReplayStatistics:
        """How much the guard currently remembers."""
        return ReplayStatistics(
            senders=len(self._senders),
            compact_senders=len(self._compact),
            remembered=sum(len(s.seen) for s in self._senders.values()),
        )

    def restore(self, low_water_marks: Mapping[bytes, Key]) -> None:
        """Raise each sender's low-water mark to at least the given one (never lower it).

        For marks loaded after construction (e.g. from a store that a peer opens later);
        accepted pairs below a raised mark are forgotten, as they are now refused anyway.

        Raises:
            LocalProtocolError: BAD_TYPE for a mark that is not a pair of uints.
        """
        for sender, mark in low_water_marks.items():
            if (
                type(mark) is not tuple
                or len(mark) != 2
                or not all(type(v) is int and v >= 0 for v in mark)
            ):
                raise LocalProtocolError(ErrorCode.BAD_TYPE, f"bad low-water mark {mark!r}")
            state = self._senders.get(sender)
            if state is None:
                current = self._compact.get(sender)
                if current is None or mark > current:
                    self._compact[sender] = mark
            elif mark > state.low:
                state.low = mark
                state.seen = {key for key in state.seen if key >= mark}
                state.heap = sorted(state.seen)

    def low_water_marks(self) -> dict[bytes, Key]:
        """Per-sender marks for persistence: one past each sender's newest accepted pair.

        A guard restored from them refuses every pair accepted so far (and older pairs
        never seen: restoring gives up the out-of-order window, not replay safety).
        """
        marks = dict(self._compact)
        for sender, state in self._senders.items():
            newest = max(state.seen) if state.seen else state.low
            marks[sender] = (newest[0], newest[1] + 1) if state.seen else newest
        return marks
