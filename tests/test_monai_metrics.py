"""MONAI's Dice, Dice+CE loss and Hausdorff distance against ours, on the same predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss
from monai.metrics import compute_dice

from silomesh.models.metrics import dice_per_class, dice_per_image, hausdorff95_per_class
from silomesh.models.segmentation import multiclass_loss


def _maps(seed: int, shape: tuple[int, ...] = (6, 24, 24)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 3, shape)
    pred = np.where(rng.random(shape) < 0.7, target, rng.integers(0, 3, shape))
    return pred, target


def _onehot(x: np.ndarray, k: int = 3) -> torch.Tensor:
    return torch.from_numpy(np.stack([x == c for c in range(k)], 1).astype(np.float32))


def test_our_global_dice_equals_monais_dice_over_the_whole_set_as_one_image() -> None:
    pred, target = _maps(0)
    ours = dice_per_class(pred, target, [0, 1, 2])
    # MONAI's Dice of one "image" made of all images side by side is the global variant
    whole = compute_dice(_onehot(pred.reshape(1, -1)), _onehot(target.reshape(1, -1)), include_background=True)
    assert [ours[c] for c in range(3)] == pytest.approx(whole[0].tolist(), abs=1e-6)


def test_per_image_dice_is_monais_dicemetric_and_equals_global_dice_when_images_are_alike() -> None:
    pred, target = _maps(1)
    per_image = compute_dice(_onehot(pred), _onehot(target), include_background=True).mean(0)
    assert [dice_per_image(pred, target, [0, 1, 2])[c] for c in range(3)] == pytest.approx(per_image.tolist(), abs=1e-6)
    # random maps of equal class balance: the two averages agree to within 0.01
    assert dice_per_image(pred, target, [1, 2]) == pytest.approx(dice_per_class(pred, target, [1, 2]), abs=0.01)


def test_thin_structure_missed_in_one_image_is_why_we_keep_global_dice() -> None:
    """A guidewire of 3 pixels missed in one image, 300 pixels right in another."""
    target = np.zeros((2, 32, 32), dtype=np.int64)
    target[0, 5:8, 5] = 1  # thin: missed
    target[1, :10, :30] = 1  # large: found
    pred = target.copy()
    pred[0] = 0
    global_dice = dice_per_class(pred, target, [1])[1]
    per_image = dice_per_image(pred, target, [1])[1]
    assert global_dice == pytest.approx(2 * 300 / (300 + 303))  # 0.995
    assert per_image == pytest.approx(0.5)  # mean of 0 and 1


def test_our_multiclass_loss_equals_monais_dicece_loss_on_the_same_logits() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 16, 16)
    target = torch.randint(0, 3, (4, 16, 16))
    ours = multiclass_loss(logits, target, [1, 2])
    monai = DiceCELoss(
        include_background=False, to_onehot_y=True, softmax=True, batch=True, smooth_nr=1.0, smooth_dr=1.0
    )(logits, target[:, None])
    assert float(ours) == pytest.approx(float(monai), abs=1e-5)


def test_hausdorff95_is_the_shift_of_a_shifted_square() -> None:
    target = np.zeros((1, 32, 32), dtype=np.int64)
    target[0, 8:20, 8:20] = 1
    pred = np.roll(target, 3, axis=2)
    assert hausdorff95_per_class(pred, target, [1])[1] == pytest.approx(3.0)
    assert hausdorff95_per_class(pred, target, [1], spacing=(2.0, 0.5))[1] == pytest.approx(1.5)
    assert np.isnan(hausdorff95_per_class(pred, target, [2])[2])
