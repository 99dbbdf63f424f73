"""Experiment files: parsing, scaling, statistics, tables, evaluations and one real run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from silomesh.models.task import ArrayDataset, Federation, Task
from silomesh.simnet.cli import simnet
from silomesh.simnet.experiment import (
    Experiment,
    ExperimentError,
    command_line,
    load_experiment,
    render_table,
    run_scenario,
    scaled,
    summarise,
)
from silomesh.simnet.scenario import ScenarioError

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"

BASE = """
task = "catheter"
size = "tiny"
rounds = 2
local_steps = 5
[task_options]
n_train = 8
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _exp(tmp_path: Path, table: str, base: str = BASE) -> Experiment:
    return load_experiment(_write(tmp_path, base + "\n" + table))


ARM = '[[experiment.arms]]\nname = "a"\n'


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_experiment_file_parses(path: Path) -> None:
    exp = load_experiment(path)
    assert exp.arms and len(exp.seeds) >= 3
    for arm in exp.arms:
        sc, _ = run_scenario(exp, arm, exp.seeds[0], 1, Path("/nonexistent/out"))
        assert sc.task == exp.base["task"]


def test_experiment_defaults_seeds_to_three_and_name_to_file_stem(tmp_path: Path) -> None:
    exp = _exp(tmp_path, "[experiment]\n" + ARM)
    assert exp.name == "exp" and exp.seeds == (0, 1, 2) and exp.scale == ("rounds",)


@pytest.mark.parametrize(("table", "field"), [
    ("[experiment]\nseeds = []\n" + ARM, "experiment.seeds"),
    ("[experiment]\nseeds = [1, 1]\n" + ARM, "experiment.seeds"),
    ("[experiment]\nevaluate = [\"magic\"]\n" + ARM, "experiment.evaluate"),
    ("[experiment]\nscale = [\"lr\"]\n" + ARM, "experiment.scale"),
    ("[experiment]\nbogus = 1\n" + ARM, "experiment: unknown field 'bogus'"),
    ("[experiment]\n", "experiment.arms"),
    ("[experiment]\n[[experiment.arms]]\npeers = 2\n", "experiment.arms[0].name"),
    ("[experiment]\n" + ARM + ARM, "experiment.arms[1].name"),
    ("[experiment]\n[[experiment.arms]]\nname = \"a\"\nseed = 3\n", "experiment.arms[0].seed"),
    ("[experiment]\n[[experiment.arms]]\nname = \"a\"\npeers = 0\n", "experiment.arms[0] (a): peers"),
])
def test_invalid_experiment_field_is_named_in_a_one_line_error(tmp_path: Path, table: str, field: str) -> None:
    with pytest.raises(ExperimentError) as info:
        _exp(tmp_path, table)
    assert field in str(info.value) and "\n" not in str(info.value)


def test_invalid_base_setting_is_a_scenario_error(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="rounds"):
        _exp(tmp_path, "[experiment]\n" + ARM, base='rounds = "x"\n')


def test_scale_multiplies_the_named_integer_settings_only() -> None:
    settings = {"rounds": 3, "local_steps": 20, "task_options": {"n_train": 32, "n_test": 16}}
    out, options = scaled(settings, {"finetune_steps": 10, "mlem_iterations": 30},
                          ("rounds", "task_options.n_train", "options.finetune_steps"), 3)
    assert out["rounds"] == 9 and out["local_steps"] == 20
    assert out["task_options"] == {"n_train": 96, "n_test": 16}
    assert options == {"finetune_steps": 30, "mlem_iterations": 30}
    assert settings["rounds"] == 3  # input untouched
    with pytest.raises(ExperimentError, match="--scale"):
        scaled(settings, {}, ("rounds",), 0)


def test_run_scenario_layers_base_arm_overrides_scale_and_seed(tmp_path: Path) -> None:
    exp = _exp(tmp_path, '[experiment]\nscale = ["rounds", "task_options.n_train"]\n'
               '[[experiment.arms]]\nname = "b"\npeers = 3\nstrategy = "fedefm"\n')
    sc, _ = run_scenario(exp, exp.arms[0], 7, 2, tmp_path / "o", {"lr": 0.01})
    assert (sc.peers, sc.strategy, sc.seed, sc.rounds, sc.lr) == (3, "fedefm", 7, 4, 0.01)
    assert sc.task_options["n_train"] == 16 and sc.effective_task_options["n_test"] == 16


def test_summarise_is_mean_and_sample_std_over_finite_values() -> None:
    s = summarise([0.5, 0.7, 0.9, math.nan])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.7) and s["std"] == pytest.approx(0.2)
    assert summarise([0.3]) == {"mean": 0.3, "std": 0.0, "n": 1}
    assert summarise([math.nan])["mean"] is None


def test_render_table_shows_mean_pm_std_and_seed_count() -> None:
    results = {"arms": {
        "fed": {"summary": {"dice": summarise([0.5, 0.7, 0.9]), "iou": summarise([0.1, 0.2, 0.3])}},
        "local": {"summary": {"dice": summarise([0.2, 0.4, 0.6])}},
    }}
    table = render_table(results, ["dice", "iou"]).splitlines()
    assert table[0] == "| arm | n | dice | iou |"
    assert table[2] == "| fed | 3 | 0.700 ± 0.200 | 0.200 ± 0.100 |"
    assert table[3] == "| local | 3 | 0.400 ± 0.200 | – |"


def test_command_line_regenerates_the_run() -> None:
    assert command_line(Path("experiments/x.toml"), 2, (0, 1), None) == \
        "silomesh simnet run experiments/x.toml --scale 2 --seeds 0,1"
    assert command_line(Path("experiments/x.toml"), 1, None, None) == "silomesh simnet run experiments/x.toml"
    # flags that changed every arm are part of the command, or the printed one would run another experiment
    overrides = {"personal_method": "head", "lr": 0.01, "compare_local": False,
                 "task_options": {"n_train": 8, "sources": ["a", "b"]}, "strategy_params": {"robust": "median"}}
    assert command_line(Path("x.toml"), 1, None, None, overrides) == (
        "silomesh simnet run x.toml --no-compare-local --lr 0.01 --personal-method head "
        "--strategy-param robust=median --task-option n_train=8 --task-option 'sources=[\"a\", \"b\"]'")


def test_the_regenerate_command_of_a_run_carries_its_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import silomesh.simnet.experiment as experiment

    seen: dict[str, Any] = {}

    def fake(exp: Experiment, out: Path, **kwargs: Any) -> dict[str, Any]:
        seen.update(kwargs)
        raise ScenarioError("stop here")

    monkeypatch.setattr(experiment, "run_experiment", fake)
    result = CliRunner().invoke(simnet, ["run", str(_write(tmp_path, BASE + "\n[experiment]\n" + ARM)),
                                         "--lr", "0.02", "--task-option", "n_train=8", "--personal-method", "head",
                                         "--out", str(tmp_path / "out")])
    assert "stop here" in result.output
    assert seen["overrides"] == {"lr": 0.02, "personal_method": "head", "task_options": {"n_train": 8}}
    assert seen["command"].endswith("--lr 0.02 --personal-method head --task-option n_train=8"), seen["command"]


def test_scale_flag_on_a_plain_scenario_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(simnet, ["run", str(_write(tmp_path, BASE)), "--scale", "2"])
    assert result.exit_code == 1 and "experiment files" in result.output


# -- evaluations on hand-made models ---------------------------------------------------------


class _Perfect(torch.nn.Module):
    """Predicts the catheter mask of the image it is given (by lookup)."""

    def __init__(self, data: ArrayDataset) -> None:
        super().__init__()
        self.images = torch.from_numpy(data["image"])
        self.masks = torch.from_numpy(data["mask"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = [int(torch.argmin(((self.images - xi) ** 2).flatten(1).sum(1))) for xi in x]
        return torch.nn.functional.one_hot(self.masks[idx], 3).permute(0, 3, 1, 2).float() * 10


class _FakeRun:
    def __init__(self, models: list[torch.nn.Module | None], fed: Federation, task: Task) -> None:
        self._m, self.federation, self.task = models, fed, task
        self.options: dict[str, Any] = {}

    def final_models(self) -> list[torch.nn.Module | None]:
        return self._m

    def metric(self, model: torch.nn.Module, data: ArrayDataset, name: str | None = None) -> float:
        return float(self.task.evaluate(model, data)[name or self.task.metric])


def test_unseen_sources_splits_dice_by_sources_the_silo_saw() -> None:
    from silomesh.models.registry import get_task
    from silomesh.simnet.evaluations import eval_unseen_sources

    task = get_task("catheter", image_size=16, n_train=4, n_test=2, n_test_source=3, sources_per_silo=1)
    fed = task.make_federation(1, 0)
    seen = fed.silos[0].info["sources"][0]
    run = _FakeRun([_Perfect(fed.tests[f"source:{seen}"])], fed, task)
    out = eval_unseen_sources(run, {})  # type: ignore[arg-type]
    assert out["seen_dice"] == pytest.approx(1.0)
    assert out["unseen_dice"] < 0.9


class _Background(torch.nn.Module):
    """Predicts background everywhere (Dice 0 wherever there is a catheter)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 3, *x.shape[2:])
        out[:, 0] = 10.0
        return out


def test_per_silo_pairs_each_silo_and_picks_the_best_silo_on_validation_only() -> None:
    from silomesh.models.registry import get_task
    from silomesh.simnet.evaluations import eval_per_silo, split_validation

    task = get_task("catheter", image_size=16, n_train=4, n_test=4, n_test_source=3, sources_per_silo=1)
    fed = task.make_federation(3, 0)
    val, test = split_validation(fed.tests["all"], seed=5)
    assert len(val) + len(test) == len(fed.tests["all"]) and len(val) > 0
    everything = ArrayDataset({k: np.concatenate([fed.tests["all"][k], fed.silos[0].test[k]])
                               for k in ("image", "mask")})
    run = _FakeRun([_Perfect(everything), task.make_model("tiny"), None], fed, task)
    run.scenario = SimpleNamespace(seed=5, personal_steps=0)  # type: ignore[attr-defined]
    # silo 1 alone is perfect on the validation half only: picked as best, scored on the test half
    alone = {0: _Background(), 1: _Perfect(val), 2: _Background()}
    run.train_alone = lambda i, extra_steps=0: alone[i]  # type: ignore[attr-defined]
    tuned: list[tuple[int, int]] = []
    run.fine_tuned = lambda i, m, steps: tuned.append((i, steps)) or _Perfect(everything)  # type: ignore[attr-defined]
    out = eval_per_silo(run, {})  # type: ignore[arg-type]
    assert not tuned and not any(k.startswith("gain_personal") for k in out)
    personal = eval_per_silo(run, {"personal_steps": 7})  # type: ignore[arg-type]
    assert tuned == [(0, 7), (1, 7)]  # each silo with a federated model, fine-tuned 7 steps
    expected = run.metric(_Perfect(everything), fed.silos[1].test) - run.metric(alone[1], fed.silos[1].test)
    assert personal["gain_personal_own_1"] == pytest.approx(expected)
    assert personal["silos_gain_personal_own"] == 2
    assert out["best_silo"] == 1
    assert out["best_silo_common_test"] == pytest.approx(run.metric(alone[1], test))
    assert out["best_silo_common_test"] < run.metric(alone[1], val)
    assert out["gain_own_0"] == pytest.approx(1.0) and out["gain_common_0"] == pytest.approx(1.0)
    assert "gain_own_2" not in out and out["silos_paired"] == 2  # silo 2's peer left no model
    assert out["silos_gain_own"] == sum(out[f"gain_own_{i}"] >= 0 for i in (0, 1))
    assert "gain_unseen_0" in out  # one source per silo: the other sources are unseen
    assert out["margin_best_silo"] == pytest.approx(out["fed_common_test"] - out["best_silo_common_test"])


def test_spect_baselines_report_each_method_per_subset() -> None:
    from silomesh.models.registry import get_task
    from silomesh.simnet.evaluations import eval_spect_baselines

    task = get_task("spect", size=16, n_train=2, n_silo_test=2, n_test=4)
    fed = task.make_federation(1, 0)
    run = _FakeRun([task.make_model("tiny")], fed, task)
    out = eval_spect_baselines(run, {"mlem_iterations": 2})  # type: ignore[arg-type]
    for subset in ("infarct", "normal"):
        for method in ("network", "fbp", "mlem"):
            assert np.isfinite(out[f"{subset}_{method}_psnr"]) and out[f"{subset}_{method}_ms_per_image"] > 0
    # untrained, the network reproduces FBP (see docs/TASKS.md)
    assert out["normal_network_psnr"] == pytest.approx(out["normal_fbp_psnr"], abs=1.5)


# -- one real experiment -----------------------------------------------------------------------


@pytest.mark.slow
def test_small_experiment_runs_every_arm_and_seed_and_writes_results(tmp_path: Path) -> None:
    path = _write(tmp_path, """
task = "catheter"
size = "tiny"
peers = 2
rounds = 1
local_steps = 2
deadline = 20.0
timeout = 90.0
[task_options]
n_train = 8
n_test = 4
n_test_source = 4
[experiment]
name = "e2e"
seeds = [0, 1]
evaluate = ["vs_best_silo", "unseen_sources"]
columns = ["fed_common", "local_common_best"]
[[experiment.arms]]
name = "fedavg"
""")
    out = tmp_path / "out"
    result = CliRunner().invoke(simnet, ["run", str(path), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    arm = results["arms"]["fedavg"]
    assert set(arm["runs"]) == {"0", "1"} and arm["settings"]["peers"] == 2
    for metrics in arm["runs"].values():
        assert 0.0 <= metrics["fed_common"] <= 1.0 and metrics["success"] == 1.0
        assert metrics["margin_common"] == pytest.approx(metrics["fed_common"] - metrics["local_common_best"])
    values = [m["fed_common"] for m in arm["runs"].values()]
    assert arm["summary"]["fed_common"]["mean"] == pytest.approx(np.mean(values))
    assert (out / "fedavg" / "seed1" / "report.json").exists()
    md = (out / "results.md").read_text()
    assert "silomesh simnet run" in md and "| fedavg | 2 |" in md
    again = CliRunner().invoke(simnet, ["run", str(path), "--out", str(out), "--quiet"])
    assert again.exit_code == 1 and "already holds" in again.output


def test_results_doc_fills_marked_blocks_from_results_json(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("results_doc", EXPERIMENTS.parent / "bench" / "results_doc.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    runs = tmp_path / "runs"
    (runs / "x").mkdir(parents=True)
    results = {"name": "x", "command": "silomesh simnet run experiments/x.toml", "seeds": [0, 1, 2],
               "wall_seconds": 12.0, "arms": {"fed": {"summary": {"dice": summarise([0.5, 0.7, 0.9])}}}}
    (runs / "x" / "results.json").write_text(json.dumps(results))
    text = "intro\n<!-- results: x columns=dice -->\nold\n<!-- /results -->\nend\n"
    out = mod.BLOCK.sub(lambda m: mod.render_block(runs, m.group("args")), text)
    assert "old" not in out and "| fed | 3 | 0.700 ± 0.200 |" in out
    assert "silomesh simnet run experiments/x.toml" in out and out.endswith("end\n")


def test_per_silo_gains_are_summarised_per_silo_over_seeds_and_plotted(tmp_path: Path) -> None:
    from silomesh.simnet.experiment import render_markdown
    from silomesh.simnet.plots import per_silo_gains, write_per_silo_plot

    runs = {"0": {"gain_own_0": 0.1, "gain_own_1": -0.2, "gain_unseen_0": 0.3, "gain_own_mean": -0.05},
            "1": {"gain_own_0": 0.3, "gain_own_1": math.nan, "gain_unseen_0": 0.1}}
    results = {"name": "x", "command": "c", "seeds": [0, 1], "scale": 1, "evaluate": ["per_silo"],
               "wall_seconds": 1.0, "arms": {"a": {"runs": runs, "settings": {
                   "peers": 2, "topology": "ring", "strategy": "fedavg", "strategy_params": {}, "task": "catheter",
                   "size": "tiny", "rounds": 1, "local_steps": 1, "lr": 0.001, "batch_size": 2, "task_options": {}},
                   "summary": {}}}}
    gains = per_silo_gains(results)["a"]
    assert [r["silo"] for r in gains["own"]] == [0, 1]  # gain_own_mean is not a silo
    assert gains["own"][0]["mean"] == pytest.approx(0.2) and gains["own"][0]["n"] == 2
    assert gains["own"][1] == {"silo": 1, "mean": pytest.approx(-0.2), "std": 0.0, "n": 1}  # NaN seed left out
    assert gains["unseen"][0]["mean"] == pytest.approx(0.2)
    md = render_markdown(results)
    assert "| arm | silo | own test set | unseen sources |" in md  # only the kinds measured
    assert "| a | 0 | +0.200 ± 0.141 (2) | +0.200 ± 0.141 (2) |" in md
    path = write_per_silo_plot(results, tmp_path / "g.png")
    assert path is not None and path.read_bytes()[:4] == b"\x89PNG"
    assert write_per_silo_plot({"arms": {"b": {"runs": {"0": {"fed_own": 1.0}}}}}, tmp_path / "n.png") is None


def test_results_doc_only_regenerates_the_named_blocks_and_adds_per_silo_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("results_doc", EXPERIMENTS.parent / "bench" / "results_doc.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    runs = tmp_path / "runs"
    (runs / "wj_a").mkdir(parents=True)
    results = {"name": "wj_a", "command": "c", "seeds": [0], "wall_seconds": 3.0,
               "arms": {"4 silos": {"summary": {"gain_own_mean": summarise([0.25])},
                                    "runs": {"0": {"gain_own_0": 0.25}}}}}
    (runs / "wj_a" / "results.json").write_text(json.dumps(results))
    doc = tmp_path / "RESULTS.md"
    doc.write_text("<!-- results: wj_a columns=gain_own_mean persilo=1 -->\nold\n<!-- /results -->\n"
                   "<!-- results: other -->\nkept\n<!-- /results -->\n<!-- walltime -->\nwall\n<!-- /walltime -->\n")
    monkeypatch.setattr(sys, "argv", ["results_doc", "--runs", str(runs), "--doc", str(doc), "--only", "wj_"])
    mod.main()
    text = doc.read_text()
    assert "old" not in text and "| 4 silos | 1 | 0.250 ± 0.000 |" in text
    assert "| 4 silos | 0 | +0.250 ± 0.000 (1) |" in text  # the per-silo table
    assert "kept" in text and "wall\n" in text  # other blocks and the wall-time table untouched
