"""``fedmix``: mixed supervision (pixel masks, boxes, image labels) with adaptive weights.

FedMix (Wicaksana et al., "FedMix: Mixed Supervised Federated Learning for Medical
Image Segmentation", IEEE TMI 2022). Every silo trains two networks. Silos without
pixel masks train on pseudo-labels made by the two federated networks:

1. each network's prediction is binarised (``prob > threshold``) and restricted by
   the silo's weak label: inside the box for box-level silos, zeroed for images whose
   image-level label says "absent";
2. a sample is kept only if the two networks agree (Dice between their masked
   predictions ``>= tau``) and, for boxes, the prediction fills its box
   (Dice with the box ``>= min_box_dice``, as in the authors' code);
3. cross pseudo supervision: network A learns from B's pseudo-label and vice versa.

Aggregation weights combine data size and training loss (as the authors' released
notebook computes them, defaults included)::

    w_i = |D_i| / sum_k |D_k|  +  lam * L_i^beta / sum_k L_k^beta,   then renormalised

so a silo with a *higher* loss gets *more* weight. In silomesh a peer applies this over
its closed neighbourhood (itself and the neighbours that answered), with each
neighbour's reported loss.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np
import torch

from .base import AggregationResult, Contribution, Strategy, StrategyConfig, check_range
from .robust import aggregate_contributions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FedMixConfig(StrategyConfig):
    """Parameters of ``fedmix`` (defaults: the authors' released code).

    Attributes:
        lam: weight ``lambda`` of the loss term in the aggregation weights (10).
        beta: exponent ``beta`` applied to the losses (1.5).
        tau: Dice agreement two networks need for a pseudo-labelled sample (0.9).
        threshold: probability above which a pixel is foreground (0.5).
        min_box_dice: box silos: minimum Dice between the masked prediction and the box
            (0.5; ``0`` disables the check).
    """

    lam: float = 10.0
    beta: float = 1.5
    tau: float = 0.9
    threshold: float = 0.5
    min_box_dice: float = 0.5

    strategy_name: ClassVar[str] = "fedmix"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("lam", self.lam, 0.0)
        check_range("beta", self.beta, 0.0)
        check_range("tau", self.tau, 0.0, 1.0)
        check_range("threshold", self.threshold, 0.0, 1.0, lo_open=True, hi_open=True)
        check_range("min_box_dice", self.min_box_dice, 0.0, 1.0)


def fedmix_weights(
    sizes: Sequence[float], losses: Sequence[float], lam: float = 10.0, beta: float = 1.5
) -> np.ndarray:
    """FedMix's adaptive aggregation weights (see the module docstring).

    If every loss is zero the loss term vanishes and the weights are the size shares.

    Raises:
        ValueError: for mismatched lengths, negative or non-finite sizes or losses,
            all-zero sizes, or negative ``lam``/``beta``.
    """
    n = np.asarray(sizes, np.float64)
    loss = np.asarray(losses, np.float64)
    if n.shape != loss.shape or n.ndim != 1 or n.size == 0:
        raise ValueError("fedmix_weights: sizes and losses must be equally long 1-D lists")
    if not (np.all(np.isfinite(n)) and np.all(n >= 0) and n.sum() > 0):
        raise ValueError(f"fedmix_weights: bad sizes {n}")
    if not (np.all(np.isfinite(loss)) and np.all(loss >= 0)):
        raise ValueError(f"fedmix_weights: losses must be finite and >= 0, got {loss}")
    if lam < 0 or beta < 0:
        raise ValueError("fedmix_weights: lam and beta must be >= 0")
    w = n / n.sum()
    score = loss**beta
    if score.sum() > 0:
        w = w + lam * score / score.sum()
    return w / w.sum()


def dice(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-sample Dice ``2|A∩B| / (|A| + |B|)`` of binary masks ``(B, ...)``; 1 if both empty."""
    a = np.asarray(a, bool).reshape(len(a), -1)
    b = np.asarray(b, bool).reshape(len(b), -1)
    inter = np.logical_and(a, b).sum(axis=1)
    total = a.sum(axis=1) + b.sum(axis=1)
    out = np.ones(len(a), dtype=np.float64)
    nz = total > 0
    out[nz] = 2.0 * inter[nz] / total[nz]
    return out


class PseudoLabels(NamedTuple):
    """Pseudo-labels of one batch.

    Attributes:
        labels_a: network A's masked binary prediction (network B learns from it).
        labels_b: network B's masked binary prediction (network A learns from it).
        keep: ``(B,)`` bool, the samples that passed selection.
        agreement: ``(B,)`` Dice between the two predictions.
    """

    labels_a: np.ndarray
    labels_b: np.ndarray
    keep: np.ndarray
    agreement: np.ndarray


def _broadcast_present(present: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    p = np.asarray(present, bool)
    if p.ndim > len(shape) or p.shape != shape[: p.ndim]:
        raise ValueError(f"present {p.shape} does not match predictions {shape}")
    return np.broadcast_to(p.reshape(p.shape + (1,) * (len(shape) - p.ndim)), shape)


def pseudo_labels(
    prob_a: np.ndarray,
    prob_b: np.ndarray,
    box: np.ndarray | None = None,
    present: np.ndarray | None = None,
    *,
    tau: float = 0.9,
    threshold: float = 0.5,
    min_box_dice: float = 0.5,
) -> PseudoLabels:
    """Make and select pseudo-labels from two networks' foreground probabilities.

    Args:
        prob_a: network A's foreground probabilities ``(B, ...)``, e.g. ``(B, H, W)`` or
            per-class sigmoid outputs ``(B, K, H, W)`` (for softmax models pass the
            foreground class's probability).
        prob_b: network B's, same shape.
        box: box-level silos: binary box masks, broadcastable to the predictions; the
            pseudo-label is zero outside the box.
        present: image-level silos: ``(B,)`` or ``(B, K)`` presence; absent images (or
            classes) get an empty pseudo-label.
        tau: minimum Dice agreement between the two masked predictions.
        threshold: foreground probability threshold.
        min_box_dice: with ``box``, minimum Dice between A's masked prediction and the
            box (0 disables).

    Raises:
        ValueError: if shapes do not match.
    """
    pa = np.asarray(prob_a)
    pb = np.asarray(prob_b)
    if pa.shape != pb.shape or pa.ndim < 1:
        raise ValueError(f"prob_a {pa.shape} and prob_b {pb.shape} must have one shape")
    la = pa > threshold
    lb = pb > threshold
    box_mask = None
    if box is not None:
        box_mask = np.broadcast_to(np.asarray(box, bool), pa.shape)
        la &= box_mask
        lb &= box_mask
    if present is not None:
        pres = _broadcast_present(present, pa.shape)
        la &= pres
        lb &= pres
    agreement = dice(la, lb)
    keep = agreement >= tau
    if box_mask is not None and min_box_dice > 0:
        keep &= dice(la, box_mask) >= min_box_dice
    return PseudoLabels(la, lb, keep, agreement)


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-sample ``1 - soft Dice`` of probabilities vs a binary target ``(B, ...)``."""
    p = prob.reshape(len(prob), -1)
    t = target.reshape(len(target), -1).to(p.dtype)
    return 1.0 - (2.0 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)


def cross_pseudo_supervision(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    labels: PseudoLabels,
) -> torch.Tensor:
    """CPS loss on the kept samples: A against B's pseudo-label plus B against A's.

    ``logits_*`` are foreground logits shaped like the pseudo-labels (sigmoid is
    applied). Returns a zero that still carries the graph when no sample is kept.
    """
    keep = torch.as_tensor(labels.keep, device=logits_a.device)
    target_for_a = torch.as_tensor(labels.labels_b, device=logits_a.device)
    target_for_b = torch.as_tensor(labels.labels_a, device=logits_b.device)
    la = soft_dice_loss(torch.sigmoid(logits_a), target_for_a)
    lb = soft_dice_loss(torch.sigmoid(logits_b), target_for_b)
    m = keep.to(la.dtype)
    return ((la + lb) * m).sum() / m.sum().clamp(min=1.0)


class FedMixStrategy(Strategy):
    """Neighbourhood averaging with FedMix's size-plus-loss adaptive weights.

    FedMix trains two networks per silo; the peer calls :meth:`aggregate` once per
    network with the same sizes and losses (so both get the same weights).
    """

    name = "fedmix"
    config_class = FedMixConfig
    config: FedMixConfig

    @property
    def contribution_fields(self) -> frozenset[str]:
        return frozenset({"n_samples", "loss"})

    def pseudo_labels(self, prob_a: np.ndarray, prob_b: np.ndarray,
                      box: np.ndarray | None = None,
                      present: np.ndarray | None = None) -> PseudoLabels:
        """:func:`pseudo_labels` with the configured ``tau``, threshold and box check."""
        cfg = self.config
        return pseudo_labels(prob_a, prob_b, box, present, tau=cfg.tau,
                             threshold=cfg.threshold, min_box_dice=cfg.min_box_dice)

    def aggregate(
        self,
        own: Mapping[str, np.ndarray],
        own_weight: float,
        neighbours: Sequence[Contribution],
        *,
        own_degree: int | None = None,
        own_loss: float | None = None,
    ) -> AggregationResult:
        """Weighted average with :func:`fedmix_weights` over own + neighbours.

        Raises:
            ValueError: if ``own_loss`` is missing (neighbours without a loss are dropped).
        """
        if own_loss is None:
            raise ValueError("fedmix needs the peer's own training loss (own_loss)")
        cfg = self.config

        def weights(acc: list[Contribution]) -> np.ndarray:
            sizes = [own_weight, *[c.n_samples for c in acc]]
            losses = [own_loss, *[float(c.loss) for c in acc]]  # type: ignore[arg-type]
            return fedmix_weights(sizes, losses, cfg.lam, cfg.beta)

        bad = {c.peer_id: f"bad loss {c.loss!r}" for c in neighbours
               if c.loss is not None and not (np.isfinite(c.loss) and c.loss >= 0)}
        for peer, reason in bad.items():
            logger.warning("dropping contribution of %s: %s", peer, reason)
        usable = [c for c in neighbours if c.peer_id not in bad]
        result = aggregate_contributions(own, usable, cfg, weights, required=("loss",))
        return dataclasses.replace(result, dropped={**bad, **result.dropped})
