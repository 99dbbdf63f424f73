"""Earth Mover's Distance between feature maps (FedEFM's expert weighting).

Following DeepEMD (Zhang et al., CVPR 2020), a feature map ``(C, h, w)`` is a set of
``h*w`` nodes, each a C-dimensional local feature. The ground cost between a node of
map A and a node of map B is the cosine distance ``1 - cos(a_i, b_j)`` (in ``[0, 2]``).
Node weights (the marginals) say how much a node matters for the *other* map:
``a_i`` weighs ``max(0, a_i . mean(B))`` and ``b_j`` weighs ``max(0, b_j . mean(A))``,
each normalised to sum to 1 (uniform if all are zero). EMD is the optimal transport
cost between the two weighted node sets, solved exactly by POT's network simplex
(``ot.emd2``) or approximately by entropic Sinkhorn (``ot.sinkhorn2``).

No gradient flows through these weights; they are computed in float64 numpy.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import ot
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

EMD_METHODS = ("exact", "sinkhorn")
WEIGHTINGS = ("softmax", "relative", "linear")
#: which experts weigh more: the ones closest to the student (the paper) or the farthest
PREFERENCES = ("similar", "dissimilar")


def cosine_cost(a: np.ndarray, b: np.ndarray, eps: float = 1e-12) -> npt.NDArray[np.float64]:
    """``1 - cos(a_i, b_j)`` for node sets ``a (n, C)`` and ``b (m, C)``: shape ``(n, m)``.

    A zero vector has cosine 0 with everything (cost 1).
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    an: npt.NDArray[np.float64] = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), eps)
    bn: npt.NDArray[np.float64] = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), eps)
    return np.clip(1.0 - an @ bn.T, 0.0, 2.0)


def node_weights(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeepEMD marginals: ``w_a[i] ∝ max(0, a_i . mean(b))``, ``w_b[j] ∝ max(0, b_j . mean(a))``.

    Each is normalised to sum to 1; an all-zero vector falls back to uniform.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    wa = np.maximum(a @ b.mean(axis=0), 0.0)
    wb = np.maximum(b @ a.mean(axis=0), 0.0)
    return _to_distribution(wa), _to_distribution(wb)


def _to_distribution(w: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    total = float(w.sum())
    if not np.isfinite(total) or total <= 0:
        return np.full(len(w), 1.0 / len(w))
    return w / total


def node_emd(a: np.ndarray, b: np.ndarray, method: str = "exact", reg: float = 0.05) -> float:
    """EMD between two node sets ``a (n, C)`` and ``b (m, C)`` with DeepEMD marginals.

    Args:
        method: ``"exact"`` (``ot.emd2``) or ``"sinkhorn"`` (``ot.sinkhorn2``).
        reg: entropic regularisation of Sinkhorn (ignored by ``exact``).

    Raises:
        ValueError: for an unknown method or empty node sets.
    """
    if method not in EMD_METHODS:
        raise ValueError(f"parameter 'emd_method' must be one of {list(EMD_METHODS)}, "
                         f"got {method!r}")
    if len(a) == 0 or len(b) == 0:
        raise ValueError("node_emd: empty node set")
    wa, wb = node_weights(a, b)
    cost = cosine_cost(a, b)
    if method == "exact":
        return float(ot.emd2(wa, wb, cost))
    return float(ot.sinkhorn2(wa, wb, cost, reg))


def feature_nodes(fmap: torch.Tensor | np.ndarray, grid: int | None = None) -> np.ndarray:
    """Turn feature maps ``(B, C, h, w)`` into node sets ``(B, h*w, C)`` (float64).

    With ``grid`` the map is first adaptive-average-pooled to at most ``grid x grid``
    nodes (DeepEMD uses 5x5), which keeps the exact solver fast.

    Raises:
        ValueError: if the input is not 4-D.
    """
    t = fmap if isinstance(fmap, torch.Tensor) else torch.from_numpy(np.asarray(fmap))
    if t.ndim != 4:
        raise ValueError(f"feature map must be (B, C, h, w), got shape {tuple(t.shape)}")
    t = t.detach().to(torch.float64)
    if grid is not None and (t.shape[2] > grid or t.shape[3] > grid):
        t = F.adaptive_avg_pool2d(t, (min(grid, t.shape[2]), min(grid, t.shape[3])))
    b, c = t.shape[:2]
    return t.reshape(b, c, -1).transpose(1, 2).cpu().numpy()


def feature_map_emd(
    fa: torch.Tensor | np.ndarray,
    fb: torch.Tensor | np.ndarray,
    *,
    method: str = "exact",
    reg: float = 0.05,
    grid: int | None = 8,
) -> np.ndarray:
    """Per-sample EMD between two batches of feature maps of the same images.

    Returns:
        ``(B,)`` distances in ``[0, 2]``.

    Raises:
        ValueError: if the batches differ in size or channel count.
    """
    na = feature_nodes(fa, grid)
    nb = feature_nodes(fb, grid)
    if na.shape[0] != nb.shape[0] or na.shape[2] != nb.shape[2]:
        raise ValueError(f"feature maps differ: {na.shape} vs {nb.shape} (B, nodes, C)")
    return np.array([node_emd(x, y, method, reg) for x, y in zip(na, nb, strict=True)])


def similarity_weights(
    distances: Sequence[float] | np.ndarray,
    weighting: str = "softmax",
    temperature: float = 0.1,
    prefer: str = "similar",
) -> np.ndarray:
    """Turn per-expert EMDs into weights that sum to 1 (closer experts weigh more).

    ``softmax``: ``w_j ∝ exp(-EMD_j / temperature)`` (similarity ``exp(-EMD)`` sharpened
    by the temperature); ``relative``: the same on ``EMD_j / mean_k EMD_k``, so that the
    temperature acts on how much closer an expert is than the others, whatever the scale
    of the distances (an output-layer EMD is ~1e-4, a feature-layer one ~0.1; uniform if
    all are 0); ``linear``: ``w_j ∝ max(0, 1 - EMD_j)`` (uniform if all are 0).
    ``prefer = "dissimilar"`` turns the ranking round (the farthest expert weighs most;
    with ``linear``, ``w_j ∝ EMD_j``).

    Raises:
        ValueError: for an unknown weighting or preference, a non-positive temperature, or
            no distances.
    """
    d = np.asarray(distances, np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError("similarity_weights: need a non-empty 1-D list of distances")
    if prefer not in PREFERENCES:
        raise ValueError(f"parameter 'prefer' must be one of {list(PREFERENCES)}, got {prefer!r}")
    sign = 1.0 if prefer == "similar" else -1.0
    if weighting in ("softmax", "relative"):
        if temperature <= 0:
            raise ValueError("parameter 'weight_temperature' must be > 0")
        if weighting == "relative":
            mean = float(d.mean())
            d = d / mean if mean > 0 else np.zeros_like(d)
        z = -sign * d / temperature
        z -= z.max()
        e: npt.NDArray[np.float64] = np.exp(z)
        return e / float(e.sum())
    if weighting == "linear":
        return _to_distribution(np.maximum(1.0 - d, 0.0) if sign > 0 else np.maximum(d, 0.0))
    raise ValueError(f"parameter 'weighting' must be one of {list(WEIGHTINGS)}, "
                     f"got {weighting!r}")
