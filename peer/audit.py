"""The peer's append-only audit log: every envelope sent, received or refused.

Each entry records who, when, which round and kind, the payload digest and size and the
sender's envelope signature — never weights or patient data. Entries form a hash chain:
``entry_hash = BLAKE2b-256(DOMAIN || msgpack([seq, at_ms, direction, peer, round, kind,
payload_digest, size, envelope_sig, reason, prev_hash]))`` with ``prev_hash`` of the first
entry 32 zero bytes (hex), and each ``entry_hash`` is signed with the peer's Ed25519 key.
Changing, deleting, inserting or reordering any entry breaks the chain or a signature.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import nacl.exceptions
import nacl.signing

from silomesh.peer.store import Store

DOMAIN = b"silomesh/audit/v1\x00"
GENESIS = "00" * 32
DIRECTIONS = ("sent", "received", "refused")
FIELDS = (
    "seq",
    "at_ms",
    "direction",
    "peer",
    "round",
    "kind",
    "payload_digest",
    "size",
    "envelope_sig",
    "reason",
    "prev_hash",
)


def entry_hash(entry: Mapping[str, Any]) -> str:
    """Hex BLAKE2b-256 of an entry's canonical encoding (the fields in :data:`FIELDS` order)."""
    values = [entry[f] if entry[f] is not None else "" for f in FIELDS]
    packed = msgpack.packb(values, use_bin_type=True)
    return hashlib.blake2b(DOMAIN + packed, digest_size=32).hexdigest()


class AuditLog:
    """Appends signed, chained entries to the store's ``audit`` table."""

    def __init__(self, store: Store, signing_key: nacl.signing.SigningKey) -> None:
        self.store = store
        self.signing_key = signing_key

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
    ) -> dict[str, Any]:
        """Append one entry in its own transaction (or the caller's, when one is open)."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        db = self.store.db
        with self.store.atomic():
            last = db.execute("SELECT seq, entry_hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
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
            }
            entry["entry_hash"] = entry_hash(entry)
            entry["signature"] = self.signing_key.sign(bytes.fromhex(entry["entry_hash"])).signature.hex()
            db.table("audit").insert(entry)
        return entry

    def entries(self) -> list[dict[str, Any]]:
        return list(self.store.db.query("SELECT * FROM audit ORDER BY seq"))


@dataclass(frozen=True)
class ChainProblem:
    """One thing wrong with a log, located by entry number (``seq``) or row position."""

    position: int
    seq: int | None
    problem: str


def verify_chain(entries: Iterable[Mapping[str, Any]], public_key: bytes) -> list[ChainProblem]:
    """Check sequence numbers, the hash chain and every entry's signature.

    Returns an empty list when the log is intact.
    """
    verify_key = nacl.signing.VerifyKey(public_key)
    problems: list[ChainProblem] = []
    prev = GENESIS
    for position, entry in enumerate(entries, start=1):
        seq = entry.get("seq")
        if seq != position:
            problems.append(ChainProblem(position, seq, f"expected entry {position}, found {seq}"))
        if entry.get("prev_hash") != prev:
            problems.append(ChainProblem(position, seq, "previous-hash link broken"))
        try:
            computed = entry_hash(entry)
        except (KeyError, TypeError) as exc:
            problems.append(ChainProblem(position, seq, f"malformed entry: {exc}"))
            prev = str(entry.get("entry_hash", ""))
            continue
        if computed != entry.get("entry_hash"):
            problems.append(ChainProblem(position, seq, "content does not match its hash"))
        try:
            verify_key.verify(
                bytes.fromhex(str(entry.get("entry_hash", ""))), bytes.fromhex(str(entry.get("signature", "")))
            )
        except (nacl.exceptions.BadSignatureError, ValueError):
            problems.append(ChainProblem(position, seq, "signature does not verify"))
        prev = str(entry.get("entry_hash", ""))
    return problems
