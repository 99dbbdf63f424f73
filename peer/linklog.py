"""Neighbour links lost and back, and transfers resumed, written to the audit log.

The transport keeps per-neighbour link records (connected, kind, reconnects, failed dials;
``Transport.network_status``). :func:`watch_links` compares them every few seconds and
appends a ``local`` audit entry when a neighbour's connection is lost (``link-lost``) or
comes back (``link-back``), so that the signed log shows when a hospital's link dropped
and for how long, next to the exchanges it cost (docs/AUDIT.md). A transfer the drop
broke off is in the log already: a ``refused`` entry for the stream that ended mid-frame
(its reason says how many bytes were kept to resume), then the update, once, as
``received`` when the resumed transfer completes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import trio

from silomesh.audit.secagg import canonical
from silomesh.peer.audit import AuditLog
from silomesh.peer.transport import Transport

log = logging.getLogger(__name__)

LOST_KIND = "link-lost"
BACK_KIND = "link-back"
#: how often the links are compared (seconds)
WATCH_SECONDS = 2.0


@dataclass
class _Seen:
    connected: bool
    disconnects: int
    reconnects: int


@dataclass
class LinkWatch:
    """What the last look saw of each neighbour's link, and since when it is down.

    A drop and a return are told by the link's counters (``disconnects``, ``reconnects``),
    so a drop shorter than the interval between two looks is still logged; a transport that
    keeps no counters is compared by ``connected`` alone.
    """

    seen: dict[str, _Seen] = field(default_factory=dict)
    down_since: dict[str, float] = field(default_factory=dict)

    def look(self, audit_log: AuditLog, links: list[dict[str, Any]], now: float) -> int:
        """Append an entry for every neighbour whose link changed since the last look; how many."""
        written = 0
        for link in links:
            peer = str(link["peer_id"])
            now_seen = _Seen(bool(link.get("connected")), int(link.get("disconnects") or 0),
                             int(link.get("reconnects") or 0))
            before = self.seen.get(peer)
            self.seen[peer] = now_seen
            if before is None:
                continue  # the first look only learns the state
            lost = now_seen.disconnects > before.disconnects or (before.connected and not now_seen.connected)
            back = now_seen.reconnects > before.reconnects or (now_seen.connected and not before.connected)
            if lost:
                self.down_since.setdefault(peer, now)
                audit_log.append("local", peer, LOST_KIND, reason=canonical(
                    {"dial_failures": int(link.get("dial_failures") or 0),
                     "last_error": str(link.get("last_error") or "")[:200]}))
                written += 1
            if back and now_seen.connected and peer in self.down_since:
                since = self.down_since.pop(peer)
                audit_log.append("local", peer, BACK_KIND, reason=canonical(
                    {"connection": link.get("kind") or "direct",
                     "down_seconds": round(now - since, 1),
                     "reconnects": now_seen.reconnects}))
                written += 1
        return written


async def watch_links(transport: Transport, audit_log: AuditLog, interval: float = WATCH_SECONDS) -> None:
    """Log links lost and back until cancelled (a failing look is logged, never fatal)."""
    watch = LinkWatch()
    while True:
        try:
            watch.look(audit_log, transport.network_status()["links"], trio.current_time())
        except Exception:  # the audit log's own trouble is reported by its writer; keep watching
            log.exception("could not record a neighbour link change in the audit log")
        await trio.sleep(interval)
