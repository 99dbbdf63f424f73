"""The peer's model and data: local training, evaluation, and the strategies' torch steps.

Everything here is synchronous torch work; the daemon calls it through
``trio.to_thread.run_sync`` under one capacity limiter, so training never blocks the
network loop and a peer never trains two things at once.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from silomesh.models.registry import get_task
from silomesh.models.task import ArrayDataset, Federation, Silo, Task
from silomesh.models.train import train_local
from silomesh.strategies import Strategy
from silomesh.strategies.fedefm import FedEFMStrategy

log = logging.getLogger(__name__)

StateDict = dict[str, np.ndarray]


def federation_seed(federation: str) -> int:
    """A seed every peer of a federation derives alike (the shared initial model)."""
    return int.from_bytes(hashlib.blake2b(federation.encode(), digest_size=4).digest(), "big")


@functools.lru_cache(maxsize=8)
def _federation(task_name: str, n_silos: int, seed: int, options: tuple[tuple[str, Any], ...]) -> Federation:
    return get_task(task_name).make_federation(n_silos, seed, **dict(options))


def synthetic_silo(task_name: str, n_silos: int, silo: int, seed: int, **options: Any) -> Silo:
    """Silo ``silo`` of a seeded synthetic federation (cached per process for simnet).

    Raises:
        ValueError: if ``silo`` is out of range.
    """
    if not 0 <= silo < n_silos:
        raise ValueError(f"silo {silo} out of range for {n_silos} silos")
    return _federation(task_name, n_silos, seed, tuple(sorted(options.items()))).silos[silo]


def to_numpy(model: nn.Module) -> StateDict:
    """A detached numpy copy of the model's state dict."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_numpy(model: nn.Module, state: Mapping[str, np.ndarray], *, strict: bool = True) -> None:
    """Load numpy arrays into ``model`` (copies; received arrays may be read-only views)."""
    tensors = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()}
    model.load_state_dict(tensors, strict=strict)


@dataclass
class RoundTraining:
    state: StateDict
    mean_loss: float
    steps: int


class Learner:
    """A task, this silo's data, and the current model."""

    def __init__(
        self,
        task: Task,
        silo: Silo,
        *,
        size: str,
        init_seed: int,
        batch_size: int,
        lr: float,
        strategy: Strategy,
    ) -> None:
        self.task = task
        self.silo = silo
        self.batch_size = batch_size
        self.lr = lr
        self.strategy = strategy
        self.model = task.make_model(size, seed=init_seed)
        self.size = size
        self.init_seed = init_seed
        self._step_seed = 0
        if hasattr(strategy, "with_head_prefixes") and hasattr(self.model, "head_prefixes"):
            self.strategy = strategy.with_head_prefixes(tuple(self.model.head_prefixes))

    @property
    def n_samples(self) -> int:
        return len(self.silo.train)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.model.state_dict().items()}

    def state(self) -> StateDict:
        return to_numpy(self.model)

    def load(self, state: Mapping[str, np.ndarray]) -> None:
        load_numpy(self.model, state)

    def shared(self, state: Mapping[str, np.ndarray]) -> StateDict:
        """The part of ``state`` the strategy exchanges with neighbours."""
        keys = self.strategy.shared_keys(state)
        return {k: state[k] for k in keys}

    def _seed(self) -> int:
        self._step_seed += 1
        return self.init_seed + self._step_seed

    def train(self, steps: int) -> RoundTraining:
        """Train the current model on this silo's data."""
        losses = train_local(self.task, self.model, self.silo.train, steps, self.batch_size, self.lr, seed=self._seed())
        return RoundTraining(self.state(), float(np.mean(losses)) if losses else float("nan"), steps)

    def train_copy(self, state: Mapping[str, np.ndarray], steps: int) -> RoundTraining:
        """FedEFM: train a neighbour's model on this silo's data (the overseas expert)."""
        model = copy.deepcopy(self.model)
        load_numpy(model, {**to_numpy(model), **state})
        losses = train_local(self.task, model, self.silo.train, steps, self.batch_size, self.lr, seed=self._seed())
        return RoundTraining(to_numpy(model), float(np.mean(losses)) if losses else float("nan"), steps)

    def distill(self, experts: list[StateDict]) -> dict[str, Any]:
        """FedEFM: distil returned experts into the current model (in place)."""
        assert isinstance(self.strategy, FedEFMStrategy)
        models = []
        for state in experts:
            m = copy.deepcopy(self.model)
            load_numpy(m, state)
            models.append(m)
        rng = np.random.default_rng(self._seed())
        result = self.strategy.distill(
            self.model, models, lambda: self.silo.train.batches(self.batch_size, rng), self.task.loss
        )
        return {"weights": [float(w) for w in result.weights], "steps": result.steps}

    @torch.no_grad()
    def evaluate(self, data: ArrayDataset | None = None) -> dict[str, float]:
        return self.task.evaluate(self.model, data if data is not None else self.silo.test)
