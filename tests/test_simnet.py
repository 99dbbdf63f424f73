"""End-to-end simnet runs: real peers (own keys, stores, libp2p hosts) on 127.0.0.1.

Tiny models, 16 training images per silo, 2 rounds of 3 steps: each run takes seconds.
Assertions are about what the peers did (rounds committed, audit logs, refusals), never
about wall-clock time or model quality.
"""

from __future__ import annotations

import json
import sqlite3
import tomllib
from pathlib import Path
from typing import Any

import pytest

from silomesh.simnet.coordinator import run_simnet
from silomesh.simnet.report import validate_report
from silomesh.simnet.scenario import make_scenario

pytestmark = pytest.mark.slow

SMALL = {
    "catheter": {"n_train": 16, "n_test": 8, "n_test_source": 8},
    "organs": {"n_train": 16, "n_test": 8},
    "lesion": {"n_train": 16, "n_test": 8},
}


def _run(out: Path, **settings: Any) -> dict[str, Any]:
    task = settings.get("task", "catheter")
    base = {"peers": 4, "rounds": 2, "size": "tiny", "local_steps": 3, "deadline": 20.0, "seed": 5,
            "task_options": SMALL[task], "timeout": 150.0, "out": str(out)}
    return run_simnet(make_scenario({**base, **settings}))


def _audit(path: str) -> list[sqlite3.Row]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return list(conn.execute("SELECT direction, peer, kind, reason FROM audit"))
    finally:
        conn.close()


@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run(tmp_path_factory.mktemp("fedavg") / "run", compare_local=True)


@pytest.mark.timeout(200)
def test_fedavg_run_completes_every_round_and_writes_all_outputs(fedavg_run: dict[str, Any]) -> None:
    r = fedavg_run
    out = Path(r["out"])
    assert r["round_success_rate"] == 1.0
    assert [h["completed"] for h in r["history"]] == [4, 4]
    # each peer of the 4-ring averaged both its neighbours in each round
    assert [(h["neighbours_used"], h["neighbours_skipped"]) for h in r["history"]] == [(8, 0), (8, 0)]
    assert "| 0 | 4/4 |" in (out / "report.md").read_text() and "| 8 / 0 |" in (out / "report.md").read_text()
    assert r["bytes_sent_total"] > 0 and all(h["bytes"] > 0 for h in r["history"])
    assert set(r["final"]["federated_per_peer"]) == {"p00", "p01", "p02", "p03"}
    assert {"local_only_mean", "local_only_best"} <= set(r["final"])
    assert r["final"]["local_only_best"] >= r["final"]["local_only_mean"]
    for name in ("report.json", "report.md", "metrics.sqlite", "metric_per_round.png", "bytes_per_round.png",
                 "topology.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "report.json").read_text()) == r
    # a round's steady CPU needs two marks (rounds 1 and 2): this run has two rounds, so none
    assert r["resources"]["steady_cpu_seconds_per_round"] is None
    assert all(list(p["cpu_round_marks"]) == ["1"] for p in r["resources"]["processes"])


@pytest.mark.timeout(200)
def test_report_json_validates_against_its_schema(fedavg_run: dict[str, Any]) -> None:
    assert validate_report(fedavg_run) == []
    broken = {**fedavg_run, "round_success_rate": 1.5}
    assert validate_report(broken)


@pytest.mark.timeout(200)
def test_every_peer_is_a_real_peer_with_its_own_key_trust_list_and_audit_log(fedavg_run: dict[str, Any]) -> None:
    detail = fedavg_run["peers_detail"]
    assert len({d["peer_id"] for d in detail}) == 4
    ids = {d["name"]: d["peer_id"] for d in detail}
    for d in detail:
        folder = Path(d["audit_log"]).parent
        assert (folder / "peer.key").stat().st_mode & 0o077 == 0
        config = tomllib.loads((folder / "peer.toml").read_text())
        assert config["listen"].startswith("/ip4/127.0.0.1/tcp/")
        assert sorted(t["peer_id"] for t in config["trusted"]) == sorted(ids[n] for n in d["neighbours"])
        entries = _audit(d["audit_log"])
        sent_to = {e["peer"] for e in entries if e["direction"] == "sent"}
        received_from = {e["peer"] for e in entries if e["direction"] == "received"}
        assert sent_to == received_from == {ids[n] for n in d["neighbours"]}


@pytest.mark.timeout(200)
def test_metrics_db_holds_one_row_per_peer_round(fedavg_run: dict[str, Any]) -> None:
    conn = sqlite3.connect(Path(fedavg_run["out"]) / "metrics.sqlite")
    try:
        rows = conn.execute("SELECT peer, round, status, metric FROM peer_rounds").fetchall()
        local = conn.execute("SELECT count(*) FROM local_only").fetchone()[0]
    finally:
        conn.close()
    assert len(rows) == 8 and all(status == "done" and metric is not None for _, _, status, metric in rows)
    assert local == 8


@pytest.mark.timeout(200)
@pytest.mark.parametrize(("strategy", "task", "params"), [
    ("fedefm", "catheter", {"distill_steps": 2}),
    ("segviz", "organs", {}),
    ("fedmix", "lesion", {}),
    ("cyclic", "catheter", {}),
    ("cyclic", "lesion", {"commit": "lap_mean"}),
])
def test_strategy_runs_end_to_end(tmp_path: Path, strategy: str, task: str, params: dict[str, Any]) -> None:
    r = _run(tmp_path / "run", strategy=strategy, task=task, strategy_params=params)
    assert r["strategy"] == strategy and r["task"] == task
    assert r["round_success_rate"] == 1.0
    assert validate_report(r) == []
    assert r["faults"]["observed"]["peer_errors"] == 0
    contributors = [x for d in r["peers_detail"] for x in _audit(d["audit_log"]) if x["direction"] == "received"]
    assert contributors, "peers exchanged nothing"
    if params.get("commit") == "lap_mean":  # the lap tensors and count passed the wire checks
        refused = [dict(x) for d in r["peers_detail"] for x in _audit(d["audit_log"]) if x["direction"] == "refused"]
        assert refused == []
    if strategy == "fedefm":  # every committed round records its largest expert weight, in [1/n, 1]
        from types import SimpleNamespace

        from silomesh.simnet.evaluations import eval_expert_weights
        from silomesh.simnet.stores import read_store

        names = [d["name"] for d in r["peers_detail"]]
        seen = []
        for name in names:
            rec = read_store(Path(r["out"]) / "peers" / name / "store.sqlite")
            for row in rec.rounds:
                if row["status"] == "done" and row["contributors"]:
                    w = rec.metrics[row["round"]]["expert_weight_max"]
                    assert 1 / len(row["contributors"]) - 1e-9 <= w <= 1.0, (name, row, w)
                    seen.append(w)
        assert seen
        run = SimpleNamespace(report=r, peer_names=names)
        assert eval_expert_weights(run, {})["expert_weight_max"] == pytest.approx(sum(seen) / len(seen))  # type: ignore[arg-type]


@pytest.mark.timeout(200)
def test_fedavg_along_a_tree_gives_every_peer_the_mean_of_all_for_2_n_minus_1_updates(tmp_path: Path) -> None:
    """``--strategy-param reduce=tree``: simnet lays the peers out as the tree (index order),
    every peer's committed rounds hold all five models, and each round moves 2 (n - 1)
    updates where a full topology's gossip moves n (n - 1)."""
    from silomesh.simnet.scenario import ScenarioError

    r = _run(tmp_path / "run", peers=5, topology="full", strategy_params={"reduce": "tree"})
    assert r["round_success_rate"] == 1.0 and validate_report(r) == []
    assert r["faults"]["observed"]["refused_total"] == 0
    for d in r["peers_detail"]:
        conn = sqlite3.connect(f"file:{d['audit_log']}?mode=ro", uri=True)
        try:
            counts = [v for (v,) in conn.execute("SELECT value FROM metrics WHERE name = 'tree_count' ORDER BY round")]
            config = tomllib.loads(Path(d["config"]).read_text(encoding="utf-8"))
        finally:
            conn.close()
        assert counts == [5.0, 5.0], d["name"]
        assert config["strategy"]["params"]["order"] == [p["peer_id"] for p in r["peers_detail"]]
    received = [x for d in r["peers_detail"] for x in _audit(d["audit_log"]) if x["direction"] == "received"
                and x["kind"] == "update"]
    assert len(received) == 2 * 2 * (5 - 1)  # two rounds
    with pytest.raises(ScenarioError, match="does not connect peer 2 to its parent 0"):
        _run(tmp_path / "ring", peers=5, topology="ring", strategy_params={"reduce": "tree"})


@pytest.mark.timeout(240)
def test_faults_crash_restart_drop_and_intruder(tmp_path: Path) -> None:
    # every message waits 2 s, so round 1 is still running when the planned crash fires
    # (0.2-1.0 s into it); without the delay a fast machine could finish rounds 1 and 2
    # first and the crash would be skipped as due after the peer was done
    r = _run(tmp_path / "run", peers=5, rounds=3, deadline=6.0,
             faults="crash=1@1,restart=after:1,drop=0.05,delay=2s,intruder=1")
    faults = r["faults"]
    inj, obs = faults["injected"], faults["observed"]
    # the run completes, and the peers that did not crash completed (almost) every round
    assert obs["round_success_rate_excluding_crashed"] >= 0.9
    # the crashed peer came back from its store and finished
    assert inj["crashes"] == 1 and inj["restarts"] == 1
    (crash,) = faults["crashes"]
    assert crash["resumed_round"] == crash["committed_before"]
    assert obs["recovered_peers"] == 1
    assert r["peers_detail"][crash["peer"]]["rounds_completed"] == 3
    # every intruder connection was refused, nothing it sent was accepted or answered
    intruder_ids = {i["peer_id"] for i in faults["intruders"]}
    assert inj["intruder_attempts"] >= 2 and inj["intruder_connections"] >= 1
    refused = received = 0
    for d in r["peers_detail"]:
        for e in _audit(d["audit_log"]):
            if e["peer"] in intruder_ids:
                refused += e["direction"] == "refused"
                received += e["direction"] == "received"
    assert refused >= inj["intruder_connections"]
    assert received == 0 and obs["intruder_messages_accepted"] == 0 and inj["intruder_answers"] == 0
    assert obs["refused_from_intruders"] == refused
    assert validate_report(r) == []


@pytest.mark.timeout(240)
def test_peers_spread_over_two_processes_still_federate(tmp_path: Path) -> None:
    r = _run(tmp_path / "run", procs=2)
    assert r["round_success_rate"] == 1.0
    assert len(r["resources"]["processes"]) == 2
    assert {d["share"] for d in r["peers_detail"]} == {0, 1}
    by_name = {d["name"]: d for d in r["peers_detail"]}
    p0, p1 = by_name["p01"], by_name["p02"]  # ring neighbours in different processes
    assert p0["share"] != p1["share"]
    assert p1["peer_id"] in {e["peer"] for e in _audit(p0["audit_log"]) if e["direction"] == "received"}


@pytest.mark.timeout(240)
def test_faults_partition_delay_and_nan_byzantine_are_counted_on_both_sides(tmp_path: Path) -> None:
    r = _run(tmp_path / "run", rounds=3, deadline=5.0, faults="partition=1-1,delay=20ms-50ms,byzantine=1:nan")
    inj, obs = r["faults"]["injected"], r["faults"]["observed"]
    assert r["round_success_rate"] == 1.0
    # the cut of a 4-ring into {p00, p01} | {p02, p03} has two edges: 4 messages a round, each
    # recorded by its sender as undelivered; a receiver skips the sender unless a later model
    # of it came within the round (then it is used): of each cut edge's two ends, the one not
    # ahead of the other waits for a model that never comes, so at least one skip an edge
    assert inj["partitioned_messages"] == 4 and obs["partition_undelivered"] == 4
    assert 2 <= obs["partition_skips"] <= 4
    # every round was committed by all four: the rounds' skips are all the skips, and each peer
    # either used or skipped each of its two neighbours
    assert sum(h["neighbours_skipped"] for h in r["history"]) == obs["skipped_neighbours"] >= 4
    assert all(h["neighbours_used"] + h["neighbours_skipped"] == 8 for h in r["history"])
    assert inj["delayed_messages"] > 0 and inj["delay_ms_total"] >= 20 * inj["delayed_messages"]
    # NaN models never leave the byzantine peer: its own envelope sealing refuses them
    assert inj["poisoned_models_nan"] > 0
    assert obs["poisoned_refused_at_source"] > 0 and obs["byzantine_contributions_used"] == 0
    (byz,) = inj["byzantine_peers"]
    byz_id = next(d["peer_id"] for d in r["peers_detail"] if d["name"] == byz)
    updates_from_byz = [e for d in r["peers_detail"] for e in _audit(d["audit_log"])
                        if e["peer"] == byz_id and e["direction"] == "received" and e["kind"] == "update"]
    assert updates_from_byz == []


@pytest.mark.timeout(200)
def test_personal_models_are_reported_and_paired_per_silo_against_the_silo_alone(tmp_path: Path) -> None:
    from silomesh.simnet.evaluations import evaluate_run

    r = _run(tmp_path / "run", peers=3, personal_steps=2, compare_local=True)
    validate_report(r)
    assert set(r["final"]["personal_per_peer"]) == set(r["final"]["federated_per_peer"]) == {"p00", "p01", "p02"}
    assert r["final"]["local_only_steps"] == 2 * 3 + 2  # the silo alone gets the personal steps too
    scenario = make_scenario({"peers": 3, "rounds": 2, "size": "tiny", "local_steps": 3, "seed": 5,
                              "task_options": SMALL["catheter"], "personal_steps": 2, "out": r["out"]})
    metrics = evaluate_run(["per_silo"], scenario, r, {})
    assert all(f"gain_personal_own_{i}" in metrics for i in range(3))
    assert metrics["silos_paired"] == 3
