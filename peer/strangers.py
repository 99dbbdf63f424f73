"""What a peer keeps of strangers: PeerIDs outside its trust list whose connections it refused.

The transport refuses them (``mesh.py``'s trust gate, before any silomesh message); this
module only counts, so that a flood of fresh PeerIDs grows neither the store nor the audit
log without bound, and costs no disk write per connection:

* :meth:`Strangers.refused` (the transport's ``on_refused`` hook) counts in memory, in at
  most ``keep`` entries;
* every :data:`FLUSH_SECONDS` the counts go to the store in one transaction
  (:meth:`~silomesh.peer.store.Store.record_strangers`): one row for each of the ``keep``
  most recently seen strangers, and totals over all of them (``silomesh peer status``);
* the audit log names the first :data:`AUDITED_PER_WINDOW` refusals of every
  :data:`SUMMARY_SECONDS` window one by one (``refused``, kind ``connection``, the
  stranger's PeerID: a curious or misconfigured peer stays traceable), and sums up the rest
  of the window in one signed entry (kind ``strangers``: "refused K more connections from
  untrusted peers ..."), written when the window ends or the peer stops. A flood adds at
  most ``AUDITED_PER_WINDOW + 1`` entries per window, however many PeerIDs it uses.

Trusted neighbours never come through here: their refusals are counted per neighbour
(``context.Journal``).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:  # trio-typing's stubs, when installed, shadow trio's own TaskStatus
    from trio_typing import TaskStatus

from silomesh.peer.audit import AuditLog
from silomesh.peer.store import Store, StrangerRecord

log = logging.getLogger(__name__)

__all__ = ["AUDITED_PER_WINDOW", "FLUSH_SECONDS", "KEEP", "SUMMARY_SECONDS", "Strangers", "serve_strangers"]

#: strangers remembered by name (in memory between writes, and as rows in the store)
KEEP = 256
#: how often counted refusals are written to the store (seconds)
FLUSH_SECONDS = 10.0
#: the audit window (seconds): refusals beyond the named ones are summed up once per window
SUMMARY_SECONDS = 600.0
#: refusals per window audited one by one, naming the stranger
AUDITED_PER_WINDOW = 32
#: the audit entry's ``kind`` for a summary of refused strangers (its ``peer`` is empty)
SUMMARY_KIND = "strangers"


@dataclass
class _Seen:
    first_seen: float
    last_seen: float
    refused: int
    last_reason: str


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Strangers:
    """Counts refused connections from untrusted PeerIDs; writes them in bounded form.

    Args:
        store: the peer's store (its owner's thread: call everything on the trio loop).
        audit_log: where the named and the summary entries go.
        keep: strangers remembered by name; beyond it the least recently seen are only counted.
        audited_per_window: refusals per audit window audited one by one.
        clock: Unix time, for the recorded times.
    """

    def __init__(
        self,
        store: Store,
        audit_log: AuditLog,
        *,
        keep: int = KEEP,
        audited_per_window: int = AUDITED_PER_WINDOW,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.store = store
        self.audit_log = audit_log
        self.keep = keep
        self.audited_per_window = audited_per_window
        self.clock = clock
        self._pending: OrderedDict[str, _Seen] = OrderedDict()
        self._unnamed_refused = 0  # pending refusals whose stranger fell out of _pending
        self._unnamed_peers = 0
        # the audit window: refusals audited one by one, the rest, new PeerIDs written
        self._window_since: float | None = None
        self._window_audited = 0
        self._window_rest = 0
        self._window_peers = 0
        self._window_last = ""

    def refused(self, peer: str, reason: str) -> None:
        """Count one refused connection (or stream) of ``peer``: in memory, plus one audit
        entry while the window's :attr:`audited_per_window` last."""
        now = self.clock()
        seen = self._pending.get(peer)
        if seen is None:
            self._pending[peer] = _Seen(now, now, 1, reason)
            if len(self._pending) > self.keep:
                _, dropped = self._pending.popitem(last=False)
                self._unnamed_refused += dropped.refused
                self._unnamed_peers += 1
        else:
            seen.last_seen, seen.refused, seen.last_reason = now, seen.refused + 1, reason
            self._pending.move_to_end(peer)
        if self._window_since is None:
            self._window_since = now
        self._window_last = peer
        if self._window_audited < self.audited_per_window:
            self._window_audited += 1
            self.audit_log.append("refused", peer, "connection", reason=reason)
        else:
            self._window_rest += 1

    @property
    def pending(self) -> int:
        """Refusals counted and not yet written to the store."""
        return sum(s.refused for s in self._pending.values()) + self._unnamed_refused

    def flush(self) -> None:
        """Write the counted refusals to the store (one transaction); nothing if none."""
        refused = self.pending
        if not refused:
            return
        records = [
            StrangerRecord(peer, s.first_seen, s.last_seen, s.refused, s.last_reason)
            for peer, s in self._pending.items()
        ]
        new = self.store.record_strangers(
            records, keep=self.keep, unnamed_refused=self._unnamed_refused, unnamed_peers=self._unnamed_peers
        )
        self._window_peers += new + self._unnamed_peers
        self._pending.clear()
        self._unnamed_refused = self._unnamed_peers = 0

    def summarize(self) -> None:
        """Flush, close the audit window, and sum up in one entry the refusals it did not name (if any)."""
        self.flush()
        if self._window_rest:
            since = self._window_since if self._window_since is not None else self.clock()
            reason = (
                f"refused {self._window_rest} more connections from untrusted peers since {_iso(since)} "
                f"than the {self._window_audited} audited one by one "
                f"({self._window_peers} PeerIDs new to this peer; latest {self._window_last})"
            )
            self.audit_log.append("refused", "", SUMMARY_KIND, reason=reason)
            log.warning("%s", reason)
        self._window_since, self._window_audited, self._window_rest, self._window_peers = None, 0, 0, 0


async def serve_strangers(
    strangers: Strangers,
    *,
    flush_seconds: float = FLUSH_SECONDS,
    summary_seconds: float = SUMMARY_SECONDS,
    task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Write counted refusals every ``flush_seconds`` and a summary every ``summary_seconds``,
    until cancelled; then write what is left and its summary."""
    task_status.started()
    next_summary = trio.current_time() + summary_seconds
    try:
        while True:
            await trio.sleep(flush_seconds)
            due = trio.current_time() >= next_summary
            _write(strangers.summarize if due else strangers.flush)
            if due:
                next_summary = trio.current_time() + summary_seconds
    finally:  # synchronous: cancellation cannot cut it short
        _write(strangers.summarize)


def _write(step: Callable[[], None]) -> None:
    try:
        step()
    except Exception:  # the peer goes on serving its neighbours; the counts wait for the next write
        log.exception("could not write refusals of strangers")
