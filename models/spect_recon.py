"""Parallel-beam SPECT projector (with attenuation), sinogram simulation, FBP and MLEM.

The projector is an explicit sparse system matrix ``A`` built once per
:class:`Geometry` (pixel driven: each pixel is split into 2x2 sub-pixels whose centres
are linearly interpolated onto the detector bins), so the back projector is exactly its
transpose and MLEM is the textbook algorithm.

Units: positions are normalised so the field of view spans [-1, 1]; a pixel is
``w = 2 / size`` wide and the projection of a pixel of activity 1 sums to ``w`` per
angle. Sinogram values are therefore line integrals in field-of-view units and do not
depend on the image size. Attenuation coefficients come in 1/cm and are converted with
the pixel size in cm.

Attenuation is modelled per sample: for angle ``theta`` the photons of pixel ``p`` are
weighted by ``exp(-integral of mu from p to the detector)``, computed by resampling the
mu map into the frame of the rays, a cumulative sum along the rays and a resampling
back (``attenuation_factors``). With these factors the attenuated projector is the
block matrix ``A_att[(theta, d), p] = A[(theta, d), p] * att[theta, p]``, still exactly
adjoint to its back projector.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Geometry:
    """Acquisition geometry: square image, parallel beam, evenly spaced angles.

    ``arc_deg`` must be 180 or 360 (360 is needed to make sense of attenuation, whose
    opposite views differ).
    """

    size: int = 64  # image side in pixels
    n_angles: int = 64  # projection angles
    n_det: int = 0  # detector bins; 0 means ``size``
    arc_deg: float = 360.0  # angular range of the acquisition
    fov_cm: float = 40.0  # field-of-view width, to convert mu (1/cm) to per pixel

    def __post_init__(self) -> None:
        if self.size < 4 or self.n_angles < 1:
            raise ValueError(f"bad geometry: size={self.size} n_angles={self.n_angles}")
        if self.arc_deg not in (180.0, 360.0):
            raise ValueError(f"arc_deg must be 180 or 360, not {self.arc_deg}")
        if self.n_det == 0:
            object.__setattr__(self, "n_det", self.size)
        if self.n_det < self.size:
            raise ValueError("need at least as many detector bins as image pixels")

    @property
    def angles(self) -> np.ndarray:
        """Projection angles in radians, ``(n_angles,)``."""
        return np.deg2rad(np.arange(self.n_angles) * self.arc_deg / self.n_angles)

    @property
    def pixel_width(self) -> float:
        """Pixel width in field-of-view units (the field of view is 2 wide)."""
        return 2.0 / self.size

    @property
    def pixel_cm(self) -> float:
        return self.fov_cm / self.size

    @property
    def sinogram_shape(self) -> tuple[int, int]:
        return (self.n_angles, self.n_det)

    def support(self) -> np.ndarray:
        """Pixels modelled by the projector: the inscribed disc (bool ``(size, size)``)."""
        c = (self.size - 1) / 2
        i, j = np.mgrid[: self.size, : self.size]
        return np.asarray(np.hypot(i - c, j - c) <= self.size / 2 - 1)

    def upsampled(self, factor: int) -> Geometry:
        """The same acquisition sampled ``factor`` times finer in image and detector."""
        return Geometry(
            self.size * factor, self.n_angles, self.n_det * factor, self.arc_deg, self.fov_cm
        )


class Projector:
    """Sparse system matrix of one geometry, with forward and back projection.

    Images are ``(N, size, size)`` arrays, sinograms ``(N, n_angles, n_det)``; optional
    attenuation factors are ``(N, n_angles, n_support)`` as returned by
    :meth:`attenuation_factors`. Build with :func:`get_projector` (cached).
    """

    def __init__(self, geometry: Geometry) -> None:
        self.geometry = g = geometry
        self.support = g.support()
        self.index = np.flatnonzero(self.support)  # support pixel -> flat image index
        self.n_support = len(self.index)
        c = (g.size - 1) / 2
        rows, cols = np.divmod(self.index, g.size)
        x, y = cols - c, c - rows  # pixel units, y up
        self._xy = (x, y)
        offsets = np.array([-0.25, 0.25])
        theta = g.angles
        cos, sin = np.cos(theta)[:, None], np.sin(theta)[:, None]
        r_idx, c_idx, vals = [], [], []
        pix = np.arange(self.n_support)
        for ox in offsets:
            for oy in offsets:
                s = (x + ox)[None, :] * cos + (y + oy)[None, :] * sin  # (A, P)
                u = s + (g.n_det - 1) / 2
                k0 = np.floor(u).astype(np.int64)
                frac = u - k0
                for k, wgt in ((k0, 1.0 - frac), (k0 + 1, frac)):
                    ok = (k >= 0) & (k < g.n_det)
                    a_idx = np.broadcast_to(np.arange(g.n_angles)[:, None], k.shape)
                    r_idx.append((a_idx * g.n_det + k)[ok])
                    c_idx.append(np.broadcast_to(pix, k.shape)[ok])
                    vals.append(0.25 * g.pixel_width * wgt[ok])
        shape = (g.n_angles * g.n_det, self.n_support)
        self.matrix = sp.csr_matrix(
            (np.concatenate(vals), (np.concatenate(r_idx), np.concatenate(c_idx))), shape=shape
        ).astype(np.float32)
        self.matrix.sum_duplicates()
        self.matrix_t = self.matrix.T.tocsr()
        # block-diagonal version: column (angle, pixel) so per-angle weights can be applied
        m = self.matrix
        row_angle = np.repeat(np.arange(shape[0]) // g.n_det, np.diff(m.indptr))
        self.block = sp.csr_matrix(
            (m.data, m.indices + row_angle * self.n_support, m.indptr),
            shape=(shape[0], g.n_angles * self.n_support),
        )
        self.block_t = self.block.T.tocsr()
        logger.debug("projector %s: %d non-zeros", g, m.nnz)

    # --- image <-> support vectors ---
    def _vec(self, images: np.ndarray) -> np.ndarray:
        g = self.geometry
        return np.asarray(images).reshape(-1, g.size * g.size)[:, self.index]

    def _img(self, vec: np.ndarray) -> np.ndarray:
        g = self.geometry
        out = np.zeros((vec.shape[0], g.size * g.size), dtype=vec.dtype)
        out[:, self.index] = vec
        return out.reshape(-1, g.size, g.size)

    def forward(self, images: np.ndarray, att: np.ndarray | None = None) -> np.ndarray:
        """Project ``(N, H, W)`` images to ``(N, A, D)`` sinograms."""
        g = self.geometry
        x = self._vec(images)
        if att is None:
            y = (self.matrix @ x.T).T
        else:
            z = (att * x[:, None, :]).reshape(len(x), -1)
            y = (self.block @ z.T).T
        return np.asarray(y).reshape(-1, g.n_angles, g.n_det)

    def back(self, sinograms: np.ndarray, att: np.ndarray | None = None) -> np.ndarray:
        """Back-project ``(N, A, D)`` sinograms to ``(N, H, W)`` (the exact adjoint)."""
        g = self.geometry
        y = np.asarray(sinograms).reshape(-1, g.n_angles * g.n_det)
        if att is None:
            x = np.asarray((self.matrix_t @ y.T).T)
        else:
            z = np.asarray((self.block_t @ y.T).T).reshape(len(y), g.n_angles, -1)
            x = (z * att).sum(axis=1)
        return self._img(x)

    @cached_property
    def _rotation_grids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampling grids for :meth:`attenuation_factors` (align_corners=True)."""
        g = self.geometry
        c = (g.size - 1) / 2
        theta = torch.from_numpy(g.angles).float()[:, None, None]
        cos, sin = torch.cos(theta), torch.sin(theta)
        s = (torch.arange(g.size).float() - c)[None, :, None]  # rows: detector position
        t = (torch.arange(g.size).float() - c)[None, None, :]  # cols: along the ray
        x, y = s * cos - t * sin, s * sin + t * cos  # (A, size, size)
        to_rays = torch.stack([x / c, -y / c], dim=-1)  # grid (col, row) normalised
        px = torch.from_numpy(self._xy[0]).float()[None, :]
        py = torch.from_numpy(self._xy[1]).float()[None, :]
        sp_ = px * cos[:, :, 0] + py * sin[:, :, 0]
        tp = -px * sin[:, :, 0] + py * cos[:, :, 0]  # (A, P)
        from_rays = torch.stack([tp / c, sp_ / c], dim=-1)[:, None]  # (A, 1, P, 2)
        return to_rays, from_rays

    def attenuation_factors(self, mu: np.ndarray, chunk: int = 4) -> np.ndarray:
        """Survival probability of photons from each pixel to the detector.

        Args:
            mu: attenuation maps in 1/cm, ``(N, H, W)``.
            chunk: samples per batch (small chunks stay in cache: faster).

        Returns:
            float32 ``(N, n_angles, n_support)`` factors in (0, 1].
        """
        g = self.geometry
        to_rays, from_rays = self._rotation_grids
        mu = np.asarray(mu, dtype=np.float32).reshape(-1, g.size, g.size)
        out = np.empty((len(mu), g.n_angles, self.n_support), dtype=np.float32)
        for start in range(0, len(mu), chunk):
            m = torch.from_numpy(mu[start : start + chunk]) * g.pixel_cm  # per pixel
            n = m.shape[0]
            inp = m[None].expand(g.n_angles, n, g.size, g.size)
            rays = F.grid_sample(inp, to_rays, mode="bilinear", align_corners=True)
            # integral from each sample to the detector at +t (t is the last axis)
            total = rays.sum(dim=-1, keepdim=True)
            integral = torch.cumsum(rays, dim=-1).sub_(total).neg_().add_(rays, alpha=0.5)
            integral.clamp_(min=0.0)  # rounding can leave -1e-7 at the far end
            back = F.grid_sample(integral, from_rays, mode="bilinear", align_corners=True)
            out[start : start + n] = back[:, :, 0, :].neg_().exp_().permute(1, 0, 2).numpy()
        return out


@lru_cache(maxsize=8)
def get_projector(geometry: Geometry) -> Projector:
    """The (cached) projector of ``geometry``."""
    return Projector(geometry)


def simulate_sinograms(
    activity: np.ndarray,
    geometry: Geometry,
    *,
    counts: float | np.ndarray | None,
    rng: np.random.Generator,
    mu: np.ndarray | None = None,
    oversample: int = 1,
) -> np.ndarray:
    """Noisy sinograms of ``(N, H, W)`` activity images, normalised by counts.

    Each sinogram is scaled so its expected total is ``counts`` (per sample or one
    value), drawn from a Poisson law, and divided back by the same scale: the result is
    an unbiased estimate of the noiseless projection whatever the count level, with
    relative noise ``~1/sqrt(counts)``.

    Args:
        activity: activity images ``(N, H*oversample, W*oversample)`` at the fine grid.
        geometry: the (coarse) acquisition geometry of the returned sinograms.
        counts: expected total counts per sinogram; ``None`` for noiseless data.
        rng: the noise generator.
        mu: attenuation maps (1/cm) on the same grid as ``activity``, or ``None``.
        oversample: the fine grid's factor; detector bins are averaged back to
            ``geometry.n_det`` so the data do not come from the reconstruction model.

    Returns:
        float32 ``(N, n_angles, n_det)``.
    """
    fine = geometry.upsampled(oversample) if oversample > 1 else geometry
    proj = get_projector(fine)
    att = None if mu is None else proj.attenuation_factors(mu)
    clean = proj.forward(np.asarray(activity, dtype=np.float32), att).astype(np.float64)
    if oversample > 1:
        n, a, _ = clean.shape
        clean = clean.reshape(n, a, geometry.n_det, oversample).mean(axis=-1)
    if counts is None:
        return clean.astype(np.float32)
    total = clean.reshape(len(clean), -1).sum(axis=1)
    scale = np.broadcast_to(np.asarray(counts, dtype=np.float64), total.shape) / total
    noisy = rng.poisson(clean * scale[:, None, None])
    return (noisy / scale[:, None, None]).astype(np.float32)


def ramp_filter(n_det: int, window: str = "hann", cutoff: float = 1.0) -> np.ndarray:
    """Frequency response of the band-limited ramp filter for an FFT of length ``2^k``.

    Built from the spatial ramp kernel (Kak & Slaney) so the zero frequency is right.

    Args:
        n_det: detector bins; the FFT length is the next power of two >= ``2 * n_det``.
        window: ``"ramp"`` (none) or ``"hann"``.
        cutoff: fraction of the Nyquist frequency kept by the window.
    """
    size = max(64, int(2 ** np.ceil(np.log2(2 * n_det))))
    n = np.concatenate([np.arange(1, size // 2 + 1, 2), np.arange(size // 2 - 1, 0, -2)])
    kernel = np.zeros(size)
    kernel[0] = 0.25
    kernel[1::2] = -1.0 / (np.pi * n) ** 2
    response = np.real(np.fft.fft(kernel))
    freq = np.abs(np.fft.fftfreq(size))  # cycles per bin, Nyquist = 0.5
    if window == "hann":
        f = np.clip(freq / (0.5 * cutoff), 0.0, 1.0)
        response *= 0.5 + 0.5 * np.cos(np.pi * f)
    elif window != "ramp":
        raise ValueError(f"unknown window {window!r}")
    return response


def fbp(
    sinograms: np.ndarray,
    geometry: Geometry,
    *,
    window: str = "hann",
    cutoff: float = 1.0,
    mu: np.ndarray | None = None,
) -> np.ndarray:
    """Filtered back projection of ``(N, A, D)`` sinograms to ``(N, H, W)`` images.

    Args:
        sinograms: normalised sinograms (line integrals, see the module docstring).
        geometry: their geometry.
        window: ramp filter window, ``"hann"`` or ``"ramp"``.
        cutoff: window cutoff as a fraction of Nyquist.
        mu: attenuation maps (1/cm) ``(N, H, W)``; when given, the first-order Chang
            correction (divide by the mean survival over angles) is applied.
    """
    g = geometry
    proj = get_projector(g)
    sino = np.asarray(sinograms, dtype=np.float64).reshape(-1, g.n_angles, g.n_det)
    response = ramp_filter(g.n_det, window, cutoff)
    padded = np.zeros((*sino.shape[:2], len(response)))
    padded[..., : g.n_det] = sino
    filtered = np.real(np.fft.ifft(np.fft.fft(padded, axis=-1) * response, axis=-1))
    # (pi / A) * sum_theta q_theta(s_p): A^T sums weights w per pixel-angle, q has 1/w
    images = proj.back(filtered[..., : g.n_det]) * (np.pi / g.n_angles) / g.pixel_width**2
    if mu is not None:
        att = proj.attenuation_factors(mu)
        chang = np.zeros((len(att), g.size * g.size))
        chang[:, proj.index] = 1.0 / att.mean(axis=1)
        images = images * chang.reshape(images.shape)
    return images.astype(np.float32)


def poisson_loglik(
    images: np.ndarray, sinograms: np.ndarray, geometry: Geometry, att: np.ndarray | None = None
) -> np.ndarray:
    """Poisson log-likelihood ``sum(y log(Ax) - Ax)`` (constant dropped), one per image."""
    expected = get_projector(geometry).forward(images, att).astype(np.float64)
    y = np.asarray(sinograms, dtype=np.float64).reshape(expected.shape)
    with np.errstate(divide="ignore"):
        log_e = np.where(y > 0, np.log(np.maximum(expected, 1e-300)), 0.0)
    return np.asarray((y * log_e - expected).reshape(len(y), -1).sum(axis=1))


def mlem(
    sinograms: np.ndarray,
    geometry: Geometry,
    n_iter: int = 30,
    *,
    mu: np.ndarray | None = None,
    callback: Callable[[int, np.ndarray], None] | None = None,
) -> np.ndarray:
    """Maximum-likelihood expectation maximisation, ``x <- x / (A^T 1) * A^T (y / Ax)``.

    Args:
        sinograms: ``(N, A, D)`` non-negative data (counts or normalised counts: MLEM is
            scale equivariant, so normalised data give images in activity units).
        geometry: their geometry.
        n_iter: iterations.
        mu: attenuation maps (1/cm) ``(N, H, W)`` to model attenuation, or ``None``.
        callback: called as ``callback(k, images)`` after iteration ``k`` (0 = start).

    Returns:
        float32 ``(N, H, W)``, zero outside the projector's support.
    """
    g = geometry
    proj = get_projector(g)
    y = np.clip(np.asarray(sinograms, dtype=np.float64).reshape(-1, g.n_angles, g.n_det), 0, None)
    att = None if mu is None else proj.attenuation_factors(mu).astype(np.float64)
    sens = proj.back(np.ones_like(y), att)
    inside = sens > 1e-12
    inv_sens = np.where(inside, 1.0 / np.where(inside, sens, 1.0), 0.0)
    # uniform start whose projection has the data's total
    x = inside.astype(np.float64)
    ratio = y.reshape(len(y), -1).sum(1) / proj.forward(x, att).reshape(len(y), -1).sum(1)
    x *= np.maximum(ratio, 1e-12)[:, None, None]
    if callback is not None:
        callback(0, x)
    for k in range(1, n_iter + 1):
        expected = proj.forward(x, att)
        q = np.divide(y, expected, out=np.zeros_like(y), where=expected > 1e-12)
        x = x * inv_sens * proj.back(q, att)
        if callback is not None:
            callback(k, x)
    return x.astype(np.float32)
