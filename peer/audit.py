"""The peer's audit log writer: every envelope sent, received or refused, signed and chained.

:class:`AuditLog` appends entries in the format of :mod:`silomesh.audit.entries` (a hash
chain, each ``entry_hash`` signed with the peer's Ed25519 key) through the store, and
signs tree heads (RFC 6962 Merkle tree over the entry hashes) into the store's
``checkpoints``, so a truncated tail is detectable and an entry's inclusion, or two
heads' consistency, can be proved to a third party. A head is signed at each round end,
as soon as :data:`CHECKPOINT_EVERY` entries are unsigned, every
:data:`CHECKPOINT_SECONDS` while any are (:func:`serve_checkpoints`), and when the peer
stops: a clean stop leaves no entry unsigned, a crash at most the entries of the last
:data:`CHECKPOINT_SECONDS` seconds, and fewer than :data:`CHECKPOINT_EVERY` of them.
Every SQL statement lives in :class:`~silomesh.peer.store.Store`. Reading, verifying,
proving and reconciling logs is the auditor's business: :mod:`silomesh.audit` (which
needs no peer). docs/AUDIT.md specifies all of it for an independent verifier.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import nacl.signing
import trio

if TYPE_CHECKING:  # trio-typing's stubs, when installed, shadow trio's own TaskStatus
    from trio_typing import TaskStatus

from silomesh.audit.entries import (
    CHECKPOINT_EVERY,
    CHECKPOINT_SECONDS,
    DIRECTIONS,
    GENESIS,
    WRITER_STATE_KEY,
    AuditError,
    TreeHead,
    entry_hash,
)
from silomesh.peer.store import Store
from silomesh.protocol.merkle import Frontier, leaf_hash
from silomesh.protocol.peerid import peer_id_from_public_key

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_EVERY", "CHECKPOINT_SECONDS", "AuditLog", "serve_checkpoints"]


class AuditLog:
    """Appends signed, chained entries to the store's ``audit`` table and signs tree heads.

    Args:
        store: the peer's store (one owner of the connection).
        signing_key: the peer's Ed25519 key; None opens the log for reading only.
        checkpoint_every: sign a head as soon as this many entries are uncovered (>= 1).
    """

    def __init__(
        self,
        store: Store,
        signing_key: nacl.signing.SigningKey | None,
        *,
        checkpoint_every: int = CHECKPOINT_EVERY,
    ) -> None:
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        self.store = store
        self.signing_key = signing_key
        self.checkpoint_every = checkpoint_every
        self._frontier: Frontier | None = None
        self._frontier_last = GENESIS

    @property
    def peer_id(self) -> str:
        if self.signing_key is None:
            raise AuditError("this AuditLog was opened for reading only")
        return peer_id_from_public_key(bytes(self.signing_key.verify_key))

    def _record_writer(self) -> None:
        """Name the writer in the store once (checked every time: a rolled-back first append undoes it)."""
        if self.signing_key is None or self.store.get_state(WRITER_STATE_KEY) is not None:
            return
        public_key = bytes(self.signing_key.verify_key)
        self.store.set_state(
            WRITER_STATE_KEY, {"peer_id": peer_id_from_public_key(public_key), "public_key": public_key.hex()}
        )

    def append(
        self,
        direction: str,
        peer: str,
        kind: str,
        *,
        round: int = -1,
        payload_digest: str = "",
        size: int = 0,
        envelope_sig: str = "",
        reason: str = "",
        envelope_header: bytes | None = None,
    ) -> dict[str, Any]:
        """Append one entry in its own transaction (or the caller's, when one is open).

        ``envelope_header`` is the exact signed header of the envelope (kept so an auditor
        can re-verify ``envelope_sig`` by the sender's key); stored as hex. A ``sent`` or
        ``received`` entry must carry it with ``envelope_sig``; a ``refused`` one carries
        both when the refused envelope authenticated, neither otherwise (docs/AUDIT.md).
        When the entry makes :attr:`checkpoint_every` entries uncovered, a head is signed
        in the same transaction.
        """
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if self.signing_key is None:
            raise AuditError("this AuditLog was opened for reading only")
        with self.store.atomic():
            self._record_writer()
            last = self.store.last_audit_entry()
            seq, prev = (1, GENESIS) if last is None else (last[0] + 1, last[1])
            entry: dict[str, Any] = {
                "seq": seq,
                "at_ms": int(time.time() * 1000),
                "direction": direction,
                "peer": peer,
                "round": int(round),
                "kind": kind,
                "payload_digest": payload_digest,
                "size": int(size),
                "envelope_sig": envelope_sig,
                "reason": reason,
                "prev_hash": prev,
                "envelope_header": envelope_header.hex() if envelope_header else None,
            }
            entry["entry_hash"] = entry_hash(entry)
            entry["signature"] = self.signing_key.sign(bytes.fromhex(entry["entry_hash"])).signature.hex()
            self.store.insert_audit_entry(entry)
            if seq - (self.store.latest_checkpoint_size() or 0) >= self.checkpoint_every:
                self.checkpoint()
        return entry

    @property
    def uncovered(self) -> int:
        """How many entries no signed head covers yet (the tail a crash now would leave unsigned)."""
        last = self.store.last_audit_entry()
        return 0 if last is None else max(last[0] - (self.store.latest_checkpoint_size() or 0), 0)

    def entries(self) -> list[dict[str, Any]]:
        return self.store.audit_entries()

    def heads(self) -> list[TreeHead]:
        """The signed checkpoints, smallest first."""
        return [TreeHead.from_json(r) for r in self.store.checkpoints()]

    def _catch_up(self) -> Frontier:
        """The Merkle frontier over every entry, extended with entries appended since last time."""
        frontier = self._frontier
        # an entry hash that moved under the frontier means a rolled-back transaction: rebuild
        if frontier is not None and frontier.size and self.store.audit_entry_hash(frontier.size) != self._frontier_last:
            frontier = None
        if frontier is None:
            frontier, self._frontier_last = Frontier(), GENESIS
        for seq, h in self.store.audit_hashes_after(frontier.size):
            if seq != frontier.size + 1:
                raise AuditError(f"audit table has a gap before entry {seq}; run 'silomesh audit verify'")
            frontier.append(leaf_hash(bytes.fromhex(h)))
            self._frontier_last = h
        self._frontier = frontier
        return frontier

    def checkpoint(self) -> TreeHead | None:
        """Sign a tree head over every entry so far and store it; None if nothing new.

        At a round end, call it inside the round's commit transaction, so the head and the
        round land together. Cheap: the Merkle frontier is kept between calls, so a head
        costs the new entries' leaf hashes, one signature and one row.
        """
        if self.signing_key is None:
            raise AuditError("this AuditLog was opened for reading only")
        with self.store.atomic():
            frontier = self._catch_up()
            latest = self.store.latest_checkpoint_size()
            if frontier.size == 0 or (latest is not None and latest >= frontier.size):
                return None
            self._record_writer()
            unsigned = TreeHead(self.peer_id, frontier.size, frontier.root.hex(), int(time.time() * 1000))
            signature = self.signing_key.sign(unsigned.signed_bytes()).signature.hex()
            head = TreeHead(unsigned.peer_id, unsigned.size, unsigned.root_hash, unsigned.at_ms, signature)
            self.store.insert_checkpoint(
                {
                    "size": head.size,
                    "root_hash": head.root_hash,
                    "at_ms": head.at_ms,
                    "peer_id": head.peer_id,
                    "signature": head.signature,
                }
            )
        return head


async def serve_checkpoints(
    audit_log: AuditLog,
    interval: float = CHECKPOINT_SECONDS,
    *,
    task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Sign a head every ``interval`` seconds while entries are uncovered, until cancelled.

    With it, no entry stays unsigned longer than ``interval`` on a running peer, even one
    that idles after its last round while late neighbours still talk to it.
    """
    task_status.started()
    while True:
        await trio.sleep(interval)
        if audit_log.uncovered:
            head = audit_log.checkpoint()
            if head is not None:
                log.debug("signed audit head of size %d", head.size)
