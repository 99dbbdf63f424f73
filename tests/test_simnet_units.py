"""Fast unit tests of simnet's pure parts: topologies, the fault grammar, scenarios, reports."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from silomesh.peer.config import PersonalConfig, parse_config
from silomesh.simnet.cli import simnet
from silomesh.simnet.faultspec import (
    FaultPlan,
    FaultSpec,
    FaultSpecError,
    Restart,
    parse_fault_table,
    parse_faults,
    plan_faults,
)
from silomesh.simnet.hooks import poison
from silomesh.simnet.plan import Plan, build_plan, toml_dumps
from silomesh.simnet.report import report_schema, validate, validate_report
from silomesh.simnet.results import CrashEvent, ShareResult, SlotResult
from silomesh.simnet.scenario import Scenario, ScenarioError, load_scenario, make_scenario
from silomesh.simnet.stores import committed_rounds, read_store
from silomesh.simnet.topology import Topology, TopologyError, build_topology

# -- topologies --------------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 4, 7, 48])
def test_ring_gives_every_peer_two_neighbours(n: int) -> None:
    top = build_topology("ring", n)
    assert top.degrees == [2] * n
    assert len(top.edges) == n
    assert top.is_connected()


def test_ring_of_two_is_one_edge() -> None:
    assert build_topology("ring", 2).edges == ((0, 1),)


@pytest.mark.parametrize(("n", "k"), [(8, 4), (8, 3), (10, 6), (6, 5), (48, 4)])
def test_regular_k_gives_degree_k(n: int, k: int) -> None:
    top = build_topology(f"regular:{k}", n)
    assert top.degrees == [k] * n
    assert top.is_connected()


def test_regular_with_odd_degree_and_odd_peers_is_refused() -> None:
    with pytest.raises(TopologyError, match="even number of peers"):
        build_topology("regular:3", 7)



def test_tree_links_each_peer_to_its_parent_only_and_stays_connected() -> None:
    top = build_topology("tree", 7)
    assert top.edges == ((0, 1), (0, 2), (1, 3), (1, 4), (2, 5), (2, 6))
    assert top.is_connected() and top.degrees == [2, 3, 3, 1, 1, 1, 1]
    wide = build_topology("tree:3", 5)
    assert wide.spec == "tree:3" and wide.neighbours[0] == [1, 2, 3] and wide.neighbours[1] == [0, 4]
    with pytest.raises(TopologyError, match="at least 2"):
        build_topology("tree:1", 5)
    with pytest.raises(TopologyError, match="bad number"):
        build_topology("tree:x", 5)

def test_full_links_everyone() -> None:
    top = build_topology("full", 6)
    assert top.degrees == [5] * 6
    assert len(top.edges) == 15


def test_smallworld_keeps_mean_degree_and_connectivity_and_is_seeded() -> None:
    a = build_topology("smallworld:4:0.3", 20, seed=1)
    b = build_topology("smallworld:4:0.3", 20, seed=1)
    c = build_topology("smallworld:4:0.3", 20, seed=2)
    assert a.edges == b.edges
    assert a.edges != c.edges
    assert sum(a.degrees) == 4 * 20
    assert a.is_connected()
    assert a.edges != build_topology("regular:4", 20).edges  # something was rewired


def test_topology_file_edge_list(tmp_path: Path) -> None:
    f = tmp_path / "star.txt"
    f.write_text("# a star\n0 1\n0 2\n0,3\n", encoding="utf-8")
    top = build_topology(str(f), 4)
    assert top.degrees == [3, 1, 1, 1]
    js = tmp_path / "line.json"
    js.write_text(json.dumps({"edges": [[0, 1], [1, 2]]}), encoding="utf-8")
    assert build_topology(str(js), None).degrees == [1, 2, 1]


def test_topology_file_naming_a_missing_peer_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "bad.txt"
    f.write_text("0 1\n1 5\n", encoding="utf-8")
    with pytest.raises(TopologyError, match="only 4 peers"):
        build_topology(str(f), 4)


def test_topology_round_trips_through_json() -> None:
    top = build_topology("smallworld:4:0.3", 12, seed=4)
    assert Topology.from_json(json.loads(json.dumps(top.to_json()))) == top


@pytest.mark.parametrize("spec", ["ring:3", "regular", "regular:x", "nosuch", "regular:9"])
def test_bad_topology_specs_are_refused(spec: str) -> None:
    with pytest.raises(TopologyError):
        build_topology(spec, 8)


# -- fault grammar -----------------------------------------------------------------------


def test_fault_spec_accepts_the_documented_example() -> None:
    spec = parse_faults("crash=0.1,restart=after:2,drop=0.05,delay=200ms,partition=3-5,"
                        "byzantine=2:noise,intruder=1")
    assert spec == FaultSpec(crash=0.1, restart=Restart("rounds", 2.0), drop=0.05, delay=(0.2, 0.2),
                             partition=(3, 5), byzantine=2.0, byzantine_mode="noise", intruders=1)


@pytest.mark.parametrize("text", [
    "none", "", "crash=2@1", "restart=after:1.5s,crash=1", "delay=100ms-1s", "byzantine=0.25:nan",
    "byzantine=1:scale", "drop=0", "drop=1", "partition=0-0", "intruder=3",
])
def test_fault_spec_round_trips_through_its_canonical_text(text: str) -> None:
    spec = parse_faults(text)
    assert parse_faults(spec.to_text()) == spec


@pytest.mark.parametrize("text", ["none", "crash=2@1,restart=after:1.5s", "crash=0.25,restart=after:2,drop=0.1",
                                  "delay=100ms-1s,partition=0-1,byzantine=0.25:nan,intruder=3"])
def test_fault_spec_round_trips_through_json(text: str) -> None:
    spec = parse_faults(text)
    assert FaultSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


def test_fault_table_parses_to_the_same_spec_as_the_string_form() -> None:
    table = {"crash": 0.25, "restart": "after:1", "drop": 0.05, "delay": "200ms", "partition": "1-2",
             "byzantine": "1:scale", "intruder": 1}
    assert parse_fault_table(table) == parse_faults(
        "crash=0.25,restart=after:1,drop=0.05,delay=200ms,partition=1-2,byzantine=1:scale,intruder=1")
    assert parse_fault_table({}) == FaultSpec()


@pytest.mark.parametrize(("table", "message"), [
    ({"drop": True}, "faults.drop: expected a number or string, got a boolean"),
    ({"drop": [0.1]}, "faults.drop: expected a number or string"),
    ({"drop": 2}, "probability must be in"),
    ({"restart": "after:1"}, "needs crash"),
])
def test_fault_table_rejects_bad_values_naming_the_key(table: dict[str, object], message: str) -> None:
    with pytest.raises(FaultSpecError, match=message):
        parse_fault_table(table)


@pytest.mark.parametrize(("text", "message"), [
    ("explode=1", "unknown fault 'explode'"),
    ("drop=1.5", "probability must be in"),
    ("drop=often", "not a probability"),
    ("delay=200", "give a unit"),
    ("delay=2s-1s", "upper end is below"),
    ("partition=5-3", "last round is before"),
    ("partition=3", "round range"),
    ("byzantine=1:evil", "mode must be one of"),
    ("crash=1.5", "whole count"),
    ("crash=0", "fraction"),
    ("crash=1,crash=2", "given twice"),
    ("restart=after:2", "needs crash"),
    ("crash=1,restart=sometimes", "restart=never"),
    ("drop", "NAME=VALUE"),
    ("drop=0.1,,delay=1s", "empty item"),
])
def test_fault_spec_rejects_bad_items_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(FaultSpecError, match=message):
        parse_faults(text)


def test_fault_plan_is_seeded_and_resolves_amounts() -> None:
    spec = parse_faults("crash=0.25,restart=after:1,byzantine=2:scale,intruder=2,partition=1-2")
    a = plan_faults(spec, 8, 4, seed=3)
    assert a == plan_faults(spec, 8, 4, seed=3)
    assert len(a.crashes) == 2
    assert all(1 <= c.round <= 2 for c in a.crashes)
    assert len(a.byzantine) == 2 and set(a.byzantine.values()) == {"scale"}
    assert not {c.peer for c in a.crashes} & set(a.byzantine)
    assert len(a.intruders) == 2 and all(len(i.targets) == 2 for i in a.intruders)
    assert a.partition_side == (0, 1, 2, 3)
    assert FaultPlan.from_json(json.loads(json.dumps(a.to_json()))) == a


def test_fault_plan_refuses_rounds_that_do_not_exist() -> None:
    with pytest.raises(FaultSpecError, match=r"rounds are 0\.\.2"):
        plan_faults(parse_faults("partition=3-5"), 4, 3, seed=0)


def test_poison_modes_change_floats_only() -> None:
    state = {"w": np.ones((3, 3), np.float32), "n": np.array(7, np.int64)}
    rng = np.random.default_rng(0)
    assert np.all(poison(state, "scale", rng)["w"] == -10.0)
    assert np.isnan(poison(state, "nan", rng)["w"]).all()
    noisy = poison(state, "noise", rng)["w"]
    assert noisy.dtype == np.float32 and not np.allclose(noisy, 1.0)
    assert all(poison(state, m, rng)["n"] == 7 for m in ("scale", "nan", "noise"))


# -- scenarios and configs ---------------------------------------------------------------


def test_scenario_file_is_overridden_by_flags(tmp_path: Path) -> None:
    f = tmp_path / "s.toml"
    f.write_text('peers = 6\nstrategy = "fedefm"\nout = "runs/x"\n[faults]\ndrop = 0.1\n'
                 '[task_options]\nn_train = 8\n', encoding="utf-8")
    s = make_scenario(load_scenario(f), {"peers": 5, "seed": None, "task_options": {"n_test": 4}})
    assert (s.peers, s.strategy, s.faults) == (5, "fedefm", FaultSpec(drop=0.1))
    assert s.out == tmp_path / "runs" / "x"
    assert s.effective_task_options["n_train"] == 8 and s.effective_task_options["n_test"] == 4


@pytest.mark.parametrize(("layer", "message"), [
    ({"peers": 0}, "peers"), ({"procs": 9, "peers": 4}, "procs"), ({"rounds": "3"}, "rounds: expected int"),
    ({"faults": "drop=2"}, "probability"), ({"deadline": -1.0}, "deadline"), ({"bogus": 1}, "bogus"),
    ({"compare_local": 1}, "compare_local"), ({"personal_method": "fedrep"}, "personal_method"),
    ({"personal_lambda": -1}, "personal_lambda"), ({"personal_lambda": float("nan")}, "personal_lambda"),
    ({"codec": "topk", "topk": 0.7}, "topk:"), ({"codec": "topk", "topk_step": 0}, "topk_step"),
    ({"codec": "topk", "strategy": "cyclic"}, "codec: topk is for"),
    ({"codec": "topk", "strategy_params": {"reduce": "tree"}}, "codec: topk does not fit"),
    ({"topk": 0.2}, 'topk: applies only with codec = "topk"'),
    ({"codec": "int4", "topk_step": 0.5}, "topk_step: applies"),
])
def test_bad_scenarios_are_refused_naming_the_setting(layer: dict[str, object], message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        make_scenario(layer)


def test_the_silo_alone_gets_as_many_more_steps_as_the_personal_model_had(tmp_path: Path) -> None:
    """A fine-tune (of the whole model or its head) has ``personal_steps``; Ditto's one model has
    had that many after every round. The plan hands method and lambda to every peer."""
    base = {"rounds": 4, "personal_steps": 3}
    assert make_scenario(base).personal_total_steps == 3
    assert make_scenario({**base, "personal_method": "head"}).personal_total_steps == 3
    ditto = make_scenario({**base, "personal_method": "ditto", "personal_lambda": 1})
    assert ditto.personal_total_steps == 12
    assert Scenario.from_json(json.loads(json.dumps(ditto.to_json()))) == ditto
    plan = build_plan(ditto, tmp_path / "run")
    config = parse_config(tomllib.loads(plan.peers[0].config_path.read_text(encoding="utf-8")), tmp_path)
    assert config.personal == PersonalConfig(3, None, "ditto", 1.0)


def test_the_scenario_example_in_the_docs_is_valid(tmp_path: Path) -> None:
    doc = (Path(__file__).parents[1] / "docs" / "SIMNET.md").read_text(encoding="utf-8")
    section = doc.split("## Scenario files", 1)[1]
    example = section.split("```toml", 1)[1].split("```", 1)[0]
    f = tmp_path / "scenario.toml"
    f.write_text(example, encoding="utf-8")
    s = make_scenario(load_scenario(f))
    assert (s.peers, s.topology, s.rounds, s.compare_local) == (8, "smallworld:4:0.2", 5, True)
    assert s.faults.intruders == 1 and s.strategy_params == {"robust": "median"}


def test_scenario_round_trips_through_json(tmp_path: Path) -> None:
    s = make_scenario({"peers": 6, "out": str(tmp_path / "o"), "faults": "crash=1,restart=after:2,delay=1ms-2ms",
                       "timeout": 50, "task_options": {"n_train": 8, "sources": ["a", "b"]},
                       "strategy_params": {"robust": "median"}})
    assert Scenario.from_json(json.loads(json.dumps(s.to_json()))) == s
    assert Scenario.from_json(json.loads(json.dumps(Scenario().to_json()))) == Scenario()


def test_scenario_settings_show_faults_as_spec_text_and_effective_task_options() -> None:
    settings = make_scenario({"faults": {"drop": 0.1}, "task_options": {"n_train": 8}}).to_settings()
    assert settings["faults"] == "drop=0.1" and settings["out"] is None
    assert settings["task_options"] == {"image_size": 32, "n_train": 8, "n_test": 16, "n_test_source": 16}


def test_plan_round_trips_through_plan_json(tmp_path: Path) -> None:
    scenario = make_scenario({"peers": 4, "procs": 2, "rounds": 3, "topology": "regular:3", "seed": 5,
                              "faults": "crash=1,restart=after:1,byzantine=1,intruder=1,partition=1-2"})
    plan = build_plan(scenario, tmp_path / "run")
    loaded = Plan.load(plan.path)
    assert loaded == plan
    assert loaded.scenario is not plan.scenario and loaded.scenario == scenario
    assert [p.share for p in loaded.peers] == [0, 0, 1, 1]
    assert all(p.config_path.is_file() and p.key_path.stat().st_mode & 0o777 == 0o600 for p in loaded.peers)
    config = tomllib.loads(loaded.peers[0].config_path.read_text(encoding="utf-8"))
    assert [t["peer_id"] for t in config["trusted"]] == [loaded.peers[j].peer_id for j in loaded.peers[0].neighbours]


def test_unknown_scenario_file_setting_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "s.toml"
    f.write_text("peer = 3\n", encoding="utf-8")
    with pytest.raises(ScenarioError, match="unknown setting 'peer'"):
        load_scenario(f)


def test_toml_writer_round_trips_a_peer_config() -> None:
    config = {"federation": "f", "listen": "/ip4/127.0.0.1/tcp/1", "task": {"name": "catheter",
              "options": {"silos": 4, "sources": ["a", "b"], "lr": 0.5}}, "rounds": {"count": 3},
              "trusted": [{"name": "p1", "peer_id": "x"}, {"name": "p2", "peer_id": "y"}]}
    assert tomllib.loads(toml_dumps(config)) == config


# -- results and stores ------------------------------------------------------------------


def test_share_result_round_trips_through_worker_json() -> None:
    crash = CrashEvent(2, 1, phase="round 1: training", crashed_at=5.0, committed_before=1, restarted_at=9.0,
                       resumed_round=1, committed_after=3)
    result = ShareResult(share=1, pid=42, rss_bytes=1 << 20, counters={"dropped_messages": 3}, barrier_released_at=None,
                         started_at=1.0, finished_at=2.0,
                         slots={2: SlotResult(None, 2, {"refused_streams": 1}, crash), 3: SlotResult("boom")},
                         intruders=({"index": 0, "error": "RuntimeError()"},))
    assert ShareResult.from_json(json.loads(json.dumps(result.to_json()))) == result
    assert result.peers == [2, 3]


def test_store_views_read_what_the_peer_committed(tmp_path: Path) -> None:
    from silomesh.peer.store import Store

    path = tmp_path / "store.sqlite"
    assert committed_rounds(path) == 0 and read_store(path).rounds == []
    store = Store(path)
    try:
        store.record_round(0, status="done", contributors=["a"], skipped=[], bytes_sent=10)
        store.record_round(1, status="running")
        store.record_metric(0, "dice", 0.5)
        assert committed_rounds(path) == 1  # read while the writer holds its connection
        record = read_store(path)
    finally:
        store.close()
    rows = [(r["round"], r["status"], r["contributors"]) for r in record.rounds]
    assert rows == [(0, "done", ["a"]), (1, "running", [])]
    assert record.metrics == {0: {"dice": 0.5}} and record.audit == []


# -- CLI -----------------------------------------------------------------------------------


def test_cli_bad_faults_is_one_line_error() -> None:
    result = CliRunner().invoke(simnet, ["run", "--faults", "drop=2", "--out", "unused"])
    assert result.exit_code == 1
    assert "Error: faults: drop=2: a probability must be in [0, 1]" in result.output
    assert "Traceback" not in result.output


def test_cli_unknown_strategy_is_one_line_error() -> None:
    result = CliRunner().invoke(simnet, ["run", "--strategy", "fedmagic", "--out", "unused"])
    assert result.exit_code == 1
    assert "unknown strategy 'fedmagic'" in result.output


def test_cli_unknown_model_size_is_one_line_error() -> None:
    result = CliRunner().invoke(simnet, ["run", "--size", "enormous", "--out", "unused"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: size:") and "Traceback" not in result.output


def test_cli_unknown_task_option_is_one_line_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(simnet, ["run", "--size", "tiny", "--task-option", "colour=red", "-q",
                                         "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "unknown option(s) colour for task 'catheter'" in result.output
    assert "Traceback" not in result.output


def test_cli_help_has_examples() -> None:
    result = CliRunner().invoke(simnet, ["run", "--help"])
    assert result.exit_code == 0
    assert "silomesh simnet run --peers" in result.output and "--faults" in result.output


# -- report schema ----------------------------------------------------------------------


def test_schema_validator_reports_type_required_and_range_problems() -> None:
    schema = report_schema()
    assert validate_report({}) and "required field 'peers' is missing" in " ".join(validate_report({}))
    item = schema["properties"]["history"]["items"]
    good = {"round": 0, "metric_mean": None, "metric_per_peer": {"p0": 0.5}, "bytes": 3, "seconds": 1.0,
            "completed": 1}
    assert validate(good, item) == []
    assert any("below the minimum" in p for p in validate({**good, "round": -1}, item))
    assert any("expected integer" in p for p in validate({**good, "bytes": True}, item))
    assert any("expected number" in p for p in validate({**good, "metric_per_peer": {"p0": "x"}}, item))


@pytest.mark.parametrize("task", ["catheter", "organs", "lesion", "spect"])
def test_compare_local_trains_every_task_at_the_federations_geometry(task: str, tmp_path: Path) -> None:
    from silomesh.simnet.local import compare_local

    options = {"n_train": 4, "n_test": 4}
    options.update({"n_silo_test": 4} if task == "spect" else {"n_test_source": 4} if task == "catheter" else {})
    scenario = make_scenario({"task": task, "peers": 2, "rounds": 1, "local_steps": 1, "batch_size": 2,
                              "seed": 3, "task_options": options})
    plan = build_plan(scenario, tmp_path / "run")
    result = compare_local(plan)
    assert set(result["per_peer"]) == {p.name for p in plan.peers} and len(plan.peers) == 2
    assert all(np.isfinite(v) for v in result["per_peer"].values())
    assert result["steps"] == 1 and len(result["history"]) == 1


def test_rounds_where_no_peer_used_a_neighbour_are_named_in_the_summary(capsys: pytest.CaptureFixture[str]) -> None:
    from silomesh.simnet.cli import _summary
    from silomesh.simnet.markdown import isolated_rounds

    history = [
        {"round": 0, "completed": 3, "neighbours_used": 0, "neighbours_skipped": 6},  # all skipped
        {"round": 1, "completed": 3, "neighbours_used": 6, "neighbours_skipped": 0},
        {"round": 2, "completed": 0, "neighbours_used": 0, "neighbours_skipped": 0},  # nobody committed
        {"round": 3, "completed": 2},  # a report from before the counts
    ]
    assert isolated_rounds({"history": history}) == [0]
    report = {
        "strategy": "fedavg", "task": "catheter", "peers": 3, "topology": "ring", "rounds": 4, "wall_seconds": 3.0,
        "round_success_rate": 0.75, "metric": "dice", "final": {"federated_mean": 0.5}, "bytes_sent_total": 0,
        "peers_detail": [], "faults": {"spec": "none"}, "out": "/tmp/run", "settings": {"deadline": 0.5},
        "history": history,
    }
    _summary(report)
    err = capsys.readouterr().err
    assert "warning: in round(s) 0 no peer used a neighbour's model" in err and "(0.5 s)" in err
    _summary({**report, "history": history[1:]})
    assert "no peer used" not in capsys.readouterr().err
