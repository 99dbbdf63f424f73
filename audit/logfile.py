"""Reading an audit log as an auditor does (read-only), and exporting it.

A log comes from a peer's ``store.sqlite`` (or the data folder holding it), opened with
the stdlib :mod:`sqlite3` in read-only mode — nothing is migrated or written — or from a
JSONL export made by :func:`export_jsonl`. Either way the auditor gets a
:class:`LoadedLog`: the entries in stored order, the signed heads, and who the log says
wrote it.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from silomesh.audit.entries import COLUMNS, WRITER_STATE_KEY, AuditError, TreeHead, key_of

STORE_FILE_NAME = "store.sqlite"
EXPORT_FORMAT = "silomesh-audit-log/1"


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
        rows = conn.execute("SELECT * FROM audit ORDER BY seq")
        present = {column[0] for column in rows.description}  # `c in row` would test the values
        for row in rows:
            entry = {c: row[c] if c in present else None for c in COLUMNS}
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


def _set_writer(log: LoadedLog, writer: object) -> None:
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
        key = key_of(peer_id)
        if key is not None:
            return key
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
