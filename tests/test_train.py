"""Generic training loop, evaluation, checkpoints and the ``silomesh train`` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from silomesh.models.catheter import CatheterTask
from silomesh.models.task import ArrayDataset
from silomesh.models.train import evaluate, load_checkpoint, save_checkpoint, train_local
from silomesh.peer.cli_local import train as train_command

TINY = {"image_size": 32, "n_train": 8, "n_test": 4, "n_test_source": 4}


@pytest.fixture(scope="module")
def task() -> CatheterTask:
    return CatheterTask(**TINY)


@pytest.fixture(scope="module")
def data(task: CatheterTask) -> ArrayDataset:
    return task.make_federation(1, seed=0).silos[0].train


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [v.clone() for v in model.state_dict().values()]


def test_same_seed_gives_identical_losses_and_weights(task: CatheterTask, data: ArrayDataset) -> None:
    runs = []
    for seed in (1, 1, 2):
        model = task.make_model("tiny", seed=0)
        losses = train_local(task, model, data, steps=3, batch_size=4, seed=seed)
        runs.append((losses, _weights(model)))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))
    assert runs[0][0] != runs[2][0]


def test_returns_one_loss_per_step_and_zero_steps_changes_nothing(task: CatheterTask, data: ArrayDataset) -> None:
    model = task.make_model("tiny", seed=0)
    before = _weights(model)
    assert train_local(task, model, data, steps=0) == []
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model), strict=True))
    assert len(train_local(task, model, data, steps=5, batch_size=3)) == 5  # wraps passes


def test_empty_data_is_refused(task: CatheterTask, data: ArrayDataset) -> None:
    with pytest.raises(ValueError, match="empty dataset"):
        train_local(task, task.make_model(), data.subset(np.arange(0)), steps=1)


def test_evaluate_accepts_one_dataset_or_a_mapping(task: CatheterTask, data: ArrayDataset) -> None:
    model = task.make_model("tiny", seed=0)
    single = evaluate(task, model, data)
    named = evaluate(task, model, {"a": data, "b": data})
    assert "dice" in single and named["a"] == named["b"] == single


def test_evaluation_restores_training_mode(task: CatheterTask, data: ArrayDataset) -> None:
    model = task.make_model("tiny", seed=0)
    model.train()
    task.evaluate(model, data)
    assert model.training


def test_checkpoint_round_trips_weights_config_and_round(task: CatheterTask, tmp_path: Path) -> None:
    model = task.make_model("tiny", seed=3)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, task="catheter", size="tiny", round=7, note="x")
    state, meta = load_checkpoint(path)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert meta["round"] == 7 and meta["task"] == "catheter" and meta["extra"] == {"note": "x"}
    assert meta["config"]["width"] == 8 and meta["model"] == "UNet"


def _cli_args(*extra: str) -> list[str]:
    opts = [f"-o{k}={v}" for k, v in TINY.items()]
    return [
        "--task",
        "catheter",
        "--silos",
        "2",
        "--steps",
        "2",
        "--batch-size",
        "4",
        *opts,
        *extra,
    ]


def test_cli_train_prints_json_with_metrics_per_test_set() -> None:
    result = CliRunner().invoke(train_command, _cli_args("--json", "--silo", "1"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["silo"] == "silo1" and report["steps"] == 2 and report["metric"] == "dice"
    assert {"own", "all", "source:simulator", "source:clinical"} <= set(report["results"])
    assert "dice" in report["results"]["own"]


def test_cli_train_prints_a_table_by_default() -> None:
    result = CliRunner().invoke(train_command, _cli_args())
    assert result.exit_code == 0, result.output
    assert "source:phantom" in result.output and "dice" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--silo", "5"], "--silo must be in 0..1"),
        (["-o", "nonsense"], "KEY=VALUE"),
        (["-o", "colour=red"], "unknown option(s) colour"),
    ],
)
def test_cli_train_errors_are_one_line(args: list[str], message: str) -> None:
    result = CliRunner().invoke(train_command, _cli_args(*args))
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output and result.output.count("\n") == 1


def test_cli_train_unknown_task_is_a_clear_error() -> None:
    result = CliRunner().invoke(train_command, ["--task", "brain"])
    assert result.exit_code == 1 and "unknown task 'brain'" in result.output


def test_cli_train_help_has_a_usage_example() -> None:
    result = CliRunner().invoke(train_command, ["--help"])
    assert result.exit_code == 0 and "silomesh train --task catheter" in result.output


def _distance(model: torch.nn.Module, anchor: dict[str, torch.Tensor]) -> float:
    return float(sum(((p.detach() - anchor[n]) ** 2).sum() for n, p in model.named_parameters()))


def test_an_anchor_pulls_the_trained_weights_towards_it(task: CatheterTask, data: ArrayDataset) -> None:
    """Ditto's proximal term: lambda 0 changes nothing, a strong pull stays near the anchor."""
    start = task.make_model("tiny", seed=0)
    anchor = {n: p.detach().clone() for n, p in start.named_parameters()}
    trained = {}
    for weight in (None, 0.0, 100.0):
        model = task.make_model("tiny", seed=0)
        kwargs = {} if weight is None else {"anchor": anchor, "anchor_weight": weight}
        train_local(task, model, data, steps=8, batch_size=4, lr=0.01, seed=3, **kwargs)
        trained[weight] = model
    assert all(torch.equal(a, b) for a, b in zip(_weights(trained[None]), _weights(trained[0.0]), strict=True))
    free, pulled = _distance(trained[0.0], anchor), _distance(trained[100.0], anchor)
    assert free > 0 and pulled < 0.5 * free, (free, pulled)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="anchor_weight"):
            train_local(task, task.make_model("tiny", seed=0), data, steps=1, anchor=anchor, anchor_weight=bad)
