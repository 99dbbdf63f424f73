"""A peer's privacy budget, end to end: real peers on 127.0.0.1 train with DP-SGD, log each
round's spending in their signed audit logs, stop when the budget is spent, and an auditor
recomputes the spending from the logs alone."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner
from peerkit import configs

from silomesh.audit.cli import audit
from silomesh.audit.privacy import PRIVACY_KIND, SpendingRecord, check_spending, epsilon
from silomesh.audit.verify import verify_chain
from silomesh.models.privacy import DPSettings, DPTrainer
from silomesh.peer.config import StrategyConfig
from silomesh.peer.daemon import Peer
from silomesh.peer.privacy import PHASE_EXHAUSTED

SIGMA = 1.5
N_TRAIN, BATCH = 16, 8  # peerkit's tiny catheter silos: q = 0.5


def _target_for(steps_ok: int, steps_too_many: int) -> float:
    """A target that pays for ``steps_ok`` steps but not ``steps_too_many``."""
    dp = DPTrainer(DPSettings(target_epsilon=1e6, noise_multiplier=SIGMA), N_TRAIN, BATCH)
    lo, hi = dp.epsilon_after(steps_ok), dp.epsilon_after(steps_too_many)
    assert lo < hi
    return (lo + hi) / 2


async def _run(peers: list[Peer]) -> dict[str, Any]:
    seen = {}
    async with trio.open_nursery() as nursery:
        for p in peers:
            await nursery.start(p.run)
        for p in peers:
            await p.done.wait()
        for p in peers:
            seen[p.peer_id] = {"rounds": await p.operator.rounds(), "status": await p.operator.status(),
                               "audit": p.audit_log.entries(), "phase": p.progress.phase}
        nursery.cancel_scope.cancel()
    return seen


@pytest.mark.slow
async def test_peer_stops_at_its_budget_and_an_auditor_recomputes_its_spending(tmp_path: Path) -> None:
    target = _target_for(4, 6)  # 2 rounds of 2 local steps fit, a third does not
    ids, cfgs = configs(tmp_path, 2, rounds=5, local_steps=2,
                        extra={"privacy": {"target_epsilon": target, "noise_multiplier": SIGMA, "delta": 1e-5}})
    peers = [Peer(c, identity=i, serve_control_api=False) for i, c in zip(ids, cfgs, strict=True)]
    with trio.fail_after(180):
        seen = await _run(peers)
    for p in peers:
        got = seen[p.peer_id]
        assert [r["round"] for r in got["rounds"] if r["status"] == "done"] == [0, 1]
        assert got["phase"] == PHASE_EXHAUSTED
        status = got["status"]["privacy"]
        assert status["exhausted"] and "budget spent" in status["reason"]
        assert status["epsilon_spent"] <= target and status["steps"] == 4
        spends = [e for e in got["audit"] if e["kind"] == PRIVACY_KIND]
        assert [e["round"] for e in spends] == [0, 1] and all(e["direction"] == "local" for e in spends)
        for spend in spends:  # logged before the round's model left the peer: a crash cannot hide it
            sends = [e["seq"] for e in got["audit"]
                     if e["direction"] == "sent" and e["kind"] == "update" and e["round"] == spend["round"]]
            assert sends and spend["seq"] < min(sends)
        assert verify_chain(got["audit"], p.identity.public_key) == []
        report = check_spending(got["audit"])
        assert report.ok, report.problems
        assert report.epsilon_total == pytest.approx(status["epsilon_spent"], abs=1e-4)
        # the CLI an auditor runs, on the peer's store
        result = CliRunner().invoke(audit, ["privacy", str(p.config.store), "--key", p.peer_id])
        assert result.exit_code == 0, result.output
        assert "OK" in result.output


@pytest.mark.slow
async def test_fedefm_training_a_neighbours_model_is_logged_in_our_spending(tmp_path: Path) -> None:
    ids, cfgs = configs(tmp_path, 2, strategy="fedefm", rounds=1, local_steps=2,
                        extra={"privacy": {"target_epsilon": 50.0, "noise_multiplier": SIGMA}})
    cfgs = [dataclasses.replace(c, strategy=StrategyConfig("fedefm", {"local_steps": 2, "distill_steps": 2}))
            for c in cfgs]
    peers = [Peer(c, identity=i, serve_control_api=False) for i, c in zip(ids, cfgs, strict=True)]
    with trio.fail_after(180):
        seen = await _run(peers)
    for p in peers:
        got = seen[p.peer_id]
        steps = sum(SpendingRecord.from_reason(e["reason"]).steps for e in got["audit"] if e["kind"] == PRIVACY_KIND)
        # 2 steps training the neighbour's copy on our data + 2 distillation steps on our data
        assert steps == got["status"]["privacy"]["steps"] == 4
        assert check_spending(got["audit"]).ok


def _entry(seq: int, rec: SpendingRecord) -> dict[str, Any]:
    return {"seq": seq, "round": seq, "direction": "local", "kind": PRIVACY_KIND, "reason": rec.to_reason()}


def test_auditor_epsilon_equals_the_peers_accountant() -> None:
    dp = DPTrainer(DPSettings(target_epsilon=1e6, noise_multiplier=0.9), 200, 10)
    assert epsilon([(0.9, 0.05, 30), (0.9, 0.05, 20)], 1e-5) == pytest.approx(dp.epsilon_after(50), rel=1e-9)


def test_auditor_finds_an_understated_round_and_a_total_past_the_target() -> None:
    e1 = epsilon([(1.0, 0.1, 50)], 1e-5)
    e2 = epsilon([(1.0, 0.1, 100)], 1e-5)
    honest = [_entry(1, SpendingRecord(50, 1.0, 0.1, e1, e1, 1e-5, 10.0)),
              _entry(2, SpendingRecord(50, 1.0, 0.1, e1, e2, 1e-5, 10.0))]
    assert check_spending(honest).ok
    understated = [honest[0], _entry(2, SpendingRecord(50, 1.0, 0.1, e1, e1, 1e-5, 10.0))]
    assert any("cumulative epsilon logged" in p for p in check_spending(understated).problems)
    over = [_entry(1, SpendingRecord(50, 1.0, 0.1, e1, e1, 1e-5, e1 / 2))]
    assert any("exceeds the target" in p for p in check_spending(over).problems)
    raised = [honest[0], _entry(2, SpendingRecord(50, 1.0, 0.1, e1, e2, 1e-5, 20.0))]
    assert any("target changed" in p for p in check_spending(raised).problems)
    for bad in ("Infinity", "NaN"):  # an infinite target would let any spending pass
        text = SpendingRecord(50, 1.0, 0.1, e1, e1, 1e-5, 10.0).to_reason().replace("10.0", bad)
        with pytest.raises(ValueError, match="finite"):
            SpendingRecord.from_reason(text)
