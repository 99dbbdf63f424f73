"""Operator methods added for the dashboard, against real peers: audit entries, verify, bytes received."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_peer_operator import make_peers, running

from silomesh.peer.operator import OperatorError

pytestmark = pytest.mark.slow


async def test_audit_lists_newest_first_verifies_and_rounds_count_bytes_received(tmp_path: Path) -> None:
    peers = make_peers(tmp_path, participation=["auto", "auto"], rounds=1, deadline=30.0)
    a, _b = peers
    async with running(peers):
        await a.done.wait()
        entries = await a.operator.audit(5)
        report = await a.operator.verify_audit()
        rounds = await a.operator.rounds()
        with pytest.raises(OperatorError):
            await a.operator.audit(0)
    seqs = [e["seq"] for e in entries]
    assert seqs == sorted(seqs, reverse=True) and len(seqs) == 5
    assert "envelope_header" not in entries[0]
    assert report["ok"] is True and report["summary"].startswith("OK") and report["peer_id"] == a.peer_id
    assert rounds[0]["bytes_received"] > 0
