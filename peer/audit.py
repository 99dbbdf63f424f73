"""The peer's append-only audit log: every envelope sent, received or refused.

Each entry records who, when, which round and kind, the payload digest and size, the
sender's envelope signature and the signed envelope header (routing fields and digests)
— never weights or patient data. Entries form a hash chain:
``entry_hash = BLAKE2b-256(DOMAIN || msgpack([seq, at_ms, direction, peer, round, kind,
payload_digest, size, envelope_sig, reason, prev_hash]))`` with ``prev_hash`` of the first
entry 32 zero bytes (hex); an entry that kept its envelope header appends the header's
hex as a 12th array element. Each ``entry_hash`` is signed with the peer's Ed25519 key.
Changing, deleting, inserting or reordering any entry breaks the chain or a signature.

At each round end the peer signs a tree head (RFC 6962 Merkle tree over the entry
hashes) into the ``checkpoints`` table, so a truncated tail is detectable and an entry's
inclusion, or two heads' consistency, can be proved to a third party. docs/AUDIT.md
specifies all of it for an independent verifier; :mod:`silomesh.peer.audit_verify`
verifies and reconciles.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import nacl.exceptions
import nacl.signing

from silomesh.peer.identity import IdentityError, peer_id_from_public_key, public_key_from_peer_id
from silomesh.peer.store import Store
from silomesh.protocol.merkle import Frontier, leaf_hash

DOMAIN = b"silomesh/audit/v1\x00"
CHECKPOINT_DOMAIN = b"silomesh/audit-checkpoint/v1\x00"
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
#: every column of an entry, in export order
COLUMNS = (*FIELDS, "envelope_header", "entry_hash", "signature")
#: the ``state`` row naming the log's writer: {"peer_id": ..., "public_key": hex}
WRITER_STATE_KEY = "audit_writer"
STORE_FILE_NAME = "store.sqlite"
EXPORT_FORMAT = "silomesh-audit-log/1"
HEAD_FORMAT = "silomesh-tree-head/1"


class AuditError(Exception):
    """A log, head or proof cannot be read or is not what it claims to be (an input problem)."""


def entry_hash(entry: Mapping[str, Any]) -> str:
    """Hex BLAKE2b-256 of an entry's canonical encoding (:data:`FIELDS` order, then the header)."""
    values = [entry[f] if entry[f] is not None else "" for f in FIELDS]
    header = entry.get("envelope_header")
    if header:
        values.append(header)
    packed = msgpack.packb(values, use_bin_type=True)
    return hashlib.blake2b(DOMAIN + packed, digest_size=32).hexdigest()


def entry_leaf(entry: Mapping[str, Any]) -> bytes:
    """The Merkle leaf hash of an entry: ``SHA-256(0x00 || entry_hash bytes)``."""
    return leaf_hash(bytes.fromhex(str(entry["entry_hash"])))


def verify_ed25519(public_key: bytes, message: bytes, signature_hex: str) -> bool:
    """True if ``signature_hex`` is a valid Ed25519 signature of ``message`` by ``public_key``."""
    try:
        nacl.signing.VerifyKey(public_key).verify(message, bytes.fromhex(signature_hex))
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError, TypeError):
        return False
    return True


@dataclass(frozen=True)
class TreeHead:
    """A signed tree head: the writer commits to the first ``size`` entries of its log.

    The signature is Ed25519 over ``CHECKPOINT_DOMAIN || msgpack([peer_id, size, at_ms,
    root_hash])`` (``root_hash`` as lower-case hex) by the key inside ``peer_id``.
    """

    peer_id: str
    size: int
    root_hash: str
    at_ms: int
    signature: str = ""

    def signed_bytes(self) -> bytes:
        packed = msgpack.packb([self.peer_id, self.size, self.at_ms, self.root_hash], use_bin_type=True)
        return CHECKPOINT_DOMAIN + packed

    @property
    def public_key(self) -> bytes:
        """The writer's Ed25519 key, taken from its PeerID.

        Raises:
            AuditError: if ``peer_id`` is not an Ed25519 PeerID.
        """
        try:
            return public_key_from_peer_id(self.peer_id)
        except IdentityError as exc:
            raise AuditError(str(exc)) from None

    def verify(self, public_key: bytes | None = None) -> bool:
        """True if the signature is the writer's (or, when given, ``public_key``'s)."""
        try:
            key = public_key if public_key is not None else self.public_key
        except AuditError:
            return False
        return verify_ed25519(key, self.signed_bytes(), self.signature)

    def to_json(self) -> dict[str, Any]:
        try:
            public_key = self.public_key.hex()
        except AuditError:
            public_key = ""
        return {
            "format": HEAD_FORMAT,
            "peer_id": self.peer_id,
            "public_key": public_key,
            "size": self.size,
            "root_hash": self.root_hash,
            "at_ms": self.at_ms,
            "signature": self.signature,
        }

    @classmethod
    def from_json(cls, obj: Any) -> TreeHead:
        """Parse a head written by :meth:`to_json` (or a ``checkpoints`` row).

        Raises:
            AuditError: if a field is missing or has the wrong type.
        """
        try:
            head = cls(
                peer_id=str(obj["peer_id"]),
                size=obj["size"],
                root_hash=str(obj["root_hash"]),
                at_ms=obj["at_ms"],
                signature=str(obj["signature"]),
            )
        except (KeyError, TypeError) as exc:
            raise AuditError(f"not a signed tree head: missing {exc}") from None
        if type(head.size) is not int or type(head.at_ms) is not int or head.size < 0:
            raise AuditError("not a signed tree head: size and at_ms must be integers")
        return head


class AuditLog:
    """Appends signed, chained entries to the store's ``audit`` table and signs tree heads."""

    def __init__(self, store: Store, signing_key: nacl.signing.SigningKey | None) -> None:
        self.store = store
        self.signing_key = signing_key
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
        can re-verify ``envelope_sig`` by the sender's key); stored as hex.
        """
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if self.signing_key is None:
            raise AuditError("this AuditLog was opened for reading only")
        db = self.store.db
        with self.store.atomic():
            self._record_writer()
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
                "envelope_header": envelope_header.hex() if envelope_header else None,
            }
            entry["entry_hash"] = entry_hash(entry)
            entry["signature"] = self.signing_key.sign(bytes.fromhex(entry["entry_hash"])).signature.hex()
            db.table("audit").insert(entry)
        return entry

    def entries(self) -> list[dict[str, Any]]:
        return list(self.store.db.query("SELECT * FROM audit ORDER BY seq"))

    def heads(self) -> list[TreeHead]:
        """The signed checkpoints, smallest first."""
        return [TreeHead.from_json(r) for r in self.store.db.query("SELECT * FROM checkpoints ORDER BY size")]

    def _catch_up(self) -> Frontier:
        """The Merkle frontier over every entry, extended with entries appended since last time."""
        db = self.store.db
        frontier = self._frontier
        if frontier is not None and frontier.size:
            row = db.execute("SELECT entry_hash FROM audit WHERE seq = ?", [frontier.size]).fetchone()
            if row is None or row[0] != self._frontier_last:  # a rolled-back transaction: rebuild
                frontier = None
        if frontier is None:
            frontier, self._frontier_last = Frontier(), GENESIS
        for seq, h in db.execute("SELECT seq, entry_hash FROM audit WHERE seq > ? ORDER BY seq", [frontier.size]):
            if seq != frontier.size + 1:
                raise AuditError(f"audit table has a gap before entry {seq}; run 'silomesh audit verify'")
            frontier.append(leaf_hash(bytes.fromhex(h)))
            self._frontier_last = h
        self._frontier = frontier
        return frontier

    def checkpoint(self) -> TreeHead | None:
        """Sign a tree head over every entry so far and store it; None if nothing new.

        Call inside the round's commit transaction, so the head and the round land together.
        """
        if self.signing_key is None:
            raise AuditError("this AuditLog was opened for reading only")
        with self.store.atomic():
            frontier = self._catch_up()
            latest = self.store.db.execute("SELECT max(size) FROM checkpoints").fetchone()[0]
            if frontier.size == 0 or (latest is not None and latest >= frontier.size):
                return None
            self._record_writer()
            unsigned = TreeHead(self.peer_id, frontier.size, frontier.root.hex(), int(time.time() * 1000))
            signature = self.signing_key.sign(unsigned.signed_bytes()).signature.hex()
            head = TreeHead(unsigned.peer_id, unsigned.size, unsigned.root_hash, unsigned.at_ms, signature)
            self.store.db.table("checkpoints").insert(
                {
                    "size": head.size,
                    "root_hash": head.root_hash,
                    "at_ms": head.at_ms,
                    "peer_id": head.peer_id,
                    "signature": head.signature,
                }
            )
        return head


@dataclass(frozen=True)
class ChainProblem:
    """One thing wrong with a log, located by entry number (``seq``) or row position."""

    position: int
    seq: int | None
    problem: str


def verify_chain(entries: Iterable[Mapping[str, Any]], public_key: bytes) -> list[ChainProblem]:
    """Check sequence numbers, the hash chain and every entry's signature (strictly, row by row).

    Returns an empty list when the log is intact. :func:`silomesh.peer.audit_verify.verify_log`
    adds envelope signatures, checkpoints and a diagnosis of what was changed.
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


# -- reading logs (read-only, for auditors) ------------------------------------------


@dataclass
class LoadedLog:
    """A log as an auditor reads it: entries in stored order, heads, and who claims to have written it."""

    source: str
    entries: list[dict[str, Any]]
    checkpoints: list[TreeHead] = field(default_factory=list)
    writer_peer_id: str | None = None
    writer_public_key: bytes | None = None

    @property
    def name(self) -> str:
        return self.writer_peer_id or self.source


def _resolve(path: Path) -> Path:
    if path.is_dir():
        candidate = path / STORE_FILE_NAME
        if not candidate.is_file():
            raise AuditError(f"{path} is a folder without a {STORE_FILE_NAME}; give a peer's data folder or a log file")
        return candidate
    if not path.is_file():
        raise AuditError(f"{path} not found")
    return path


def load_log(path: Path) -> LoadedLog:
    """Read a log from a store (``store.sqlite`` or a peer's data folder) or a JSONL export.

    The store is opened read-only: nothing is migrated or written.

    Raises:
        AuditError: if the file is missing or is neither a silomesh store nor an export.
    """
    path = _resolve(path)
    with open(path, "rb") as fh:
        magic = fh.read(16)
    if magic == b"SQLite format 3\x00":
        return _load_sqlite(path)
    return _load_jsonl(path)


def _load_sqlite(path: Path) -> LoadedLog:
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise AuditError(f"cannot open {path}: {exc}") from None
    conn.row_factory = sqlite3.Row
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "audit" not in tables:
            raise AuditError(f"{path} is an SQLite file without an audit table; not a silomesh store")
        entries = []
        for row in conn.execute("SELECT * FROM audit ORDER BY seq"):
            entry = {c: row[c] if c in row.keys() else None for c in COLUMNS}
            entries.append(entry)
        heads = []
        if "checkpoints" in tables:
            heads = [TreeHead.from_json(dict(r)) for r in conn.execute("SELECT * FROM checkpoints ORDER BY size")]
        writer: Any = None
        if "state" in tables:
            row = conn.execute("SELECT value FROM state WHERE key = ?", [WRITER_STATE_KEY]).fetchone()
            writer = json.loads(row[0]) if row is not None else None
    except sqlite3.Error as exc:
        raise AuditError(f"cannot read {path}: {exc}") from None
    finally:
        conn.close()
    log = LoadedLog(str(path), entries, heads)
    _set_writer(log, writer)
    return log


def _set_writer(log: LoadedLog, writer: Any) -> None:
    if not isinstance(writer, dict):
        return
    log.writer_peer_id = str(writer.get("peer_id") or "") or None
    try:
        log.writer_public_key = bytes.fromhex(str(writer.get("public_key") or "")) or None
    except ValueError:
        raise AuditError(f"{log.source}: the recorded writer's public key is not hex") from None


def _load_jsonl(path: Path) -> LoadedLog:
    log = LoadedLog(str(path), [])
    writer: Any = None
    try:
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    raise AuditError(f"{path}:{number}: not JSON; give a store.sqlite or a JSONL export") from None
                record = obj.get("record") if isinstance(obj, dict) else None
                if record == "log":
                    writer = obj
                elif record == "entry":
                    log.entries.append({c: obj.get(c) for c in COLUMNS})
                elif record == "checkpoint":
                    log.checkpoints.append(TreeHead.from_json(obj))
                else:
                    raise AuditError(f"{path}:{number}: unknown record {record!r} (not a silomesh audit export)")
    except UnicodeDecodeError:
        raise AuditError(f"{path} is neither a silomesh store nor a JSONL audit export") from None
    log.checkpoints.sort(key=lambda h: h.size)
    _set_writer(log, writer)
    return log


def writer_key(log: LoadedLog) -> bytes | None:
    """The key the log says wrote it: the recorded writer, else its checkpoints' PeerID."""
    if log.writer_public_key is not None:
        return log.writer_public_key
    for peer_id in ([log.writer_peer_id] if log.writer_peer_id else []) + [h.peer_id for h in log.checkpoints]:
        try:
            return public_key_from_peer_id(peer_id)
        except IdentityError:
            continue
    return None


def export_jsonl(log: LoadedLog) -> Iterator[str]:
    """Lines of a JSONL export: a ``log`` record, the entries, then the signed heads."""
    yield json.dumps(
        {
            "record": "log",
            "format": EXPORT_FORMAT,
            "peer_id": log.writer_peer_id,
            "public_key": log.writer_public_key.hex() if log.writer_public_key else None,
            "source": log.source,
        }
    )
    for entry in log.entries:
        yield json.dumps({"record": "entry", **{c: entry.get(c) for c in COLUMNS}})
    for head in log.checkpoints:
        yield json.dumps({"record": "checkpoint", **head.to_json()})


def export_csv(log: LoadedLog) -> str:
    """The entries as CSV (one row per entry, columns as in :data:`COLUMNS`)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for entry in log.entries:
        writer.writerow({c: entry.get(c) for c in COLUMNS})
    return out.getvalue()
