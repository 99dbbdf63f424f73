"""Differentially private local training (DP-SGD) with Opacus, and the budget it spends.

One :class:`DPTrainer` per peer: every optimiser step that reads this silo's data goes
through :meth:`DPTrainer.run`, so its accountant sees every step (local training, a
neighbour's model trained on our data, distillation, pseudo-label steps, head fine-tune).

How a step works (DP-SGD, Abadi et al. 2016):

1. a batch is drawn by Poisson sampling: each sample joins with probability
   ``q = batch_size / n`` (the sampling the accountant's analysis assumes);
2. each sample's gradient is computed **on that sample alone** (the loss is called with a
   one-sample batch), so it depends on no other record, even for losses that couple a
   batch (batch soft Dice, FedEFM's EMD expert weights);
3. Opacus's :class:`~opacus.optimizers.DPOptimizer` clips each per-sample gradient to
   ``max_grad_norm`` in L2 over all trained parameters, sums, adds Gaussian noise of
   standard deviation ``noise_multiplier * max_grad_norm`` and divides by the expected
   batch size, then the wrapped optimiser steps;
4. Opacus's RDP accountant records ``(noise_multiplier, q)`` for the step.

The RDP accountant (not PRV) because its bound is a deterministic function of the logged
``(noise_multiplier, sample_rate, steps)`` triples, so an auditor recomputes the same ε
from the audit log (:mod:`silomesh.audit.privacy` evaluates the same Opacus RDP formulas
without torch); PRV is tighter but numerical, with an error bound to carry along.

A step that would take ε past the target is never taken: :meth:`DPTrainer.run` checks the
whole request first and raises :class:`BudgetExhausted`.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from torch import nn

from silomesh.models.task import ArrayDataset

logger = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor]
#: ``step_loss(batch) -> scalar``: the loss of one step, for whatever networks it trains
StepLoss = Callable[[Batch], torch.Tensor]
#: ``make_optimizer(params) -> optimizer``
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class BudgetExhausted(RuntimeError):
    """Training would take this peer's ε past its target; nothing was trained."""


@dataclass(frozen=True)
class DPSettings:
    """A peer's differential-privacy settings (peer.toml ``[privacy]``).

    Attributes:
        target_epsilon: ε this peer may spend over the whole federation (its budget).
        delta: δ of the (ε, δ) guarantee; well below 1 / (training samples).
        max_grad_norm: per-sample gradient clipping bound C (L2, over all trained weights).
        noise_multiplier: sigma; noise std is ``sigma * C``. ``None``: calibrated so that
            ``planned_steps`` steps spend exactly ``target_epsilon``.
        planned_steps: steps the calibration plans for (all training on our data over
            the federation: rounds x steps per round, plus served train-requests).
    """

    target_epsilon: float = 3.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    planned_steps: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.target_epsilon) and self.target_epsilon > 0):
            raise ValueError(f"privacy.target_epsilon must be a positive number, got {self.target_epsilon!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"privacy.delta must be in (0, 1), got {self.delta!r}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"privacy.max_grad_norm must be a positive number, got {self.max_grad_norm!r}")
        if self.noise_multiplier is not None and not (
            math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0
        ):
            raise ValueError(f"privacy.noise_multiplier must be a positive number, got {self.noise_multiplier!r}")
        if self.noise_multiplier is None and self.planned_steps < 1:
            raise ValueError("privacy: set noise_multiplier, or planned_steps >= 1 to calibrate it "
                             "from target_epsilon")


@dataclass(frozen=True)
class Spending:
    """What one accounting period (a round) spent.

    Attributes:
        steps: DP-SGD steps taken in the period.
        noise_multiplier: sigma of those steps.
        sample_rate: Poisson sampling rate q of those steps.
        epsilon_round: ε of the period's steps alone (composed from zero).
        epsilon_total: cumulative ε after the period.
        delta: δ both ε are stated at.
        target_epsilon: the budget.
    """

    steps: int
    noise_multiplier: float
    sample_rate: float
    epsilon_round: float
    epsilon_total: float
    delta: float
    target_epsilon: float


def poisson_batches(
    data: ArrayDataset, sample_rate: float, rng: np.random.Generator
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless Poisson-sampled batches: each sample joins each batch with ``sample_rate``."""
    n = len(data)
    while True:
        idx = np.flatnonzero(rng.random(n) < sample_rate)
        yield {k: torch.from_numpy(np.ascontiguousarray(v[idx])) for k, v in data.arrays.items()}


class DPTrainer:
    """DP-SGD steps on one silo's data and the RDP accountant that counts them.

    Args:
        settings: the peer's ``[privacy]`` settings.
        n_samples: training samples of the silo.
        batch_size: expected batch size; the sampling rate is ``batch_size / n_samples``.
        spent_history: accountant history to resume from (``(sigma, q, steps)`` triples, e.g.
            recovered from the audit log after a restart).
    """

    def __init__(
        self,
        settings: DPSettings,
        n_samples: int,
        batch_size: int,
        spent_history: Sequence[tuple[float, float, int]] = (),
    ) -> None:
        if n_samples < 1:
            raise ValueError("cannot train privately on an empty dataset")
        self.settings = settings
        self.n_samples = n_samples
        self.sample_rate = min(1.0, batch_size / n_samples)
        self.expected_batch_size = max(1, round(self.sample_rate * n_samples))
        if settings.noise_multiplier is not None:
            self.noise_multiplier = settings.noise_multiplier
        else:
            self.noise_multiplier = float(get_noise_multiplier(
                target_epsilon=settings.target_epsilon, target_delta=settings.delta,
                sample_rate=self.sample_rate, steps=settings.planned_steps, accountant="rdp",
            ))
        self.accountant = RDPAccountant()
        self.accountant.history = [(float(s), float(q), int(n)) for s, q, n in spent_history]
        #: the closed periods' (sigma, q, steps), as the audit log has them
        self._closed: list[tuple[float, float, int]] = list(self.accountant.history)
        self._period_steps = 0
        #: set once a training was refused for the budget: the peer takes no further part
        self.exhausted = False
        self._lock = threading.Lock()  # training runs in a worker thread, closing on the event loop
        logger.info("DP-SGD: sigma %.3f, C %.3g, q %.4f, target eps %.3g at delta %.1e",
                    self.noise_multiplier, settings.max_grad_norm, self.sample_rate,
                    settings.target_epsilon, settings.delta)

    # -- the budget --------------------------------------------------------------------

    @property
    def epsilon(self) -> float:
        """Cumulative ε spent so far (0 before the first step)."""
        return _epsilon(self.accountant.history, self.settings.delta)

    @property
    def remaining(self) -> float:
        """ε left of the target (never negative)."""
        return max(0.0, self.settings.target_epsilon - self.epsilon)

    def epsilon_after(self, steps: int) -> float:
        """Cumulative ε if ``steps`` more steps were taken now."""
        history = [*self.accountant.history, (self.noise_multiplier, self.sample_rate, steps)]
        return _epsilon(history, self.settings.delta)

    def can_train(self, steps: int) -> bool:
        """True if ``steps`` more steps stay within the target ε."""
        return steps <= 0 or self.epsilon_after(steps) <= self.settings.target_epsilon

    def close_period(self) -> Spending:
        """End an accounting period (a round, a served request): what it spent, and the
        total over all closed periods (steps of a training still running count in the next)."""
        with self._lock:
            steps, self._period_steps = self._period_steps, 0
        period = (self.noise_multiplier, self.sample_rate, steps)
        self._closed.append(period)
        # the total over closed periods only: what an auditor recomputes from the logged ones
        return Spending(
            steps=steps, noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
            epsilon_round=_epsilon([period], self.settings.delta),
            epsilon_total=_epsilon(self._closed, self.settings.delta), delta=self.settings.delta,
            target_epsilon=self.settings.target_epsilon,
        )

    @property
    def period_steps(self) -> int:
        """Steps taken since the last :meth:`close_period`."""
        return self._period_steps

    # -- training ---------------------------------------------------------------------

    def batches(self, data: ArrayDataset, seed: int) -> Callable[[], Iterator[dict[str, torch.Tensor]]]:
        """A batch source of Poisson-sampled batches (the strategies' ``BatchSource``)."""
        rng = np.random.default_rng(seed)
        return lambda: poisson_batches(data, self.sample_rate, rng)

    def run(
        self,
        params: Sequence[nn.Parameter],
        step_loss: StepLoss,
        batches: Iterator[Batch],
        steps: int,
        make_optimizer: OptimizerFactory,
    ) -> list[float]:
        """Take ``steps`` DP-SGD steps on ``params``; return each step's mean loss.

        Args:
            params: every parameter the steps change (e.g. both FedMix networks).
            step_loss: the loss of one batch; called once per sample with a one-sample batch.
            batches: Poisson-sampled batches (:meth:`batches`).
            steps: DP-SGD steps.
            make_optimizer: builds the optimiser Opacus wraps (Adam, SGD, AdamW...).

        Raises:
            BudgetExhausted: if the steps would take ε past the target (nothing is trained).
            FloatingPointError: if a per-sample loss is not finite.
        """
        params = [p for p in params if p.requires_grad]
        if steps <= 0 or not params:
            return []
        if self.exhausted:  # the peer stopped for its budget: nothing trains on its data any more
            raise BudgetExhausted(f"the privacy budget is spent (eps {self.epsilon:.3f} of "
                                  f"{self.settings.target_epsilon:g}): no more training on this silo's data")
        if not self.can_train(steps):
            self.exhausted = True
            raise BudgetExhausted(
                f"{steps} more DP-SGD steps would spend eps {self.epsilon_after(steps):.3f} "
                f"> target {self.settings.target_epsilon:g} (spent {self.epsilon:.3f})"
            )
        opt = DPOptimizer(
            make_optimizer(list(params)),
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.settings.max_grad_norm,
            expected_batch_size=self.expected_batch_size,
            loss_reduction="mean",
        )
        losses: list[float] = []
        try:
            for step in range(steps):
                batch = next(batches)
                n = len(next(iter(batch.values())))
                opt.zero_grad(set_to_none=True)
                grads: list[list[torch.Tensor]] = [[] for _ in params]
                total = 0.0
                for i in range(n):
                    one = {k: v[i:i + 1] for k, v in batch.items()}
                    value = step_loss(one)
                    if not torch.isfinite(value):
                        raise FloatingPointError(f"non-finite per-sample loss at step {step}")
                    got = torch.autograd.grad(value, params, allow_unused=True)
                    for slot, g, p in zip(grads, got, params, strict=True):
                        slot.append(torch.zeros_like(p) if g is None else g.detach())
                    total += float(value.detach())
                for p, slot in zip(params, grads, strict=True):
                    # an empty Poisson batch still takes a (noise-only) step
                    sample = torch.stack(slot) if slot else torch.zeros((0, *p.shape), dtype=p.dtype)
                    p.grad_sample = sample  # type: ignore[attr-defined]  # Opacus reads it
                opt.step()
                with self._lock:
                    self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
                    self._period_steps += 1
                losses.append(total / n if n else math.nan)
        finally:
            for p in params:
                p.grad_sample = None  # type: ignore[attr-defined]
                p.grad = None
        return losses


def check_private_model(models: Sequence[nn.Module]) -> None:
    """Refuse models whose layers DP-SGD cannot protect (Opacus's ``ModuleValidator``).

    BatchNorm is the one that matters here: its running statistics are updated from the
    data without noise and travel with the model, so they would leak past the budget.

    Raises:
        ValueError: naming the first offending layer.
    """
    from opacus.validators import ModuleValidator

    for model in models:
        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise ValueError(f"privacy: {type(model).__name__} has a layer DP-SGD cannot protect: {errors[0]} "
                             "(use GroupNorm or InstanceNorm instead of BatchNorm)")


def _epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    history = [h for h in history if h[2] > 0]
    if not history:
        return 0.0
    acc = RDPAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta))
