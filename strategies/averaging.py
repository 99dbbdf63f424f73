"""Weighted averaging of state dicts and the mixing weights of gossip averaging.

The rules follow decentralised parallel SGD (D-PSGD, Lian et al., NeurIPS 2017) and
its asynchronous/periodic variants (DPASGD): after local training each peer replaces
its model by a convex combination of its own and its neighbours' models. The mixing
weights are either proportional to sample counts (FedAvg's rule, applied to the
neighbourhood) or Metropolis–Hastings weights, which make the mixing matrix symmetric
and doubly stochastic on any undirected graph (Xiao & Boyd, 2004) so gossip converges
to the network-wide average.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from .base import Contribution, StateDict, check_choice

logger = logging.getLogger(__name__)

WEIGHTINGS = ("samples", "metropolis", "uniform")


def _normalise(raw: npt.ArrayLike, what: str) -> npt.NDArray[np.float64]:
    w = np.asarray(raw, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"{what}: need a non-empty 1-D list of weights")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"{what}: weights must be finite and non-negative, got {w}")
    total = float(w.sum())
    if total <= 0:
        raise ValueError(f"{what}: weights sum to zero")
    return w / total


def uniform_weights(n: int) -> np.ndarray:
    """Equal weights for ``n`` models."""
    if n < 1:
        raise ValueError("uniform_weights: need at least one model")
    return np.full(n, 1.0 / n)


def sample_weights(own_samples: float, neighbour_samples: Sequence[float]) -> np.ndarray:
    """FedAvg weights ``n_k / sum(n)`` over ``[own, *neighbours]``.

    Raises:
        ValueError: if a count is negative or non-finite, or all are zero.
    """
    return _normalise(np.array([own_samples, *neighbour_samples], dtype=np.float64),
                      "sample_weights")


def metropolis_weights(own_degree: int, neighbour_degrees: Sequence[int]) -> np.ndarray:
    """Metropolis–Hastings weights over ``[own, *neighbours]``.

    ``w_ij = 1 / (1 + max(d_i, d_j))`` for each neighbour j and ``w_ii = 1 - sum_j w_ij``.
    A neighbour that did not answer this round simply leaves its share with the peer,
    so the graph-wide matrix stays symmetric and doubly stochastic.

    Raises:
        ValueError: if a degree is negative, or the peer has more answering
            neighbours than its degree says.
    """
    degrees = [int(d) for d in neighbour_degrees]
    if own_degree < 0 or any(d < 0 for d in degrees):
        raise ValueError("metropolis_weights: degrees must be non-negative")
    if len(degrees) > own_degree:
        raise ValueError(
            f"metropolis_weights: {len(degrees)} neighbours answered but own degree is "
            f"{own_degree}"
        )
    w = np.array([1.0 / (1 + max(own_degree, d)) for d in degrees], dtype=np.float64)
    return np.concatenate([[1.0 - w.sum()], w])


def metropolis_matrix(adjacency: np.ndarray) -> np.ndarray:
    """The full Metropolis–Hastings mixing matrix of an undirected graph.

    Used by simnet and the tests; row i equals ``metropolis_weights`` of peer i laid out
    over all peers.

    Raises:
        ValueError: if ``adjacency`` is not a square symmetric 0/1 matrix.
    """
    a = np.asarray(adjacency)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or not np.array_equal(a, a.T):
        raise ValueError("metropolis_matrix: adjacency must be square and symmetric")
    a = (a != 0) & ~np.eye(len(a), dtype=bool)
    deg = a.sum(axis=1)
    w = np.where(a, 1.0 / (1 + np.maximum(deg[:, None], deg[None, :])), 0.0)
    w[np.diag_indices_from(w)] = 1.0 - w.sum(axis=1)
    return w


def mixing_weights(
    weighting: str,
    own_samples: float,
    neighbours: Sequence[Contribution],
    own_degree: int | None = None,
) -> np.ndarray:
    """Weights over ``[own, *neighbours]`` for a named rule (see :data:`WEIGHTINGS`).

    Raises:
        ValueError: for an unknown rule, or a neighbour without the degree Metropolis
            needs (screen with :func:`missing_field` first).
    """
    check_choice("weighting", weighting, WEIGHTINGS)
    if weighting == "uniform":
        return uniform_weights(len(neighbours) + 1)
    if weighting == "samples":
        return sample_weights(own_samples, [c.n_samples for c in neighbours])
    if any(c.degree is None for c in neighbours):
        raise ValueError("metropolis weights need every neighbour's degree")
    deg = len(neighbours) if own_degree is None else own_degree
    return metropolis_weights(deg, [int(c.degree) for c in neighbours])  # type: ignore[arg-type]


def required_fields(weighting: str) -> tuple[str, ...]:
    """Contribution fields a weighting rule reads (Metropolis needs the degree)."""
    return ("degree",) if weighting == "metropolis" else ()


def missing_field(c: Contribution, fields: Iterable[str]) -> str | None:
    """The first of ``fields`` that ``c`` leaves unset (None), or None."""
    for name in fields:
        if getattr(c, name) is None:
            return name
    return None


def is_float_array(x: np.ndarray) -> bool:
    """True for floating-point arrays (these are averaged); ints and bools are buffers."""
    return np.issubdtype(np.asarray(x).dtype, np.floating)


def weighted_average(
    states: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float] | np.ndarray,
    keys: Iterable[str] | None = None,
    *,
    int_policy: str = "own",
) -> StateDict:
    """Convex combination ``sum_k w_k * states[k]`` key by key.

    ``states[0]`` is the peer's own model: its keys, shapes and dtypes define the result;
    keys outside ``keys`` are copied from it unchanged. Floating arrays are combined in
    float64 and cast back; integer buffers are kept from ``states[0]``
    (``int_policy="own"``) or set to the rounded weighted average (``"round"``);
    booleans are always kept.

    Raises:
        ValueError: if weights do not match the states or are not a distribution.
    """
    check_choice("int_policy", int_policy, ("own", "round"))
    w = _normalise(np.asarray(weights, dtype=np.float64), "weighted_average")
    if len(w) != len(states):
        raise ValueError(f"weighted_average: {len(states)} states but {len(w)} weights")
    own = states[0]
    merge = set(own) if keys is None else set(keys)
    out: StateDict = {}
    for name, ref in own.items():
        ref = np.asarray(ref)
        if name not in merge or ref.dtype == np.bool_:
            out[name] = ref.copy()
            continue
        if not is_float_array(ref) and int_policy == "own":
            out[name] = ref.copy()
            continue
        acc = np.zeros(ref.shape, dtype=np.float64)
        for wk, st in zip(w, states, strict=True):
            if wk != 0.0:
                acc += wk * np.asarray(st[name], dtype=np.float64)
        out[name] = cast_like(acc, ref)
    return out


def cast_like(values: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Cast float64 ``values`` to ``ref``'s dtype, rounding (and clipping) for integers."""
    if is_float_array(ref):
        return values.astype(ref.dtype)
    info = np.iinfo(ref.dtype)
    rounded: np.ndarray = np.clip(np.rint(values), info.min, info.max).astype(ref.dtype)
    return rounded


def average_states(states: Sequence[Mapping[str, np.ndarray]]) -> StateDict:
    """Plain (unweighted) mean of models, integer buffers rounded.

    Raises:
        ValueError: if ``states`` is empty.
    """
    if not states:
        raise ValueError("average_states: no states")
    return weighted_average(states, uniform_weights(len(states)), int_policy="round")
