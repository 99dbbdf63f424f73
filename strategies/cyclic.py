"""``cyclic``: cyclic weight transfer, one model passed from hospital to hospital.

Chang et al., "Distributed deep learning networks among institutions for medical imaging"
(JAMIA 2018): instead of averaging models trained side by side, the hospitals take turns.
The hospitals agree on an ``order`` (a ring of peer ids); each round the model arrives from
the previous hospital in the ring, is trained ``local_steps`` steps on this hospital's data,
and is passed on to the next. Every hospital trains as many steps as it would alone, but the
model gets the steps of all of them in sequence; the price is time, since the hospitals wait
for their turn. ``bench/probe_pooled.py`` measured it against averaging (docs/RESULTS.md,
"The federation's shortfall: the federating or the step budget?").

The peer runs it as :attr:`RoundShape.RELAY`: in round ``r`` the hospital at position ``p``
waits for its predecessor's model of round ``r`` (the first hospital: of round ``r - 1``,
from the last one; in round 0 it starts from its own model), adopts it, trains, pushes the
result to its successor and commits it. A predecessor whose model does not come by the round
deadline is skipped: the hospital goes on from its own last model, and the ring carries that
one on. Nothing is averaged: :meth:`CyclicStrategy.aggregate` returns the incoming model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import SELF, AggregationResult, Contribution, StrategyConfig
from .strategy import RoundShape, Strategy


@dataclass(frozen=True)
class CyclicConfig(StrategyConfig):
    """Parameters of ``cyclic``.

    Attributes:
        order: the ring, as peer ids (every hospital lists the same ids in the same order,
            each once, at least two). A hospital's predecessor and successor in it must be
            among its trusted neighbours.
    """

    order: tuple[str, ...] = ()

    strategy_name: ClassVar[str] = "cyclic"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.robust != "none":
            raise ValueError("parameter 'robust' does not apply to 'cyclic' (nothing is averaged)")
        if self.order and len(self.order) < 2:
            raise ValueError("parameter 'order' needs at least two peer ids")
        if len(set(self.order)) != len(self.order):
            raise ValueError("parameter 'order' lists a peer id twice")

    def neighbours(self, me: str) -> tuple[str, str]:
        """``me``'s (predecessor, successor) in the ring.

        Raises:
            ValueError: if ``order`` is empty or does not list ``me``.
        """
        if me not in self.order:
            raise ValueError(f"parameter 'order' of strategy 'cyclic' does not list this peer ({me})")
        i = self.order.index(me)
        return self.order[i - 1], self.order[(i + 1) % len(self.order)]

    def first(self, me: str) -> bool:
        """True for the hospital that opens the ring (the first of ``order``)."""
        return bool(self.order) and self.order[0] == me


class CyclicStrategy(Strategy):
    """Cyclic weight transfer: the model travels round the ring; nothing is averaged."""

    name = "cyclic"
    config_class = CyclicConfig
    config: CyclicConfig
    round_shape = RoundShape.RELAY

    def aggregate(
        self,
        own: Mapping[str, np.ndarray],
        own_weight: float,
        neighbours: Sequence[Contribution],
        *,
        own_degree: int | None = None,
        own_loss: float | None = None,
    ) -> AggregationResult:
        """The predecessor's model when it came (the one contribution), else our own."""
        if not neighbours:
            return AggregationResult({k: np.array(v, copy=True) for k, v in own.items()}, {SELF: 1.0})
        (incoming,) = neighbours
        return AggregationResult({k: np.array(v, copy=True) for k, v in incoming.state.items()},
                                 {incoming.peer_id: 1.0})
