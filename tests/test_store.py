"""The peer's store: migrations, atomic model files, transactions, crash safety, audit chain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import nacl.signing
import numpy as np
import pytest

from silomesh.audit.verify import verify_chain
from silomesh.peer.audit import AuditLog
from silomesh.peer.store import MIGRATIONS, SEEN_WRITE_INTERVAL, Store, StoreError, StrangerRecord, StrangerTotals

KEY = nacl.signing.SigningKey(b"\x09" * 32)


def _state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "body.w": rng.standard_normal((4, 3)).astype(np.float32),
        "head.b": rng.standard_normal(2).astype(np.float32),
    }


def test_new_store_is_migrated_to_latest_schema_in_wal_mode(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite")
    assert store.schema_version == len(MIGRATIONS)
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert {"models", "rounds", "neighbours", "datasets", "metrics", "audit"} <= set(store.db.table_names())


def test_store_newer_than_code_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite")
    store.db.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    store.close()
    with pytest.raises(StoreError, match="newer than this silomesh"):
        Store(tmp_path / "store.sqlite")


def test_saved_model_loads_back_bit_identical(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite")
    state = _state(0)
    store.save_model(state, "ab" * 32, round=3)
    loaded = store.load_model("ab" * 32)
    assert set(loaded) == set(state)
    for k in state:
        assert np.array_equal(loaded[k], state[k])
    assert store.model("abababab").round == 3


def test_rename_and_delete_model(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite")
    store.save_model(_state(0), "aa" * 32, round=0)
    store.save_model(_state(1), "bb" * 32, round=1)
    store.rename_model("aa" * 32, "baseline")
    assert store.model("baseline").digest == "aa" * 32
    with pytest.raises(StoreError, match="already used"):
        store.rename_model("bb" * 32, "baseline")
    record = store.delete_model("baseline")
    assert not record.file.exists()
    assert [m.digest for m in store.models()] == ["bb" * 32]
    with pytest.raises(StoreError, match="no model"):
        store.model("baseline")


def test_failed_transaction_leaves_nothing_behind(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite")
    with pytest.raises(RuntimeError), store.atomic():
        store.record_round(0, status="done")
        store.record_metric(0, "dice", 0.5)
        raise RuntimeError("crash inside the round commit")
    assert store.rounds() == []
    assert store.metrics() == []


def test_orphan_model_file_from_interrupted_save_is_removed_on_open(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite")
    orphan = store.models_dir / "cc.safetensors"
    orphan.write_bytes(b"partial")
    store.close()
    Store(tmp_path / "store.sqlite")
    assert not orphan.exists()


def test_audit_chain_verifies_and_detects_a_modified_entry(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite")
    log = AuditLog(store, KEY)
    for i in range(5):
        log.append("sent", "peerB", "update", round=i, payload_digest=f"{i:064x}", size=100 + i)
    entries = log.entries()
    assert verify_chain(entries, bytes(KEY.verify_key)) == []
    entries[2]["size"] = 999
    problems = verify_chain(entries, bytes(KEY.verify_key))
    assert [(p.seq, p.problem) for p in problems] == [(3, "content does not match its hash")]


def test_audit_chain_detects_deleted_and_swapped_entries(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite")
    log = AuditLog(store, KEY)
    for i in range(4):
        log.append("received", "peerC", "update", round=i)
    entries = log.entries()
    deleted = entries[:1] + entries[2:]
    assert verify_chain(deleted, bytes(KEY.verify_key))[0].position == 2
    swapped = [entries[0], entries[2], entries[1], entries[3]]
    assert verify_chain(swapped, bytes(KEY.verify_key))[0].position == 2


def test_audit_chain_signed_by_another_key_fails(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite")
    AuditLog(store, nacl.signing.SigningKey(b"\x0a" * 32)).append("sent", "p", "hello")
    problems = verify_chain(AuditLog(store, KEY).entries(), bytes(KEY.verify_key))
    assert [p.problem for p in problems] == ["signature does not verify"]


WRITER = textwrap.dedent(
    """
    import sys, numpy as np, nacl.signing
    from pathlib import Path
    from silomesh.peer.store import Store
    from silomesh.peer.audit import AuditLog
    store = Store(Path(sys.argv[1]))
    log = AuditLog(store, nacl.signing.SigningKey(b"\\x09" * 32))
    r = start = store.last_committed_round() + 1
    while True:
        state = {"w": np.full((256, 256), r, dtype=np.float32)}
        digest = f"{r:064x}"
        store.save_model(state, digest, round=r)
        with store.atomic():
            log.append("sent", "peerB", "update", round=r, payload_digest=digest, size=4 * 256 * 256)
            store.record_metric(r, "dice", r / 1000)
            store.record_round(r, status="done", model=digest)
        if r == start + 3:
            print("ready", flush=True)
        r += 1
    """
)


def test_kill_9_mid_write_loses_no_committed_round_and_chain_verifies(tmp_path: Path) -> None:
    db = tmp_path / "store.sqlite"
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        store = Store(db)
        last = store.last_committed_round()
        assert last >= 3 * (attempt + 1)
        rounds = store.rounds()
        assert [r["round"] for r in rounds] == list(range(last + 1))
        for r in rounds:  # every committed round has its model file, complete
            assert store.load_model(r["model"])["w"][0, 0] == r["round"]
        entries = AuditLog(store, KEY).entries()
        assert len(entries) == last + 1
        assert verify_chain(entries, bytes(KEY.verify_key)) == []
        store.close()


def test_strangers_keep_only_the_most_recent_rows_and_totals_for_all(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite")
    for batch in range(30):  # 3000 strangers, 100 per write, seen in order
        records = [
            StrangerRecord(f"stranger-{batch}-{i}", t := 1000.0 + batch * 100 + i, t, 1, "untrusted-connection")
            for i in range(100)
        ]
        assert store.record_strangers(records, keep=20) == 100  # all new
    store.record_strangers([StrangerRecord("stranger-29-99", 5000.0, 5001.0, 2, "untrusted-stream")], keep=20)
    assert store.db.table("strangers").count == 20
    newest = store.strangers(limit=3)
    assert [r["peer_id"] for r in newest] == ["stranger-29-99", "stranger-29-98", "stranger-29-97"]
    assert (newest[0]["refused"], newest[0]["last_reason"], newest[0]["last_seen"]) == (3, "untrusted-stream", 5001.0)
    assert store.stranger_totals() == StrangerTotals(refused=3002, peers=3000, since=1000.0, last_at=5001.0)
    store.record_strangers([], keep=20, unnamed_refused=5, unnamed_peers=4)
    assert store.stranger_totals().refused == 3007 and store.stranger_totals().peers == 3004
    assert store.neighbours() == []
    with pytest.raises(ValueError, match="keep"):
        store.record_strangers([], keep=0)
    store.close()


def test_last_seen_is_written_at_most_every_interval_and_shown_newest(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite")
    store.upsert_neighbour("p1", name="one")

    def written() -> float | None:
        return store.db.execute("SELECT last_seen FROM neighbours WHERE peer_id = 'p1'").fetchone()[0]

    store.note_seen("p1", 1000.0)
    assert written() == 1000.0  # the first time heard from goes to the table at once
    store.note_seen("p1", 1000.0 + SEEN_WRITE_INTERVAL - 1)
    store.note_seen("p1", 1000.0 + 2)  # out of order: never moves the time back
    assert written() == 1000.0
    assert store.neighbours()[0]["last_seen"] == 1000.0 + SEEN_WRITE_INTERVAL - 1
    store.note_seen("p1", 1000.0 + SEEN_WRITE_INTERVAL)
    assert written() == 1000.0 + SEEN_WRITE_INTERVAL
    store.note_seen("p2", 5.0)  # a neighbour without a row gets one
    store.note_seen("p2", 6.0)
    store.close()  # what was not written yet is written on close
    again = Store(tmp_path / "store.sqlite")
    rows = {r["peer_id"]: r for r in again.neighbours()}
    assert {p: r["last_seen"] for p, r in rows.items()} == {"p1": 1000.0 + SEEN_WRITE_INTERVAL, "p2": 6.0}
    assert rows["p1"]["name"] == "one"


def test_replay_marks_keep_uint64_order_and_only_rise(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite")
    a, b = b"\x01" * 32, b"\x02" * 32
    store.note_replay_mark(a, 3, 7)
    store.note_replay_mark(a, 2, 99)  # older: the mark never goes down
    store.note_replay_mark(b, 0, 2**64 - 1)  # the last sequence of round 0: the mark is round 1's first
    store.note_replay_mark(b, 0, 5)
    assert store.replay_marks() == {a: (3, 8), b: (1, 0)}
    store.note_replay_mark(a, 2**63 + 5, 2**63)  # beyond int64: still ordered, nothing overflows
    assert store.replay_marks()[a] == (2**63 + 5, 2**63 + 1)
    store.close()


def test_replay_marks_written_before_the_uint64_form_read_back_the_same(tmp_path: Path) -> None:
    import sqlite3

    import sqlite_utils

    path = tmp_path / "store.sqlite"
    db = sqlite_utils.Database(sqlite3.connect(path))
    for migration in MIGRATIONS[:5]:  # a store as schema 5 left it: marks in plain form
        migration(db)
    db.execute("PRAGMA user_version=5")
    db.execute("INSERT INTO replay_marks (sender, round, sequence) VALUES (?, 4, 9)", ["01" * 32])
    db.conn.commit()
    db.conn.close()
    store = Store(path)
    assert store.schema_version == len(MIGRATIONS)
    assert store.replay_marks() == {b"\x01" * 32: (4, 9)}
    store.close()


def test_rounds_recorded_before_undelivered_existed_read_back_with_an_empty_list(tmp_path: Path) -> None:
    import sqlite3

    import sqlite_utils

    path = tmp_path / "store.sqlite"
    db = sqlite_utils.Database(sqlite3.connect(path))
    for migration in MIGRATIONS[:6]:  # a store as schema 6 left it
        migration(db)
    db.execute("PRAGMA user_version=6")
    db.execute("INSERT INTO rounds (round, status, contributors, skipped) VALUES (0, 'done', '[\"p1\"]', '[]')")
    db.conn.commit()
    db.conn.close()
    store = Store(path)
    store.record_round(1, status="done", contributors=["p1"], skipped=[],
                       undelivered=[{"peer": "p1", "reason": "unreachable: refused by the neighbour: BAD_ROUND"}])
    old, new = store.rounds()
    assert (old["contributors"], old["skipped"], old["undelivered"]) == (["p1"], [], [])
    assert new["undelivered"] == [{"peer": "p1", "reason": "unreachable: refused by the neighbour: BAD_ROUND"}]
    store.close()
