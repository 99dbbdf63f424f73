"""The peer's model and data: local training, evaluation, and the strategies' workbench.

Everything here is synchronous torch work; the round loop calls it through its
:class:`~silomesh.peer.context.Compute` (a worker thread under one capacity limiter in
production), so training never blocks the network loop and a peer never trains two
things at once.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from silomesh.models.data_io import load_folder
from silomesh.models.privacy import DPSettings, DPTrainer, check_private_model
from silomesh.models.registry import get_task
from silomesh.models.task import ArrayDataset, Federation, Silo, Task
from silomesh.models.train import frozen_copy, train_local, with_teacher
from silomesh.peer.config import TaskConfig
from silomesh.strategies import Contribution, LocalStep, StateDict, Strategy
from silomesh.strategies.training import BatchSource, run_steps

log = logging.getLogger(__name__)


def derived_seed(text: str) -> int:
    """A 32-bit seed named by ``text``: the same on every machine and in every process."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big")


def federation_seed(federation: str) -> int:
    """A seed every peer of a federation derives alike (the shared initial model)."""
    return derived_seed(federation)


@functools.lru_cache(maxsize=8)
def _federation(task_name: str, n_silos: int, seed: int, options: tuple[tuple[str, Any], ...]) -> Federation:
    return get_task(task_name, **dict(options)).make_federation(n_silos, seed)


def synthetic_silo(task_name: str, n_silos: int, silo: int, seed: int, **options: Any) -> Silo:
    """Silo ``silo`` of a seeded synthetic federation (cached per process for simnet).

    Raises:
        ValueError: if ``silo`` is out of range.
    """
    if not 0 <= silo < n_silos:
        raise ValueError(f"silo {silo} out of range for {n_silos} silos")
    return _federation(task_name, n_silos, seed, tuple(sorted(options.items()))).silos[silo]


def synthetic_federation(task_name: str, n_silos: int, seed: int, **options: Any) -> Federation:
    """The whole seeded synthetic federation (every silo and the shared test sets), cached per process."""
    return _federation(task_name, n_silos, seed, tuple(sorted(options.items())))


def to_numpy(model: nn.Module) -> StateDict:
    """A detached numpy copy of the model's state dict."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_numpy(model: nn.Module, state: Mapping[str, np.ndarray], *, strict: bool = True) -> None:
    """Load numpy arrays into ``model`` (copies; received arrays may be read-only views)."""
    tensors = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()}
    model.load_state_dict(tensors, strict=strict)


def check_keep_unlabelled(task: Task) -> None:
    """Raise ``ValueError`` if ``[rounds] keep_unlabelled`` cannot apply to ``task``."""
    if not task.distills:
        raise ValueError(f"rounds.keep_unlabelled: task {task.name!r} has nothing unannotated to keep "
                         "(it applies to tasks whose silos label only part of what the model predicts: "
                         "organs, lesion)")


class Learner:
    """A task, this silo's data, and the current model: the strategies' :class:`Workbench`.

    A strategy may add networks that travel with the model under a state-dict prefix
    (:meth:`~silomesh.strategies.Strategy.extra_networks`; FedMix's second network); every
    method here that reads or writes a state covers them. What a round does with the
    model is the strategy's (its hooks receive this learner); the learner only trains,
    evaluates, loads and copies.
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
        privacy: DPSettings | None = None,
        spent_history: Sequence[tuple[float, float, int]] = (),
        keep_unlabelled: bool = False,
    ) -> None:
        if keep_unlabelled:
            check_keep_unlabelled(task)
        self.task = task
        #: ``[rounds] keep_unlabelled``: every training on this silo's data keeps the model's
        #: outputs as it began, where this silo's labels say nothing (``train_local(teacher=)``)
        self.keep_unlabelled = keep_unlabelled
        self.silo = silo
        self.batch_size = batch_size
        self.lr = lr
        self.model = task.make_model(size, seed=init_seed)
        self.size = size
        self.init_seed = init_seed
        self._step_seed = 0
        #: while serving a train-request: its own seeds (see :meth:`serve_train_request`)
        self._request_seeds: Iterator[int] | None = None
        self.strategy = strategy.prepared_for(self.model)
        self.extra = self.strategy.extra_networks(task, lambda seed: task.make_model(size, seed=seed), init_seed)
        #: the peer's one DP-SGD trainer (None: no differential privacy); every training on
        #: this silo's data goes through it, so its accountant sees every step
        self.dp: DPTrainer | None = None
        if privacy is not None:
            check_private_model([self.model, *self.extra.values()])
            self.dp = DPTrainer(privacy, len(silo.train), batch_size, spent_history)

    # -- Workbench --------------------------------------------------------------------

    @property
    def n_samples(self) -> int:
        return len(self.silo.train)

    @property
    def weak_labels(self) -> bool:
        """True if this silo's training data has no pixel masks (box / image-level)."""
        return "mask" not in self.silo.train.arrays

    @property
    def private(self) -> DPTrainer | None:
        return self.dp

    def network(self, prefix: str) -> nn.Module | None:
        return self.extra.get(prefix)

    def next_seed(self) -> int:
        if self._request_seeds is not None:
            return next(self._request_seeds)
        self._step_seed += 1
        return self.init_seed + self._step_seed

    def batches(self, seed: int) -> BatchSource:
        if self.dp is not None:
            return self.dp.batches(self.silo.train, seed)
        rng = np.random.default_rng(seed)
        data, bs = self.silo.train, self.batch_size
        return lambda: data.batches(bs, rng)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Key -> shape of every tensor :meth:`state` returns (extra networks included)."""
        shapes = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        for prefix, net in self.extra.items():
            shapes.update({prefix + k: tuple(v.shape) for k, v in net.state_dict().items()})
        return shapes

    @property
    def wire_shapes(self) -> dict[str, tuple[int, ...]]:
        """Key -> shape of every tensor a neighbour's update may hold: :attr:`shapes` and
        what the strategy carries besides (``cyclic``'s lap mean)."""
        shapes = self.shapes
        return {**shapes, **{k: shapes[of] for k, of in self.strategy.carried_keys(shapes).items()}}

    def wire_dtypes(self) -> dict[str, str]:
        """Key -> numpy dtype name of every tensor in :attr:`wire_shapes`."""
        dtypes = {k: v.dtype.name for k, v in self.state().items()}
        return {**dtypes, **{k: dtypes[of] for k, of in self.strategy.carried_keys(dtypes).items()}}

    def state(self) -> StateDict:
        """The model's state dict; extra networks' keys follow under their prefixes."""
        state = to_numpy(self.model)
        for prefix, net in self.extra.items():
            state.update({prefix + k: v for k, v in to_numpy(net).items()})
        return state

    def load(self, state: Mapping[str, np.ndarray]) -> None:
        """Load a state written by :meth:`state` (strict for the first network).

        Raises:
            RuntimeError: from torch, if keys or shapes do not match the model.
        """
        prefixes = tuple(self.extra)
        load_numpy(self.model, {k: v for k, v in state.items() if not k.startswith(prefixes)})
        for prefix, net in self.extra.items():
            own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if own:
                load_numpy(net, own)
            else:
                log.warning("state without the %r network: keeping the current one", prefix)

    def teacher(self, model: nn.Module) -> nn.Module | None:
        """A frozen copy of ``model`` to keep what this silo does not label (``keep_unlabelled``), else None."""
        return frozen_copy(model) if self.keep_unlabelled else None

    def _train(self, model: nn.Module, steps: int) -> list[float]:
        seed = self.next_seed()
        teacher = self.teacher(model)
        if self.dp is None:
            return train_local(self.task, model, self.silo.train, steps, self.batch_size, self.lr, seed=seed,
                               teacher=teacher)
        torch.manual_seed(seed)
        model.train()
        # Adam: train_local's AdamW without weight decay
        return run_steps(list(model.parameters()), lambda b: self.task.loss(model, with_teacher(b, teacher)),
                         self.batches(seed), steps, "adam", self.lr, self.dp)

    def train_plain(self, steps: int) -> LocalStep:
        """Train the first network with the task's loss on this silo's data."""
        losses = self._train(self.model, steps)
        return LocalStep(self.state(), _mean(losses), steps)

    def train_copy(self, state: Mapping[str, np.ndarray], steps: int) -> LocalStep:
        """Train a copy of the first network, started from ``state``, on this silo's data.

        Under DP-SGD the steps spend this peer's budget (it is our data they read).
        """
        model = copy.deepcopy(self.model)
        load_numpy(model, {**to_numpy(model), **state})
        losses = self._train(model, steps)
        return LocalStep(to_numpy(model), _mean(losses), steps)

    def copies(self, states: list[StateDict]) -> list[nn.Module]:
        models = []
        for state in states:
            m = copy.deepcopy(self.model)
            load_numpy(m, state)
            models.append(m)
        return models

    # -- what the round loop calls (each one strategy hook) -----------------------------

    def train(self, steps: int) -> LocalStep:
        """The round's local training, as the strategy does it (FedMix: both networks)."""
        return self.strategy.local_step(self, steps)

    def serve_train_request(
        self, state: Mapping[str, np.ndarray], steps: int, *, request: tuple[int, str] | None = None
    ) -> LocalStep:
        """A neighbour's model trained on this silo's data, as the strategy does it.

        ``request``: (round, requester): the training's seeds derive from it rather than
        from our own sequence, so what we return does not depend on the order in which
        neighbours' requests and our own rounds reached the compute (the sequence of our own
        trainings does not either).
        """
        if request is None:
            return self.strategy.serve_train_request(self, state, steps)
        round, requester = request
        self._request_seeds = itertools.count(derived_seed(f"{self.init_seed}/{round}/{requester}"))
        try:
            return self.strategy.serve_train_request(self, state, steps)
        finally:
            self._request_seeds = None

    def learn_from_experts(self, experts: Sequence[Contribution]) -> dict[str, Any]:
        """Learn from neighbours' trained copies of our model (train-request rounds)."""
        return self.strategy.learn_from_experts(self, experts)

    def adopt(self, state: Mapping[str, np.ndarray]) -> StateDict:
        """Load the round's aggregated ``state``; return the model to evaluate and commit.

        The strategy's :meth:`~silomesh.strategies.Strategy.adopt` hook runs after the
        load (SegViz's head fine-tune); for the others the aggregated state is returned.

        Raises:
            RuntimeError: from torch, if keys or shapes do not match the model.
        """
        self.load(state)
        return self.state() if self.strategy.adopt(self) else dict(state)

    def shared(self, state: Mapping[str, np.ndarray]) -> StateDict:
        """The part of ``state`` the strategy exchanges with neighbours."""
        return {k: state[k] for k in self.strategy.shared_keys(state)}

    @torch.no_grad()
    def evaluate(self, data: ArrayDataset | None = None) -> dict[str, float]:
        return self.task.evaluate(self.model, data if data is not None else self.silo.test)


def _mean(losses: Sequence[float]) -> float:
    finite = [x for x in losses if np.isfinite(x)]
    return float(np.mean(finite)) if finite else float("nan")


#: ``[task.options]`` keys that pick this peer's synthetic silo rather than configure the task
SILO_OPTIONS = ("silos", "silo", "seed")


def build_task(task: TaskConfig) -> Task:
    """The configured task; with a MONAI network (``task.model`` or a bundle) in place of its own.

    Raises:
        ValueError, TypeError: unknown task or task options.
        TaskUnavailableError: the task's module cannot be imported.
    """
    built = get_task(task.name, **{k: v for k, v in task.options.items() if k not in SILO_OPTIONS})
    if task.spec is None:
        return built
    from silomesh.models.monai_net import ModelTask

    return ModelTask(built, task.spec, task.weights)


def load_silo(task: TaskConfig) -> Silo:
    """This peer's data: a registered folder, or a seeded synthetic silo (simnet, demos).

    Synthetic data is chosen with ``[task.options]``: ``silos`` (federation size),
    ``silo`` (this peer's index), ``seed``, plus the task's own options.

    Raises:
        DatasetError: if the folder cannot be loaded.
    """
    options = dict(task.options)
    if task.dataset is not None:
        data = load_folder(task.dataset, preprocess=task.preprocess)
        n_test = max(1, len(data) // 5)
        order = np.random.default_rng(0).permutation(len(data))
        return Silo(task.dataset.name, data.subset(order[n_test:]), data.subset(order[:n_test]))
    n_silos = int(options.pop("silos", 1))
    index = int(options.pop("silo", 0))
    seed = int(options.pop("seed", 0))
    return synthetic_silo(task.name, n_silos, index, seed, **options)
