"""Audit logs written by real peers: they verify, carry a signed head per round, end
covered by a head after a clean stop, hold no weights, and reconcile across peers —
finding a dropped and an altered receive."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
from click.testing import CliRunner, Result
from peerkit import configs

from silomesh.audit.cli import audit
from silomesh.audit.logfile import load_log
from silomesh.audit.proofs import check_consistency, check_inclusion, consistency, inclusion
from silomesh.audit.reconcile import reconcile
from silomesh.peer.daemon import Peer
from silomesh.peer.store import Store
from silomesh.protocol.envelope import HEADER_KEYS
from silomesh.protocol.wire import unpack_map

pytestmark = pytest.mark.slow

ROUNDS = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Three peers (each trusting the other two) run two fedavg rounds on tiny catheter data."""
    root = tmp_path_factory.mktemp("audit-peers")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    ids, cfgs = configs(root, 3, rounds=ROUNDS, deadline=30.0, local_steps=1)
    peers = [Peer(c, identity=i, serve_control_api=False) for i, c in zip(ids, cfgs, strict=True)]

    async def main() -> None:
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for p in peers:
                    await nursery.start(p.run)
                for p in peers:
                    await p.done.wait()
                nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        torch.set_num_threads(before)
    yield {"root": root, "ids": ids, "stores": [c.data_dir / "store.sqlite" for c in cfgs]}


def _cli(*args: object) -> Result:
    return CliRunner().invoke(audit, [str(a) for a in args], catch_exceptions=False)


def test_every_peer_log_verifies_against_its_pinned_key(run: dict[str, Any]) -> None:
    for ident, store in zip(run["ids"], run["stores"], strict=True):
        result = _cli("verify", store, "--key", ident.public_key.hex(), "--json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        assert report["peer_id"] == ident.peer_id_text
        assert report["envelope_signatures_checked"] > 0


def test_each_round_end_signed_a_tree_head(run: dict[str, Any]) -> None:
    for ident, store in zip(run["ids"], run["stores"], strict=True):
        log = load_log(store)
        assert len(log.checkpoints) >= ROUNDS
        assert all(h.peer_id == ident.peer_id_text and h.verify() for h in log.checkpoints)
        first, last = log.checkpoints[0], log.checkpoints[-1]
        assert check_consistency(consistency(log, first.size, last.size)) == []
        received = next(e for e in log.entries if e["direction"] == "received" and e["kind"] == "update")
        assert check_inclusion(inclusion(log, received["seq"]), last) == []


def test_after_a_clean_stop_the_latest_head_covers_the_whole_log(run: dict[str, Any]) -> None:
    # here the last round end already covers everything; test_audit_checkpoints.py stops peers with a tail
    for store in run["stores"]:
        log = load_log(store)
        assert log.checkpoints[-1].size == len(log.entries) > 0
        result = _cli("head", store)
        assert json.loads(result.stdout)["size"] == len(log.entries) and result.stderr == ""


def test_the_log_holds_digests_and_headers_never_weights(run: dict[str, Any]) -> None:
    store = Store(run["stores"][0])
    try:
        latest = store.latest_model()
        assert latest is not None
        weights = store.load_model(latest.digest)
        model_bytes = sum(a.nbytes for a in weights.values())
        probe = next(a for a in weights.values() if a.size >= 16).tobytes()[:32].hex()
    finally:
        store.close()
    conn = sqlite3.connect(run["stores"][0])
    conn.row_factory = sqlite3.Row
    rows = [dict(r) for r in conn.execute("SELECT * FROM audit")]
    checkpoints = [dict(r) for r in conn.execute("SELECT * FROM checkpoints")]
    conn.close()
    assert rows and any(r["size"] > 100_000 for r in rows)  # large updates were exchanged ...
    cells = [v for r in rows + checkpoints for v in r.values()]
    assert max(len(str(v)) for v in cells) <= 1024  # ... and nothing large was kept of them
    assert sum(len(str(v)) for v in cells) < model_bytes
    assert not any(probe in str(v) for v in cells)
    for r in rows:
        if r["envelope_header"]:
            header = unpack_map(bytes.fromhex(r["envelope_header"]), what="header", max_size=1024)
            assert set(header) == set(HEADER_KEYS)
            assert all(len(v) <= 32 for v in header.values() if isinstance(v, bytes))


def test_reconcile_of_untouched_logs_matches_every_send(run: dict[str, Any]) -> None:
    report = reconcile([load_log(p) for p in run["stores"]])
    assert report.ok, report.discrepancies
    assert report.matched > 0 and report.unchecked_sends == 0


def test_reconcile_finds_a_dropped_and_an_altered_receive(run: dict[str, Any], tmp_path: Path) -> None:
    p0, p1, p2 = (i.peer_id_text for i in run["ids"])
    copy = tmp_path / "p1" / "store.sqlite"
    copy.parent.mkdir()
    src, dst = sqlite3.connect(run["stores"][1]), sqlite3.connect(copy)
    src.backup(dst)
    src.close()
    conn = dst
    conn.row_factory = sqlite3.Row
    dropped = dict(
        conn.execute(
            "SELECT * FROM audit WHERE direction = 'received' AND peer = ? AND kind = 'update' ORDER BY seq LIMIT 1",
            [p0],
        ).fetchone()
    )
    altered = dict(
        conn.execute(
            "SELECT * FROM audit WHERE direction = 'received' AND peer = ? AND kind = 'update' "
            "ORDER BY seq DESC LIMIT 1",
            [p2],
        ).fetchone()
    )
    with conn:
        conn.execute("DELETE FROM audit WHERE seq = ?", [dropped["seq"]])
        conn.execute("UPDATE audit SET payload_digest = ? WHERE seq = ?", ["ee" * 32, altered["seq"]])
    conn.close()

    logs = [load_log(run["stores"][0]), load_log(copy), load_log(run["stores"][2])]
    sent_by = {
        (log.writer_peer_id, e["envelope_sig"]): e["seq"]
        for log in logs
        for e in log.entries
        if e["direction"] == "sent"
    }
    report = reconcile(logs)
    got = {(d.code, d.sender, d.recipient, d.sender_entry, d.recipient_entry) for d in report.discrepancies}
    assert got == {
        ("unmatched-send", p0, p1, sent_by[(p0, dropped["envelope_sig"])], None),
        ("digest-mismatch", p2, p1, sent_by[(p2, altered["envelope_sig"])], altered["seq"]),
    }
    mismatch = next(d for d in report.discrepancies if d.code == "digest-mismatch")
    assert "the receiver's record is wrong" in mismatch.detail

    result = _cli("reconcile", run["stores"][0], copy, run["stores"][2], "--json")
    assert result.exit_code == 1
    assert {d["code"] for d in json.loads(result.output)["discrepancies"]} == {"unmatched-send", "digest-mismatch"}
    # and the altered copy no longer verifies, at exactly the entries touched
    verdict = json.loads(_cli("verify", copy, "--json").output)
    assert {f["entry"] for f in verdict["findings"] if f["entry"] is not None} == {dropped["seq"], altered["seq"]}
