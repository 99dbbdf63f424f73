"""Evaluation metrics: Dice and IoU per class, PSNR and SSIM.

Dice and IoU are computed on integer label maps over the whole evaluation set (the
"global" variant: sums over all pixels of all images), which is stable for thin
structures such as guidewires. PSNR and SSIM delegate to scikit-image.

MONAI computes the same Dice per image (``monai.metrics.DiceMetric``) and averages over
images; :func:`dice_per_image` gives that variant and tests/test_monai_metrics.py checks
our global Dice against MONAI's on the same predictions. :func:`hausdorff95_per_class`
delegates to MONAI's Hausdorff distance.
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


def _onehot(labels: np.ndarray, classes: list[int]) -> np.ndarray:
    """``(N, *S)`` label maps -> ``(N, K, *S)`` float one-hot over ``classes``."""
    return np.stack([labels == c for c in classes], axis=1).astype(np.float32)


def dice_per_image(pred: np.ndarray, target: np.ndarray, classes: list[int]) -> dict[int, float]:
    """MONAI's ``DiceMetric``: Dice of each image, averaged over the images where it is defined.

    Unlike :func:`dice_per_class` an image whose **target** lacks a class is left out for
    that class (MONAI's ``ignore_empty``), so false positives on such images are not
    counted, and a thin structure missed in one image weighs as much as a large one.
    ``pred``/``target``: ``(N, *S)`` label maps.

    Raises:
        ValueError: if the label maps differ in shape.
    """
    import torch
    from monai.metrics import DiceMetric

    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape} vs target {target.shape}")
    metric = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=True)
    metric(torch.from_numpy(_onehot(pred, classes)), torch.from_numpy(_onehot(target, classes)))
    values = metric.aggregate()
    assert isinstance(values, torch.Tensor)
    return {c: float(v) for c, v in zip(classes, values.tolist(), strict=True)}


def hausdorff95_per_class(
    pred: np.ndarray, target: np.ndarray, classes: list[int], spacing: tuple[float, ...] | None = None
) -> dict[int, float]:
    """95th-percentile Hausdorff distance per class (MONAI), mean over images, in voxels or mm.

    ``spacing`` gives the voxel size for distances in mm. Images where a class is missing
    from the prediction or the target give ``inf`` (MONAI's convention) and are left out of
    the mean; a class missing everywhere gives ``nan``.

    Raises:
        ValueError: if the label maps differ in shape.
    """
    import torch
    from monai.metrics import compute_hausdorff_distance

    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape} vs target {target.shape}")
    dist = compute_hausdorff_distance(
        torch.from_numpy(_onehot(pred, classes)), torch.from_numpy(_onehot(target, classes)),
        include_background=True, percentile=95, spacing=list(spacing) if spacing else None,
    ).numpy()
    out: dict[int, float] = {}
    for k, c in enumerate(classes):
        finite = dist[:, k][np.isfinite(dist[:, k])]
        out[c] = float(finite.mean()) if finite.size else float("nan")
    return out
