"""``[rounds] keep_unlabelled``: partial labels, and the organs a silo does not annotate.

Each organs silo labels one organ; its training leaves the other organs' outputs to drift.
With ``keep_unlabelled`` every training on the silo's data (the round's, the personal
model's) keeps them towards the model as the training began.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from peerkit import configs

from silomesh.models.registry import get_task
from silomesh.models.train import train_local
from silomesh.peer import personal
from silomesh.peer.config import ConfigError, PersonalConfig, parse_config
from silomesh.peer.daemon import Peer
from silomesh.peer.learner import Learner, load_numpy
from silomesh.peer.operator import OperatorError
from silomesh.simnet.plan import build_plan
from silomesh.simnet.scenario import Scenario, ScenarioError, make_scenario
from silomesh.strategies import get_strategy

ORGANS = {"image_size": 32, "n_train": 12, "n_test": 6}


def _raw(**rounds: object) -> dict[str, object]:
    return {"federation": "f", "key_file": "k", "task": {"name": "organs"}, "rounds": rounds}


def test_the_setting_is_parsed_and_a_wrong_type_names_it(tmp_path: Path) -> None:
    assert parse_config(_raw(), tmp_path).rounds.keep_unlabelled is False
    assert parse_config(_raw(keep_unlabelled=True), tmp_path).rounds.keep_unlabelled is True
    with pytest.raises(ConfigError, match=r"rounds\.keep_unlabelled"):
        parse_config(_raw(keep_unlabelled="yes"), tmp_path)


def test_a_task_whose_silos_label_everything_is_refused_at_start(tmp_path: Path) -> None:
    ids, cfgs = configs(tmp_path, 2, extra={"rounds": {"count": 1, "keep_unlabelled": True}})
    with pytest.raises(OperatorError, match=r"rounds\.keep_unlabelled: task 'catheter'"):
        Peer(cfgs[0], identity=ids[0], serve_control_api=False)
    task = get_task("catheter", image_size=32, n_train=4, n_test=2, n_test_source=2)
    with pytest.raises(ValueError, match=r"rounds\.keep_unlabelled"):
        Learner(task, task.make_federation(1, seed=0).silos[0], size="tiny", init_seed=0, batch_size=4, lr=0.01,
                strategy=get_strategy("fedavg", {}), keep_unlabelled=True)


def _liver_drift(keep: bool, train: Callable[[Learner], dict[str, np.ndarray]]) -> float:
    """A model that knows the liver (trained on silo 0) given to silo 1 (spleen only), trained
    there by ``train``: how far its liver outputs on the shared test images move."""
    task = get_task("organs", **ORGANS)
    fed = task.make_federation(2, seed=0)
    liver = task.make_model("tiny", seed=0)
    train_local(task, liver, fed.silos[0].train, steps=30, batch_size=4, lr=1e-2, seed=1)
    learner = Learner(task, fed.silos[1], size="tiny", init_seed=0, batch_size=4, lr=1e-2,
                      strategy=get_strategy("fedavg", {}), keep_unlabelled=keep)
    learner.model.load_state_dict(liver.state_dict())
    trained = task.make_model("tiny", seed=0)
    load_numpy(trained, train(learner))
    images = torch.from_numpy(fed.tests["all"]["image"])
    with torch.no_grad():
        trained.eval()
        liver.eval()
        return float((torch.sigmoid(trained(images)[:, 0]) - torch.sigmoid(liver(images)[:, 0])).abs().mean())


@pytest.mark.parametrize(("how", "train"), [
    ("round", lambda learner: learner.train_plain(20).state),
    ("personal finetune", lambda learner: personal.fine_tune(learner, PersonalConfig(20, 1e-2), 1e-2, 0)[0]),
])
def test_the_rounds_and_the_personal_fine_tune_keep_the_organs_the_silo_does_not_label(
    how: str, train: Callable[[Learner], dict[str, np.ndarray]]
) -> None:
    kept, drifted = _liver_drift(True, train), _liver_drift(False, train)
    assert kept < 0.5 * drifted, (how, kept, drifted)


def test_the_personal_head_fine_tune_trains_the_other_organs_rows_only_with_a_teacher() -> None:
    """The body is frozen and the loss masks the liver row: alone it stays exactly; with the
    teacher it is trained too (towards the teacher's outputs, sharpened by the Dice term)."""
    def head(learner: Learner) -> dict[str, np.ndarray]:
        return personal.fine_tune(learner, PersonalConfig(20, 1e-2, "head"), 1e-2, 0)[0]

    assert _liver_drift(False, head) == 0.0
    assert 0.0 < _liver_drift(True, head) < 0.1


def test_simnet_hands_the_setting_to_every_peer(tmp_path: Path) -> None:
    scenario = make_scenario({"task": "organs", "peers": 2, "keep_unlabelled": True})
    assert Scenario.from_json(json.loads(json.dumps(scenario.to_json()))) == scenario
    plan = build_plan(scenario, tmp_path / "run")
    for peer in plan.peers:
        config = parse_config(tomllib.loads(peer.config_path.read_text(encoding="utf-8")), tmp_path)
        assert config.rounds.keep_unlabelled is True
    with pytest.raises(ScenarioError, match="keep_unlabelled"):
        make_scenario({"keep_unlabelled": 1})


def test_the_silo_alone_trains_under_the_same_rule_as_its_peer(tmp_path: Path) -> None:
    """The baselines (``--compare-local`` and the ``per_silo`` evaluation's silo alone and
    fine-tune) keep what the labels leave open too: on lesion the image-label silo's alone
    model changes (self-training on its own outputs), the pixel silo's does not."""
    from silomesh.simnet.evaluations import RunModels
    from silomesh.simnet.local import compare_local

    base = {"task": "lesion", "peers": 3, "rounds": 2, "local_steps": 2, "batch_size": 2, "seed": 3,
            "personal_steps": 2, "task_options": {"n_train": 4, "n_test": 4, "image_size": 32}}
    alone: dict[bool, dict[str, float]] = {}
    models: dict[bool, list[dict[str, torch.Tensor]]] = {}
    start = None  # one model both fine-tunes start from
    for keep in (False, True):
        scenario = make_scenario({**base, "keep_unlabelled": keep})
        alone[keep] = compare_local(build_plan(scenario, tmp_path / f"run{keep}"))["per_peer"]
        run = RunModels(scenario, {"peers_detail": []})
        trained = [run.train_alone(i, extra_steps=2) for i in range(3)]
        start = start or trained[2]
        models[keep] = [m.state_dict() for m in [*trained, run.fine_tuned(2, start, 2)]]

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(models[False][0], models[True][0])  # silo 0 has pixel masks: nothing to keep
    assert not same(models[False][2], models[True][2])  # silo 2 has image labels only
    assert not same(models[False][3], models[True][3])  # its fine-tune too
    names = sorted(alone[False])
    assert alone[False][names[0]] == alone[True][names[0]]
