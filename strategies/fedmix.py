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

:func:`train_pair` is that local step for a pair of torch networks (the peer's
``Learner`` calls it each round); pixel-mask silos train both networks on their masks.

Aggregation weights combine data size and training loss (as the authors' released
notebook computes them, defaults included)::

    w_i = |D_i| / sum_k |D_k|  +  lam * L_i^beta / sum_k L_k^beta,   then renormalised

so a silo with a *higher* loss gets *more* weight. In silomesh a peer applies this over
its closed neighbourhood (itself and the neighbours that answered), with each
neighbour's reported loss.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from .base import AggregationResult, Contribution, StrategyConfig, check_range
from .robust import aggregate_contributions
from .secagg import FEDMIX, SecureParams, SecureSum
from .strategy import Strategy
from .training import Batch, BatchSource, PrivateSteps, run_steps, to_device
from .workbench import LocalStep, Workbench

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FedMixConfig(StrategyConfig, SecureParams):
    """Parameters of ``fedmix`` (defaults: the authors' released code).

    Attributes:
        lam: weight ``lambda`` of the loss term in the aggregation weights (10).
        beta: exponent ``beta`` applied to the losses (1.5).
        tau: Dice agreement two networks need for a pseudo-labelled sample (0.9).
        threshold: probability above which a pixel is foreground (0.5).
        min_box_dice: box silos: minimum Dice between the masked prediction and the box
            (0.5; ``0`` disables the check).
        pseudo_weight: weight of the pseudo-label term next to the silo's own weak-label
            loss in the local step (ours: 1.0; ``0`` turns the pseudo-label step off).

    The ``secure_*`` parameters are those of :class:`~.secagg.SecureParams`: members mask
    their models weighted by size and by training loss (:func:`~.secagg.member_vector`).
    """

    lam: float = 10.0
    beta: float = 1.5
    tau: float = 0.9
    threshold: float = 0.5
    min_box_dice: float = 0.5
    pseudo_weight: float = 1.0

    strategy_name: ClassVar[str] = "fedmix"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("lam", self.lam, 0.0)
        check_range("beta", self.beta, 0.0)
        check_range("tau", self.tau, 0.0, 1.0)
        check_range("threshold", self.threshold, 0.0, 1.0, lo_open=True, hi_open=True)
        check_range("min_box_dice", self.min_box_dice, 0.0, 1.0)
        check_range("pseudo_weight", self.pseudo_weight, 0.0)
        self.check_secure(self.robust, FEDMIX, self.int_policy)


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
    w = n / float(n.sum())
    score: npt.NDArray[np.float64] = loss**beta
    if score.sum() > 0:
        w = w + lam * score / float(score.sum())
    return w / float(w.sum())


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
    drop_contradicting: bool = True,
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
        drop_contradicting: also drop a sample whose weak label says the object is
            there (a non-empty box, or ``present``) while its pseudo-label is empty:
            two networks that both miss a lesion agree perfectly (Dice 1) on a label
            that contradicts the silo's own annotation (ours; on by default).

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
    if drop_contradicting:
        n = len(la)
        if box_mask is not None:
            keep &= ~(box_mask.reshape(n, -1).any(1) & ~la.reshape(n, -1).any(1))
        if present is not None:
            p = np.asarray(present, bool)
            found = la.reshape((*p.shape, -1)).any(-1)
            keep &= ~(p & ~found).reshape(n, -1).any(1)
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


#: label value the tasks' pixel losses skip (``silomesh.models.segmentation.IGNORE``)
IGNORE = -1

#: ``loss_terms(model, batch) -> {term: scalar}``, e.g. ``LesionTask.loss_terms``; a batch
#: may carry ``"pseudo"`` (int64, ``IGNORE`` = no supervision) and must then get a
#: ``"pseudo"`` term back
LossTermsFn = Callable[[nn.Module, Batch], Mapping[str, torch.Tensor]]
#: ``prob(model, images) -> (B, ...)`` foreground probabilities, e.g. ``LesionTask.predict_proba``
ProbFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def box_masks(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Binary masks ``(N, H, W)`` filling each half-open box ``(y0, x0, y1, x1)``.

    Boxes are rounded outwards and clipped to the image; an all-zero box gives an empty
    mask (the lesion task's convention for "no lesion").
    """
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    h, w = shape
    r0, c0 = np.clip(np.floor(b[:, 0]), 0, h), np.clip(np.floor(b[:, 1]), 0, w)
    r1, c1 = np.clip(np.ceil(b[:, 2]), 0, h), np.clip(np.ceil(b[:, 3]), 0, w)
    rows, cols = np.arange(h)[None, :], np.arange(w)[None, :]
    in_rows = (rows >= r0[:, None]) & (rows < r1[:, None])  # (N, H)
    in_cols = (cols >= c0[:, None]) & (cols < c1[:, None])  # (N, W)
    return in_rows[:, :, None] & in_cols[:, None, :]


def cps_targets(labels: PseudoLabels) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel targets for cross pseudo supervision: ``(target of A, target of B)``.

    A gets B's pseudo-label and B gets A's, as int64 ``{0, 1}``; samples that failed
    selection are :data:`IGNORE` everywhere, so they add nothing to the loss.
    """
    keep = np.asarray(labels.keep, bool)
    shape = np.shape(labels.labels_a)
    kept = keep.reshape(keep.shape + (1,) * (len(shape) - 1))
    for_a = np.where(kept, np.asarray(labels.labels_b, np.int64), IGNORE)
    for_b = np.where(kept, np.asarray(labels.labels_a, np.int64), IGNORE)
    return for_a, for_b


@dataclass
class PairTrainResult:
    """Outcome of :func:`train_pair`.

    Attributes:
        steps: optimiser steps run (each network takes one per step).
        mean_loss: mean over steps of the two networks' mean total loss (what the peer
            reports as its training loss for FedMix's weights).
        losses: that mean for each step.
        pseudo_steps: steps that ran the pseudo-label step (weakly labelled batches).
        samples: weakly labelled samples seen by the pseudo-label step.
        kept: of those, samples that passed selection.
        kept_foreground: kept samples whose pseudo-labels hold foreground.
        agreement: mean Dice agreement between the two networks' masked predictions.
    """

    steps: int
    mean_loss: float
    losses: list[float] = field(default_factory=list)
    pseudo_steps: int = 0
    samples: int = 0
    kept: int = 0
    kept_foreground: int = 0
    agreement: float = math.nan

    @property
    def kept_fraction(self) -> float:
        """Share of weakly labelled samples kept (NaN if none was seen)."""
        return self.kept / self.samples if self.samples else math.nan


def make_pseudo_labels(
    teacher_a: nn.Module, teacher_b: nn.Module, batch: Batch, prob: ProbFn,
    config: FedMixConfig,
) -> PseudoLabels:
    """Pseudo-labels of one weakly labelled batch from two networks (eval mode, no grad).

    The batch's ``"box"`` (box silos) restricts the labels to the box, its
    ``"present"`` zeroes images labelled absent.

    Raises:
        ValueError: if the batch holds neither ``box`` nor ``present``.
    """
    if "box" not in batch and "present" not in batch:
        raise ValueError("a weakly labelled batch needs 'box' or 'present'")
    modes = (teacher_a.training, teacher_b.training)
    teacher_a.eval()
    teacher_b.eval()
    try:
        with torch.no_grad():
            pa = prob(teacher_a, batch["image"]).float().cpu().numpy()
            pb = prob(teacher_b, batch["image"]).float().cpu().numpy()
    finally:
        teacher_a.train(modes[0])
        teacher_b.train(modes[1])
    box = None
    if "box" in batch:
        box = box_masks(batch["box"].cpu().numpy(), pa.shape[-2:])
        box = box.reshape(box.shape[:1] + (1,) * (pa.ndim - 3) + box.shape[1:])
    present = batch["present"].cpu().numpy() > 0.5 if "present" in batch else None
    return pseudo_labels(pa, pb, box, present, tau=config.tau, threshold=config.threshold,
                         min_box_dice=config.min_box_dice)


def _total(terms: Mapping[str, torch.Tensor], pseudo_weight: float) -> torch.Tensor:
    weak = [v for k, v in terms.items() if k != "pseudo"]
    total = torch.stack(weak).sum() if weak else torch.zeros(())
    if "pseudo" in terms:
        total = total + pseudo_weight * terms["pseudo"]
    return total


def train_pair(
    net_a: nn.Module,
    net_b: nn.Module,
    batches: BatchSource,
    loss_terms: LossTermsFn,
    prob: ProbFn,
    steps: int,
    lr: float,
    config: FedMixConfig | None = None,
    *,
    optimizer: str = "adam",
    teachers: tuple[nn.Module, nn.Module] | None = None,
    private: PrivateSteps | None = None,
) -> PairTrainResult:
    """FedMix's local step: train both networks of a silo in place for ``steps`` steps.

    A batch with ``"mask"`` trains each network on ``loss_terms`` as is. A weakly
    labelled batch (``"box"`` and/or ``"present"``, no ``"mask"``) first gets
    pseudo-labels from the two ``teachers`` (:func:`make_pseudo_labels`: masked by box /
    presence, kept if the two agree with Dice ``>= tau``), then network A trains on
    ``weak terms + pseudo_weight * pseudo term`` with B's pseudo-label as ``"pseudo"``
    and B likewise with A's (cross pseudo supervision, :func:`cps_targets`).

    Args:
        net_a, net_b: the silo's two networks (trained in place, left in train mode).
        batches: own data; a list or a factory (``lambda: data.batches(bs, rng)``).
        loss_terms: the task's per-term loss (must understand ``"pseudo"``).
        prob: the task's foreground probabilities.
        steps: optimiser steps (0: one pass over the batches).
        lr: learning rate of both networks.
        config: ``tau``, ``threshold``, ``min_box_dice``, ``pseudo_weight``.
        optimizer: ``"adam"`` or ``"sgd"``.
        teachers: the networks that make the pseudo-labels (default: ``net_a`` and
            ``net_b`` themselves, as they are at each step).
        private: the peer's DP-SGD trainer when it trains privately: one DP-SGD step over
            both networks' weights, each sample clipped once over both.

    Raises:
        FloatingPointError: if a loss becomes non-finite.
    """
    cfg = config or FedMixConfig()
    teach_a, teach_b = teachers or (net_a, net_b)
    net_a.train()
    net_b.train()
    result = PairTrainResult(0, math.nan)
    agreement = 0.0

    def step_loss(batch: Batch) -> torch.Tensor:
        # under DP-SGD this sees one sample at a time (its pseudo-label is its own)
        nonlocal agreement
        batch = to_device(batch, net_a)
        targets: tuple[Batch, Batch] = (batch, batch)
        if "mask" not in batch and cfg.pseudo_weight > 0:
            pl = make_pseudo_labels(teach_a, teach_b, batch, prob, cfg)
            for_a, for_b = cps_targets(pl)
            device = batch["image"].device
            targets = ({**batch, "pseudo": torch.from_numpy(for_a).to(device)},
                       {**batch, "pseudo": torch.from_numpy(for_b).to(device)})
            result.pseudo_steps += 1
            result.samples += len(pl.keep)
            result.kept += int(pl.keep.sum())
            fg = pl.labels_a.reshape(len(pl.keep), -1).any(axis=1)
            result.kept_foreground += int((pl.keep & fg).sum())
            agreement += float(pl.agreement.sum())
        # the pseudo-labels are constants: A's term reaches only A's weights, B's only B's,
        # so one optimiser over both networks steps each as its own optimiser would
        return sum((_total(loss_terms(net, b), cfg.pseudo_weight)
                    for net, b in zip((net_a, net_b), targets, strict=True)), torch.zeros(()))

    params = [*net_a.parameters(), *net_b.parameters()]
    try:
        totals = run_steps(params, step_loss, batches, steps, optimizer, lr, private)
    except FloatingPointError as exc:
        raise FloatingPointError(f"non-finite FedMix loss: {exc}") from exc
    result.losses = [t / 2 for t in totals]
    result.steps = len(totals)
    if private is not None:
        result.pseudo_steps = min(result.pseudo_steps, result.steps)
    if result.losses:
        result.mean_loss = float(np.mean(result.losses))
    if result.samples:
        result.agreement = agreement / result.samples
    logger.debug("fedmix local step: %d steps, kept %d of %d weak samples", result.steps,
                 result.kept, result.samples)
    return result


#: state-dict prefix of a FedMix peer's second network
TWIN_PREFIX = "twin."
#: the second network is initialised from ``init_seed + TWIN_SEED_OFFSET``
TWIN_SEED_OFFSET = 7919


def supports_pseudo_labels(task: object) -> bool:
    """True if the task offers what FedMix's local step needs.

    That is ``loss_terms(model, batch)`` understanding a ``"pseudo"`` key and
    ``predict_proba(model, images)``; today the ``lesion`` task.
    """
    return callable(getattr(task, "loss_terms", None)) and callable(getattr(task, "predict_proba", None))


class FedMixStrategy(Strategy):
    """Neighbourhood averaging with FedMix's size-plus-loss adaptive weights.

    FedMix trains two networks per silo (:meth:`train_pair`) and both are averaged with
    the same weights. The peer's ``Learner`` carries the second network in the same
    state dict (keys under ``"twin."``), so one :meth:`aggregate` call weights both
    alike; calling it once per network with the same sizes and losses is equivalent.
    """

    name = "fedmix"
    config_class = FedMixConfig
    config: FedMixConfig

    def extra_networks(
        self, task: object, make_model: Callable[[int], nn.Module], init_seed: int
    ) -> dict[str, nn.Module]:
        """FedMix's second network, under :data:`TWIN_PREFIX`, if the task supports pseudo-labels.

        It is initialised from ``init_seed + TWIN_SEED_OFFSET``: alike on every peer of a
        federation, and different from the first network.
        """
        if supports_pseudo_labels(task):
            return {TWIN_PREFIX: make_model(init_seed + TWIN_SEED_OFFSET)}
        logger.warning("task %s has no pseudo-label support: fedmix trains one network "
                       "with the task's loss and only its aggregation weights differ",
                       getattr(task, "name", task))
        return {}

    def local_step(self, bench: Workbench, steps: int) -> LocalStep:
        """FedMix's local step (:func:`train_pair`) when the peer holds the second network.

        Pixel-mask silos train both networks on their masks. Box / image-level silos
        train each network on its weak-label loss plus the other network's
        pseudo-labels, made by frozen copies of the two networks as they stand at the
        start of the round, i.e. the federated (aggregated) networks. Without a second
        network this is the plain local step.
        """
        twin = bench.network(TWIN_PREFIX)
        if twin is None:
            return bench.train_plain(steps)
        seed = bench.next_seed()
        if steps <= 0:
            return LocalStep(bench.state(), float("nan"), 0)
        model = bench.model
        teachers = (copy.deepcopy(model), copy.deepcopy(twin)) if bench.weak_labels else None
        torch.manual_seed(seed)
        task = bench.task
        result = self.train_pair(model, twin, bench.batches(seed), task.loss_terms, task.predict_proba,
                                 steps, bench.lr, teachers=teachers, private=bench.private)
        info: dict[str, float] = {}
        if result.pseudo_steps:
            info = {
                "pseudo_steps": float(result.pseudo_steps),
                "weak_samples": float(result.samples),
                "kept": float(result.kept),
                "kept_foreground": float(result.kept_foreground),
                "kept_fraction": result.kept_fraction,
                "agreement": result.agreement,
            }
            logger.debug("fedmix pseudo-labels: kept %d of %d (%d with foreground), agreement %.3f",
                         result.kept, result.samples, result.kept_foreground, result.agreement)
        return LocalStep(bench.state(), result.mean_loss, result.steps, info)

    @property
    def contribution_fields(self) -> frozenset[str]:
        return frozenset({"n_samples", "loss"})

    @property
    def secure_sum(self) -> SecureSum | None:
        return self.config.secure_sum(FEDMIX, lam=self.config.lam, beta=self.config.beta)

    def pseudo_labels(self, prob_a: np.ndarray, prob_b: np.ndarray,
                      box: np.ndarray | None = None,
                      present: np.ndarray | None = None) -> PseudoLabels:
        """:func:`pseudo_labels` with the configured ``tau``, threshold and box check."""
        cfg = self.config
        return pseudo_labels(prob_a, prob_b, box, present, tau=cfg.tau,
                             threshold=cfg.threshold, min_box_dice=cfg.min_box_dice)

    def train_pair(self, net_a: nn.Module, net_b: nn.Module, batches: BatchSource,
                   loss_terms: LossTermsFn, prob: ProbFn, steps: int, lr: float, *,
                   teachers: tuple[nn.Module, nn.Module] | None = None,
                   private: PrivateSteps | None = None) -> PairTrainResult:
        """:func:`train_pair` with this strategy's config."""
        return train_pair(net_a, net_b, batches, loss_terms, prob, steps, lr, self.config,
                          teachers=teachers, private=private)

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
