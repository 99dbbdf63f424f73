"""Losses, evaluation and model-building helpers shared by the segmentation tasks.

Dice here is the *global* (batch) soft Dice: intersections and sums run over the whole
batch and all pixels, which, like :mod:`silomesh.models.metrics`, stays stable for thin
or rare structures (guidewires, small organs) that are absent from some images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields, replace
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from silomesh.models.metrics import dice_per_class, iou_per_class
from silomesh.models.task import ArrayDataset, SplitModel
from silomesh.models.unet import UNet, UNetConfig
from silomesh.models.vit import ViTConfig, ViTSeg

#: label value meaning "no supervision here" in pixel targets (pseudo-labels, weak masks)
IGNORE = -1


def soft_dice_loss(
    probs: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None, eps: float = 1.0
) -> torch.Tensor:
    """Mean over channels of ``1 - Dice``.

    Args:
        probs: ``(B, K, *S)`` probabilities.
        target: ``(B, K, *S)`` targets in [0, 1].
        valid: optional ``(B, 1 or K, *S)`` weights (broadcastable); zero removes a
            pixel, and channels with no supervised pixel are left out of the mean.
        eps: smoothing, keeps the loss finite for empty channels.
    """
    dims = (0, *range(2, probs.dim()))
    if valid is not None:
        valid = valid.to(probs.dtype)
        probs = probs * valid
        target = target * valid
    inter = (probs * target).sum(dims)
    denom = probs.sum(dims) + target.sum(dims)
    per_channel = 1.0 - (2.0 * inter + eps) / (denom + eps)  # (K,)
    if valid is None:
        return per_channel.mean()
    # channels without any supervised pixel do not count (partial labels)
    supervised = (valid.expand_as(probs).sum(dims) > 0).to(probs.dtype)
    return (per_channel * supervised).sum() / supervised.sum().clamp(min=1.0)


def multiclass_loss(logits: torch.Tensor, target: torch.Tensor, dice_classes: Sequence[int]) -> torch.Tensor:
    """Cross-entropy + soft Dice over ``dice_classes`` for softmax outputs.

    Args:
        logits: ``(B, K, *S)``.
        target: ``(B, *S)`` int64 class ids; :data:`IGNORE` pixels are skipped.
        dice_classes: classes entering the Dice term (usually the foreground ones).
    """
    target = target.long()
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE)
    valid = (target != IGNORE).unsqueeze(1).to(logits.dtype)  # (B, 1, *S)
    onehot = F.one_hot(target.clamp(min=0), logits.shape[1]).movedim(-1, 1).to(logits.dtype)
    idx = list(dice_classes)
    dice = soft_dice_loss(logits.softmax(1)[:, idx], onehot[:, idx], valid)
    return ce + dice


def binary_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy + soft Dice for sigmoid outputs.

    Args:
        logits: ``(B, K, *S)``.
        target: ``(B, K, *S)`` in [0, 1] (soft targets allowed).
        valid: optional ``(B, 1 or K, *S)`` 0/1 weights; zero removes a pixel.
    """
    target = target.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if valid is None:
        bce_mean = bce.mean()
    else:
        weights = valid.to(logits.dtype).expand_as(bce)
        bce_mean = (bce * weights).sum() / weights.sum().clamp(min=1.0)
    return bce_mean + soft_dice_loss(torch.sigmoid(logits), target, valid)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for parameter-free models)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def predict_dataset(
    model: nn.Module,
    data: ArrayDataset,
    predict: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    batch_size: int = 32,
) -> np.ndarray:
    """Run ``predict(model, images)`` over ``data`` in eval mode; return stacked labels."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    out = []
    try:
        for start in range(0, len(data), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(data["image"][start : start + batch_size]))
            out.append(predict(model, x.to(device)).cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out, axis=0)


def segmentation_report(pred: np.ndarray, target: np.ndarray, names: Mapping[int, str]) -> dict[str, float]:
    """Dice and IoU per named class plus their means (``dice``, ``iou``).

    Args:
        pred: predicted label map, any shape.
        target: reference label map, same shape.
        names: class id -> name for the classes to report (usually the foreground).
    """
    classes = list(names)
    dice = dice_per_class(pred, target, classes)
    iou = iou_per_class(pred, target, classes)
    report = {
        "dice": float(np.mean(list(dice.values()))),
        "iou": float(np.mean(list(iou.values()))),
    }
    for c, name in names.items():
        report[f"dice_{name}"] = dice[c]
        report[f"iou_{name}"] = iou[c]
    return report


def build_segmenter(
    arch: str,
    size: str,
    seed: int,
    *,
    in_channels: int,
    out_channels: int,
    dims: int = 2,
    image_size: int = 64,
    head_bias: float = 0.0,
) -> SplitModel:
    """A freshly initialised U-Net or ViT, identical for identical arguments.

    The global torch RNG is forked, so building a model does not disturb other seeded
    code.

    Raises:
        ValueError: for an unknown architecture or size, or a 3D ViT.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: SplitModel
        if arch == "unet":
            cfg = UNetConfig.preset(size, dims, in_channels=in_channels, out_channels=out_channels, head_bias=head_bias)
            model = UNet(cfg)
        elif arch == "vit":
            if dims != 2:
                raise ValueError("the ViT backbone is 2D only; use arch='unet' for volumes")
            vit = ViTSeg(
                ViTConfig.preset(size, in_channels=in_channels, out_channels=out_channels, image_size=image_size)
            )
            assert vit.decoder.out.bias is not None  # the output convolution has a bias
            nn.init.constant_(vit.decoder.out.bias, head_bias)
            model = vit
        else:
            raise ValueError(f"unknown architecture {arch!r}; choose 'unet' or 'vit'")
    return model


C = TypeVar("C")


def apply_options(config: C, options: Mapping[str, Any], task: str, *, fixed: Sequence[str] = ()) -> C:
    """``dataclasses.replace(config, **options)`` with clear errors.

    Args:
        config: the task's configuration dataclass.
        options: overrides.
        task: task name, for messages.
        fixed: fields that shape the model; per-federation options may not change them
            (set them when creating the task instead).

    Raises:
        ValueError: naming an unknown option (and the known ones) or a fixed field.
    """
    for name in fixed:
        if name in options and options[name] != getattr(config, name):
            raise ValueError(
                f"option {name!r} shapes the model: set it when creating the task "
                f"(get_task({task!r}, {name}=...)), not per federation"
            )
    known = {f.name for f in fields(config)}  # type: ignore[arg-type]
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for task {task!r}; known: {', '.join(sorted(known))}")
    return replace(config, **options)  # type: ignore[type-var]
