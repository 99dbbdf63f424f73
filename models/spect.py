"""The ``spect`` task: reconstruct myocardial perfusion SPECT slices from noisy sinograms.

Data (made, not downloaded): torso phantoms with or without a myocardial infarct
(:mod:`silomesh.models.spect_phantom`), projected with attenuation onto a parallel-beam
sinogram and drawn with Poisson noise at a silo's count level
(:mod:`silomesh.models.spect_recon`). To avoid the "inverse crime", sinograms are
simulated on a grid ``oversample`` times finer than the reconstruction grid.

Batches hold ``"image"`` (the sinogram, the network input, ``(N, 1, A, D)``, divided by
its count scale so every dose level has the same units), ``"target"`` (the activity,
``(N, 1, H, W)``), ``"infarct"`` (0/1), ``"counts"`` (expected total counts) and, with
attenuation, ``"mu"`` (the attenuation map in 1/cm, as a SPECT/CT would give; used by
the classical baselines, not by the network).

Federation layout: silos differ in dose (count levels log-spaced between the low and
the high level) and in infarct prevalence; shared test sets ``all``, ``infarct``,
``normal``, ``low_dose`` and ``high_dose``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from silomesh.models.metrics import psnr, ssim
from silomesh.models.recon import ReconNet, recon_config
from silomesh.models.spect_phantom import PhantomConfig, block_mean, make_phantom
from silomesh.models.spect_recon import (
    Geometry,
    fbp,
    get_projector,
    mlem,
    simulate_sinograms,
)
from silomesh.models.task import ArrayDataset, Federation, Silo, Task

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpectConfig:
    """Geometry, acquisition and federation layout of the ``spect`` task."""

    size: int = 64  # image side (pixels)
    n_angles: int = 0  # projection angles over the arc; 0 means ``size``
    arc_deg: float = 360.0  # 180 or 360
    attenuation: bool = True  # attenuate the projections (mu map from the phantom)
    oversample: int = 2  # simulate data on a grid this much finer than the images
    count_levels: tuple[float, float] = (5e4, 5e5)  # expected counts: low and high dose
    infarct_rates: tuple[float, float] = (0.1, 0.6)  # prevalence range over silos
    n_train: int = 128  # training samples per silo
    n_silo_test: int = 32  # each silo's own test samples
    n_test: int = 128  # shared test set ("all"), half low dose, half infarcts
    l1_weight: float = 0.1  # loss = MSE + l1_weight * L1
    phantom: PhantomConfig = field(default_factory=PhantomConfig)

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.size, self.n_angles or self.size, 0, self.arc_deg, self.phantom.fov_cm)


def make_dataset(
    n: int,
    seed: int | np.random.SeedSequence,
    config: SpectConfig,
    *,
    counts: float | Sequence[float] | np.ndarray,
    infarct_rate: float,
    chunk: int = 32,
) -> ArrayDataset:
    """Generate ``n`` samples (see the module docstring for the keys).

    Args:
        n: number of samples.
        seed: seed of everything random here (phantoms, infarct draws, noise).
        config: task configuration.
        counts: expected total counts of each sinogram (one value or one per sample).
        infarct_rate: fraction of samples with an infarct (rounded to whole samples,
            assigned at random).
        chunk: samples simulated at once (bounds memory).
    """
    cfg = config
    geo = cfg.geometry
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    s_layout, s_phantoms, s_noise = ss.spawn(3)
    rng = np.random.default_rng(s_layout)
    infarct = np.zeros(n, dtype=np.int64)
    infarct[: round(infarct_rate * n)] = 1
    infarct = rng.permutation(infarct)
    count = np.broadcast_to(np.asarray(counts, dtype=np.float64), (n,)).copy()
    k = max(1, cfg.oversample)
    fine_cfg = dataclasses.replace(cfg.phantom, supersample=max(1, cfg.phantom.supersample // k))
    noise = np.random.default_rng(s_noise)
    phantom_seeds = s_phantoms.spawn(n)
    sinos, targets, mus = [], [], []
    for start in range(0, n, chunk):
        idx = range(start, min(n, start + chunk))
        ph = [
            make_phantom(
                np.random.default_rng(phantom_seeds[i]),
                geo.size * k,
                infarct=bool(infarct[i]),
                config=fine_cfg,
            )
            for i in idx
        ]
        act = np.stack([p.activity for p in ph])
        mu = np.stack([p.mu for p in ph])
        sinos.append(
            simulate_sinograms(
                act,
                geo,
                counts=count[start : start + len(ph)],
                rng=noise,
                mu=mu if cfg.attenuation else None,
                oversample=k,
            )
        )
        targets.append(block_mean(act, k))
        mus.append(block_mean(mu, k))
    arrays: dict[str, np.ndarray] = {
        "image": np.concatenate(sinos)[:, None].astype(np.float32),
        "target": np.concatenate(targets)[:, None].astype(np.float32),
        "infarct": infarct,
        "counts": count.astype(np.float32),
    }
    if cfg.attenuation:
        arrays["mu"] = np.concatenate(mus)[:, None].astype(np.float32)
    return ArrayDataset(arrays, label_kind="image")


@lru_cache(maxsize=8)
def attenuation_gain(config: SpectConfig, n: int = 16) -> np.ndarray | None:
    """Mean first-order Chang factor of ``n`` reference phantoms, ``(H, W)``.

    Used to initialise :class:`ReconNet`'s back-projection gain, so a fresh network
    starts as an FBP with a population-average attenuation correction. Deterministic
    (fixed seeds) and cached: do not modify the result. ``None`` without attenuation.
    """
    if not config.attenuation:
        return None
    geo = config.geometry
    proj = get_projector(geo)
    mu = np.stack(
        [
            make_phantom(10_000 + i, geo.size, infarct=False, config=config.phantom).mu
            for i in range(n)
        ]
    )
    chang = np.ones((n, geo.size * geo.size))
    chang[:, proj.index] = 1.0 / proj.attenuation_factors(mu).mean(axis=1)
    return np.asarray(chang.mean(axis=0).reshape(geo.size, geo.size))


def image_metrics(recon: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Mean PSNR, SSIM and NRMSE over images ``(N, [1,] H, W)``; range = each target's."""
    r = np.asarray(recon, dtype=np.float64).reshape(len(recon), *target.shape[-2:])
    t = np.asarray(target, dtype=np.float64).reshape(r.shape)
    nrmse = np.sqrt(((r - t) ** 2).sum(axis=(1, 2)) / (t**2).sum(axis=(1, 2)))
    return {
        "psnr": float(np.mean([psnr(a, b) for a, b in zip(r, t, strict=True)])),
        "ssim": float(np.mean([ssim(a, b) for a, b in zip(r, t, strict=True)])),
        "nrmse": float(nrmse.mean()),
    }


@torch.no_grad()
def predict(model: nn.Module, sinograms: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Network reconstructions ``(N, 1, H, W)`` of ``(N, 1, A, D)`` sinograms (eval mode)."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        out = [
            model(torch.from_numpy(np.ascontiguousarray(sinograms[i : i + batch_size])).to(device))
            .cpu()
            .numpy()
            for i in range(0, len(sinograms), batch_size)
        ]
    finally:
        model.train(was_training)
    return np.concatenate(out)


def run_baselines(
    data: ArrayDataset,
    geometry: Geometry,
    *,
    model: nn.Module | None = None,
    methods: Sequence[str] = ("fbp", "mlem", "network"),
    mlem_iterations: int = 30,
) -> dict[str, dict[str, float]]:
    """Reconstruct ``data`` with each method; PSNR/SSIM/NRMSE and time per image.

    Methods: ``fbp`` (Hann ramp, Chang attenuation correction when ``data`` has
    ``"mu"``), ``fbp_noac`` (no correction), ``mlem`` (attenuation modelled when ``data``
    has ``"mu"``), ``mlem_noac`` (not modelled) and ``network`` (skipped when ``model``
    is ``None``; it never sees ``"mu"``).

    Returns:
        ``{method: {"psnr", "ssim", "nrmse", "ms_per_image"}}``.
    """
    sino = data["image"][:, 0]
    target = data["target"][:, 0]
    mu = data["mu"][:, 0] if "mu" in data.arrays else None
    results: dict[str, dict[str, float]] = {}
    for method in methods:
        t0 = time.perf_counter()
        if method == "fbp":
            recon = fbp(sino, geometry, mu=mu)
        elif method == "fbp_noac":
            recon = fbp(sino, geometry)
        elif method == "mlem":
            recon = mlem(sino, geometry, mlem_iterations, mu=mu)
        elif method == "mlem_noac":
            recon = mlem(sino, geometry, mlem_iterations)
        elif method == "network":
            if model is None:
                continue
            recon = predict(model, data["image"])
        else:
            raise ValueError(f"unknown method {method!r}")
        seconds = time.perf_counter() - t0
        results[method] = image_metrics(recon, target)
        results[method]["ms_per_image"] = 1000.0 * seconds / max(1, len(data))
        logger.info("%s on %d images: %s", method, len(data), results[method])
    return results


class SpectTask(Task):
    """SPECT reconstruction from sinograms; metric PSNR (dB, higher is better).

    Geometry options given to the constructor or to :meth:`make_federation` (any
    :class:`SpectConfig` field) update :attr:`config`, so models made afterwards
    match the data.
    """

    name = "spect"
    metric = "psnr"

    def __init__(self, config: SpectConfig | None = None, **options: Any) -> None:
        self.config = dataclasses.replace(config or SpectConfig(), **options)

    @property
    def geometry(self) -> Geometry:
        return self.config.geometry

    def make_federation(self, n_silos: int, seed: int, **options: Any) -> Federation:
        """Silos with log-spaced count levels and shuffled infarct prevalences.

        Raises:
            ValueError: if ``n_silos < 1`` or an option is not a :class:`SpectConfig` field.
        """
        if n_silos < 1:
            raise ValueError("need at least one silo")
        if options:
            self.config = dataclasses.replace(self.config, **options)
        cfg = self.config
        low, high = cfg.count_levels
        mid = np.sqrt(low * high)
        levels = np.geomspace(low, high, n_silos) if n_silos > 1 else np.array([mid])
        root = np.random.SeedSequence(seed)
        s_layout, s_tests, *s_silos = root.spawn(2 + n_silos)
        rates = (
            np.linspace(*cfg.infarct_rates, n_silos)
            if n_silos > 1
            else np.array([np.mean(cfg.infarct_rates)])
        )
        rates = np.random.default_rng(s_layout).permutation(rates)
        silos = []
        for i in range(n_silos):
            s_train, s_test = s_silos[i].spawn(2)
            level, rate = float(levels[i]), float(rates[i])
            train = make_dataset(cfg.n_train, s_train, cfg, counts=level, infarct_rate=rate)
            test = make_dataset(cfg.n_silo_test, s_test, cfg, counts=level, infarct_rate=rate)
            silos.append(
                Silo(
                    name=f"silo{i}",
                    train=train,
                    test=test,
                    info={
                        "count_level": level,
                        "infarct_rate": rate,
                        "dose": "low" if level < mid * (1 - 1e-9) else "high",
                    },
                )
            )
        test_counts = np.where(np.arange(cfg.n_test) % 2 == 0, low, high)
        all_ = make_dataset(cfg.n_test, s_tests, cfg, counts=test_counts, infarct_rate=0.5)
        tests = {
            "all": all_,
            "infarct": all_.subset(np.flatnonzero(all_["infarct"] == 1)),
            "normal": all_.subset(np.flatnonzero(all_["infarct"] == 0)),
            "low_dose": all_.subset(np.flatnonzero(all_["counts"] == np.float32(low))),
            "high_dose": all_.subset(np.flatnonzero(all_["counts"] == np.float32(high))),
        }
        logger.info(
            "spect federation: %d silos, counts %s, infarct rates %s",
            n_silos,
            [f"{x:.3g}" for x in levels],
            [f"{x:.2f}" for x in rates],
        )
        return Federation(task=self.name, seed=seed, silos=silos, tests=tests)

    def make_model(self, size: str = "tiny", seed: int = 0) -> ReconNet:
        """A :class:`ReconNet` for this task's geometry (``tiny``, ``small`` or ``base``)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return ReconNet(recon_config(size, self.geometry), gain=attenuation_gain(self.config))

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """MSE plus ``l1_weight`` times L1 between reconstruction and activity."""
        pred = model(batch["image"])
        target = batch["target"]
        return F.mse_loss(pred, target) + self.config.l1_weight * F.l1_loss(pred, target)

    def evaluate(self, model: nn.Module, data: ArrayDataset) -> dict[str, float]:
        """Mean PSNR, SSIM and NRMSE of the network's reconstructions of ``data``."""
        return image_metrics(predict(model, data["image"]), data["target"])

    def baselines(
        self, data: ArrayDataset, model: nn.Module | None = None, **kwargs: Any
    ) -> dict[str, dict[str, float]]:
        """:func:`run_baselines` with this task's geometry."""
        return run_baselines(data, self.geometry, model=model, **kwargs)
