"""A MONAI network as a task's model: checked names and arguments, the agreed model id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from silomesh.models.architecture import ModelSpec, model_difference, model_id
from silomesh.models.monai_net import ModelSpecError, ModelTask, build_network, check_spec, load_weights
from silomesh.models.registry import get_task
from silomesh.models.train import train_local
from silomesh.peer.config import ConfigError, parse_config
from silomesh.peer.learner import build_task

TINY_2D = {"spatial_dims": 2, "in_channels": 1, "out_channels": 3, "features": [4, 4, 8, 8, 16, 4]}


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _raw(task: dict[str, Any]) -> dict[str, Any]:
    return {"federation": "f", "key_file": "k", "task": {"name": "catheter", **task}}


def test_check_spec_accepts_a_short_or_full_monai_name_and_normalises_it() -> None:
    a = check_spec("BasicUNet", TINY_2D)
    b = check_spec("monai.networks.nets.BasicUNet", TINY_2D)
    assert a == b
    assert a.name == "monai.networks.nets.BasicUNet"


@pytest.mark.parametrize(
    ("name", "args", "field"),
    [
        ("monai.networks.nets.NoSuchNet", {}, "task.model:"),
        ("torch.nn.Linear", {}, "task.model:"),
        ("BasicUNet", {"featurez": [1]}, "task.model_args.featurez:"),
        ("UNet", {"spatial_dims": 2}, "task.model_args:"),  # channels and strides missing
    ],
)
def test_check_spec_errors_name_the_field(name: str, args: dict[str, Any], field: str) -> None:
    with pytest.raises(ModelSpecError) as err:
        check_spec(name, args)
    assert str(err.value).startswith(field)


def test_config_rejects_a_bad_model_argument_at_start_up_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^task\.model_args\.bogus: BasicUNet takes no argument"):
        parse_config(_raw({"model": "BasicUNet", "model_args": {"bogus": 1}}), tmp_path)
    with pytest.raises(ConfigError, match=r"^task\.model_args: needs task\.model"):
        parse_config(_raw({"model_args": {"features": [4]}}), tmp_path)
    with pytest.raises(ConfigError, match=r"^task\.preprocess\.spacing"):
        parse_config(_raw({"model": "BasicUNet", "preprocess": {"spacing": [1.0, -1.0, 1.0]}}), tmp_path)


def test_model_id_names_network_and_argument_digest_within_the_hello_limit() -> None:
    spec = check_spec("BasicUNet", TINY_2D)
    ident = model_id("catheter", "tiny", spec)
    assert ident == f"catheter/BasicUNet/{spec.args_digest}"
    assert len(ident.encode()) <= 128
    assert model_id("catheter", "tiny") == "catheter/tiny"
    # argument order does not matter, values do
    assert ModelSpec(spec.name, dict(reversed(list(TINY_2D.items())))).args_digest == spec.args_digest
    assert check_spec("BasicUNet", {**TINY_2D, "out_channels": 2}).args_digest != spec.args_digest


def test_model_difference_says_which_field_differs() -> None:
    a = check_spec("BasicUNet", TINY_2D)
    b = check_spec("BasicUNet", {**TINY_2D, "features": [8, 8, 8, 8, 16, 8]})
    c = check_spec("UNet", {"spatial_dims": 2, "in_channels": 1, "out_channels": 3, "channels": [4, 8], "strides": [2]})
    assert model_difference(model_id("catheter", "tiny", a), model_id("catheter", "tiny", a)) is None
    assert model_difference(model_id("catheter", "tiny", a), "") == (  # an unnamed model is not ours
        f"the neighbour names no model (an empty id); ours is {model_id('catheter', 'tiny', a)!r}"
    )
    assert model_difference("", "") is None
    assert (model_difference(model_id("catheter", "tiny", a), model_id("catheter", "tiny", b)) or "").startswith(
        "task.model_args differ"
    )
    assert model_difference(model_id("catheter", "tiny", a), model_id("catheter", "tiny", c)) == (
        "task.model differs: ours 'BasicUNet', theirs 'UNet'"
    )
    assert (model_difference(model_id("catheter", "tiny", a), "catheter/tiny") or "").startswith("task.model differs")
    assert model_difference("catheter/tiny", "catheter/small") == "task.size differs: ours 'tiny', theirs 'small'"
    assert model_difference("catheter/tiny", "organs/tiny") == "task.name differs: ours 'catheter', theirs 'organs'"


def test_peer_task_with_a_monai_model_trains_with_the_tasks_loss_and_metrics(tmp_path: Path) -> None:
    cfg = parse_config(_raw({"model": "BasicUNet", "model_args": TINY_2D, "options": {"image_size": 32}}), tmp_path)
    task = build_task(cfg.task)
    assert isinstance(task, ModelTask) and task.name == "catheter" and task.metric == "dice"
    model = task.make_model(seed=3)
    assert type(model).__name__ == "BasicUNet"
    assert _same(model, task.make_model(seed=3))
    silo = get_task("catheter", image_size=32, n_train=16, n_test=8).make_federation(2, 0).silos[0]
    before = task.evaluate(model, silo.test)
    losses = train_local(task, model, silo.train, 20, 8, 3e-3, seed=0)
    after = task.evaluate(model, silo.test)
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert {"dice", "iou"} <= set(after) and after["dice"] != before["dice"]


def test_starting_weights_come_from_a_local_file_and_must_fit(tmp_path: Path) -> None:
    spec = check_spec("BasicUNet", TINY_2D)
    source = build_network(spec, seed=7)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    loaded = build_network(spec, seed=0, weights=tmp_path / "w.pt")
    assert _same(source, loaded)
    other = build_network(check_spec("BasicUNet", {**TINY_2D, "out_channels": 2}))
    with pytest.raises(ValueError, match=r"w\.pt: .*has shape"):
        load_weights(tmp_path / "w.pt", other)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"bad\.pt: not a readable torch state dict"):
        load_weights(tmp_path / "bad.pt", other)


def test_strategies_that_need_the_tasks_own_network_are_refused_at_start_up(tmp_path: Path) -> None:
    monai = {"model": "BasicUNet", "model_args": TINY_2D}
    with pytest.raises(ConfigError, match=r"^strategy\.name: fedefm needs the task's own network"):
        parse_config({**_raw(monai), "strategy": {"name": "fedefm"}}, tmp_path)
    with pytest.raises(ConfigError, match=r"^strategy\.params\.head_prefixes"):
        parse_config({**_raw(monai), "strategy": {"name": "segviz"}}, tmp_path)
    cfg = parse_config({**_raw(monai), "strategy": {"name": "segviz", "params": {"head_prefixes": ["final_conv."]}}},
                       tmp_path)
    assert cfg.strategy.name == "segviz"
    with pytest.raises(ConfigError, match=r'^personal\.method: "head" needs the task\'s own network'):
        parse_config({**_raw(monai), "personal": {"steps": 5, "method": "head"}}, tmp_path)
    ditto = parse_config({**_raw(monai), "personal": {"steps": 5, "method": "ditto"}}, tmp_path)
    assert ditto.personal.method == "ditto"


def test_a_network_whose_outputs_do_not_fit_the_task_is_refused_before_training(tmp_path: Path) -> None:
    data = get_task("lesion", image_size=32, n_train=4, n_test=2).make_federation(3, 0).silos[0].train
    fits = {**TINY_2D, "in_channels": 3, "out_channels": 1}
    ModelTask(get_task("lesion", image_size=32), check_spec("BasicUNet", fits)).check_data(data)
    with pytest.raises(ModelSpecError, match=r"^task\.model_args: BasicUNet gives outputs \(1, 2, 32, 32\), the "
                                             r"lesion task needs \(1, 1, 32, 32\)"):
        ModelTask(get_task("lesion"), check_spec("BasicUNet", {**fits, "out_channels": 2})).check_data(data)
    with pytest.raises(ModelSpecError, match=r"^task\.model_args: BasicUNet cannot take this data's images"):
        ModelTask(get_task("lesion"), check_spec("BasicUNet", TINY_2D)).check_data(data)  # 1 channel, RGB data
