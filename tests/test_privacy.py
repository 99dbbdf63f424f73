"""DP-SGD local training: clipping, noise, accounting, the budget, and that every training path pays.

Tiny data (24 samples of 32x32) so each test takes seconds; the privacy maths is checked
against Opacus's own accountant and against a hand-computed clipping bound.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn

from silomesh.models.privacy import BudgetExhausted, DPSettings, DPTrainer
from silomesh.models.registry import get_task
from silomesh.models.task import ArrayDataset, Federation, Task
from silomesh.peer.learner import Learner
from silomesh.strategies import get_strategy

SEED = 0


def linear_data(n: int = 12) -> ArrayDataset:
    rng = np.random.default_rng(SEED)
    return ArrayDataset({"image": rng.normal(size=(n, 4)).astype(np.float32),
                         "y": rng.normal(size=(n,)).astype(np.float32)})


def test_calibrated_noise_spends_the_target_over_the_planned_steps() -> None:
    dp = DPTrainer(DPSettings(target_epsilon=3.0, delta=1e-5, planned_steps=50), n_samples=100, batch_size=10)
    assert dp.epsilon == 0.0
    eps = dp.epsilon_after(50)
    assert 2.8 < eps <= 3.0
    assert dp.can_train(50) and not dp.can_train(80)


def test_epsilon_matches_opacus_rdp_accountant_for_the_same_steps() -> None:
    data = linear_data()
    model = nn.Linear(4, 1)
    dp = DPTrainer(DPSettings(target_epsilon=50.0, noise_multiplier=1.1), len(data), batch_size=4)
    loss = lambda b: ((model(b["image"])[:, 0] - b["y"]) ** 2).mean()  # noqa: E731
    dp.run(list(model.parameters()), loss, dp.batches(data, 1)(), 7, lambda ps: torch.optim.SGD(ps, lr=0.1))
    ref = RDPAccountant()
    for _ in range(7):
        ref.step(noise_multiplier=1.1, sample_rate=4 / 12)
    assert dp.epsilon == pytest.approx(ref.get_epsilon(1e-5))
    spent = dp.close_period()
    assert spent.steps == 7 and spent.epsilon_total == pytest.approx(dp.epsilon)
    assert spent.epsilon_round == pytest.approx(dp.epsilon)  # the first period is the whole history


def test_each_per_sample_gradient_is_clipped_before_the_sum() -> None:
    # sigma tiny, SGD lr 1: the update is minus the sum of clipped per-sample gradients / E
    data = linear_data(8)
    model = nn.Linear(4, 1)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    clip = 0.01
    dp = DPTrainer(DPSettings(target_epsilon=1e9, noise_multiplier=1e-3, max_grad_norm=clip), 8, batch_size=8)
    seen: list[int] = []

    def loss(b: Any) -> torch.Tensor:  # noqa: ANN401 - a batch dict
        seen.append(len(b["image"]))
        return 1e3 * ((model(b["image"])[:, 0] - b["y"]) ** 2).mean()

    full = {k: torch.from_numpy(v) for k, v in data.arrays.items()}
    # the reference, computed by hand: each sample's gradient, clipped to norm <= clip
    expected = torch.zeros_like(before)
    for i in range(8):
        model.zero_grad()
        loss({k: v[i:i + 1] for k, v in full.items()}).backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()])  # type: ignore[union-attr]
        expected -= g * min(1.0, clip / float(g.norm())) / 8
    model.zero_grad()
    seen.clear()
    dp.run(list(model.parameters()), loss, iter([full]), 1, lambda ps: torch.optim.SGD(ps, lr=1.0))
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert seen == [1] * 8  # one sample at a time: no gradient depends on another record
    # noise std is sigma * clip / E = 1.25e-6 per coordinate
    assert torch.allclose(after - before, expected, atol=2e-5)
    assert float(expected.norm()) > 1e-3  # the step is not lost in the tolerance


def test_training_past_the_budget_raises_and_leaves_the_model_unchanged() -> None:
    data = linear_data()
    model = nn.Linear(4, 1)
    dp = DPTrainer(DPSettings(target_epsilon=3.0, noise_multiplier=1.5), len(data), batch_size=4)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(BudgetExhausted, match="target 3"):
        dp.run(list(model.parameters()), lambda b: model(b["image"]).sum(), dp.batches(data, 0)(), 1000,
               lambda ps: torch.optim.SGD(ps, lr=0.1))
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))
    assert dp.epsilon == 0.0
    # a refused training ends the peer's part even where a smaller one would still fit
    from silomesh.peer.privacy import can_afford

    assert dp.exhausted and dp.can_train(1) and not can_afford(dp, 1)
    with pytest.raises(BudgetExhausted, match="budget is spent"):  # a served train-request too
        dp.run(list(model.parameters()), lambda b: model(b["image"]).sum(), dp.batches(data, 0)(), 1,
               lambda ps: torch.optim.SGD(ps, lr=0.1))
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))


def test_the_noise_added_has_the_calibrated_standard_deviation() -> None:
    # a loss with zero gradient: the whole update is the noise, std sigma * C / E per coordinate
    n, sigma, clip = 16, 1.0, 1.0
    model = nn.Linear(400, 1)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    dp = DPTrainer(DPSettings(target_epsilon=1e9, noise_multiplier=sigma, max_grad_norm=clip), n, batch_size=n)
    data = ArrayDataset({"image": np.zeros((n, 400), np.float32)})
    full = {"image": torch.from_numpy(data["image"])}
    dp.run(list(model.parameters()), lambda b: 0.0 * model(b["image"]).sum(), iter([full]), 1,
           lambda ps: torch.optim.SGD(ps, lr=1.0))
    update = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    expected = sigma * clip / n  # Opacus divides the noised sum by the expected batch size
    assert float(update.std()) == pytest.approx(expected, rel=0.15)  # 401 coordinates: about 3.5 % std error
    assert float(update.abs().max()) > 0


def test_resumed_history_counts_toward_the_budget() -> None:
    fresh = DPTrainer(DPSettings(target_epsilon=5.0, noise_multiplier=1.0), 100, 10)
    resumed = DPTrainer(DPSettings(target_epsilon=5.0, noise_multiplier=1.0), 100, 10, [(1.0, 0.1, 40)])
    assert fresh.epsilon == 0.0
    assert resumed.epsilon == pytest.approx(fresh.epsilon_after(40))


@pytest.mark.parametrize("bad", [
    {"target_epsilon": 0.0, "noise_multiplier": 1.0},
    {"delta": 1.0, "noise_multiplier": 1.0},
    {"max_grad_norm": -1.0, "noise_multiplier": 1.0},
    {"noise_multiplier": None, "planned_steps": 0},
])
def test_bad_settings_name_the_field(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="privacy"):
        DPSettings(**bad)


# -- every training path on the silo's data goes through the one trainer -------------------


@pytest.fixture(scope="module")
def catheter() -> tuple[Task, Federation]:
    task = get_task("catheter")
    return task, task.make_federation(2, SEED, image_size=32, n_train=24, n_test=8, n_test_source=8)


@pytest.fixture(scope="module")
def lesion() -> tuple[Task, Federation]:
    task = get_task("lesion")
    return task, task.make_federation(2, SEED, image_size=32, n_train=24, n_test=8)


def private_learner(task: Task, fed: Federation, strategy: str, silo: int = 0,
                    params: dict[str, Any] | None = None) -> Learner:
    return Learner(task, fed.silos[silo], size="tiny", init_seed=SEED, batch_size=6, lr=1e-2,
                   strategy=get_strategy(strategy, params or {}),
                   privacy=DPSettings(target_epsilon=8.0, noise_multiplier=1.0))


def steps_counted(x: Learner) -> int:
    assert x.dp is not None
    return sum(n for _, _, n in x.dp.accountant.history)


def test_local_training_is_counted(catheter: tuple[Task, Federation]) -> None:
    x = private_learner(*catheter, "fedavg")
    before = x.state()
    step = x.train(2)
    assert steps_counted(x) == 2
    assert any(not np.array_equal(before[k], step.state[k]) for k in before)


def test_a_neighbours_model_trained_on_our_data_spends_our_budget(catheter: tuple[Task, Federation]) -> None:
    x = private_learner(*catheter, "fedefm", params={"local_steps": 2})
    other = private_learner(*catheter, "fedefm", silo=1)
    x.serve_train_request(other.state(), 2)
    assert steps_counted(x) == 2 and steps_counted(other) == 0


def test_fedefm_distillation_is_counted(catheter: tuple[Task, Federation]) -> None:
    from silomesh.strategies import Contribution

    x = private_learner(*catheter, "fedefm", params={"distill_steps": 2})
    expert = Contribution("p1", x.state(), 24)
    x.learn_from_experts([expert])
    assert steps_counted(x) == 2


def test_segviz_head_finetune_is_counted(catheter: tuple[Task, Federation]) -> None:
    x = private_learner(*catheter, "segviz", params={"finetune_steps": 2})
    x.adopt(x.state())
    assert steps_counted(x) == 2


def test_fedmix_pseudo_label_steps_are_one_step_over_both_networks(lesion: tuple[Task, Federation]) -> None:
    task, fed = lesion
    weak = next(i for i, s in enumerate(fed.silos) if "mask" not in s.train.arrays)
    x = private_learner(task, fed, "fedmix", silo=weak)
    step = x.train(2)
    assert steps_counted(x) == 2  # both networks stepped together, each sample clipped once
    assert step.info.get("pseudo_steps", 0) > 0


def test_a_simnet_scenario_passes_its_privacy_table_to_every_peer_and_checks_it() -> None:
    from silomesh.simnet.scenario import Scenario, ScenarioError, make_scenario

    s = make_scenario({"rounds": 2, "privacy": {"target_epsilon": 3.0}})
    assert s.privacy == {"target_epsilon": 3.0}
    assert Scenario.from_json(s.to_json()) == s
    with pytest.raises(ScenarioError, match=r"privacy\.delta"):
        make_scenario({"privacy": {"target_epsilon": 3.0, "delta": 2.0}})
    with pytest.raises(ScenarioError, match=r"privacy\.epsilon"):
        make_scenario({"privacy": {"epsilon": 3.0}})


def test_a_model_with_batchnorm_is_refused_for_private_training(catheter: tuple[Task, Federation]) -> None:
    task, fed = catheter

    class BatchNormTask(type(task)):  # type: ignore[misc]
        def make_model(self, size: str = "tiny", seed: int = 0) -> nn.Module:
            return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1))

    with pytest.raises(ValueError, match="BatchNorm"):
        Learner(BatchNormTask(), fed.silos[0], size="tiny", init_seed=SEED, batch_size=6, lr=1e-2,
                strategy=get_strategy("fedavg"), privacy=DPSettings(target_epsilon=3.0, noise_multiplier=1.0))
