"""SegViz: heads stay bit-identical, bodies are averaged, FedBN keeps norms local."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from silomesh.models.task import SplitModel
from silomesh.strategies import Contribution, get_strategy, partition_keys
from silomesh.strategies.segviz import SegVizStrategy, is_local
from silomesh.strategies.training import Batch

if TYPE_CHECKING:
    from silomesh.peer.learner import Learner


class TwoHeadNet(SplitModel):
    """Shared conv body with BatchNorm; a per-silo head whose class count may differ."""

    head_prefixes = ("head.",)

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Conv2d(4, classes, 1)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(x)
        return self.head(f), f


def numpy_state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def silo_states(
    classes: Sequence[int] = (2, 2, 2), seed: int = 0
) -> tuple[list[TwoHeadNet], list[dict[str, np.ndarray]]]:
    torch.manual_seed(seed)
    models = [TwoHeadNet(c) for c in classes]
    with torch.no_grad():  # make the BN buffers differ between silos
        for i, m in enumerate(models):
            m.body[1].running_mean.fill_(float(i))
            m.body[1].num_batches_tracked.fill_(10 * i)
    return models, [numpy_state(m) for m in models]


def test_segviz_keeps_head_bit_identical_and_averages_body() -> None:
    _, (own, a, b) = silo_states()
    strategy = get_strategy("segviz", {"head_prefixes": ["head."]})
    result = strategy.aggregate(own, 10, [Contribution("a", a, 30), Contribution("b", b, 60)])
    for k in ("head.weight", "head.bias"):
        assert result.state[k].tobytes() == own[k].tobytes()
    w = np.array([10, 30, 60]) / 100
    for k in ("body.0.weight", "body.1.running_mean"):
        ref = np.average(np.stack([own[k], a[k], b[k]]).astype(np.float64), axis=0, weights=w)
        np.testing.assert_allclose(result.state[k], ref, rtol=1e-6, atol=1e-7)


def test_segviz_ignores_neighbour_heads_of_another_shape() -> None:
    _, (own, other) = silo_states(classes=(2, 5))
    result = get_strategy("segviz", {"head_prefixes": ["head."]}).aggregate(
        own, 1, [Contribution("x", other)])
    assert result.dropped == {}
    assert result.state["head.weight"].shape == own["head.weight"].shape
    np.testing.assert_allclose(result.state["body.0.bias"],
                               (own["body.0.bias"] + other["body.0.bias"]) / 2, rtol=1e-6)


def test_fedbn_variant_keeps_normalisation_layers_local() -> None:
    _, (own, other) = silo_states(classes=(2, 2))
    strategy = get_strategy("segviz", {"head_prefixes": ["head."], "local_norm": True,
                                       "norm_patterns": ["body.1."]})
    result = strategy.aggregate(own, 1, [Contribution("x", other)])
    for k in own:
        if k.startswith(("body.1.", "head.")):
            assert np.array_equal(result.state[k], own[k]), k
    assert not np.array_equal(result.state["body.0.weight"], own["body.0.weight"])


def test_default_norm_patterns_match_batchnorm_buffers_by_name() -> None:
    names = ["enc.bn1.weight", "enc.bn1.running_var", "dec.norm.bias", "enc.conv.weight",
             "blocks.0.num_batches_tracked", "head.weight"]
    shared, _local = partition_keys(names, ["head."], SegVizStrategy.config_class().norm_patterns)
    assert shared == ["enc.conv.weight"]
    assert not is_local("enc.conv.weight", ["head."])


def test_shared_keys_tell_the_peer_not_to_send_heads() -> None:
    model = TwoHeadNet()
    strategy = get_strategy("segviz")
    assert isinstance(strategy, SegVizStrategy)
    strategy = strategy.with_head_prefixes(model.head_prefixes)
    body, _head = model.split_names()
    assert strategy.shared_keys(model.state_dict()) == body


def test_finetune_head_changes_head_and_leaves_body_bit_identical() -> None:
    torch.manual_seed(1)
    model = TwoHeadNet()
    before = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(2)
    batches = [{"image": torch.rand(4, 1, 6, 6, generator=g),
                "mask": torch.randint(0, 2, (4, 6, 6), generator=g)} for _ in range(2)]

    def loss(m: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(m(batch["image"]), batch["mask"])

    strategy = get_strategy("segviz", {"head_prefixes": ["head."], "finetune_steps": 5,
                                       "finetune_lr": 0.05})
    result = strategy.finetune_head(model, batches, loss)  # type: ignore[attr-defined]
    assert result.steps == 5
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith("head."):
            assert not torch.equal(after[k], v), k
        else:
            assert torch.equal(after[k], v), k
    assert all(p.requires_grad for p in model.parameters())


# -- the peer applies finetune_steps (peer/learner.py Learner.adopt) -----------------------


def _organ_learner(finetune_steps: int) -> Learner:
    from silomesh.models.registry import get_task
    from silomesh.peer.learner import Learner

    task = get_task("organs", image_size=32, n_train=16, n_test=8)
    silo = task.make_federation(2, 0).silos[0]
    strategy = get_strategy("segviz", {"finetune_steps": finetune_steps, "finetune_lr": 1e-2})
    return Learner(task, silo, size="tiny", init_seed=0, batch_size=4, lr=1e-2, strategy=strategy)


def _aggregated_state(learner: Learner) -> dict[str, np.ndarray]:
    """A stand-in for an aggregated state: the learner's state, perturbed everywhere."""
    rng = np.random.default_rng(1)
    return {k: (v + rng.normal(0, 0.01, v.shape).astype(v.dtype)) if v.dtype.kind == "f" else v
            for k, v in learner.state().items()}


def test_learner_adopt_fine_tunes_only_the_head_when_segviz_finetune_steps_is_set() -> None:
    learner = _organ_learner(finetune_steps=3)
    heads = learner.strategy.config.head_prefixes
    assert heads
    aggregated = _aggregated_state(learner)
    committed = learner.adopt(aggregated)
    body = [k for k in aggregated if not k.startswith(heads)]
    head = [k for k in aggregated if k.startswith(heads) and aggregated[k].dtype.kind == "f"]
    assert body and head
    for k in body:
        np.testing.assert_array_equal(committed[k], aggregated[k], err_msg=k)
    assert any(not np.array_equal(committed[k], aggregated[k]) for k in head)
    for k, v in learner.state().items():  # the evaluated model is the committed one
        np.testing.assert_array_equal(v, committed[k])


def test_learner_adopt_returns_the_aggregated_state_unchanged_without_finetune_steps() -> None:
    learner = _organ_learner(finetune_steps=0)
    aggregated = _aggregated_state(learner)
    committed = learner.adopt(aggregated)
    assert committed.keys() == aggregated.keys()
    for k in aggregated:
        np.testing.assert_array_equal(committed[k], aggregated[k], err_msg=k)
