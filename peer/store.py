"""The peer's durable store: one SQLite file (WAL) plus model files named by digest.

One :class:`Store` object owns the connection (SQLite connections are thread-bound).
Schema changes are migrations applied in order at start-up and recorded in
``PRAGMA user_version``. Writes that belong together happen in one transaction
(``with store.atomic():``), so a peer killed at any instant restarts from its last
committed state. Model weights live beside the database as safetensors files written
atomically (temporary file, fsync, rename, fsync of the folder) and are referenced by
digest; a file without a row is garbage left by a crash and is removed at start-up.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sqlite_utils
from safetensors.numpy import load_file, save_file

log = logging.getLogger(__name__)


#: the largest round or sequence number (uint64), and the offset that maps them onto SQLite's int64
U64 = 2**64 - 1
INT64_OFFSET = 2**63


#: the origin of a personal model (fine-tuned on own data after a round; never sent, never resumed)
PERSONAL = "personal"
#: seconds between two writes of a neighbour's ``last_seen`` (:meth:`Store.note_seen`)
SEEN_WRITE_INTERVAL = 10.0


class StoreError(Exception):
    """The store cannot be opened, or an operation names a model or dataset that does not exist."""


def _migration_1(db: sqlite_utils.Database) -> None:
    db.table("models").create(
        {
            "digest": str,
            "round": int,
            "parent": str,
            "name": str,
            "file": str,
            "created_at": float,
            "deleted": int,
            "origin": str,
        },
        pk="digest",
        not_null={"round", "file", "created_at"},
        defaults={"deleted": 0, "origin": "local"},
    )
    db.table("models").create_index(["round"])
    db.table("models").create_index(["name"], unique=False)
    db.table("rounds").create(
        {
            "round": int,
            "started_at": float,
            "finished_at": float,
            "status": str,
            "model": str,
            "contributors": str,
            "skipped": str,
            "bytes_sent": int,
            "bytes_received": int,
        },
        pk="round",
    )
    db.table("neighbours").create(
        {
            "peer_id": str,
            "name": str,
            "address": str,
            "last_seen": float,
            "connected": int,
            "samples": int,
            "data_digest": str,
            "data_announced_at": float,
            "refused": int,
            "selected": int,
        },
        pk="peer_id",
        defaults={"connected": 0, "refused": 0, "selected": 1},
    )
    db.table("datasets").create(
        {"id": int, "path": str, "manifest": str, "registered_at": float, "active": int},
        pk="id",
        defaults={"active": 1},
    )
    db.table("metrics").create({"round": int, "name": str, "value": float, "at": float}, pk=("round", "name"))
    db.table("state").create({"key": str, "value": str}, pk="key")
    db.table("audit").create(
        {
            "seq": int,
            "at_ms": int,
            "direction": str,
            "peer": str,
            "round": int,
            "kind": str,
            "payload_digest": str,
            "size": int,
            "envelope_sig": str,
            "reason": str,
            "prev_hash": str,
            "entry_hash": str,
            "signature": str,
        },
        pk="seq",
        not_null={"at_ms", "direction", "prev_hash", "entry_hash", "signature"},
    )
    db.table("approvals").create(
        {
            "id": int,
            "kind": str,
            "round": int,
            "peer": str,
            "detail": str,
            "status": str,
            "created_at": float,
            "decided_at": float,
        },
        pk="id",
        defaults={"status": "pending"},
    )


def _migration_2(db: sqlite_utils.Database) -> None:
    """Audit: each envelope's signed header (to re-verify its signature) and signed tree heads."""
    db.table("audit").add_column("envelope_header", str)
    db.table("checkpoints").create(
        {"size": int, "root_hash": str, "at_ms": int, "peer_id": str, "signature": str},
        pk="size",
        not_null={"root_hash", "at_ms", "peer_id", "signature"},
    )


def _migration_3(db: sqlite_utils.Database) -> None:
    """Replay marks that survive a restart (PROTOCOL.md section 11), and why a neighbour and
    we last refused each other (shown to both operators)."""
    db.table("replay_marks").create({"sender": str, "round": int, "sequence": int}, pk="sender")
    db.table("neighbours").add_column("last_refused", str)  # what we last refused of theirs, and why
    db.table("neighbours").add_column("refused_by", int, not_null_default=0)  # times it refused ours
    db.table("neighbours").add_column("last_refused_by", str)  # its last error code and message


def _migration_4(db: sqlite_utils.Database) -> None:
    """Rounds: why a round failed (it was rolled back), or other notes on it."""
    db.table("rounds").add_column("note", str)


def _migration_5(db: sqlite_utils.Database) -> None:
    """Strangers: PeerIDs outside the trust list whose connections we refused. Only the most
    recently seen are kept (see :meth:`Store.record_strangers`); totals over all of them are
    the ``state`` row :data:`STRANGER_TOTALS`."""
    db.table("strangers").create(
        {"peer_id": str, "first_seen": float, "last_seen": float, "refused": int, "last_reason": str},
        pk="peer_id",
        not_null={"first_seen", "last_seen", "refused"},
    )
    db.table("strangers").create_index(["last_seen"])


def _migration_6(db: sqlite_utils.Database) -> None:
    """Replay marks are uint64 (PROTOCOL.md) but SQLite integers are int64: marks are stored
    shifted down by :data:`INT64_OFFSET`, so the whole uint64 range keeps its order. Marks
    written by migration 3's plain form (all below 2**63) are shifted the same way."""
    db.execute(
        "UPDATE replay_marks SET round = round + (-9223372036854775807 - 1), "
        "sequence = sequence + (-9223372036854775807 - 1)"
    )


def _migration_7(db: sqlite_utils.Database) -> None:
    """A round row's ``undelivered``: the neighbours our update did not reach, and why. Before,
    they were listed in ``skipped`` even when their own model came and was used."""
    db.table("rounds").add_column("undelivered", str)


#: migrations in order; index i upgrades from user_version i to i + 1
MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _migration_1, _migration_2, _migration_3, _migration_4, _migration_5,
    _migration_6, _migration_7,
]

#: the ``state`` key of :class:`StrangerTotals`
STRANGER_TOTALS = "stranger_totals"


@dataclass(frozen=True)
class StrangerRecord:
    """Refusals of one stranger's connections since the last write (times: Unix seconds)."""

    peer_id: str
    first_seen: float
    last_seen: float
    refused: int
    last_reason: str = ""


@dataclass(frozen=True)
class StrangerTotals:
    """Refusals of strangers' connections over the life of the store.

    ``peers`` counts PeerIDs not among the kept rows when they were written: a stranger that
    dropped out of them (or that the caller could not keep apart) counts again.
    """

    refused: int = 0
    peers: int = 0
    since: float | None = None
    last_at: float | None = None


@dataclass(frozen=True)
class ModelRecord:
    digest: str
    round: int
    parent: str | None
    name: str | None
    file: Path
    created_at: float
    origin: str


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Create ``path`` so that it either holds the complete content or does not exist."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Store:
    """The peer's SQLite store and model folder.

    Raises:
        StoreError: if the database cannot be opened or is newer than this silomesh.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.models_dir = path.parent / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite_utils.Database(path)
            self.db.enable_wal()
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open store {path}: {exc}") from None
        self._remove_orphan_files()
        self._seen: dict[str, float] = {}  # peer -> when last heard from
        self._seen_written: dict[str, float] = {}  # peer -> the last_seen last written

    @classmethod
    def open_readonly(cls, path: Path) -> Store:
        """Open an existing store for reading only, beside the peer that writes it.

        No migrations, no clean-up of model files, no writes: SQLite's WAL lets such a
        reader run next to the peer's own connection (in this process or another), so a
        harness or a tool can watch a live peer. Only the read methods may be used.

        Raises:
            StoreError: if the file does not exist or cannot be opened.
        """
        if not path.is_file():
            raise StoreError(f"no store {path}")
        store = cls.__new__(cls)
        store.path = path
        store._seen, store._seen_written = {}, {}
        store.models_dir = path.parent / "models"
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {path}: {exc}") from None
        try:
            store.db = sqlite_utils.Database(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"cannot open store {path}: {exc}") from None
        return store

    # -- lifecycle -----------------------------------------------------------------

    def _migrate(self) -> None:
        version = int(self.db.execute("PRAGMA user_version").fetchone()[0])
        if version > len(MIGRATIONS):
            raise StoreError(
                f"store {self.path} has schema version {version}, newer than this silomesh "
                f"understands ({len(MIGRATIONS)}); upgrade silomesh"
            )
        for target, migration in enumerate(MIGRATIONS[version:], start=version + 1):
            with self.db.atomic():
                migration(self.db)
                self.db.execute(f"PRAGMA user_version={target}")
            log.info("store %s migrated to schema version %d", self.path, target)

    @property
    def schema_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def _remove_orphan_files(self) -> None:
        known = {row["file"] for row in self.db.table("models").rows}
        for f in self.models_dir.iterdir():
            if f.name not in known:
                log.warning("removing %s: written by an interrupted save, never committed", f)
                f.unlink(missing_ok=True)

    def close(self) -> None:
        try:
            for peer_id, at in self._seen.items():
                if at != self._seen_written.get(peer_id):
                    self._write_seen(peer_id, at)
        except sqlite3.Error as exc:  # closing goes on: a last_seen is not worth a failed stop
            log.warning("store %s: neighbours' last_seen not written on close: %s", self.path, exc)
        self.db.close()

    @contextmanager
    def atomic(self) -> Iterator[Store]:
        """One transaction; nested blocks become savepoints."""
        with self.db.atomic():
            yield self

    # -- key/value state -----------------------------------------------------------

    def get_state(self, key: str, default: object = None) -> object:
        """The JSON value stored under ``key`` (``default`` if none)."""
        row = self.db.execute("SELECT value FROM state WHERE key = ?", [key]).fetchone()
        return default if row is None else json.loads(row[0])

    def set_state(self, key: str, value: object) -> None:
        """Store ``value`` (anything ``json.dumps`` takes) under ``key``."""
        self.db.table("state").upsert({"key": key, "value": json.dumps(value)}, pk="key")

    # -- models --------------------------------------------------------------------

    def write_model_file(self, state: Mapping[str, np.ndarray], digest: str) -> str:
        """Write a weights file atomically (no database access: safe from a worker thread)."""
        file_name = f"{digest}.safetensors"
        path = self.models_dir / file_name
        if not path.exists():
            arrays = {k: np.ascontiguousarray(v) for k, v in state.items()}
            write_atomic(path, lambda p: save_file(arrays, str(p)))
        return file_name

    def save_model(
        self,
        state: Mapping[str, np.ndarray],
        digest: str,
        round: int,
        parent: str | None = None,
        name: str | None = None,
        origin: str = "local",
    ) -> ModelRecord:
        """Write the weights file (unless already written), then record it; idempotent per digest."""
        existing = self.db.execute("SELECT digest FROM models WHERE digest = ?", [digest]).fetchone()
        if existing is None:
            file_name = self.write_model_file(state, digest)
            self.db.table("models").insert(
                {
                    "digest": digest,
                    "round": round,
                    "parent": parent,
                    "name": name,
                    "file": file_name,
                    "created_at": time.time(),
                    "deleted": 0,
                    "origin": origin,
                }
            )
        return self.model(digest)

    def model(self, ref: str) -> ModelRecord:
        """A model by digest, unique digest prefix (>= 8 chars) or name; ``personal`` is the
        newest personal model.

        Raises:
            StoreError: if nothing or more than one model matches.
        """
        if ref == PERSONAL:
            record = self.latest_personal_model()
            if record is None:
                raise StoreError("no personal model yet (set [personal] steps in peer.toml)")
            return record
        rows = list(
            self.db.query(
                "SELECT * FROM models WHERE deleted = 0 AND (digest = :r OR name = :r OR "
                "(length(:r) >= 8 AND digest LIKE :p))",
                {"r": ref, "p": ref + "%"},
            )
        )
        if not rows:
            raise StoreError(f"no model {ref!r}")
        if len(rows) > 1:
            raise StoreError(f"{ref!r} matches {len(rows)} models; give more of the digest")
        r = rows[0]
        return ModelRecord(
            r["digest"], r["round"], r["parent"], r["name"], self.models_dir / r["file"], r["created_at"], r["origin"]
        )

    def load_model(self, ref: str) -> dict[str, np.ndarray]:
        return self.read_model_file(self.model(ref))

    @staticmethod
    def read_model_file(record: ModelRecord) -> dict[str, np.ndarray]:
        """The tensors of ``record``'s file (no database access: safe from a worker thread)."""
        return dict(load_file(str(record.file)))

    def models(self) -> list[ModelRecord]:
        return [
            ModelRecord(
                r["digest"],
                r["round"],
                r["parent"],
                r["name"],
                self.models_dir / r["file"],
                r["created_at"],
                r["origin"],
            )
            for r in self.db.query("SELECT * FROM models WHERE deleted = 0 ORDER BY round, created_at")
        ]

    def latest_model(self) -> ModelRecord | None:
        """The newest shared model (the one rounds resume from and neighbours see)."""
        models = [m for m in self.models() if m.origin != PERSONAL]
        return models[-1] if models else None

    def latest_personal_model(self) -> ModelRecord | None:
        """The newest personal model, if ``[personal]`` made any."""
        models = [m for m in self.models() if m.origin == PERSONAL]
        return models[-1] if models else None

    def rename_model(self, ref: str, name: str) -> ModelRecord:
        if not name or name != name.strip():
            raise StoreError("a model name must be non-empty without surrounding spaces")
        if name == PERSONAL:
            raise StoreError(f"{PERSONAL!r} is reserved: it always names the newest personal model")
        record = self.model(ref)
        clash = self.db.execute(
            "SELECT digest FROM models WHERE name = ? AND deleted = 0 AND digest != ?", [name, record.digest]
        ).fetchone()
        if clash:
            raise StoreError(f"name {name!r} is already used by model {clash[0][:12]}")
        self.db.table("models").update(record.digest, {"name": name})
        return self.model(record.digest)

    def delete_model(self, ref: str) -> ModelRecord:
        """Mark a model deleted and remove its weights file (the row keeps the history)."""
        record = self.model(ref)
        with self.atomic():
            self.db.table("models").update(record.digest, {"deleted": 1, "name": None})
        record.file.unlink(missing_ok=True)
        return record

    # -- rounds, metrics, neighbours, datasets --------------------------------------

    def record_round(self, round: int, **fields: Any) -> None:
        row: dict[str, Any] = {"round": round}
        for key, value in fields.items():
            row[key] = json.dumps(value) if isinstance(value, list | dict) else value
        self.db.table("rounds").upsert(row, pk="round")

    def rounds(self) -> list[dict[str, Any]]:
        out = []
        for r in self.db.query("SELECT * FROM rounds ORDER BY round"):
            for key in ("contributors", "skipped", "undelivered"):
                r[key] = json.loads(r[key]) if r.get(key) else []
            out.append(r)
        return out

    def last_committed_round(self) -> int:
        row = self.db.execute("SELECT max(round) FROM rounds WHERE status = 'done'").fetchone()
        return -1 if row[0] is None else int(row[0])

    def committed_round_count(self) -> int:
        """How many rounds this peer has committed (rounds with status ``done``)."""
        row = self.db.execute("SELECT count(*) FROM rounds WHERE status = 'done'").fetchone()
        return int(row[0])

    def failed_rounds_in_a_row(self) -> int:
        """How many rounds failed (were rolled back) since the last committed one."""
        row = self.db.execute(
            "SELECT count(*) FROM rounds WHERE status = 'failed' AND round > "
            "(SELECT coalesce(max(round), -1) FROM rounds WHERE status = 'done')"
        ).fetchone()
        return int(row[0])

    def record_metric(self, round: int, name: str, value: float) -> None:
        self.db.table("metrics").upsert(
            {"round": round, "name": name, "value": float(value), "at": time.time()}, pk=("round", "name")
        )

    def metrics(self) -> list[dict[str, Any]]:
        return list(self.db.query("SELECT round, name, value FROM metrics ORDER BY round, name"))

    def upsert_neighbour(self, peer_id: str, **fields: Any) -> None:
        self.db.table("neighbours").upsert({"peer_id": peer_id, **fields}, pk="peer_id")

    def note_seen(self, peer_id: str, at: float | None = None) -> None:
        """Remember that ``peer_id`` was heard from (at ``at``, default now).

        A peer hears from its neighbours on every stream and announce: the row's
        ``last_seen`` is written (one transaction) at most every :data:`SEEN_WRITE_INTERVAL`
        seconds per neighbour, and on :meth:`close`. :meth:`neighbours` shows the newest
        time either way; after a crash the row may be up to that interval behind.
        """
        at = time.time() if at is None else at
        if at <= self._seen.get(peer_id, -math.inf):
            return
        self._seen[peer_id] = at
        if at - self._seen_written.get(peer_id, -math.inf) >= SEEN_WRITE_INTERVAL:
            self._write_seen(peer_id, at)

    def _write_seen(self, peer_id: str, at: float) -> None:
        self.db.execute(
            "INSERT INTO neighbours (peer_id, last_seen) VALUES (?, ?) ON CONFLICT(peer_id) DO UPDATE "
            "SET last_seen = max(coalesce(last_seen, excluded.last_seen), excluded.last_seen)",
            [peer_id, at],
        )
        self._seen_written[peer_id] = at

    def count_refused(self, peer_id: str, reason: str = "") -> None:
        """Count one refusal of ``peer_id``'s messages (and remember the latest reason)."""
        self.db.execute(
            "INSERT INTO neighbours (peer_id, refused, last_refused) VALUES (?, 1, ?) "
            "ON CONFLICT(peer_id) DO UPDATE SET refused = refused + 1, last_refused = excluded.last_refused",
            [peer_id, reason[:300]],
        )

    def count_refused_by(self, peer_id: str, reason: str) -> None:
        """Count one refusal of our message by ``peer_id`` (its error code and message)."""
        self.db.execute(
            "INSERT INTO neighbours (peer_id, refused_by, last_refused_by) VALUES (?, 1, ?) "
            "ON CONFLICT(peer_id) DO UPDATE SET refused_by = refused_by + 1, "
            "last_refused_by = excluded.last_refused_by",
            [peer_id, reason[:300]],
        )

    def save_replay_marks(self, marks: Mapping[bytes, tuple[int, int]]) -> None:
        """Persist per-sender replay low-water marks (one past the newest accepted pair)."""
        for sender, (round, sequence) in marks.items():
            self._raise_replay_mark(sender, round, sequence)

    def note_replay_mark(self, sender: bytes, round: int, sequence: int) -> None:
        """Raise ``sender``'s persisted mark to one past (round, sequence), never lower it."""
        if sequence >= U64:  # one past the largest sequence of a round is the next round's first
            self._raise_replay_mark(sender, min(round + 1, U64), 0)
        else:
            self._raise_replay_mark(sender, round, sequence + 1)

    def _raise_replay_mark(self, sender: bytes, round: int, sequence: int) -> None:
        # rounds and sequences are uint64 (PROTOCOL.md), SQLite integers int64: stored offset
        self.db.execute(
            "INSERT INTO replay_marks (sender, round, sequence) VALUES (?, ?, ?) "
            "ON CONFLICT(sender) DO UPDATE SET round = excluded.round, sequence = excluded.sequence "
            "WHERE (excluded.round, excluded.sequence) > (replay_marks.round, replay_marks.sequence)",
            [sender.hex(), min(round, U64) - INT64_OFFSET, min(sequence, U64) - INT64_OFFSET],
        )

    def replay_marks(self) -> dict[bytes, tuple[int, int]]:
        """The persisted replay low-water marks, to seed the replay guard on start."""
        return {
            bytes.fromhex(r["sender"]): (int(r["round"]) + INT64_OFFSET, int(r["sequence"]) + INT64_OFFSET)
            for r in self.db.query("SELECT sender, round, sequence FROM replay_marks")
        }

    def neighbours(self) -> list[dict[str, Any]]:
        rows = list(self.db.query("SELECT * FROM neighbours ORDER BY name, peer_id"))
        for row in rows:  # a time heard from that is not written yet (note_seen)
            seen = self._seen.get(row["peer_id"])
            if seen is not None and (row["last_seen"] is None or seen > row["last_seen"]):
                row["last_seen"] = seen
        return rows

    def record_strangers(
        self, records: list[StrangerRecord], *, keep: int, unnamed_refused: int = 0, unnamed_peers: int = 0
    ) -> int:
        """Add refusals of strangers' connections, keeping rows for the ``keep`` most recent only.

        One transaction: each record adds to its stranger's row (created if absent), rows
        beyond the ``keep`` most recently seen are deleted, and the totals grow by every
        refusal, including ``unnamed_refused`` refusals of ``unnamed_peers`` strangers the
        caller counted without a record. So however many strangers there are, the table
        holds at most ``keep`` rows and the totals one.

        Returns:
            How many of ``records`` named a PeerID that had no row.
        """
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        with self.atomic():
            new = 0
            for r in records:
                known = self.db.execute("SELECT 1 FROM strangers WHERE peer_id = ?", [r.peer_id]).fetchone()
                new += known is None
                self.db.execute(
                    "INSERT INTO strangers (peer_id, first_seen, last_seen, refused, last_reason) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT(peer_id) DO UPDATE SET "
                    "last_seen = max(last_seen, excluded.last_seen), refused = refused + excluded.refused, "
                    "last_reason = excluded.last_reason",
                    [r.peer_id, r.first_seen, r.last_seen, r.refused, r.last_reason[:300]],
                )
            self.db.execute(
                "DELETE FROM strangers WHERE peer_id NOT IN "
                "(SELECT peer_id FROM strangers ORDER BY last_seen DESC, peer_id LIMIT ?)",
                [keep],
            )
            old = self.stranger_totals()
            refused = sum(r.refused for r in records) + unnamed_refused
            times = [r.first_seen for r in records] + ([old.since] if old.since is not None else [])
            last = [r.last_seen for r in records] + ([old.last_at] if old.last_at is not None else [])
            self.set_state(
                STRANGER_TOTALS,
                {
                    "refused": old.refused + refused,
                    "peers": old.peers + new + unnamed_peers,
                    "since": min(times, default=None),
                    "last_at": max(last, default=None),
                },
            )
        return new

    def stranger_totals(self) -> StrangerTotals:
        value = self.get_state(STRANGER_TOTALS)
        if not isinstance(value, dict):
            return StrangerTotals()
        return StrangerTotals(int(value["refused"]), int(value["peers"]), value.get("since"), value.get("last_at"))

    def strangers(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recently seen strangers (newest first): peer_id, first_seen, last_seen, refused, last_reason."""
        return list(self.db.query("SELECT * FROM strangers ORDER BY last_seen DESC, peer_id LIMIT ?", [limit]))

    def register_dataset(self, path: str, manifest: Mapping[str, Any]) -> int:
        with self.atomic():
            self.db.execute("UPDATE datasets SET active = 0")
            table = self.db.table("datasets").insert(
                {"path": path, "manifest": json.dumps(dict(manifest)), "registered_at": time.time(), "active": 1}
            )
            return int(table.last_pk)  # type: ignore[arg-type]  # insert() returns the table holding it

    def datasets(self) -> list[dict[str, Any]]:
        rows = list(self.db.query("SELECT * FROM datasets ORDER BY id"))
        for r in rows:
            r["manifest"] = json.loads(r["manifest"])
        return rows

    def deselected_neighbours(self) -> set[str]:
        """PeerIDs the operator took out of the next rounds (``selected = 0``)."""
        return {r[0] for r in self.db.execute("SELECT peer_id FROM neighbours WHERE selected = 0")}

    # -- operator approvals (participation = "manual") ------------------------------

    def add_approval(self, kind: str, round: int, peer: str, detail: str) -> int:
        """A new pending approval request; returns its id."""
        table = self.db.table("approvals").insert(
            {"kind": kind, "round": round, "peer": peer, "detail": detail, "status": "pending",
             "created_at": time.time()}
        )
        return int(table.last_pk)  # type: ignore[arg-type]  # insert() returns the table holding it

    def approval(self, approval_id: int) -> dict[str, Any] | None:
        rows = list(self.db.query("SELECT * FROM approvals WHERE id = ?", [approval_id]))
        return rows[0] if rows else None

    def decide_approval(self, approval_id: int, status: str) -> None:
        """Set a request's status (approved, declined, expired) and decision time."""
        self.db.execute("UPDATE approvals SET status = ?, decided_at = ? WHERE id = ?",
                        [status, time.time(), approval_id])

    def expire_pending_approvals(self) -> int:
        """Expire every pending request (nobody waits for them any more); returns how many."""
        cursor = self.db.execute("UPDATE approvals SET status = 'expired', decided_at = ? WHERE status = 'pending'",
                                 [time.time()])
        return int(cursor.rowcount)

    def approvals(self) -> list[dict[str, Any]]:
        return list(self.db.query("SELECT * FROM approvals ORDER BY id"))

    # -- audit log (written only by silomesh.peer.audit.AuditLog) ---------------------

    def last_audit_entry(self) -> tuple[int, str] | None:
        """``(seq, entry_hash)`` of the newest audit entry, or None when the log is empty."""
        row = self.db.execute("SELECT seq, entry_hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def insert_audit_entry(self, entry: Mapping[str, Any]) -> None:
        """Insert one audit entry row (the caller chains and signs it, inside :meth:`atomic`)."""
        self.db.table("audit").insert(dict(entry))

    def audit_entry_hash(self, seq: int) -> str | None:
        """The ``entry_hash`` of audit entry ``seq``, or None if there is no such entry."""
        row = self.db.execute("SELECT entry_hash FROM audit WHERE seq = ?", [seq]).fetchone()
        return None if row is None else str(row[0])

    def audit_hashes_after(self, seq: int) -> list[tuple[int, str]]:
        """``(seq, entry_hash)`` of every audit entry numbered above ``seq``, in order."""
        return [
            (int(s), str(h))
            for s, h in self.db.execute("SELECT seq, entry_hash FROM audit WHERE seq > ? ORDER BY seq", [seq])
        ]

    def audit_entries(self) -> list[dict[str, Any]]:
        """Every audit entry row, oldest first."""
        return list(self.db.query("SELECT * FROM audit ORDER BY seq"))

    def local_audit_entries(self, kind: str, min_round: int) -> list[dict[str, Any]]:
        """``peer``, ``round`` and ``payload_digest`` of the ``local`` audit entries of ``kind``
        naming a peer, from round ``min_round`` on, oldest first."""
        return list(self.db.query(
            "SELECT peer, round, payload_digest FROM audit WHERE direction = 'local' AND kind = ? "
            "AND peer != '' AND round >= ? ORDER BY seq", [kind, min_round]))

    def latest_audit_entries(self, limit: int) -> list[dict[str, Any]]:
        """The ``limit`` newest audit entry rows, newest first."""
        return list(self.db.query("SELECT * FROM audit ORDER BY seq DESC LIMIT ?", [limit]))

    def received_bytes_by_round(self) -> dict[int, int]:
        """Bytes recorded as received in the audit log, summed per round."""
        return {
            int(r["round"]): int(r["total"])
            for r in self.db.query(
                "SELECT round, sum(size) AS total FROM audit WHERE direction = 'received' GROUP BY round"
            )
        }

    def latest_checkpoint_size(self) -> int | None:
        """The size of the largest signed audit checkpoint, or None when there is none."""
        row = self.db.execute("SELECT max(size) FROM checkpoints").fetchone()
        return None if row[0] is None else int(row[0])

    def insert_checkpoint(self, row: Mapping[str, Any]) -> None:
        """Insert one signed tree head row (``size``, ``root_hash``, ``at_ms``, ``peer_id``, ``signature``)."""
        self.db.table("checkpoints").insert(dict(row))

    def checkpoints(self) -> list[dict[str, Any]]:
        """Every signed audit checkpoint row, smallest first."""
        return list(self.db.query("SELECT * FROM checkpoints ORDER BY size"))
