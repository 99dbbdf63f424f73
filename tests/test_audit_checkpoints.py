"""When the writer signs tree heads: by count, by time, at a clean stop; and what a crash leaves unsigned.

The policy (docs/AUDIT.md, "Merkle tree and signed checkpoints"): a head as soon as
``CHECKPOINT_EVERY`` entries are uncovered, every ``CHECKPOINT_SECONDS`` while any are,
at each round end and when the peer stops. A crash therefore leaves at most
``CHECKPOINT_EVERY - 1`` entries unsigned, all written in the last ``CHECKPOINT_SECONDS``.
Time runs on trio's MockClock; "a crash" is reading the store file from another
connection at that moment, without stopping anything.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
import trio.testing
from memnet import MemoryNetwork, StartTogether
from peerkit import configs, identity

from silomesh.audit.entries import CHECKPOINT_EVERY, CHECKPOINT_SECONDS
from silomesh.audit.logfile import load_log
from silomesh.audit.verify import verify_log
from silomesh.peer.audit import AuditLog, serve_checkpoints
from silomesh.peer.context import InlineCompute
from silomesh.peer.daemon import Peer
from silomesh.peer.store import Store

A, B = identity("checkpoint-a"), identity("checkpoint-b")
Clock = trio.testing.MockClock


def _append(log: AuditLog, n: int = 1) -> None:
    for _ in range(n):
        log.append("refused", B.peer_id_text, "connection", reason="untrusted-connection")


async def _at(when: float) -> None:
    """Sleep until ``when``, then let every task woken at that same instant run first."""
    await trio.sleep_until(when)
    for _ in range(3):
        await trio.lowlevel.checkpoint()


def _on_disk(path: Path) -> tuple[int, int]:
    """(entries, size of the latest signed head) as another reader of the file sees them now."""
    loaded = load_log(path)
    return len(loaded.entries), max((h.size for h in loaded.checkpoints), default=0)


def test_a_head_is_signed_as_soon_as_checkpoint_every_entries_are_uncovered(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite")
    log = AuditLog(store, A.signing_key, checkpoint_every=8)
    _append(log, 7)
    assert (log.uncovered, log.heads()) == (7, [])
    _append(log)
    assert [h.size for h in log.heads()] == [8] and log.uncovered == 0
    _append(log, 12)
    assert [h.size for h in log.heads()] == [8, 16] and log.uncovered == 4
    store.close()
    assert _on_disk(tmp_path / "store.sqlite") == (20, 16)
    assert verify_log(load_log(tmp_path / "store.sqlite")).ok


def test_default_policy_is_the_documented_one() -> None:
    assert (CHECKPOINT_EVERY, CHECKPOINT_SECONDS) == (64, 60.0)
    text = (Path(__file__).resolve().parent.parent / "docs" / "AUDIT.md").read_text()
    assert "at most 63 entries" in text and "60 seconds" in text
    with pytest.raises(ValueError, match="checkpoint_every"):
        AuditLog(None, A.signing_key, checkpoint_every=0)  # type: ignore[arg-type]


async def test_a_crash_at_any_moment_leaves_at_most_the_documented_window_unsigned(
    tmp_path: Path, autojump_clock: Clock
) -> None:
    every, seconds = 8, CHECKPOINT_SECONDS
    path = tmp_path / "store.sqlite"
    store = Store(path)
    log = AuditLog(store, A.signing_key, checkpoint_every=every)
    written: list[float] = []  # virtual time at which each entry was appended
    rng = random.Random(16)
    worst = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_checkpoints, log, seconds)
        for _ in range(400):
            if rng.random() < 0.3:  # a burst of exchanges
                for _ in range(rng.randint(1, 2 * every)):
                    _append(log)
                    written.append(trio.current_time())
            else:  # a quiet spell: idle-waiting for late neighbours, or between rounds
                await trio.sleep(rng.choice([0.5, 7.0, 29.0, 59.0, 61.0, 150.0]))
            entries, covered = _on_disk(path)  # what a crash now would leave
            assert entries == len(written)
            unsigned = written[covered:]
            worst = max(worst, len(unsigned))
            assert len(unsigned) <= every - 1
            assert all(trio.current_time() - t <= seconds for t in unsigned), (covered, unsigned)
        nursery.cancel_scope.cancel()
    assert worst > 0, "the schedule never left a tail to check"
    store.close()  # no stop checkpoint here: a crash does not call one
    assert verify_log(load_log(path)).ok


async def test_an_idle_peer_signs_its_tail_within_checkpoint_seconds(tmp_path: Path, autojump_clock: Clock) -> None:
    store = Store(tmp_path / "store.sqlite")
    log = AuditLog(store, A.signing_key)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_checkpoints, log, CHECKPOINT_SECONDS)
        start = trio.current_time()
        _append(log, 3)
        await trio.sleep_until(start + CHECKPOINT_SECONDS - 0.001)
        assert log.uncovered == 3
        await _at(start + CHECKPOINT_SECONDS)
        assert log.uncovered == 0
        await trio.sleep(10 * CHECKPOINT_SECONDS)
        assert [h.size for h in log.heads()] == [3], "nothing new: no further head"
        nursery.cancel_scope.cancel()
    store.close()


async def test_a_clean_stop_leaves_no_entry_unsigned(tmp_path: Path, autojump_clock: Clock) -> None:
    net = MemoryNetwork()
    ids, cfgs = configs(tmp_path, 2, rounds=1, deadline=600.0, local_steps=1)
    peers = [
        Peer(
            c,
            identity=i,
            serve_control_api=False,
            transport=net.open,
            compute=InlineCompute(),
            faults=StartTogether(net, 2),
        )
        for i, c in zip(ids, cfgs, strict=True)
    ]
    with trio.fail_after(3600):
        async with trio.open_nursery() as nursery:
            for p in peers:
                await nursery.start(p.run)
            for p in peers:
                await p.done.wait()
            # after its last round a peer keeps answering late neighbours: entries no round end signs
            for p in peers:
                _append(p.audit_log, 2)
            unsigned = {p.peer_id: p.audit_log.uncovered for p in peers}
            nursery.cancel_scope.cancel()  # what SIGTERM does
    assert all(n >= 2 for n in unsigned.values()), unsigned
    for c in cfgs:
        loaded = load_log(c.data_dir / "store.sqlite")
        assert loaded.checkpoints[-1].size == len(loaded.entries)
        report = verify_log(loaded)
        assert report.ok, report.findings
        assert report.envelope_signatures_checked > 0


async def test_a_running_peer_signs_what_it_writes_after_its_last_round(tmp_path: Path, autojump_clock: Clock) -> None:
    net = MemoryNetwork()
    ids, cfgs = configs(tmp_path, 1, rounds=1, deadline=600.0, local_steps=1, neighbours=[[]])
    peer = Peer(cfgs[0], identity=ids[0], serve_control_api=False, transport=net.open, compute=InlineCompute())
    with trio.fail_after(3600):
        async with trio.open_nursery() as nursery:
            await nursery.start(peer.run)
            await peer.done.wait()
            written = trio.current_time()
            _append(peer.audit_log, 2)
            assert peer.audit_log.uncovered == 2
            await _at(written + CHECKPOINT_SECONDS)  # the peer idles for 600 s before it stops itself
            assert peer.audit_log.uncovered == 0
            assert peer.progress.phase == "done", "still running: the head came from the periodic task"
            nursery.cancel_scope.cancel()
