"""``segviz``: selective synchronisation of the shared body, task heads kept local.

SegViz (Kanhere et al., "SegViz: A federated-learning based framework for multi-organ
segmentation on heterogeneous data sets with partial annotations", 2023): silos label
different organs, so each keeps its own task head and only the shared body (encoder
and decoder) is averaged. The FedBN variant (Li et al., ICLR 2021) additionally keeps
normalisation layers local, which helps when silos differ in scanner or contrast.
With ``finetune_steps > 0`` a peer also fine-tunes its head on the federated body after
every aggregation (:func:`finetune_head`; our addition, not the paper's).

Only the shared keys travel: :meth:`SegVizStrategy.shared_keys` tells the peer what to
send, and a neighbour's heads (which may even have another shape) are never read.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from .averaging import WEIGHTINGS, mixing_weights, required_fields
from .base import (
    AggregationResult,
    Contribution,
    StrategyConfig,
    check_choice,
    check_range,
)
from .robust import aggregate_contributions
from .secagg import SecureParams, SecureSum
from .strategy import Strategy
from .training import OPTIMIZERS, BatchSource, LossFn, PrivateSteps, TrainResult, train_steps
from .workbench import Workbench

logger = logging.getLogger(__name__)

#: name fragments of normalisation parameters and buffers (FedBN variant)
DEFAULT_NORM_PATTERNS = ("bn", "norm", "running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class SegVizConfig(StrategyConfig, SecureParams):
    """Parameters of ``segviz`` (plus the robust ones, applied to the body only).

    Attributes:
        head_prefixes: state-dict name prefixes of the local task head (normally
            ``SplitModel.head_prefixes``; see :meth:`SegVizStrategy.with_head_prefixes`).
            Empty means nothing is local (plain gossip averaging).
        local_norm: FedBN variant: also keep normalisation layers local.
        norm_patterns: with ``local_norm``, a key is local when its lower-cased name
            contains any of these fragments.
        weighting: ``"samples"``, ``"metropolis"`` or ``"uniform"`` (as in ``fedavg``).
        finetune_steps: head-only fine-tuning steps on the peer's own data after every
            round's aggregation, before it evaluates and commits (0 = none, the
            paper's method); run by the peer (``Learner.adopt``) through
            :meth:`SegVizStrategy.finetune_head`.
        finetune_lr: learning rate of the head fine-tuning.
        optimizer: ``"adam"`` or ``"sgd"`` for the head fine-tuning.

    The ``secure_*`` parameters are those of :class:`~.secagg.SecureParams`: only the shared
    body travels, masked; heads (and norms under ``local_norm``) stay local as without it.
    """

    head_prefixes: tuple[str, ...] = ()
    local_norm: bool = False
    norm_patterns: tuple[str, ...] = DEFAULT_NORM_PATTERNS
    weighting: str = "samples"
    finetune_steps: int = 0
    finetune_lr: float = 1e-3
    optimizer: str = "adam"

    strategy_name: ClassVar[str] = "segviz"

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(not p for p in self.head_prefixes):
            raise ValueError("parameter 'head_prefixes' must not contain an empty prefix")
        if self.local_norm and not self.norm_patterns:
            raise ValueError("parameter 'norm_patterns' must not be empty when local_norm")
        check_choice("weighting", self.weighting, WEIGHTINGS)
        check_range("finetune_steps", self.finetune_steps, 0)
        check_range("finetune_lr", self.finetune_lr, 0.0, lo_open=True)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        self.check_secure(self.robust, self.weighting, self.int_policy)


def is_local(
    name: str, head_prefixes: Sequence[str], norm_patterns: Sequence[str] | None = None
) -> bool:
    """True if key ``name`` stays local: under a head prefix or (FedBN) a norm layer."""
    if head_prefixes and name.startswith(tuple(head_prefixes)):
        return True
    lowered = name.lower()
    return bool(norm_patterns) and any(p.lower() in lowered for p in norm_patterns or ())


def partition_keys(
    names: Iterable[str], head_prefixes: Sequence[str],
    norm_patterns: Sequence[str] | None = None,
) -> tuple[list[str], list[str]]:
    """Split state-dict keys into (shared, local)."""
    shared: list[str] = []
    local: list[str] = []
    for n in names:
        (local if is_local(n, head_prefixes, norm_patterns) else shared).append(n)
    return shared, local


def _in_head(module_name: str, head_prefixes: Sequence[str]) -> bool:
    dotted = module_name + "."
    return any(dotted.startswith(p) or module_name == p.rstrip(".") for p in head_prefixes)


def finetune_head(
    model: nn.Module,
    batches: BatchSource,
    loss: LossFn,
    head_prefixes: Sequence[str],
    steps: int,
    lr: float = 1e-3,
    optimizer: str = "adam",
    private: PrivateSteps | None = None,
) -> TrainResult:
    """Train only the head of ``model`` in place; the body stays bit-identical.

    Body parameters are frozen and body modules kept in eval mode (so BatchNorm running
    statistics and dropout of the body do not change); head modules train. Gradient
    flags and modes are restored afterwards.

    Raises:
        ValueError: if no parameter lies under ``head_prefixes``.
    """
    prefixes = tuple(head_prefixes)
    params = dict(model.named_parameters())
    head = [n for n in params if n.startswith(prefixes)]
    if not prefixes or not head:
        raise ValueError(f"no parameter under head prefixes {list(prefixes)}")
    flags = {n: p.requires_grad for n, p in params.items()}
    modes = {n: m.training for n, m in model.named_modules()}
    try:
        for n, p in params.items():
            p.requires_grad_(n.startswith(prefixes) and flags[n])
        model.eval()
        for n, m in model.named_modules():
            if n and _in_head(n, prefixes):
                m.train()
        return train_steps(model, batches, loss, steps, lr, optimizer, set_train_mode=False, private=private)
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
        for n, m in model.named_modules():
            m.training = modes[n]


class SegVizStrategy(Strategy):
    """Average the shared body over own + neighbours; keep heads (and maybe norms) local."""

    name = "segviz"
    config_class = SegVizConfig
    config: SegVizConfig

    def with_head_prefixes(self, prefixes: Sequence[str]) -> SegVizStrategy:
        """A copy using ``prefixes`` (e.g. ``model.head_prefixes``) if none were configured."""
        if self.config.head_prefixes:
            return self
        return SegVizStrategy(dataclasses.replace(self.config, head_prefixes=tuple(prefixes)))

    def prepared_for(self, model: nn.Module) -> SegVizStrategy:
        """Take the head prefixes from ``model.head_prefixes`` when none were configured."""
        prefixes = getattr(model, "head_prefixes", None)
        return self.with_head_prefixes(tuple(prefixes)) if prefixes else self

    def adopt(self, bench: Workbench) -> bool:
        """SegViz's local head step: fine-tune the head on this silo's data, body frozen.

        With ``finetune_steps > 0`` the committed body equals the aggregated one bit for
        bit; with 0 nothing changes.
        """
        if self.config.finetune_steps <= 0:
            return False
        seed = bench.next_seed()
        torch.manual_seed(seed)
        result = self.finetune_head(bench.model, bench.batches(seed), bench.task.loss, private=bench.private)
        logger.debug("segviz head fine-tune: %d steps, loss %.4f", result.steps, result.mean_loss)
        return True

    @property
    def contribution_fields(self) -> frozenset[str]:
        return frozenset({"n_samples", *required_fields(self.config.weighting)})

    def _norm_patterns(self) -> tuple[str, ...] | None:
        return self.config.norm_patterns if self.config.local_norm else None

    @property
    def secure_sum(self) -> SecureSum | None:
        return self.config.secure_sum(self.config.weighting)

    def shared_keys(self, names: Iterable[str]) -> list[str]:
        return partition_keys(names, self.config.head_prefixes, self._norm_patterns())[0]

    def aggregate(
        self,
        own: Mapping[str, np.ndarray],
        own_weight: float,
        neighbours: Sequence[Contribution],
        *,
        own_degree: int | None = None,
        own_loss: float | None = None,
    ) -> AggregationResult:
        cfg = self.config
        if not cfg.head_prefixes:
            logger.warning("segviz without head_prefixes: every key is averaged")
        shared = self.shared_keys(own)
        return aggregate_contributions(
            own, neighbours, cfg,
            lambda acc: mixing_weights(cfg.weighting, own_weight, acc, own_degree),
            keys=shared, required=required_fields(cfg.weighting),
        )

    def finetune_head(self, model: nn.Module, batches: BatchSource, loss: LossFn,
                      steps: int | None = None, private: PrivateSteps | None = None) -> TrainResult:
        """:func:`finetune_head` with the configured prefixes, steps and learning rate."""
        cfg = self.config
        n = cfg.finetune_steps if steps is None else steps
        if n <= 0:
            return TrainResult(model, 0, float("nan"))
        return finetune_head(model, batches, loss, cfg.head_prefixes, n, cfg.finetune_lr,
                             cfg.optimizer, private)
