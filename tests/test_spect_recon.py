"""Phantoms, projector, noise model, FBP and MLEM of the spect task (32x32, fast)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from silomesh.models.metrics import psnr
from silomesh.models.spect_phantom import LABELS, make_phantom
from silomesh.models.spect_recon import (
    Geometry,
    fbp,
    get_projector,
    mlem,
    poisson_loglik,
    simulate_sinograms,
)

SIZE = 32


def _disc(size: int, cx: float, cy: float, r: float, sub: int = 8) -> np.ndarray:
    """Area-weighted disc (normalised coordinates, y up)."""
    n = size * sub
    c = (np.arange(n) + 0.5) / n * 2 - 1
    x, y = np.meshgrid(c, -c)
    fine = ((x - cx) ** 2 + (y - cy) ** 2 <= r * r).astype(float)
    return fine.reshape(size, sub, size, sub).mean(axis=(1, 3))


def test_phantom_is_deterministic_per_seed() -> None:
    a, b, c = make_phantom(5, SIZE), make_phantom(5, SIZE), make_phantom(6, SIZE)
    np.testing.assert_array_equal(a.activity, b.activity)
    np.testing.assert_array_equal(a.mu, b.mu)
    assert a.infarct == b.infarct
    assert not np.array_equal(a.activity, c.activity)


def test_phantom_has_declared_shapes_and_organs() -> None:
    p = make_phantom(1, SIZE, infarct=False)
    assert p.activity.shape == p.mu.shape == p.labels.shape == (SIZE, SIZE)
    assert p.activity.dtype == p.mu.dtype == np.float32
    assert p.activity.min() >= 0 and p.mu.min() >= 0
    myo = p.labels == LABELS["myocardium"]
    assert myo.any() and (p.labels == LABELS["lung"]).any()
    # the myocardium is the hottest organ and the lungs attenuate less than tissue
    assert p.activity[myo].mean() > 3 * p.activity[p.labels == LABELS["body"]].mean()
    assert p.mu[p.labels == LABELS["lung"]].mean() < p.mu[p.labels == LABELS["body"]].mean()
    assert not p.infarct_mask.any()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_infarct_reduces_myocardial_activity_in_its_sector_only(seed: int) -> None:
    sick = make_phantom(seed, SIZE, infarct=True)
    well = make_phantom(seed, SIZE, infarct=False)
    mask = sick.infarct_mask
    assert sick.infarct and not well.infarct and mask.sum() >= 2
    assert np.all(sick.labels[mask] == LABELS["myocardium"])
    assert sick.activity[mask].mean() < 0.6 * well.activity[mask].mean()
    # sub-pixel partial volume can touch pixels next to the sector, nothing further
    away = ~binary_dilation(mask, structure=np.ones((3, 3)), iterations=2)
    np.testing.assert_array_equal(sick.activity[away], well.activity[away])


def test_sinogram_has_angles_by_detector_shape() -> None:
    g = Geometry(SIZE, 24)
    p = make_phantom(0, SIZE)
    rng = np.random.default_rng(0)
    y = simulate_sinograms(p.activity[None], g, counts=1e5, rng=rng, mu=p.mu[None])
    assert y.shape == (1, 24, SIZE) and y.dtype == np.float32
    assert y.min() >= 0


@pytest.mark.parametrize("attenuated", [False, True])
def test_back_projector_is_the_adjoint_of_the_projector(attenuated: bool) -> None:
    g = Geometry(SIZE, 20)
    proj = get_projector(g)
    rng = np.random.default_rng(0)
    x = rng.random((2, SIZE, SIZE)) * g.support()
    y = rng.random((2, *g.sinogram_shape))
    att = proj.attenuation_factors(rng.random((2, SIZE, SIZE)) * 0.2) if attenuated else None
    lhs = np.sum(proj.forward(x, att) * y)
    rhs = np.sum(x * proj.back(y, att))
    assert lhs == pytest.approx(rhs, rel=1e-9)


def test_projection_of_off_centre_disc_matches_the_analytic_radon_transform() -> None:
    g = Geometry(SIZE, 16)
    cx, cy, r = 0.3, 0.2, 0.3
    sino = get_projector(g).forward(_disc(SIZE, cx, cy, r)[None])[0]
    s = (np.arange(g.n_det) - (g.n_det - 1) / 2) * g.pixel_width
    s0 = cx * np.cos(g.angles)[:, None] + cy * np.sin(g.angles)[:, None]
    exact = 2 * np.sqrt(np.clip(r * r - (s[None] - s0) ** 2, 0, None))
    assert np.abs(sino - exact).mean() < 0.02 * exact.max()
    assert np.corrcoef(sino.ravel(), exact.ravel())[0, 1] > 0.995


def test_fbp_of_a_disc_recovers_its_activity_and_position() -> None:
    g = Geometry(SIZE, 32)
    disc = _disc(SIZE, 0.3, 0.2, 0.3)
    img = fbp(get_projector(g).forward(disc[None]), g, window="ramp")[0]
    inner = _disc(SIZE, 0.3, 0.2, 0.18) > 0.99
    assert img[inner].mean() == pytest.approx(1.0, abs=0.03)
    assert np.abs(img[_disc(SIZE, -0.3, -0.3, 0.15) > 0.99]).mean() < 0.05


def test_attenuation_factor_at_the_centre_of_a_uniform_disc_is_exp_minus_mu_r() -> None:
    g = Geometry(SIZE, 8, fov_cm=40.0)
    proj = get_projector(g)
    mu_cm, r = 0.15, 0.6
    att = proj.attenuation_factors(mu_cm * _disc(SIZE, 0, 0, r)[None])[0]
    c = SIZE // 2
    centre = np.flatnonzero(proj.index == c * SIZE + c)[0]
    # path from the pixel centre to the disc's edge along the ray, towards the detector
    p = np.array([0.5, -0.5]) * g.pixel_width  # (x, y) of pixel (c, c)
    u = np.stack([-np.sin(g.angles), np.cos(g.angles)], axis=1)
    pu = u @ p
    length = -pu + np.sqrt(pu**2 - p @ p + r * r)
    expected = np.exp(-mu_cm * length * g.fov_cm / 2)
    np.testing.assert_allclose(att[:, centre], expected, rtol=0.05)
    assert att.max() <= 1.0 and att.min() > 0.0


def test_more_counts_give_lower_noise() -> None:
    g = Geometry(SIZE, 16)
    act = make_phantom(3, SIZE).activity[None]
    clean = simulate_sinograms(act, g, counts=None, rng=np.random.default_rng(0))
    err = {
        c: np.std(simulate_sinograms(act, g, counts=c, rng=np.random.default_rng(1)) - clean)
        for c in (1e4, 1e6)
    }
    assert err[1e6] < err[1e4] / 5  # noise ~ 1/sqrt(counts): ratio 10 expected
    low = simulate_sinograms(act, g, counts=1e4, rng=np.random.default_rng(2))
    assert low.sum() == pytest.approx(clean.sum(), rel=0.05)  # normalised: same scale


def test_mlem_increases_the_poisson_loglikelihood_every_iteration() -> None:
    g = Geometry(SIZE, 24)
    p = make_phantom(4, SIZE, infarct=True)
    y = simulate_sinograms(
        p.activity[None], g, counts=5e4, rng=np.random.default_rng(0), mu=p.mu[None]
    )
    att = get_projector(g).attenuation_factors(p.mu[None]).astype(np.float64)
    history: list[float] = []
    mlem(
        y,
        g,
        10,
        mu=p.mu[None],
        callback=lambda k, x: history.append(float(poisson_loglik(x, y, g, att)[0])),
    )
    assert len(history) == 11
    assert np.all(np.diff(history) > 0), history


def test_mlem_beats_fbp_on_nearly_noiseless_data() -> None:
    g = Geometry(SIZE, 32)
    ph = [make_phantom(i, 2 * SIZE, infarct=bool(i % 2)) for i in range(3)]
    fine = np.stack([p.activity for p in ph])
    target = fine.reshape(3, SIZE, 2, SIZE, 2).mean(axis=(2, 4))
    y = simulate_sinograms(fine, g, counts=1e8, rng=np.random.default_rng(0), oversample=2)
    p_fbp = np.mean([psnr(r, t) for r, t in zip(fbp(y, g), target, strict=True)])
    p_mlem = np.mean([psnr(r, t) for r, t in zip(mlem(y, g, 40), target, strict=True)])
    assert p_mlem > p_fbp + 1.0, (p_mlem, p_fbp)
