"""``fedefm``: neighbour distillation weighted by Earth Mover's Distance.

FedEFM (Do et al., "FedEFM: Federated Endovascular Foundation Model with Unseen Data",
ICRA 2025). Each round, peer i sends its model to every neighbour j
(``train-request``); j trains that copy on its own data for ``local_steps`` steps and
returns it (``train-result``): an "overseas expert" that has seen data i has not.
Peer i then distils from the returned experts on its own data::

    L = beta * T^2 * sum_j w_j * KL(p_j^T || p_student^T) + (1 - beta) * L_task

where ``p^T`` are temperature-softened class probabilities (per pixel for
segmentation logits ``(B, K, H, W)``) and ``w_j`` is an EMD-based similarity between
the student's and expert j's intermediate feature maps on the same batch (see
:mod:`.emd`), normalised over the experts. For a regression output (SPECT) the KL term
is replaced by ``MSE(student, expert)`` without the ``T^2`` factor.

Optionally (``mix > 0``) the distilled student is then mixed with the experts,
``theta_i <- (1 - mix) theta_i + mix * mean_j theta_j`` (``mix = 0.5`` is what the
authors' released code does); ``mix = 0`` is the paper's pure distillation.

The round, as the peer daemon runs it (``round_shape = TRAIN_REQUEST``; the hooks of
:class:`~.strategy.Strategy`)::

    # send own state to each neighbour                      -> train-request
    # on a neighbour's train-request: s.serve_train_request(bench, its_state, steps)
    #                                                        -> train-result (the trained copy)
    # with the train-results that came back in time:
    ok = s.screen(own_state, results)                       # drop broken / non-finite experts
    s.learn_from_experts(bench, ok.accepted)                # EMD-weighted distillation, in place
    new = s.aggregate(bench.state(), n_own, ok.accepted)    # the mixing step
    # after the last round: global_model([all peers' states]) is the foundation model
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .averaging import average_states
from .base import (
    AggregationResult,
    Contribution,
    StateDict,
    StrategyConfig,
    check_choice,
    check_range,
)
from .emd import EMD_METHODS, PREFERENCES, WEIGHTINGS, feature_map_emd, similarity_weights
from .robust import aggregate_contributions
from .strategy import RoundShape, Strategy
from .training import (
    OPTIMIZERS,
    Batch,
    BatchSource,
    LossFn,
    PrivateSteps,
    TrainResult,
    model_device,
    run_steps,
    to_device,
    train_steps,
)
from .workbench import Workbench

logger = logging.getLogger(__name__)

#: ``forward(model, batch) -> (output, feature map (B, C, h, w))``
ForwardFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]


class _SplitForward(Protocol):
    """The part of :class:`silomesh.models.task.SplitModel` FedEFM relies on by default."""

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


DISTILL_LOSSES = ("kl", "mse")
#: what the expert-weighting EMD compares (FedEFMConfig.emd_layer)
EMD_LAYERS = ("features", "output")


@dataclass(frozen=True)
class FedEFMConfig(StrategyConfig):
    """Parameters of ``fedefm`` (plus the robust ones, which apply to the mixing step).

    The paper's exact values were not available to us; these defaults are ours.

    Attributes:
        beta: weight of the distillation term (``1 - beta`` weighs the task loss).
        temperature: softmax temperature ``T`` of the KL term.
        local_steps: optimiser steps a neighbour trains a ``train-request`` copy for
            (``0`` = one pass over its batches).
        distill_steps: optimiser steps of the distillation on own data
            (``0`` = one pass over the batches).
        lr: learning rate of both the neighbour training and the distillation.
        optimizer: ``"adam"`` or ``"sgd"`` (momentum 0.9).
        distill_loss: ``"kl"`` (class logits, incl. per-pixel segmentation logits) or
            ``"mse"`` (regression outputs such as SPECT reconstructions).
        emd_method: ``"exact"`` (``ot.emd2``) or ``"sinkhorn"`` (``ot.sinkhorn2``).
        emd_reg: Sinkhorn's entropic regularisation.
        emd_grid: feature maps are average-pooled to at most ``grid x grid`` nodes
            before the EMD (``0``: no pooling).
        weighting: ``"softmax"`` (``w_j ∝ exp(-EMD_j / weight_temperature)``),
            ``"relative"`` (the same on ``EMD_j / mean EMD``: scale-free) or ``"linear"``
            (``w_j ∝ max(0, 1 - EMD_j)``).
        weight_temperature: temperature of the softmax weighting (cosine EMDs lie in
            ``[0, 2]``; 0.1 makes a 0.1 EMD difference worth a factor e; under
            ``relative``, an expert 10 % closer than the mean).
        emd_layer: what the EMD compares: ``"features"`` (the intermediate feature maps,
            ``forward_features``; the paper) or ``"output"`` (the class-probability maps,
            ``softmax`` of the logits over the class dimension; needs ``distill_loss =
            "kl"``: a one-channel regression output has no class vector to compare).
        prefer: ``"similar"`` (the closest experts weigh most; the paper) or
            ``"dissimilar"`` (the farthest: the ones that saw data least like one's own).
        mix: ``theta <- (1 - mix) theta + mix * mean(experts)`` after distillation;
            ``0`` is the paper's pure distillation, ``0.5`` the authors' code; ``0.75``
            (our default) did best on unseen sources in bench/bench_strategies.py (see
            docs/STRATEGIES.md, "Measured").
    """

    beta: float = 0.5
    temperature: float = 2.0
    local_steps: int = 20
    distill_steps: int = 20
    lr: float = 1e-3
    optimizer: str = "adam"
    distill_loss: str = "kl"
    emd_method: str = "exact"
    emd_reg: float = 0.05
    emd_grid: int = 8
    weighting: str = "softmax"
    weight_temperature: float = 0.1
    emd_layer: str = "features"
    prefer: str = "similar"
    mix: float = 0.75

    strategy_name: ClassVar[str] = "fedefm"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("beta", self.beta, 0.0, 1.0)
        check_range("temperature", self.temperature, 0.0, lo_open=True)
        check_range("local_steps", self.local_steps, 0)
        check_range("distill_steps", self.distill_steps, 0)
        check_range("lr", self.lr, 0.0, lo_open=True)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("distill_loss", self.distill_loss, DISTILL_LOSSES)
        check_choice("emd_method", self.emd_method, EMD_METHODS)
        check_range("emd_reg", self.emd_reg, 0.0, lo_open=True)
        check_range("emd_grid", self.emd_grid, 0)
        check_choice("weighting", self.weighting, WEIGHTINGS)
        check_range("weight_temperature", self.weight_temperature, 0.0, lo_open=True)
        check_choice("emd_layer", self.emd_layer, EMD_LAYERS)
        check_choice("prefer", self.prefer, PREFERENCES)
        if self.emd_layer == "output" and self.distill_loss != "kl":
            raise ValueError("parameter 'emd_layer' = 'output' needs distill_loss = 'kl' (class-probability "
                             "maps); a regression output has no class vector to compare")
        check_range("mix", self.mix, 0.0, 1.0)


@dataclass
class DistillResult:
    """Outcome of :func:`distill`.

    Attributes:
        student: the distilled student (the same module object, trained in place).
        weights: per-expert weight averaged over the steps, ``(E,)``, sums to 1.
        emd: per-expert EMD to the student averaged over the steps, ``(E,)``.
        steps: optimiser steps run.
        losses: total loss of each step.
    """

    student: nn.Module
    weights: np.ndarray
    emd: np.ndarray
    steps: int
    losses: list[float] = field(default_factory=list)


def default_forward(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``model.forward_features(batch["image"])`` (the :class:`SplitModel` contract)."""
    return cast(_SplitForward, model).forward_features(batch["image"])


def distillation_term(
    student_out: torch.Tensor, expert_out: torch.Tensor, temperature: float, kind: str = "kl"
) -> torch.Tensor:
    """One expert's distillation loss on a batch.

    ``kl``: ``T^2 * KL(softmax(expert/T) || softmax(student/T))`` over dim 1 (classes),
    summed over classes and averaged over batch and pixels; a single output channel is
    treated as a Bernoulli logit (sigmoid). ``mse``: mean squared error to the expert.

    Raises:
        ValueError: for an unknown kind or mismatched shapes.
    """
    if student_out.shape != expert_out.shape:
        raise ValueError(f"student output {tuple(student_out.shape)} != expert output "
                         f"{tuple(expert_out.shape)}")
    expert_out = expert_out.detach()
    if kind == "mse":
        return F.mse_loss(student_out, expert_out)
    if kind != "kl":
        raise ValueError(f"parameter 'distill_loss' must be one of {list(DISTILL_LOSSES)}")
    t = temperature
    if student_out.ndim >= 2 and student_out.shape[1] == 1:
        s = torch.cat([torch.zeros_like(student_out), student_out], dim=1)
        e = torch.cat([torch.zeros_like(expert_out), expert_out], dim=1)
    else:
        s, e = student_out, expert_out
    log_ps = F.log_softmax(s / t, dim=1)
    log_pe = F.log_softmax(e / t, dim=1)
    kl = (log_pe.exp() * (log_pe - log_ps)).sum(dim=1)
    return kl.mean() * t * t


@torch.no_grad()
def expert_weights(
    student_features: torch.Tensor,
    expert_features: Sequence[torch.Tensor],
    config: FedEFMConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-expert (weights, mean EMD) from the feature maps of one batch."""
    grid = config.emd_grid or None
    emds = np.array([
        float(feature_map_emd(student_features, f, method=config.emd_method,
                              reg=config.emd_reg, grid=grid).mean())
        for f in expert_features
    ])
    return similarity_weights(emds, config.weighting, config.weight_temperature, config.prefer), emds


def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class-probability maps ``(B, K, H, W)`` of logits: softmax over the class dimension,
    or ``[1 - p, p]`` for a single Bernoulli logit channel (as :func:`distillation_term`)."""
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1.0 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


def emd_input(output: torch.Tensor, features: torch.Tensor, config: FedEFMConfig) -> torch.Tensor:
    """What the expert-weighting EMD compares under ``config.emd_layer`` (no gradient)."""
    return (class_probabilities(output) if config.emd_layer == "output" else features).detach()


def distill(
    student: nn.Module,
    experts: Sequence[nn.Module],
    batches: BatchSource,
    task_loss: LossFn,
    config: FedEFMConfig | None = None,
    forward: ForwardFn = default_forward,
    private: PrivateSteps | None = None,
) -> DistillResult:
    """Distil the ``experts`` into ``student`` on the peer's own batches (in place).

    Each step computes the expert weights from the EMD between the student's and each
    expert's feature maps (or class-probability maps, ``emd_layer = "output"``) on that
    batch, then takes one optimiser step on
    ``beta * sum_j w_j * term_j + (1 - beta) * task_loss`` (see :func:`distillation_term`).
    Experts run in eval mode without gradients, the student in train mode; all modes
    are restored afterwards.

    Args:
        student: the peer's model (trained in place).
        experts: the returned ``train-result`` models (screen them first).
        batches: own data; a list or a factory (``lambda: data.batches(bs, rng)``).
        task_loss: ``loss(model, batch)``, e.g. ``task.loss``.
        config: hyperparameters (defaults of :class:`FedEFMConfig`).
        forward: ``forward(model, batch) -> (output, feature map)``.
        private: the peer's DP-SGD trainer when it trains privately (each sample's
            gradient, EMD weights included, is then computed on that sample alone).

    Raises:
        FloatingPointError: if the loss becomes non-finite.
    """
    cfg = config or FedEFMConfig()
    n_exp = len(experts)
    if n_exp == 0:
        logger.info("no experts returned: distillation is plain local training")
    modes = [e.training for e in experts]
    student_mode = student.training
    for e in experts:
        e.eval()
    student.train()
    w_sum = np.zeros(n_exp)
    emd_sum = np.zeros(n_exp)
    weighed = 0

    def step_loss(batch: Batch) -> torch.Tensor:
        # under DP-SGD this sees one sample at a time, so the EMD weights are per sample
        nonlocal w_sum, emd_sum, weighed
        batch = to_device(batch, student)
        total = torch.zeros((), device=model_device(student))
        if n_exp and cfg.beta > 0:
            s_out, s_feat = forward(student, batch)
            with torch.no_grad():
                e_outs = [forward(e, batch) for e in experts]
            w, emds = expert_weights(emd_input(s_out, s_feat, cfg),
                                     [emd_input(eo, ef, cfg) for eo, ef in e_outs], cfg)
            w_sum += w
            emd_sum += emds
            weighed += 1
            kd = sum(float(wj) * distillation_term(s_out, eo, cfg.temperature,
                                                   cfg.distill_loss)
                     for wj, (eo, _) in zip(w, e_outs, strict=True))
            total = total + cfg.beta * kd
        if cfg.beta < 1 or not n_exp:
            total = total + (1.0 - cfg.beta if n_exp else 1.0) * task_loss(student, batch)
        return total

    try:
        losses = run_steps(list(student.parameters()), step_loss, batches, cfg.distill_steps,
                           cfg.optimizer, cfg.lr, private)
    finally:
        student.train(student_mode)
        for e, m in zip(experts, modes, strict=True):
            e.train(m)
    steps = len(losses)
    if weighed:
        weights, emd = w_sum / weighed, emd_sum / weighed
    else:
        weights, emd = np.full(n_exp, 1.0 / max(n_exp, 1)), np.full(n_exp, math.nan)
    logger.debug("distilled %d steps from %d experts, weights %s", steps, n_exp, weights)
    return DistillResult(student, weights, emd, steps, losses)




def global_model(states: Sequence[Mapping[str, np.ndarray]]) -> StateDict:
    """The federation's foundation model: the plain average of the peers' models.

    Raises:
        ValueError: if ``states`` is empty.
    """
    return average_states(states)


class FedEFMStrategy(Strategy):
    """FedEFM: train-request/train-result round trips, EMD-weighted distillation, mixing."""

    name = "fedefm"
    config_class = FedEFMConfig
    config: FedEFMConfig
    round_shape = RoundShape.TRAIN_REQUEST

    def learn_from_experts(self, bench: Workbench, experts: Sequence[Contribution]) -> dict[str, Any]:
        """Distil the screened experts into the peer's model on its own data (in place).

        Returns ``{"weights": [...], "steps": n}``: each expert's EMD-based weight, in order.
        """
        models = bench.copies([dict(c.state) for c in experts])
        result = self.distill(bench.model, models, bench.batches(bench.next_seed()), bench.task.loss,
                              private=bench.private)
        return {"weights": [float(w) for w in result.weights], "steps": result.steps}

    def train_for_neighbour(self, model: nn.Module, batches: BatchSource,
                            loss: LossFn, private: PrivateSteps | None = None) -> TrainResult:
        """Answer a ``train-request``: train the neighbour's model (in place) on own data.

        Under DP-SGD (``private``) these steps spend this peer's budget, not the requester's.
        """
        cfg = self.config
        return train_steps(model, batches, loss, cfg.local_steps, cfg.lr, cfg.optimizer, private=private)

    def distill(self, student: nn.Module, experts: Sequence[nn.Module],
                batches: BatchSource, loss: LossFn,
                forward: ForwardFn = default_forward,
                private: PrivateSteps | None = None) -> DistillResult:
        """:func:`distill` with this strategy's config."""
        return distill(student, experts, batches, loss, self.config, forward, private)

    def aggregate(
        self,
        own: Mapping[str, np.ndarray],
        own_weight: float,
        neighbours: Sequence[Contribution],
        *,
        own_degree: int | None = None,
        own_loss: float | None = None,
    ) -> AggregationResult:
        """The mixing step: ``(1 - mix) * own + mix * mean(experts)``.

        ``neighbours`` are the returned experts (``train-result`` states). With
        ``mix = 0`` the own (distilled) model is returned unchanged. Under
        ``robust = "median"`` / ``"trimmed_mean"`` the mean of the experts is replaced by
        the robust estimate over own + experts.
        """
        mix = self.config.mix

        def weights(acc: list[Contribution]) -> np.ndarray:
            if not acc or mix == 0.0:
                return np.concatenate([[1.0], np.zeros(len(acc))])
            return np.concatenate([[1.0 - mix], np.full(len(acc), mix / len(acc))])

        return aggregate_contributions(
            own, neighbours, self.config, weights,
            own_share=1.0 - mix if mix > 0 else 1.0,
        )

    @staticmethod
    def global_model(states: Sequence[Mapping[str, np.ndarray]]) -> StateDict:
        """See :func:`global_model`."""
        return global_model(states)
