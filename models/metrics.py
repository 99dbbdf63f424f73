"""Evaluation metrics: Dice and IoU per class, PSNR and SSIM.

Dice and IoU are computed on integer label maps over the whole evaluation set (the
"global" variant: sums over all pixels of all images), which is stable for thin
structures such as guidewires. PSNR and SSIM delegate to scikit-image.
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def _confusion(pred: np.ndarray, target: np.ndarray, cls: int) -> tuple[int, int, int]:
    p = pred == cls
    t = target == cls
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    return tp, fp, fn


def dice_per_class(pred: np.ndarray, target: np.ndarray, classes: list[int]) -> dict[int, float]:
    """Dice = 2|P∩T| / (|P| + |T|) for each class; 1.0 when the class is absent from both.

    Raises:
        ValueError: if the label maps differ in shape.
    """
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape} vs target {target.shape}")
    out: dict[int, float] = {}
    for c in classes:
        tp, fp, fn = _confusion(pred, target, c)
        denom = 2 * tp + fp + fn
        out[c] = 1.0 if denom == 0 else 2 * tp / denom
    return out


def iou_per_class(pred: np.ndarray, target: np.ndarray, classes: list[int]) -> dict[int, float]:
    """IoU = |P∩T| / |P∪T| for each class; 1.0 when the class is absent from both.

    Raises:
        ValueError: if the label maps differ in shape.
    """
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape} vs target {target.shape}")
    out: dict[int, float] = {}
    for c in classes:
        tp, fp, fn = _confusion(pred, target, c)
        denom = tp + fp + fn
        out[c] = 1.0 if denom == 0 else tp / denom
    return out


def psnr(recon: np.ndarray, target: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB; ``data_range`` defaults to the target's range."""
    if data_range is None:
        data_range = float(target.max() - target.min()) or 1.0
    return float(peak_signal_noise_ratio(target, recon, data_range=data_range))


def ssim(recon: np.ndarray, target: np.ndarray, data_range: float | None = None) -> float:
    """Structural similarity of two 2D images (scikit-image, 7x7 Gaussian-free window)."""
    if data_range is None:
        data_range = float(target.max() - target.min()) or 1.0
    return float(structural_similarity(target, recon, data_range=data_range))
