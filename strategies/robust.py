"""Screening and robust aggregation of neighbours' models.

A single poisoned or broken neighbour must not wreck a peer's model. Every strategy
therefore first *screens* the contributions (missing keys, wrong shapes, non-finite
values, duplicates: dropped and reported) and then combines them with one of:

- ``none``: the strategy's weighted average;
- ``median``: coordinate-wise median over own + neighbours (Yin et al., ICML 2018);
- ``trimmed_mean``: coordinate-wise mean after cutting the ``k`` largest and ``k``
  smallest values (Yin et al., 2018);
- ``clip``: each neighbour's delta to the own model is scaled down to a maximum L2
  norm before the weighted average (norm bounding, Sun et al., 2019), so the step a
  peer takes is at most the bound whatever a neighbour sends.

The median and trimmed mean are unweighted: a weighted median would let a neighbour
that lies about its sample count buy influence.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .averaging import cast_like, is_float_array, missing_field, weighted_average
from .base import SELF, AggregationResult, Contribution, StateDict, StrategyConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Screened:
    """Contributions that passed :func:`screen`, and the reasons for the others."""

    accepted: list[Contribution]
    dropped: dict[str, str] = field(default_factory=dict)


def screen(
    own: Mapping[str, np.ndarray],
    neighbours: Sequence[Contribution],
    keys: Iterable[str] | None = None,
) -> Screened:
    """Keep the contributions that can be merged into ``own`` over ``keys``.

    A contribution is dropped (with a reason) when its peer id repeats an earlier one,
    a key is missing, a shape differs from the own model's, an array is not numeric,
    a floating value is NaN/inf, or its sample count is negative or not finite.
    Keys outside ``keys`` (e.g. SegViz heads) are not looked at.
    """
    names = list(own) if keys is None else list(keys)
    accepted: list[Contribution] = []
    dropped: dict[str, str] = {}
    seen: set[str] = set()
    for c in neighbours:
        reason = _problem(own, c, names, seen)
        seen.add(c.peer_id)
        if reason is None:
            accepted.append(c)
        else:
            dropped.setdefault(c.peer_id, reason)
            logger.warning("dropping contribution of %s: %s", c.peer_id, reason)
    return Screened(accepted, dropped)


def _problem(
    own: Mapping[str, np.ndarray], c: Contribution, names: list[str], seen: set[str]
) -> str | None:
    if c.peer_id in seen:
        return "duplicate contribution from the same peer"
    n = c.n_samples
    if isinstance(n, bool) or not isinstance(n, int | float | np.number) or not (
        np.isfinite(n) and n >= 0
    ):
        return f"bad sample count {n!r}"
    for name in names:
        if name not in c.state:
            return f"missing key {name!r}"
        arr = np.asarray(c.state[name])
        ref = np.asarray(own[name])
        if arr.shape != ref.shape:
            return f"shape of {name!r} is {arr.shape}, expected {ref.shape}"
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            return f"non-numeric dtype {arr.dtype} for {name!r}"
        if np.issubdtype(arr.dtype, np.inexact) and not np.all(np.isfinite(arr)):
            return f"non-finite values in {name!r}"
    return None


def coordinate_median(
    states: Sequence[Mapping[str, np.ndarray]], keys: Iterable[str]
) -> dict[str, np.ndarray]:
    """Coordinate-wise median (float64) of ``states`` over ``keys``."""
    return {k: np.median(np.stack([np.asarray(s[k], np.float64) for s in states]), axis=0)
            for k in keys}


def trim_count(n: int, trim: float) -> int:
    """Values cut at each end: ``ceil(trim * n)`` capped at ``(n - 1) // 2``."""
    return min(math.ceil(trim * n - 1e-12), (n - 1) // 2) if n > 0 else 0


def trimmed_mean(
    states: Sequence[Mapping[str, np.ndarray]], keys: Iterable[str], trim: float
) -> dict[str, np.ndarray]:
    """Coordinate-wise trimmed mean (float64): cut ``trim_count`` values at each end."""
    n = len(states)
    k = trim_count(n, trim)
    out = {}
    for name in keys:
        stacked = np.sort(np.stack([np.asarray(s[name], np.float64) for s in states]), axis=0)
        out[name] = stacked[k : n - k].mean(axis=0)
    return out


def delta_norm(
    own: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray], keys: Iterable[str]
) -> float:
    """Global L2 norm of ``other - own`` over the floating keys in ``keys``."""
    total = 0.0
    for k in keys:
        if is_float_array(own[k]):
            d = np.asarray(other[k], np.float64) - np.asarray(own[k], np.float64)
            total += float(np.dot(d.ravel(), d.ravel()))
    return math.sqrt(total)


def clip_threshold(norms: Sequence[float], clip_norm: float | None,
                   clip_multiplier: float) -> float:
    """The norm bound: ``min(clip_norm, clip_multiplier * lower_median(norms))``.

    The lower median (the ``(k-1)//2``-th smallest of k norms) is used so that with two
    neighbours an outlier cannot raise the bound to half its own norm.
    """
    bounds = []
    if clip_norm is not None:
        bounds.append(float(clip_norm))
    if clip_multiplier > 0 and len(norms) > 0:
        lower_median = float(np.sort(np.asarray(norms, np.float64))[(len(norms) - 1) // 2])
        bounds.append(clip_multiplier * lower_median)
    return min(bounds) if bounds else math.inf


def clip_states(
    own: Mapping[str, np.ndarray],
    states: Sequence[Mapping[str, np.ndarray]],
    keys: Iterable[str],
    max_norm: float,
) -> tuple[list[dict[str, np.ndarray]], list[float], list[float]]:
    """Scale each state's delta to ``own`` down to at most ``max_norm`` (float keys only).

    Returns:
        (clipped states as float64 over the float keys, original norms, scale factors).
    """
    fkeys = [k for k in keys if is_float_array(own[k])]
    clipped, norms, scales = [], [], []
    for st in states:
        norm = delta_norm(own, st, fkeys)
        scale = 1.0 if norm <= max_norm or norm == 0.0 else max_norm / norm
        base = {k: np.asarray(own[k], np.float64) for k in fkeys}
        clipped.append({k: base[k] + scale * (np.asarray(st[k], np.float64) - base[k])
                        for k in fkeys})
        norms.append(norm)
        scales.append(scale)
    return clipped, norms, scales


def combine(
    own: Mapping[str, np.ndarray],
    contributions: Sequence[Contribution],
    weights: np.ndarray,
    keys: Iterable[str],
    config: StrategyConfig,
    *,
    own_share: float | None = None,
) -> tuple[StateDict, dict[str, float], dict[str, Any]]:
    """Merge screened ``contributions`` into ``own`` over ``keys`` with ``config.robust``.

    Args:
        own: the peer's model; keys outside ``keys`` are copied from it.
        contributions: screened neighbours (see :func:`screen`).
        weights: mixing weights over ``[own, *contributions]`` (used by ``none``/``clip``).
        keys: the keys to merge.
        config: supplies ``robust``, ``trim``, ``clip_*`` and ``int_policy``.
        own_share: for ``median``/``trimmed_mean`` only: blend the robust estimate
            ``R`` as ``own_share * own + (1 - own_share) * R`` (FedEFM's mixing step);
            ``None`` returns ``R`` itself.

    Returns:
        (new state, clip scale per peer id for clipped peers, info for logs).
    """
    keys = [k for k in keys if k in own]
    states: list[Mapping[str, np.ndarray]] = [own, *[c.state for c in contributions]]
    rule = config.robust
    info: dict[str, Any] = {"rule": rule, "n_models": len(states)}
    clip_scale: dict[str, float] = {}
    if rule == "none" or len(states) == 1:
        return weighted_average(states, weights, keys, int_policy=config.int_policy), \
            clip_scale, info
    if rule == "clip":
        fkeys = [k for k in keys if is_float_array(own[k])]
        norms = [delta_norm(own, c.state, fkeys) for c in contributions]
        bound = clip_threshold(norms, config.clip_norm, config.clip_multiplier)
        clipped, norms, scales = clip_states(own, [c.state for c in contributions], fkeys,
                                             bound)
        info.update(clip_threshold=bound, delta_norms=norms)
        for c, s in zip(contributions, scales, strict=True):
            if s < 1.0:
                clip_scale[c.peer_id] = s
                logger.info("clipped delta of %s by %.3g (bound %.3g)", c.peer_id, s, bound)
        merged = weighted_average([dict(own), *clipped], weights, fkeys, int_policy="own")
        ints = [k for k in keys if k not in set(fkeys)]
        int_part = weighted_average(states, weights, ints, int_policy=config.int_policy)
        return {k: merged[k] if k in set(fkeys) else int_part[k] for k in own}, \
            clip_scale, info
    if rule == "median":
        robust = coordinate_median(states, keys)
    else:
        info["trimmed_each_end"] = trim_count(len(states), config.trim)
        robust = trimmed_mean(states, keys, config.trim)
    out: StateDict = {}
    for name, ref in own.items():
        ref = np.asarray(ref)
        if name not in robust or ref.dtype == np.bool_ or (
            not is_float_array(ref) and config.int_policy == "own"
        ):
            out[name] = ref.copy()
            continue
        value = robust[name]
        if own_share is not None:
            value = own_share * np.asarray(ref, np.float64) + (1.0 - own_share) * value
        out[name] = cast_like(value, ref)
    return out, clip_scale, info


def aggregate_contributions(
    own: Mapping[str, np.ndarray],
    neighbours: Sequence[Contribution],
    config: StrategyConfig,
    weight_fn: Callable[[list[Contribution]], np.ndarray],
    *,
    keys: Iterable[str] | None = None,
    required: Iterable[str] = (),
    own_share: float | None = None,
) -> AggregationResult:
    """The pipeline every weight-averaging strategy runs: screen, weigh, combine.

    Args:
        own: the peer's model.
        neighbours: the contributions of the round.
        config: the strategy's config (robust rule and integer policy).
        weight_fn: maps the accepted contributions to weights over ``[own, *accepted]``.
        keys: keys to merge (default: all of ``own``).
        required: :class:`Contribution` fields that must be set (else dropped).
        own_share: see :func:`combine`.
    """
    names = list(own) if keys is None else [k for k in keys if k in own]
    screened = screen(own, neighbours, names)
    dropped = dict(screened.dropped)
    accepted: list[Contribution] = []
    for c in screened.accepted:
        miss = missing_field(c, required)
        if miss is None:
            accepted.append(c)
        else:
            dropped[c.peer_id] = f"missing {miss}"
            logger.warning("dropping contribution of %s: missing %s", c.peer_id, miss)
    weights = np.asarray(weight_fn(accepted), dtype=np.float64)
    state, clip_scale, info = combine(own, accepted, weights, names, config,
                                      own_share=own_share)
    report = {SELF: float(weights[0])}
    report.update({c.peer_id: float(w) for c, w in zip(accepted, weights[1:], strict=True)})
    return AggregationResult(state, report, dropped, clip_scale, info)
