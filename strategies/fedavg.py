"""``fedavg``: decentralised gossip averaging, the baseline of every other strategy.

Each round a peer trains locally, sends its model to its trusted neighbours, and
replaces its model by a weighted average of its own and the neighbours' models
(D-PSGD / DPASGD). Without a server there is no single global model; repeated
neighbourhood averaging drives all peers towards the network average.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .averaging import WEIGHTINGS, mixing_weights, required_fields
from .base import AggregationResult, Contribution, StrategyConfig, check_choice
from .robust import aggregate_contributions
from .secagg import SecureParams, SecureSum
from .strategy import Strategy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FedAvgConfig(StrategyConfig, SecureParams):
    """Parameters of ``fedavg`` (plus the robust ones of :class:`StrategyConfig`).

    Attributes:
        weighting: ``"samples"`` (``n_k / sum n`` over own + neighbours, FedAvg's rule),
            ``"metropolis"`` (Metropolis–Hastings weights from the degrees; symmetric
            and doubly stochastic, so gossip converges to the true network average) or
            ``"uniform"``.

    The ``secure_*`` parameters are those of :class:`~.secagg.SecureParams`.
    """

    weighting: str = "samples"

    strategy_name: ClassVar[str] = "fedavg"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("weighting", self.weighting, WEIGHTINGS)
        self.check_secure(self.robust, self.weighting, self.int_policy)


class FedAvgStrategy(Strategy):
    """Gossip averaging with sample-count, Metropolis or uniform weights."""

    name = "fedavg"
    config_class = FedAvgConfig
    config: FedAvgConfig

    @property
    def secure_sum(self) -> SecureSum | None:
        return self.config.secure_sum(self.config.weighting)

    @property
    def contribution_fields(self) -> frozenset[str]:
        return frozenset({"n_samples", *required_fields(self.config.weighting)})

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
        return aggregate_contributions(
            own, neighbours, cfg,
            lambda acc: mixing_weights(cfg.weighting, own_weight, acc, own_degree),
            required=required_fields(cfg.weighting),
        )
