"""What a neighbour's model may do to ours before any strategy sees it, and what we commit.

A trusted neighbour's update passes every wire check and can still be poison: weights of
1e30 (or one 3e38) are finite, so they decode, average, and then turn the next round's
loss into NaN. Two checks, whatever the strategy (a robust aggregator is not required
to be safe):

* :func:`update_violation`: a contribution is dropped when it moves the model by more
  than ``max_distance_ratio`` times our own model's norm (L2 over the floating tensors
  both hold), or holds a weight beyond ``max_weight_factor`` times our largest weight
  (or 1). Benign neighbours train from the same initial model on similar tasks: their
  distance to ours is a fraction of our norm (bench/bench_strategies.py and the
  simnet runs stay below 1), so the defaults leave room of an order of magnitude and more.
* :func:`state_violation`: a model that is not finite, or whose evaluation is not, is
  never committed; the round rolls back (:mod:`silomesh.peer.rounds`).

Norms are computed in float64, so 3e38 squared does not overflow to infinity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from silomesh.strategies import StateDict


@dataclass(frozen=True)
class UpdateBound:
    """``[rounds]`` ``max_update_ratio`` and ``max_weight_factor`` in peer.toml (0 switches one off)."""

    max_distance_ratio: float = 10.0
    max_weight_factor: float = 1e4


def _floats(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in state.items() if np.asarray(v).dtype.kind == "f"}


def update_violation(own: StateDict, theirs: Mapping[str, np.ndarray], bound: UpdateBound) -> str | None:
    """Why ``theirs`` may not be used against ``own`` (a short reason), or None if it may."""
    mine = _floats(own)
    keys = [k for k in _floats(theirs) if k in mine and np.shape(theirs[k]) == np.shape(mine[k])]
    if not keys:
        return None
    own_sq = diff_sq = 0.0
    own_max = their_max = 0.0
    for k in keys:
        a = np.asarray(mine[k], dtype=np.float64)
        b = np.asarray(theirs[k], dtype=np.float64)
        if not np.all(np.isfinite(b)):
            return f"non-finite values in {k}"
        own_sq += float(np.dot(a.ravel(), a.ravel()))
        d = (b - a).ravel()
        diff_sq += float(np.dot(d, d))
        if a.size:
            own_max = max(own_max, float(np.max(np.abs(a))))
            their_max = max(their_max, float(np.max(np.abs(b))))
    if bound.max_weight_factor > 0:
        limit = bound.max_weight_factor * max(own_max, 1.0)
        if their_max > limit:
            return f"largest weight {their_max:.3g} > {limit:.3g} ({bound.max_weight_factor:g} x ours)"
    if bound.max_distance_ratio > 0:
        own_norm, distance = math.sqrt(own_sq), math.sqrt(diff_sq)
        limit = bound.max_distance_ratio * max(own_norm, 1e-12)
        if distance > limit:
            return f"moves the model by {distance:.3g} > {limit:.3g} ({bound.max_distance_ratio:g} x our norm)"
    return None


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
