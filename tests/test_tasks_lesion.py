"""lesion task: supervision levels per silo, weak targets, pluggable loss, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from silomesh.models.lesion import (
    LesionConfig,
    LesionTask,
    box_masks,
    box_weak_mask,
    camera_style,
    generate,
    image_logit,
    mask_box,
)
from silomesh.models.segmentation import IGNORE
from silomesh.models.synth import stream
from silomesh.models.task import Federation
from silomesh.models.train import train_local

SMALL = {"image_size": 32, "n_train": 16, "n_test": 8}


@pytest.fixture(scope="module")
def task() -> LesionTask:
    return LesionTask(**SMALL)


@pytest.fixture(scope="module")
def fed(task: LesionTask) -> Federation:
    return task.make_federation(3, seed=0)


def test_silos_get_mask_box_and_image_level_supervision(fed: Federation) -> None:
    kinds = [s.train.label_kind for s in fed.silos]
    assert kinds == ["mask", "box", "present"]
    assert set(fed.silos[0].train.arrays) == {"image", "mask"}
    assert set(fed.silos[1].train.arrays) == {"image", "box", "present"}
    assert set(fed.silos[2].train.arrays) == {"image", "present"}
    assert [s.info["label_kind"] for s in fed.silos] == kinds


def test_images_are_rgb_and_test_sets_always_have_masks(fed: Federation) -> None:
    image = fed.silos[2].train["image"]
    assert image.shape == (16, 3, 32, 32) and image.dtype == np.float32
    for silo in fed.silos:
        assert silo.test.label_kind == "mask"
        assert {"mask", "present"} <= set(silo.test.arrays)
    present = fed.tests["all"]["present"]
    assert 0 < present.sum() < len(present)  # some images with and some without a lesion


def test_generation_is_deterministic_per_seed(task: LesionTask) -> None:
    a = task.make_federation(2, seed=1).silos[1].train
    b = task.make_federation(2, seed=1).silos[1].train
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["box"], b["box"])


def test_unjittered_boxes_are_the_tight_boxes_of_the_masks(task: LesionTask) -> None:
    cfg = LesionConfig(image_size=32, box_jitter=0.0)
    style = camera_style(0, 0)
    boxed = generate(10, stream(0, 7), cfg, style, "box")
    masked = generate(10, stream(0, 7), cfg, style, "mask")
    for box, mask, present in zip(boxed["box"], masked["mask"], boxed["present"], strict=True):
        assert np.array_equal(box, mask_box(mask))
        assert present == float(mask.any())


def test_box_masks_fill_each_box() -> None:
    masks = box_masks(np.array([[1, 2, 3, 5], [0, 0, 0, 0]], dtype=np.float32), (6, 6))
    assert masks[0].sum() == 2 * 3 and masks[0, 1:3, 2:5].all()
    assert not masks[1].any()


def test_box_weak_mask_marks_ellipse_background_and_ignored_ring() -> None:
    box = torch.tensor([[4.0, 4.0, 12.0, 12.0], [4.0, 4.0, 12.0, 12.0]])
    weak = box_weak_mask(box, torch.tensor([1.0, 0.0]), (16, 16))
    assert weak[0, 8, 8] == 1  # centre of the box
    assert weak[0, 0, 0] == 0  # far outside
    assert weak[0, 4, 4] == IGNORE  # box corner: neither sure lesion nor background
    assert torch.all(weak[1] == 0)  # absent image: all background


def test_image_logit_is_the_mean_of_the_top_two_percent() -> None:
    logits = torch.zeros(1, 1, 10, 10)
    logits[0, 0, 0, 0] = 4.0
    logits[0, 0, 0, 1] = 2.0
    assert image_logit(logits).item() == pytest.approx(3.0)  # k = ceil(0.02 * 100) = 2


def test_loss_terms_follow_the_keys_in_the_batch(task: LesionTask, fed: Federation) -> None:
    model = task.make_model("tiny", seed=0)
    rng = np.random.default_rng(0)
    found = [set(task.loss_terms(model, next(s.train.batches(4, rng)))) for s in fed.silos]
    assert found == [{"pixel"}, {"box", "present"}, {"present"}]


def test_pseudo_labels_in_a_batch_become_a_pixel_target(task: LesionTask, fed: Federation) -> None:
    model = task.make_model("tiny", seed=0)
    batch = next(fed.silos[2].train.batches(4, np.random.default_rng(0)))
    hard = {**batch, "pseudo": torch.zeros(4, 32, 32, dtype=torch.long)}
    soft = {**batch, "pseudo": torch.full((4, 32, 32), 0.25)}
    assert set(task.loss_terms(model, hard)) == {"pseudo", "present"}
    assert task.loss_terms(model, soft)["pseudo"].item() != pytest.approx(task.loss_terms(model, hard)["pseudo"].item())
    ignored = {**batch, "pseudo": torch.full((4, 32, 32), IGNORE, dtype=torch.long)}
    assert task.loss_terms(model, ignored)["pseudo"].item() == pytest.approx(0.0, abs=1e-6)


def test_a_teacher_fills_in_only_what_the_weak_labels_leave_open(task: LesionTask, fed: Federation) -> None:
    box = torch.tensor([[4.0, 4.0, 12.0, 12.0], [4.0, 4.0, 12.0, 12.0]])
    present = torch.tensor([1.0, 0.0])
    teacher = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    soft = torch.sigmoid(teacher[:, 0])
    boxed = task.teacher_targets({"box": box, "present": present, "teacher_logits": teacher}, (16, 16))
    weak = box_weak_mask(box, present, (16, 16))
    assert torch.equal(boxed[weak != IGNORE], weak[weak != IGNORE].float())  # the box speaks: its label
    assert torch.equal(boxed[weak == IGNORE], soft[weak == IGNORE])  # the rim: the teacher
    labelled = task.teacher_targets({"present": present, "teacher_logits": teacher}, (16, 16))
    assert torch.equal(labelled[0], soft[0]) and torch.all(labelled[1] == 0)  # absent image: background
    model = task.make_model("tiny", seed=0)
    rng = np.random.default_rng(0)
    for silo, expected in ((0, {"pixel"}), (1, {"box", "present", "teacher"}), (2, {"present", "teacher"})):
        batch = dict(next(fed.silos[silo].train.batches(4, rng)))
        batch["teacher_logits"] = torch.zeros(4, 1, 32, 32)
        assert set(task.loss_terms(model, batch)) == expected  # pixel masks need no teacher


def test_a_batch_without_supervision_is_an_error(task: LesionTask) -> None:
    model = task.make_model("tiny", seed=0)
    with pytest.raises(ValueError, match="no supervision"):
        task.loss(model, {"image": torch.zeros(2, 3, 32, 32)})


@pytest.mark.parametrize(
    ("silo", "steps", "batch_size", "lr", "factor"),
    [(0, 30, 4, 1e-2, 0.8), (1, 30, 4, 1e-2, 0.8), (2, 40, 8, 3e-3, 0.9)],
    ids=["mask", "box", "present"],
)
def test_a_few_steps_reduce_the_loss_for_each_label_kind(
    task: LesionTask,
    fed: Federation,
    silo: int,
    steps: int,
    batch_size: int,
    lr: float,
    factor: float,
) -> None:
    model = task.make_model("tiny", seed=0)
    losses = train_local(task, model, fed.silos[silo].train, steps, batch_size, lr)
    assert np.mean(losses[-5:]) < factor * np.mean(losses[:5])


def test_evaluate_reports_dice_and_image_accuracy(task: LesionTask, fed: Federation) -> None:
    report = task.evaluate(task.make_model("tiny", seed=0), fed.tests["all"])
    assert {"dice", "iou", "dice_lesion", "accuracy"} <= set(report)
    assert 0.0 <= report["accuracy"] <= 1.0


def test_n_train_mask_shrinks_only_the_pixel_mask_silos_to_a_prefix() -> None:
    scarce = LesionTask(**SMALL, n_train_mask=4).make_federation(6, seed=0)
    full = LesionTask(**SMALL).make_federation(6, seed=0)
    for s, f in zip(scarce.silos, full.silos, strict=True):
        if s.train.label_kind == "mask":
            assert len(s.train) == 4
            for k, v in s.train.arrays.items():
                np.testing.assert_array_equal(v, f.train.arrays[k][:4])
        else:
            assert len(s.train) == SMALL["n_train"]
        np.testing.assert_array_equal(s.test["mask"], f.test["mask"])
    assert sum(s.train.label_kind == "mask" for s in scarce.silos) == 2


def test_n_train_mask_unset_keeps_n_train_images(task: LesionTask) -> None:
    assert task.config.n_train_mask is None
    assert len(task.make_federation(1, seed=0, n_train_mask=None).silos[0].train) == SMALL["n_train"]


@pytest.mark.parametrize("bad", [0, -1, 17, 2.5, True])
def test_n_train_mask_outside_1_to_n_train_is_a_clear_error(bad: object) -> None:
    with pytest.raises(ValueError, match="n_train_mask"):
        LesionTask(**SMALL, n_train_mask=bad)
    with pytest.raises(ValueError, match="n_train_mask"):
        LesionTask(**SMALL).make_federation(3, seed=0, n_train_mask=bad)
