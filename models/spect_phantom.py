"""2D torso phantoms for myocardial perfusion SPECT, with optional infarction.

A phantom is one transaxial slice through the chest: body outline, two lungs, liver
dome, spine, descending aorta, and the left ventricle seen as a myocardial ring (or a
horseshoe open towards the valve plane) around its blood pool. Each organ carries a
tracer activity (relative to soft-tissue background, jittered per sample) and a linear
attenuation coefficient for 140 keV photons (Tc-99m). An infarct is a sector of the
myocardium whose uptake is reduced (a "cold" defect).

Coordinates are normalised: the field of view spans [-1, 1] in x (right in the image)
and y (up in the image, i.e. anterior), so one unit is ``fov_cm / 2``. Every random
choice comes from one ``numpy.random.Generator``, and the infarct parameters are drawn
whether or not the infarct is applied, so ``make_phantom(seed, infarct=True)`` and
``make_phantom(seed, infarct=False)`` show the same anatomy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

#: label values of :attr:`Phantom.labels`
LABELS: dict[str, int] = {
    "outside": 0,
    "body": 1,
    "lung": 2,
    "liver": 3,
    "myocardium": 4,
    "blood_pool": 5,
    "spine": 6,
}


@dataclass(frozen=True)
class PhantomConfig:
    """Mean organ activities (relative to background) and attenuation (1/cm)."""

    fov_cm: float = 40.0  # width of the square field of view
    supersample: int = 4  # sub-samples per pixel side, for partial-volume edges
    activity_jitter: float = 0.15  # log-normal sigma of each organ's activity
    body_activity: float = 1.0
    lung_activity: float = 0.3
    liver_activity: float = 5.0
    myocardium_activity: float = 8.0
    blood_pool_activity: float = 1.8
    spine_activity: float = 0.5
    mu_tissue: float = 0.15  # soft tissue at 140 keV
    mu_lung: float = 0.05
    mu_bone: float = 0.25
    infarct_reduction: tuple[float, float] = (0.1, 0.45)  # uptake kept in the defect
    infarct_width_deg: tuple[float, float] = (45.0, 100.0)
    horseshoe_probability: float = 0.5  # ring open towards the valve plane


@dataclass(frozen=True)
class Phantom:
    """One phantom slice.

    Attributes:
        activity: tracer activity, float32 ``(H, W)``.
        mu: attenuation coefficient in 1/cm, float32 ``(H, W)``.
        labels: organ label per pixel centre (see :data:`LABELS`), uint8 ``(H, W)``.
        infarct_mask: myocardial pixels inside the infarct sector, bool ``(H, W)``
            (all false when there is no infarct).
        infarct: whether the infarct was applied.
    """

    activity: np.ndarray
    mu: np.ndarray
    labels: np.ndarray
    infarct_mask: np.ndarray
    infarct: bool


def _grid(size: int, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample coordinates (x right, y up) of a ``size*supersample`` square grid."""
    n = size * supersample
    c = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    x, y = np.meshgrid(c, -c)  # row 0 is the top of the image (largest y)
    return x, y


def _ellipse(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, angle: float = 0.0
) -> np.ndarray:
    ca, sa = np.cos(angle), np.sin(angle)
    u = (x - cx) * ca + (y - cy) * sa
    v = -(x - cx) * sa + (y - cy) * ca
    return np.asarray((u / a) ** 2 + (v / b) ** 2 <= 1.0)


def _angle_in(theta: np.ndarray, centre: float, width: float) -> np.ndarray:
    """Whether polar angles ``theta`` lie within ``width`` rad centred on ``centre``."""
    d = np.mod(theta - centre + np.pi, 2 * np.pi) - np.pi
    return np.asarray(np.abs(d) <= width / 2)


def block_mean(a: np.ndarray, s: int) -> np.ndarray:
    """Average ``s x s`` blocks of the last two axes (down-sampling by ``s``)."""
    if s == 1:
        return a
    h, w = a.shape[-2] // s, a.shape[-1] // s
    return np.asarray(a.reshape(*a.shape[:-2], h, s, w, s).mean(axis=(-3, -1)))


def make_phantom(
    seed: int | np.random.Generator,
    size: int = 64,
    *,
    infarct: bool | None = None,
    config: PhantomConfig | None = None,
) -> Phantom:
    """Draw one random torso phantom.

    Args:
        seed: an integer seed or a generator (consumed).
        size: image side in pixels.
        infarct: apply a myocardial infarct; ``None`` draws it with probability 0.5.
        config: organ activities and attenuation; defaults to :class:`PhantomConfig`.
    """
    cfg = config or PhantomConfig()
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    def act(mean: float) -> float:
        return float(mean * np.exp(rng.normal(0.0, cfg.activity_jitter)))

    # --- anatomy (all draws happen in a fixed order) ---
    shift = rng.uniform(-0.03, 0.03, size=2)
    body_a, body_b = 0.78 * rng.uniform(0.94, 1.06), 0.55 * rng.uniform(0.94, 1.06)
    body_c = (shift[0], -0.05 + shift[1])
    lung_r = (-0.36 + shift[0] + rng.uniform(-0.02, 0.02), 0.10 + shift[1])
    lung_l = (0.44 + shift[0] + rng.uniform(-0.02, 0.02), 0.08 + shift[1])
    lung_ax = rng.uniform(0.9, 1.1, size=4) * np.array([0.19, 0.27, 0.16, 0.26])
    liver_c = (-0.36 + shift[0], -0.16 + shift[1] + rng.uniform(-0.04, 0.04))
    liver_ax = rng.uniform(0.85, 1.1, size=2) * np.array([0.27, 0.19])
    heart_jitter = rng.uniform(-0.03, 0.03, size=2)
    heart_c = (0.12 + shift[0] + heart_jitter[0], 0.14 + shift[1] + heart_jitter[1])
    r_out = 0.17 * rng.uniform(0.9, 1.1)
    r_in = r_out - 0.065 * rng.uniform(0.85, 1.15)
    horseshoe = bool(rng.random() < cfg.horseshoe_probability)
    gap_width = np.deg2rad(rng.uniform(40.0, 80.0))
    gap_centre = np.deg2rad(215.0 + rng.uniform(-15.0, 15.0))
    spine_c = (shift[0], -0.42 + shift[1])
    aorta_c = (0.09 + shift[0], -0.30 + shift[1])
    activities = {
        "body": act(cfg.body_activity),
        "lung": act(cfg.lung_activity),
        "liver": act(cfg.liver_activity),
        "myocardium": act(cfg.myocardium_activity),
        "blood_pool": act(cfg.blood_pool_activity),
        "spine": act(cfg.spine_activity),
    }
    # infarct sector: centred somewhere on the closed part of the wall
    inf_width = np.deg2rad(rng.uniform(*cfg.infarct_width_deg))
    inf_offset = rng.uniform(0.0, 1.0)
    inf_keep = float(rng.uniform(*cfg.infarct_reduction))
    has_infarct = bool(rng.random() < 0.5) if infarct is None else infarct
    free_arc = 2 * np.pi - (gap_width if horseshoe else 0.0)
    inf_centre = gap_centre + (gap_width if horseshoe else 0.0) / 2 + inf_offset * free_arc

    def paint(
        x: np.ndarray, y: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        activity = np.zeros(x.shape)
        mu = np.zeros(x.shape)
        labels = np.zeros(x.shape, dtype=np.uint8)

        def put(mask: np.ndarray, organ: str, mu_value: float) -> None:
            activity[mask] = activities[organ]
            mu[mask] = mu_value
            labels[mask] = LABELS[organ]

        body = _ellipse(x, y, body_c[0], body_c[1], body_a, body_b)
        put(body, "body", cfg.mu_tissue)
        put(body & _ellipse(x, y, *lung_r, lung_ax[0], lung_ax[1], 0.15), "lung", cfg.mu_lung)
        put(body & _ellipse(x, y, *lung_l, lung_ax[2], lung_ax[3], -0.2), "lung", cfg.mu_lung)
        put(body & _ellipse(x, y, *liver_c, liver_ax[0], liver_ax[1], 0.1), "liver", cfg.mu_tissue)
        r = np.hypot(x - heart_c[0], y - heart_c[1])
        theta = np.arctan2(y - heart_c[1], x - heart_c[0])
        wall = (r <= r_out) & (r > r_in)
        if horseshoe:
            wall &= ~_angle_in(theta, gap_centre, gap_width)
        put(wall, "myocardium", cfg.mu_tissue)
        put(r <= r_in, "blood_pool", cfg.mu_tissue)
        put(_ellipse(x, y, *aorta_c, 0.055, 0.055), "blood_pool", cfg.mu_tissue)
        put(_ellipse(x, y, *spine_c, 0.09, 0.08), "spine", cfg.mu_bone)
        sector = wall & _angle_in(theta, inf_centre, inf_width)
        if has_infarct:
            activity[sector] *= inf_keep
        return activity, mu, labels, sector

    s = max(1, cfg.supersample)
    fine_act, fine_mu, _, _ = paint(*_grid(size, s))
    _, _, labels, sector = paint(*_grid(size, 1))
    logger.debug("phantom size=%d infarct=%s horseshoe=%s", size, has_infarct, horseshoe)
    return Phantom(
        activity=block_mean(fine_act, s).astype(np.float32),
        mu=block_mean(fine_mu, s).astype(np.float32),
        labels=labels,
        infarct_mask=sector & has_infarct,
        infarct=has_infarct,
    )
