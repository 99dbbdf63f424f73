"""The peer's model and data: local training, evaluation, and the strategies' torch steps.

Everything here is synchronous torch work; the daemon calls it through
``trio.to_thread.run_sync`` under one capacity limiter, so training never blocks the
network loop and a peer never trains two things at once.

FedMix peers hold two networks (:class:`Learner` ``.model`` and ``.twin``). The second
one travels in the same state dict under :data:`TWIN_PREFIX`, so it is exchanged,
aggregated with the same weights, stored with every committed model and restored on
restart exactly like the first; evaluation uses the first network only.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from silomesh.models.registry import get_task
from silomesh.models.task import ArrayDataset, Federation, Silo, Task
from silomesh.models.train import train_local
from silomesh.strategies import Strategy
from silomesh.strategies.fedefm import FedEFMStrategy
from silomesh.strategies.fedmix import FedMixStrategy
from silomesh.strategies.segviz import SegVizStrategy

log = logging.getLogger(__name__)

StateDict = dict[str, np.ndarray]

#: state-dict prefix of a FedMix peer's second network
TWIN_PREFIX = "twin."
#: the second network is initialised from ``init_seed + TWIN_SEED_OFFSET`` (alike on all
#: peers of a federation, and different from the first network's initialisation)
TWIN_SEED_OFFSET = 7919


def federation_seed(federation: str) -> int:
    """A seed every peer of a federation derives alike (the shared initial model)."""
    return int.from_bytes(hashlib.blake2b(federation.encode(), digest_size=4).digest(), "big")


@functools.lru_cache(maxsize=8)
def _federation(task_name: str, n_silos: int, seed: int, options: tuple[tuple[str, Any], ...]) -> Federation:
    return get_task(task_name, **dict(options)).make_federation(n_silos, seed)


def synthetic_federation(task_name: str, n_silos: int, seed: int, **options: Any) -> Federation:
    """The whole seeded synthetic federation (every silo and the shared test sets), cached per process."""
    return _federation(task_name, n_silos, seed, tuple(sorted(options.items())))


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
    """One round's local training: the new state, its mean loss, and strategy facts.

    ``info`` holds FedMix's pseudo-label statistics (``pseudo_steps``, ``weak_samples``,
    ``kept``, ``kept_foreground``, ``kept_fraction``, ``agreement``); empty otherwise.
    """

    state: StateDict
    mean_loss: float
    steps: int
    info: dict[str, float] = field(default_factory=dict)


def supports_pseudo_labels(task: Task) -> bool:
    """True if the task offers what FedMix's local step needs.

    That is ``loss_terms(model, batch)`` understanding a ``"pseudo"`` key and
    ``predict_proba(model, images)``; today the ``lesion`` task.
    """
    return callable(getattr(task, "loss_terms", None)) and callable(getattr(task, "predict_proba", None))


class Learner:
    """A task, this silo's data, and the current model (two networks under FedMix).

    With the ``fedmix`` strategy on a task that supports pseudo-labels
    (:func:`supports_pseudo_labels`), ``twin`` is FedMix's second network; otherwise it
    is ``None`` and the learner trains one model with the task's loss.
    """

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
        self.twin: nn.Module | None = None
        if isinstance(strategy, FedMixStrategy):
            if supports_pseudo_labels(task):
                self.twin = task.make_model(size, seed=init_seed + TWIN_SEED_OFFSET)
            else:
                log.warning("task %s has no pseudo-label support: fedmix trains one network "
                            "with the task's loss and only its aggregation weights differ", task.name)

    @property
    def n_samples(self) -> int:
        return len(self.silo.train)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Key -> shape of every tensor :meth:`state` returns (twin keys included)."""
        shapes = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        if self.twin is not None:
            shapes.update({TWIN_PREFIX + k: tuple(v.shape) for k, v in self.twin.state_dict().items()})
        return shapes

    @property
    def weak_labels(self) -> bool:
        """True if this silo's training data has no pixel masks (box / image-level)."""
        return "mask" not in self.silo.train.arrays

    def state(self) -> StateDict:
        """The model's state dict; a FedMix twin's keys follow under :data:`TWIN_PREFIX`."""
        state = to_numpy(self.model)
        if self.twin is not None:
            state.update({TWIN_PREFIX + k: v for k, v in to_numpy(self.twin).items()})
        return state

    def load(self, state: Mapping[str, np.ndarray]) -> None:
        """Load a state written by :meth:`state` (strict for the first network).

        Raises:
            RuntimeError: from torch, if keys or shapes do not match the model.
        """
        if self.twin is None:
            load_numpy(self.model, state)
            return
        twin = {k[len(TWIN_PREFIX):]: v for k, v in state.items() if k.startswith(TWIN_PREFIX)}
        load_numpy(self.model, {k: v for k, v in state.items() if not k.startswith(TWIN_PREFIX)})
        if twin:
            load_numpy(self.twin, twin)
        else:
            log.warning("state without FedMix's second network: keeping the current one")

    def adopt(self, state: Mapping[str, np.ndarray]) -> StateDict:
        """Load the round's aggregated ``state`` and return the model to evaluate and commit.

        Under ``segviz`` with ``finetune_steps > 0`` the task head is then fine-tuned on
        this silo's training data with the federated body frozen (SegViz's local head
        step), so the committed body equals the aggregated one bit for bit. Every other
        strategy returns the aggregated state unchanged.

        Raises:
            RuntimeError: from torch, if keys or shapes do not match the model.
        """
        self.load(state)
        strategy = self.strategy
        if not isinstance(strategy, SegVizStrategy) or strategy.config.finetune_steps <= 0:
            return dict(state)
        seed = self._seed()
        rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        data, bs = self.silo.train, self.batch_size
        result = strategy.finetune_head(self.model, lambda: data.batches(bs, rng), self.task.loss)
        log.debug("segviz head fine-tune: %d steps, loss %.4f", result.steps, result.mean_loss)
        return self.state()

    def shared(self, state: Mapping[str, np.ndarray]) -> StateDict:
        """The part of ``state`` the strategy exchanges with neighbours."""
        keys = self.strategy.shared_keys(state)
        return {k: state[k] for k in keys}

    def _seed(self) -> int:
        self._step_seed += 1
        return self.init_seed + self._step_seed

    def train(self, steps: int) -> RoundTraining:
        """Train the current model on this silo's data (FedMix: both networks)."""
        if self.twin is not None:
            return self._train_fedmix(steps)
        losses = train_local(self.task, self.model, self.silo.train, steps, self.batch_size, self.lr, seed=self._seed())
        return RoundTraining(self.state(), float(np.mean(losses)) if losses else float("nan"), steps)

    def _train_fedmix(self, steps: int) -> RoundTraining:
        """FedMix's local step (:func:`silomesh.strategies.fedmix.train_pair`).

        Pixel-mask silos train both networks on their masks. Box / image-level silos
        train each network on its weak-label loss plus the other network's
        pseudo-labels, made by frozen copies of the two networks as they stand at the
        start of the round, i.e. the federated (aggregated) networks.
        """
        assert isinstance(self.strategy, FedMixStrategy) and self.twin is not None
        seed = self._seed()
        if steps <= 0:
            return RoundTraining(self.state(), float("nan"), 0)
        teachers = (copy.deepcopy(self.model), copy.deepcopy(self.twin)) if self.weak_labels else None
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        data, bs = self.silo.train, self.batch_size
        result = self.strategy.train_pair(
            self.model, self.twin, lambda: data.batches(bs, rng),
            getattr(self.task, "loss_terms"), getattr(self.task, "predict_proba"),  # noqa: B009
            steps, self.lr, teachers=teachers,
        )
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
            log.debug("fedmix pseudo-labels: kept %d of %d (%d with foreground), agreement %.3f",
                      result.kept, result.samples, result.kept_foreground, result.agreement)
        return RoundTraining(self.state(), result.mean_loss, result.steps, info)

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
