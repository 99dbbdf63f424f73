"""Drawing primitives shared by the synthetic task generators.

Geometry is expressed in *normalised* units (the image side is 1.0) and converted to
pixels at the end, so a generator draws the same scene at 32, 64 or 512 pixels and
only the sampling changes. Every function takes an explicit ``numpy.random.Generator``;
nothing touches global random state.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from silomesh.models.task import ArrayDataset


def stream(seed: int, *keys: int) -> np.random.Generator:
    """An independent random stream for ``(seed, *keys)``.

    Tasks name their streams (e.g. ``stream(seed, TRAIN, silo, source)``) so that one
    split does not change when another one grows.
    """
    return np.random.default_rng([int(seed), *(int(k) for k in keys)])


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma: float | Sequence[float]) -> np.ndarray:
    """Gaussian-blurred white noise with zero mean and unit standard deviation.

    Args:
        rng: random stream.
        shape: output shape (2D or 3D).
        sigma: correlation length in pixels (scalar or per axis).
    """
    field = ndimage.gaussian_filter(rng.standard_normal(tuple(shape)), sigma, mode="wrap")
    std = float(field.std())
    return ((field - field.mean()) / (std if std > 0 else 1.0)).astype(np.float64)


def random_curve(
    rng: np.random.Generator,
    start: np.ndarray,
    heading: float,
    length: float,
    curvature: float,
    *,
    step: float = 0.004,
    correlation: float = 0.15,
) -> np.ndarray:
    """A smooth random path (a random walk of the heading), in normalised units.

    The heading changes by smoothed Gaussian noise, so ``curvature`` (radians per unit
    length, roughly) controls how tortuous the path is and ``correlation`` (a length)
    how far a bend extends.

    Returns:
        ``(n, 2)`` array of (y, x) points spaced ``step`` apart.
    """
    n = max(2, round(length / step))
    turn = ndimage.gaussian_filter1d(rng.standard_normal(n), max(1.0, correlation / step))
    turn /= float(turn.std()) or 1.0
    angles = heading + np.cumsum(turn * curvature * step)
    steps = step * np.stack([np.sin(angles), np.cos(angles)], axis=1)
    return np.asarray(start, dtype=np.float64)[None, :] + np.cumsum(steps, axis=0)


def border_start(rng: np.random.Generator, margin: float = 0.0) -> tuple[np.ndarray, float]:
    """A point on a random image border and a heading pointing roughly inwards."""
    side = int(rng.integers(4))
    t = float(rng.uniform(0.15, 0.85))
    start = [
        np.array([-margin, t]),
        np.array([1.0 + margin, t]),
        np.array([t, -margin]),
        np.array([t, 1.0 + margin]),
    ][side]
    towards = np.array([0.5, 0.5]) + rng.uniform(-0.2, 0.2, size=2) - start
    heading = float(np.arctan2(towards[0], towards[1]) + rng.uniform(-0.4, 0.4))
    return start, heading


def pixel_centres(shape: tuple[int, int]) -> np.ndarray:
    """``(H*W, 2)`` array of pixel-centre coordinates (y, x) in pixels."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.float64)


def curve_distance(points_px: np.ndarray, shape: tuple[int, int], reach: float) -> np.ndarray:
    """Distance (pixels) from every pixel centre to the nearest curve point.

    Pixels farther than ``reach`` get ``inf`` (the KD-tree stops searching there), which
    keeps this cheap for large frames.
    """
    out = np.full(shape, np.inf)
    if len(points_px) == 0:
        return out
    # only pixels inside the curve's bounding box (grown by ``reach``) can be near it
    lo = np.maximum(np.floor(points_px.min(axis=0) - reach), 0).astype(int)
    hi = np.minimum(np.ceil(points_px.max(axis=0) + reach) + 1, shape).astype(int)
    if np.any(hi <= lo):
        return out
    box = (int(hi[0] - lo[0]), int(hi[1] - lo[1]))
    query = pixel_centres(box) + lo[None, :]
    dist, _ = cKDTree(points_px).query(query, k=1, distance_upper_bound=reach)
    out[lo[0] : hi[0], lo[1] : hi[1]] = np.asarray(dist).reshape(box)
    return out


def tube_profile(dist: np.ndarray, radius: float) -> np.ndarray:
    """Path length through a cylinder of ``radius`` at distance ``dist`` from its axis.

    Normalised to 1 on the axis; this is what an X-ray sees of a tube (a wire or a
    contrast-filled vessel): darkest in the middle, fading to the edge, anti-aliased
    over half a pixel.
    """
    r = max(radius, 0.5)
    inside = np.sqrt(np.clip(1.0 - (dist / (r + 0.5)) ** 2, 0.0, 1.0))
    return inside


def irregular_blob(
    rng: np.random.Generator,
    grid: Sequence[np.ndarray],
    centre: Sequence[float] | np.ndarray,
    radii: Sequence[float],
    angle: float = 0.0,
    roughness: float = 0.1,
    sigma: float | Sequence[float] = 4.0,
) -> np.ndarray:
    """Implicit function of a rotated, rough ellipse/ellipsoid; ``<= 1`` is inside.

    Args:
        rng: random stream (for the boundary roughness).
        grid: coordinate arrays (2 for (y, x) or 3 for (z, y, x)), in normalised units.
        centre: centre per axis, same order as ``grid``.
        radii: semi-axes per axis.
        angle: rotation in the (y, x) plane, radians.
        roughness: amplitude of the smooth boundary perturbation.
        sigma: correlation length of the perturbation in pixels (scalar or per axis).
    """
    *zs, y, x = grid
    cy, cx = centre[-2], centre[-1]
    dy, dx = y - cy, x - cx
    c, s = np.cos(angle), np.sin(angle)
    u = (c * dx + s * dy) / radii[-1]
    v = (-s * dx + c * dy) / radii[-2]
    level = u**2 + v**2
    if zs:
        level = level + ((zs[0] - centre[0]) / radii[0]) ** 2
    if roughness > 0:
        level = level + roughness * smooth_noise(rng, level.shape, sigma)
    return np.asarray(level)


def concat(datasets: Sequence[ArrayDataset]) -> ArrayDataset:
    """Concatenate datasets that share keys and label kind."""
    if not datasets:
        raise ValueError("nothing to concatenate")
    keys = list(datasets[0].arrays)
    return ArrayDataset(
        {k: np.concatenate([d[k] for d in datasets], axis=0) for k in keys},
        datasets[0].label_kind,
    )
