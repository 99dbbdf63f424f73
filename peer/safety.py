"""What a neighbour's model may do to ours before any strategy sees it, and what we commit.

A trusted neighbour's update passes every wire check and can still be poison: weights of
1e30 (or one 3e38) are finite, so they decode, average, and then turn the next round's
loss into NaN. Whatever the strategy (a robust aggregator is not required to be safe), a
neighbour's model is measured against ours (:func:`measure_update`: the L2 distance over
the floating tensors both hold, in float64 so that 3e38 squared does not overflow) and
dropped (:func:`update_violation`) when

* it holds a weight beyond ``max_weight_factor`` times our largest weight (or 1);
* it is further from ours than ``max_update_ratio`` times our model's norm;
* it is further than ``max_update_growth`` times that sender's usual distance (the median
  of its last :data:`HISTORY` distances, once :data:`MIN_HISTORY` are known): a sudden
  jump. The history keeps every finite distance measured, dropped or not
  (:class:`UpdateGuard`), so a neighbour whose honest distance changes for good is
  accepted again once the change is the new usual; a slow drift is bounded by the
  first two checks only.

Benign neighbours train the same task from the same initial model: on the catheter,
organs and lesion tasks with fedavg, fedefm, segviz and fedmix their distance stays below
our norm (``bench/bench_strategies.py``'s federations measured round by round) and moves
by less than 2x from round to round, so the defaults leave an order of magnitude.

:func:`state_violation`: a model that is not finite, or whose evaluation is not, is never
committed; the round rolls back (:mod:`silomesh.peer.rounds`).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

#: distances kept per sender for its usual distance
HISTORY = 8
#: distances a sender needs before the growth check applies
MIN_HISTORY = 3


@dataclass(frozen=True)
class UpdateBound:
    """``[rounds]`` ``max_update_ratio``, ``max_weight_factor`` and ``max_update_growth`` in
    peer.toml; 0 switches one off."""

    max_update_ratio: float = 10.0
    max_weight_factor: float = 1e4
    max_update_growth: float = 20.0


@dataclass(frozen=True)
class UpdateMeasure:
    """A neighbour's model against ours, over the floating tensors both hold with one shape."""

    #: L2 norm of (theirs - ours)
    distance: float
    #: L2 norm of ours
    own_norm: float
    #: largest absolute weight of ours, and of theirs
    own_max: float
    their_max: float
    #: the first tensor of theirs holding NaN or an infinity, if any
    non_finite: str | None = None

    @property
    def ratio(self) -> float:
        """The distance in units of our norm."""
        return self.distance / max(self.own_norm, 1e-12)


def _floats(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in state.items() if np.asarray(v).dtype.kind == "f"}


def measure_update(own: Mapping[str, np.ndarray], theirs: Mapping[str, np.ndarray]) -> UpdateMeasure:
    """Measure ``theirs`` against ``own`` (tensors only one side holds, or not float, are ignored)."""
    mine = _floats(own)
    own_sq = diff_sq = own_max = their_max = 0.0
    for k, v in _floats(theirs).items():
        if k not in mine or np.shape(v) != np.shape(mine[k]):
            continue
        a = np.asarray(mine[k], dtype=np.float64).ravel()
        b = np.asarray(v, dtype=np.float64).ravel()
        if not np.all(np.isfinite(b)):
            return UpdateMeasure(math.inf, math.sqrt(own_sq), own_max, math.inf, non_finite=k)
        d = b - a
        own_sq += float(np.dot(a, a))
        diff_sq += float(np.dot(d, d))
        if a.size:
            own_max = max(own_max, float(np.max(np.abs(a))))
            their_max = max(their_max, float(np.max(np.abs(b))))
    return UpdateMeasure(math.sqrt(diff_sq), math.sqrt(own_sq), own_max, their_max)


def update_violation(m: UpdateMeasure, bound: UpdateBound, usual: float | None = None) -> str | None:
    """Why a neighbour's model measured ``m`` may not be used (a short reason), or None.

    ``usual`` is that sender's usual distance ratio (:meth:`UpdateGuard.usual`), None
    while too few are known.
    """
    if m.non_finite is not None:
        return f"non-finite values in {m.non_finite}"
    if bound.max_weight_factor > 0:
        limit = bound.max_weight_factor * max(m.own_max, 1.0)
        if m.their_max > limit:
            return f"largest weight {m.their_max:.3g} > {limit:.3g} ({bound.max_weight_factor:g} x ours)"
    if bound.max_update_ratio > 0 and m.ratio > bound.max_update_ratio:
        return f"moves the model by {m.ratio:.3g} x our norm > {bound.max_update_ratio:g}"
    if bound.max_update_growth > 0 and usual is not None and m.ratio > bound.max_update_growth * usual:
        return (
            f"moves the model by {m.ratio:.3g} x our norm, {m.ratio / max(usual, 1e-300):.3g} x its usual "
            f"{usual:.3g} > {bound.max_update_growth:g}"
        )
    return None


class UpdateGuard:
    """The update bound and each sender's recent distances (one per peer, kept by the round loop).

    The history lives in memory: after a restart each sender starts a new one, and only
    the absolute checks apply until :data:`MIN_HISTORY` distances are known again.
    """

    def __init__(self, bound: UpdateBound) -> None:
        self.bound = bound
        self._history: dict[str, deque[float]] = {}

    def usual(self, sender: str) -> float | None:
        """The median of ``sender``'s last distance ratios, or None while fewer than MIN_HISTORY."""
        seen = self._history.get(sender)
        if seen is None or len(seen) < MIN_HISTORY:
            return None
        return statistics.median(seen)

    def check(self, sender: str, own: Mapping[str, np.ndarray], theirs: Mapping[str, np.ndarray]) -> str | None:
        """Why ``sender``'s model may not be used against ``own``, or None.

        A distance within the absolute bounds joins the sender's history, whether the
        growth check lets it through or not; one beyond them does not (a neighbour cannot
        raise its usual distance with updates that are dropped anyway).
        """
        m = measure_update(own, theirs)
        why = update_violation(m, self.bound)
        if why is not None:
            return why
        why = update_violation(m, self.bound, self.usual(sender))
        self._history.setdefault(sender, deque(maxlen=HISTORY)).append(m.ratio)
        return why


def state_violation(state: Mapping[str, np.ndarray], metrics: Mapping[str, float]) -> str | None:
    """Why a round's result may not be committed (non-finite weights or metrics), or None."""
    for k, v in state.items():
        a = np.asarray(v)
        if a.dtype.kind in "fc" and not np.all(np.isfinite(a)):
            return f"non-finite values in {k}"
    bad = sorted(name for name, value in metrics.items() if not math.isfinite(value))
    if bad:
        return f"non-finite evaluation: {', '.join(bad)}"
    return None

