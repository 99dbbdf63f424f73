"""What a strategy's round hooks may use of a peer's model and data.

The peer (``silomesh.peer.learner.Learner``) owns the torch model, this silo's training
data and the seeds; a strategy's hooks (:class:`~silomesh.strategies.strategy.Strategy`)
receive it as a :class:`Workbench` and do their torch work through it, so the strategy
never learns where the data lives and the peer never learns what the strategy does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .base import StateDict

if TYPE_CHECKING:
    from torch import nn

    from .training import BatchSource, PrivateSteps


@dataclass
class LocalStep:
    """One local training step of a round: the new state, its mean loss, and strategy facts.

    Attributes:
        state: the peer's whole state after the step (extra networks' keys included).
        mean_loss: the mean training loss (NaN when no step ran).
        steps: optimiser steps run.
        info: small strategy facts for logs (FedMix's pseudo-label statistics).
    """

    state: StateDict
    mean_loss: float
    steps: int
    info: dict[str, float] = field(default_factory=dict)


class Workbench(Protocol):
    """A peer's model, data and seeds, as a strategy's hooks see them."""

    @property
    def task(self) -> Any:  # noqa: ANN401 - duck-typed: loss, plus FedMix's optional loss_terms/predict_proba
        """The task (``loss(model, batch)`` and optional capabilities such as ``loss_terms``)."""

    @property
    def model(self) -> nn.Module:
        """The peer's (first) network."""

    @property
    def lr(self) -> float:
        """The configured local learning rate."""

    @property
    def weak_labels(self) -> bool:
        """True if this silo's training data has no pixel masks (box / image-level)."""

    @property
    def private(self) -> PrivateSteps | None:
        """The peer's DP-SGD trainer, or None when it trains without differential privacy.

        Every hook that trains on this silo's data passes it on, so its accountant sees
        every step; :meth:`batches` are then Poisson-sampled.
        """

    def network(self, prefix: str) -> nn.Module | None:
        """The extra network stored under ``prefix`` (see :meth:`Strategy.extra_networks`)."""

    def next_seed(self) -> int:
        """A fresh seed for the next piece of local work (deterministic per peer)."""

    def batches(self, seed: int) -> BatchSource:
        """This silo's training batches, shuffled by a generator seeded with ``seed``."""

    def state(self) -> StateDict:
        """The whole current state (first network plus extra networks under their prefixes)."""

    def train_plain(self, steps: int) -> LocalStep:
        """Train the first network with the task's loss for ``steps`` steps."""

    def train_copy(self, state: Mapping[str, np.ndarray], steps: int) -> LocalStep:
        """Train a copy of the first network, started from ``state``, on this silo's data."""

    def copies(self, states: list[StateDict]) -> list[nn.Module]:
        """One copy of the first network per state, loaded with it."""
