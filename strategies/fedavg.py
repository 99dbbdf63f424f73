"""``fedavg``: decentralised gossip averaging, the baseline of every other strategy.

Each round a peer trains locally, sends its model to its trusted neighbours, and
replaces its model by a weighted average of its own and the neighbours' models
(D-PSGD / DPASGD). Without a server there is no single global model; repeated
neighbourhood averaging drives all peers towards the network average.

With ``reduce = "tree"`` every peer instead ends the round with the exact sample-weighted
mean of the whole federation (FedAvg), for ``2 (n - 1)`` model transfers a round instead of
the ``n (n - 1)`` of a full topology: the peers of ``order`` form a tree (position ``i``'s
parent is ``(i - 1) // fanout``); each peer averages its model with the subtree means its
children send up and sends the result, weighted by the subtree's samples, to its parent;
the root's mean is the federation's, and it travels back down the tree
(:attr:`RoundShape.TREE`, PROTOCOL.md section 6). Each update carries how many peers' models
its mean holds in the metric :data:`TREE_COUNT`.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .averaging import WEIGHTINGS, mixing_weights, required_fields
from .base import AggregationResult, Contribution, StrategyConfig, check_choice, check_range
from .robust import aggregate_contributions
from .secagg import SecureParams, SecureSum
from .strategy import RoundShape, Strategy

logger = logging.getLogger(__name__)

#: how a round combines the models: with the trusted neighbours (gossip), or along a tree of all peers
REDUCES = ("neighbours", "tree")
#: with ``reduce = "tree"``, the update metric that says how many peers' models its mean holds
TREE_COUNT = "tree_count"
#: the widest tree (children per peer) the parameter ``fanout`` allows
MAX_FANOUT = 64


@dataclass(frozen=True)
class FedAvgConfig(StrategyConfig, SecureParams):
    """Parameters of ``fedavg`` (plus the robust ones of :class:`StrategyConfig`).

    Attributes:
        weighting: ``"samples"`` (``n_k / sum n`` over own + neighbours, FedAvg's rule),
            ``"metropolis"`` (Metropolis–Hastings weights from the degrees; symmetric
            and doubly stochastic, so gossip converges to the true network average) or
            ``"uniform"``.
        reduce: ``"neighbours"`` (average with the trusted neighbours) or ``"tree"`` (the
            exact sample-weighted mean of all peers of ``order``, along a tree; module
            docstring). ``tree`` needs ``weighting = "samples"``, ``robust = "none"`` and no
            secure aggregation: a parent sees its children's subtree means, not their models.
        order: with ``reduce = "tree"``: the peers, as peer ids, in tree order (every peer
            lists the same ids in the same order, each once, at least two; the first is the
            root). A peer's parent and children in the tree must be among its trusted peers.
        fanout: with ``reduce = "tree"``: children per peer (2 to 64).

    The ``secure_*`` parameters are those of :class:`~.secagg.SecureParams`.
    """

    weighting: str = "samples"
    reduce: str = "neighbours"
    order: tuple[str, ...] = ()
    fanout: int = 2

    strategy_name: ClassVar[str] = "fedavg"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("weighting", self.weighting, WEIGHTINGS)
        self.check_secure(self.robust, self.weighting, self.int_policy)
        check_choice("reduce", self.reduce, REDUCES)
        check_range("fanout", self.fanout, 2, MAX_FANOUT)
        if self.reduce != "tree":
            if self.order:
                raise ValueError("parameter 'order' applies only to reduce = 'tree'")
            return
        for name, value, needed in (("weighting", self.weighting, "samples"), ("robust", self.robust, "none")):
            if value != needed:
                raise ValueError(f"parameter {name!r} = {value!r} cannot be combined with reduce = 'tree' "
                                 f"(needs {needed!r}: a parent sees only its children's subtree means)")
        if self.secure_aggregation:
            raise ValueError("parameter 'secure_aggregation' cannot be combined with reduce = 'tree'")
        if len(self.order) < 2:
            raise ValueError("parameter 'order' needs at least two peer ids when reduce = 'tree'")
        if len(set(self.order)) != len(self.order):
            raise ValueError("parameter 'order' lists a peer id twice")

    # -- the tree of ``reduce = "tree"`` ---------------------------------------------------

    def _position(self, me: str) -> int:
        if me not in self.order:
            raise ValueError(f"parameter 'order' of strategy 'fedavg' does not list this peer ({me})")
        return self.order.index(me)

    def tree_parent(self, me: str) -> str | None:
        """``me``'s parent in the tree; None for the root.

        Raises:
            ValueError: if ``order`` does not list ``me``.
        """
        i = self._position(me)
        return self.order[(i - 1) // self.fanout] if i else None

    def tree_children(self, me: str) -> tuple[str, ...]:
        """``me``'s children in the tree (none for a leaf)."""
        i = self._position(me)
        return self.order[self.fanout * i + 1 : self.fanout * i + 1 + self.fanout]

    def tree_depth(self, me: str) -> int:
        """How many edges ``me`` is below the root."""
        i, depth = self._position(me), 0
        while i:
            i, depth = (i - 1) // self.fanout, depth + 1
        return depth

    def tree_height(self) -> int:
        """The depth of the deepest peer (the last of ``order``)."""
        return self.tree_depth(self.order[-1]) if self.order else 0

    def tree_ties(self, me: str) -> tuple[str, ...]:
        """``me``'s parent (if any) and children: the peers it exchanges with in a tree round."""
        parent = self.tree_parent(me)
        return ((parent,) if parent is not None else ()) + self.tree_children(me)


class FedAvgStrategy(Strategy):
    """Gossip averaging with sample-count, Metropolis or uniform weights."""

    name = "fedavg"
    config_class = FedAvgConfig
    config: FedAvgConfig

    @property
    def shape(self) -> RoundShape:
        """:attr:`RoundShape.TREE` with ``reduce = "tree"``, else the base class's."""
        return RoundShape.TREE if self.config.reduce == "tree" else super().shape

    @property
    def secure_sum(self) -> SecureSum | None:
        return self.config.secure_sum(self.config.weighting)

    def trust_problem(self, peer_id: str, trusted: Container[str]) -> str | None:
        """With ``reduce = "tree"`` the tree's edges must be trusted: this peer's parent and children."""
        if self.config.reduce != "tree":
            return None
        for n in self.config.tree_ties(peer_id):
            if n not in trusted:
                return f"params.order: {n}, next to this peer in the tree, is not a trusted peer"
        return None

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
