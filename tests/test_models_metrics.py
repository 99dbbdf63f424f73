"""Metrics and segmentation losses against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from silomesh.models.metrics import dice_per_class, iou_per_class
from silomesh.models.segmentation import (
    IGNORE,
    binary_loss,
    multiclass_loss,
    segmentation_report,
    soft_dice_loss,
)

PRED = np.array([[0, 1, 1], [2, 2, 0]])
TARGET = np.array([[0, 1, 0], [2, 1, 1]])


def test_dice_and_iou_match_hand_computed_values() -> None:
    # class 1: tp=1 fp=1 fn=2 -> dice 2/5, iou 1/4; class 2: tp=1 fp=1 fn=0 -> 2/3, 1/2
    dice = dice_per_class(PRED, TARGET, [1, 2])
    iou = iou_per_class(PRED, TARGET, [1, 2])
    assert dice == pytest.approx({1: 0.4, 2: 2 / 3})
    assert iou == pytest.approx({1: 0.25, 2: 0.5})


def test_class_absent_from_both_scores_one() -> None:
    assert dice_per_class(PRED, TARGET, [5]) == {5: 1.0}


def test_segmentation_report_averages_the_named_classes() -> None:
    report = segmentation_report(PRED, TARGET, {1: "a", 2: "b"})
    assert report["dice"] == pytest.approx((0.4 + 2 / 3) / 2)
    assert report["iou_b"] == pytest.approx(0.5)


def test_soft_dice_loss_is_zero_for_a_perfect_prediction_and_known_otherwise() -> None:
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    assert soft_dice_loss(target, target, eps=0.0).item() == pytest.approx(0.0)
    probs = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]]]])
    # inter 1, sums 2 + 2 -> dice 0.5
    assert soft_dice_loss(probs, target, eps=0.0).item() == pytest.approx(0.5)


def test_soft_dice_loss_skips_channels_without_supervision() -> None:
    probs = torch.rand(2, 3, 4, 4)
    target = (torch.rand(2, 3, 4, 4) > 0.5).float()
    valid = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).view(2, 3, 1, 1)
    only_first = soft_dice_loss(probs[:, :1], target[:, :1])
    assert soft_dice_loss(probs, target, valid).item() == pytest.approx(only_first.item())


def test_multiclass_loss_ignores_pixels_marked_ignore() -> None:
    target = torch.tensor([[[0, 1], [2, IGNORE]]])
    logits = torch.randn(1, 3, 2, 2)
    changed = logits.clone()
    changed[..., 1, 1] += 10.0  # only the ignored pixel changes
    assert multiclass_loss(logits, target, [1, 2]).item() == pytest.approx(
        multiclass_loss(changed, target, [1, 2]).item()
    )


def test_binary_loss_is_lower_for_the_right_answer() -> None:
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    good = binary_loss(10 * (2 * target - 1), target)
    bad = binary_loss(-10 * (2 * target - 1), target)
    assert good.item() < 0.05 < bad.item()
