"""organs task: partial labels, 2D and 3D phantoms, per-organ heads, loss and metrics."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from silomesh.models.organs import ORGANS, OrgansTask
from silomesh.models.task import ArrayDataset, Federation
from silomesh.models.train import train_local

SMALL = {"image_size": 32, "n_train": 12, "n_test": 6, "volume_shape": (8, 16, 16)}


@pytest.fixture(scope="module")
def task() -> OrgansTask:
    return OrgansTask(**SMALL)


@pytest.fixture(scope="module")
def fed(task: OrgansTask) -> Federation:
    return task.make_federation(4, seed=0)


def test_slices_have_declared_shapes_and_ct_window_range(fed: Federation) -> None:
    train = fed.silos[0].train
    assert train["image"].shape == (12, 1, 32, 32) and train["image"].dtype == np.float32
    assert train["mask"].shape == (12, 32, 32) and train["mask"].dtype == np.int64
    assert train["image"].min() >= 0.0 and train["image"].max() <= 1.0


def test_silo_k_annotates_only_organ_k(fed: Federation) -> None:
    for k, silo in enumerate(fed.silos):
        assert set(np.unique(silo.train["mask"])) == {0, k + 1}
        expected = np.zeros(len(ORGANS), dtype=bool)
        expected[k] = True
        assert np.all(silo.train["labelled"] == expected)
        assert silo.info["organ"] == ORGANS[k]


def test_test_sets_are_fully_labelled_with_every_organ(fed: Federation) -> None:
    test = fed.tests["all"]
    assert set(np.unique(test["mask"])) == {0, 1, 2, 3, 4}
    assert np.all(test["labelled"])
    assert all(np.all(s.test["labelled"]) for s in fed.silos)


def test_generation_is_deterministic_per_seed(task: OrgansTask) -> None:
    a = task.make_federation(1, seed=5).silos[0].train
    b = task.make_federation(1, seed=5).silos[0].train
    c = task.make_federation(1, seed=6).silos[0].train
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
    assert not np.array_equal(a["image"], c["image"])


def test_silos_have_different_scanners(fed: Federation) -> None:
    noise = {s.info["scanner"]["noise_hu"] for s in fed.silos}
    assert len(noise) == 4


def test_fully_labelled_option_labels_every_organ(task: OrgansTask) -> None:
    silo = task.make_federation(1, seed=0, partial=False).silos[0]
    assert np.all(silo.train["labelled"]) and len(np.unique(silo.train["mask"])) == 5


def test_model_shaping_fields_cannot_change_per_federation(task: OrgansTask) -> None:
    with pytest.raises(ValueError, match="'organs' shapes the model"):
        task.make_federation(2, seed=0, organs=("liver", "spleen"))


def test_3d_option_makes_volumes() -> None:
    task = OrgansTask(dims=3, **SMALL)
    fed = task.make_federation(2, seed=0)
    assert fed.silos[0].train["image"].shape == (12, 1, 8, 16, 16)
    assert fed.silos[1].train["mask"].shape == (12, 8, 16, 16)
    assert set(np.unique(fed.silos[1].train["mask"])) == {0, 2}


def test_head_rows_are_organs_and_split_by_name(task: OrgansTask) -> None:
    model = task.make_model("tiny", seed=0)
    state = model.state_dict()
    assert state["head.weight"].shape[0] == len(ORGANS)
    assert model.split_names()[1] == ["head.weight", "head.bias"]


class _Fixed(nn.Module):
    """Returns the same logits for any input (to probe the loss)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


def test_loss_ignores_organs_a_silo_does_not_annotate(task: OrgansTask, fed: Federation) -> None:
    batch = next(fed.silos[2].train.batches(4, np.random.default_rng(0)))  # kidneys only
    model = _Fixed(torch.randn(4, len(ORGANS), 32, 32))
    task.loss(model, batch).backward()
    grad = model.logits.grad
    assert grad is not None
    assert torch.count_nonzero(grad[:, 2]) > 0
    assert torch.count_nonzero(grad[:, [0, 1, 3]]) == 0


class _Oracle(nn.Module):
    """Perfect logits for a known label map, served in evaluation order."""

    def __init__(self, mask: np.ndarray, organs: int) -> None:
        super().__init__()
        onehot = np.stack([mask == k + 1 for k in range(organs)], axis=1)
        self.logits = torch.from_numpy(np.where(onehot, 8.0, -8.0).astype(np.float32))
        self.start = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.logits[self.start : self.start + len(x)]
        self.start += len(x)
        return out


def test_perfect_prediction_scores_dice_one_for_every_organ(task: OrgansTask, fed: Federation) -> None:
    test = fed.tests["all"]
    report = task.evaluate(_Oracle(test["mask"], len(ORGANS)), test)
    assert report["dice"] == pytest.approx(1.0)
    assert all(report[f"dice_{o}"] == pytest.approx(1.0) for o in ORGANS)


def test_evaluate_scores_only_annotated_organs_on_partial_data(task: OrgansTask, fed: Federation) -> None:
    train = fed.silos[0].train
    report = task.evaluate(_Oracle(train["mask"], len(ORGANS)), train)
    assert {k for k in report if k.startswith("dice_")} == {"dice_liver"}


@pytest.mark.parametrize("dims", [2, 3])
def test_a_few_steps_reduce_the_loss(dims: int) -> None:
    task = OrgansTask(dims=dims, **SMALL)
    data: ArrayDataset = task.make_federation(1, seed=0).silos[0].train
    model = task.make_model("tiny", seed=0)
    losses = train_local(task, model, data, steps=30, batch_size=4, lr=1e-2)
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5])


def test_with_a_teacher_the_unannotated_organs_follow_it_except_on_annotated_pixels(
    task: OrgansTask, fed: Federation
) -> None:
    batch = dict(next(fed.silos[2].train.batches(4, np.random.default_rng(0))))
    teacher = torch.randn(4, len(ORGANS), 32, 32, generator=torch.Generator().manual_seed(0))
    kidneys = batch["mask"] == 3
    assert kidneys.any() and (~kidneys).any()
    plain, plain_valid = task.targets(batch, len(ORGANS), 2)
    target, valid = task.targets({**batch, "teacher_logits": teacher}, len(ORGANS), 2)
    assert plain_valid is not None and valid is None  # with a teacher every channel counts
    assert torch.equal(target[:, 2], plain[:, 2])  # the annotated organ: its mask, as without a teacher
    for other in (0, 1, 3):
        expected = torch.where(kidneys, 0.0, torch.sigmoid(teacher[:, other]))
        assert torch.allclose(target[:, other], expected)
    model = _Fixed(torch.randn(4, len(ORGANS), 32, 32))
    task.loss(model, {**batch, "teacher_logits": teacher}).backward()
    assert model.logits.grad is not None and torch.count_nonzero(model.logits.grad[:, [0, 1, 3]]) > 0


def test_a_teacher_keeps_an_organ_the_silo_does_not_annotate(task: OrgansTask, fed: Federation) -> None:
    """Learning the liver, then training on the spleen silo: without a teacher the liver
    channel drifts; with the model as it arrived for teacher it stays close."""
    liver = task.make_model("tiny", seed=0)
    train_local(task, liver, fed.silos[0].train, steps=30, batch_size=4, lr=1e-2, seed=1)
    images = torch.from_numpy(fed.tests["all"]["image"])

    def liver_drift(teacher: bool) -> float:
        model = task.make_model("tiny", seed=0)
        model.load_state_dict(liver.state_dict())
        train_local(task, model, fed.silos[1].train, steps=20, batch_size=4, lr=1e-2, seed=2,
                    teacher=copy.deepcopy(liver) if teacher else None)
        with torch.no_grad():
            model.eval()
            liver.eval()
            return float((torch.sigmoid(model(images)[:, 0]) - torch.sigmoid(liver(images)[:, 0])).abs().mean())

    kept, drifted = liver_drift(True), liver_drift(False)
    assert kept < 0.5 * drifted, (kept, drifted)


def test_a_teacher_is_refused_for_a_task_that_labels_everything() -> None:
    from silomesh.models.catheter import CatheterTask

    catheter = CatheterTask(image_size=32, n_train=4, n_test=2, n_test_source=2)
    model = catheter.make_model("tiny", seed=0)
    data = catheter.make_federation(1, seed=0).silos[0].train
    with pytest.raises(ValueError, match="teacher"):
        train_local(catheter, model, data, steps=1, batch_size=2, teacher=copy.deepcopy(model))
