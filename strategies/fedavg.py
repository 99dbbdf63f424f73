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
from .base import AggregationResult, Contribution, StrategyConfig, check_choice, check_range
from .robust import aggregate_contributions
from .secagg import SECURE_WEIGHTINGS, SecureSum
from .strategy import Strategy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FedAvgConfig(StrategyConfig):
    """Parameters of ``fedavg`` (plus the robust ones of :class:`StrategyConfig`).

    Attributes:
        weighting: ``"samples"`` (``n_k / sum n`` over own + neighbours, FedAvg's rule),
            ``"metropolis"`` (Metropolis–Hastings weights from the degrees; symmetric
            and doubly stochastic, so gossip converges to the true network average) or
            ``"uniform"``.
    """

    weighting: str = "samples"
    #: each neighbour's model stays hidden: the peer learns only the masked sum of its
    #: neighbours' models (docs/SECURE-AGGREGATION.md); needs at least 2 neighbours
    secure_aggregation: bool = False
    #: with secure_aggregation and fewer than 2 trusted neighbours, run plain rounds instead of
    #: refusing to start (the operator's explicit choice: those neighbours see each other's models)
    secure_fallback: bool = False
    #: coordinates are clipped to [-secure_clip, secure_clip] before masking
    secure_clip: float = 8.0
    #: the ring: 32 bits (the bytes of float32) or 64 (a far smaller error bound, twice the bytes)
    secure_ring_bits: int = 32

    strategy_name: ClassVar[str] = "fedavg"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("weighting", self.weighting, WEIGHTINGS)
        check_range("secure_clip", self.secure_clip, 0.0, lo_open=True)
        if self.secure_ring_bits not in (32, 64):
            raise ValueError(f"parameter 'secure_ring_bits' must be 32 or 64, got {self.secure_ring_bits}")
        if not self.secure_aggregation:
            return
        if self.robust != "none":
            raise ValueError(
                f"parameter 'robust' = {self.robust!r} cannot be combined with secure_aggregation: the "
                "median, the trimmed mean and per-update clipping need each neighbour's model, which "
                "secure aggregation hides (only secure_clip's coordinate clip remains)")
        if self.weighting not in SECURE_WEIGHTINGS:
            raise ValueError(
                f"parameter 'weighting' = {self.weighting!r} cannot be combined with secure_aggregation: "
                f"a member must weight its own model under a rule the whole group shares; use one of "
                f"{list(SECURE_WEIGHTINGS)}")
        if self.int_policy != "own":
            raise ValueError("parameter 'int_policy' must be 'own' with secure_aggregation: the ring "
                             "carries floating tensors only, integer buffers stay the peer's own")


class FedAvgStrategy(Strategy):
    """Gossip averaging with sample-count, Metropolis or uniform weights."""

    name = "fedavg"
    config_class = FedAvgConfig
    config: FedAvgConfig

    @property
    def secure_sum(self) -> SecureSum | None:
        cfg = self.config
        if not cfg.secure_aggregation:
            return None
        return SecureSum(weighting=cfg.weighting, clip=cfg.secure_clip, ring_bits=cfg.secure_ring_bits,
                         fallback=cfg.secure_fallback)

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
