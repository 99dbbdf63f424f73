"""Small torch training helpers the strategies share (neighbour training, head fine-tune).

They take the task's loss as a callable ``loss(model, batch)`` and batches as dicts of
tensors (``ArrayDataset.batches``), so they know nothing about a particular task.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, Union

import numpy as np
import torch
from torch import nn

from .base import check_choice

logger = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor]
#: ``loss(model, batch) -> scalar tensor`` (a task's training loss)
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
#: batches: an iterable (a list is cycled) or a factory returning one fresh pass per call
BatchSource = Union[Iterable[Batch], Callable[[], Iterable[Batch]]]  # noqa: UP007

OPTIMIZERS = ("adam", "sgd")


class PrivateSteps(Protocol):
    """A peer's DP-SGD trainer (``silomesh.models.privacy.DPTrainer``), as strategies see it.

    Every step on the silo's data goes through :meth:`run` so one accountant counts them all.
    """

    def run(
        self,
        params: Sequence[nn.Parameter],
        step_loss: Callable[[Batch], torch.Tensor],
        batches: Iterator[Batch],
        steps: int,
        make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    ) -> list[float]:
        """Take ``steps`` DP-SGD steps; each sample's gradient from ``step_loss`` of it alone."""
        ...

    @property
    def sample_rate(self) -> float:
        """Poisson sampling rate (one pass is ``ceil(1 / sample_rate)`` steps)."""
        ...


@dataclass
class TrainResult:
    """Outcome of :func:`train_steps`: the (same) model, steps run and their mean loss."""

    model: nn.Module
    steps: int
    mean_loss: float


def iterate_batches(source: BatchSource, steps: int | None) -> Iterator[Batch]:
    """Yield ``steps`` batches (one pass if None), restarting the source as needed.

    A factory is called again for each pass; a re-iterable (list, tuple) is cycled; a
    one-shot iterator (generator) ends when exhausted, with a warning if that is
    before ``steps``.
    """
    produced = 0
    while True:
        iterable = source() if callable(source) else source
        it = iter(iterable)
        one_shot = not callable(source) and it is iterable
        got = 0
        for batch in it:
            if steps is not None and produced >= steps:
                return
            yield batch
            produced += 1
            got += 1
        if steps is None or produced >= steps or got == 0 or one_shot:
            if steps is not None and produced < steps:
                logger.warning("batch source ran out after %d of %d steps", produced, steps)
            return


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless model)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def to_device(batch: Batch, model: nn.Module) -> Batch:
    """Move the batch's tensors to the model's device (no-op when already there)."""
    device = model_device(model)
    return {k: v.to(device) if isinstance(v, torch.Tensor) and v.device != device else v
            for k, v in batch.items()}


def make_optimizer(params: Iterable[nn.Parameter], name: str, lr: float) -> torch.optim.Optimizer:
    """Adam, or SGD with momentum 0.9."""
    check_choice("optimizer", name, OPTIMIZERS)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def run_steps(
    params: Sequence[nn.Parameter],
    step_loss: Callable[[Batch], torch.Tensor],
    batches: BatchSource,
    steps: int,
    optimizer: str,
    lr: float,
    private: PrivateSteps | None = None,
) -> list[float]:
    """Optimiser steps on ``params`` with ``step_loss``; return each step's loss.

    Without ``private``: plain steps on whole batches (``steps = 0``: one pass). With it:
    DP-SGD through the peer's trainer (``steps = 0``: ``ceil(1 / sample_rate)`` steps),
    where ``step_loss`` sees one sample at a time.

    Raises:
        FloatingPointError: if the loss becomes non-finite.
        silomesh.models.privacy.BudgetExhausted: if the private steps would pass the budget.
    """
    trainable = [p for p in params if p.requires_grad]
    if private is not None:
        n = steps or math.ceil(1.0 / private.sample_rate)
        return private.run(trainable, step_loss, iterate_batches(batches, None), n,
                           lambda ps: make_optimizer(ps, optimizer, lr))
    opt = make_optimizer(trainable, optimizer, lr)
    losses: list[float] = []
    for batch in iterate_batches(batches, steps or None):
        opt.zero_grad(set_to_none=True)
        value = step_loss(batch)
        if not torch.isfinite(value):
            raise FloatingPointError(f"non-finite training loss at step {len(losses)}")
        value.backward()
        opt.step()
        losses.append(float(value.detach()))
    return losses


def train_steps(
    model: nn.Module,
    batches: BatchSource,
    loss: LossFn,
    steps: int,
    lr: float,
    optimizer: str = "adam",
    *,
    set_train_mode: bool = True,
    private: PrivateSteps | None = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters in place for ``steps`` steps (0: one pass).

    Args:
        set_train_mode: put the whole model in train mode first (``False`` when the
            caller has chosen the modes, e.g. a frozen body kept in eval mode).
        private: the peer's DP-SGD trainer, if it trains privately.

    Raises:
        FloatingPointError: if the loss becomes non-finite.
    """
    if set_train_mode:
        model.train()
    losses = run_steps(list(model.parameters()), lambda b: loss(model, to_device(b, model)), batches,
                       steps, optimizer, lr, private)
    finite = [x for x in losses if math.isfinite(x)]  # an empty Poisson batch has no loss
    return TrainResult(model, len(losses), float(np.mean(finite)) if finite else math.nan)
