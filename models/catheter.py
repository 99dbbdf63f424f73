"""Catheter and guidewire segmentation in fluoroscopy (FedEFM, Do et al.).

A frame is drawn as X-ray physics would make it: an attenuation map (soft-tissue
texture, rib-like bands and a spine, contrast-filled vessel trees, and the devices) is
turned into transmission ``exp(-mu)``, blurred by the detector, hit by Poisson quantum
noise and Gaussian read noise, then windowed for display. Devices are one smooth random
path entering from a border: the first part is the catheter (thick), the rest is the
guidewire protruding from its tip (thin); some frames show a guidewire alone.

Labels: 0 background, 1 catheter, 2 guidewire.

Four **sources** mimic the data FedEFM pools: ``simulator`` (clean, flat, gentle paths),
``phantom`` (silicone vessels, moderate noise), ``animal`` (bones, more noise, tortuous)
and ``clinical`` (low dose, cluttered anatomy, most tortuous). Silo ``i`` of a federation
sees ``sources_per_silo`` sources assigned ring-wise (with 4 sources and 2 per silo: silo
``i`` sees sources ``i`` and ``i+1 mod 4``), so every source is unseen by some silos;
``Federation.tests`` has ``"source:<name>"`` per source and ``"all"``. With
``holdout_source`` set, that source is kept out of every silo (foundation pre-training)
and :meth:`CatheterTask.downstream_split` gives its fine-tune / test data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from silomesh.models.segmentation import (
    apply_options,
    build_segmenter,
    multiclass_loss,
    predict_dataset,
    segmentation_report,
)
from silomesh.models.synth import (
    border_start,
    concat,
    curve_distance,
    random_curve,
    smooth_noise,
    stream,
    tube_profile,
)
from silomesh.models.task import ArrayDataset, Federation, Silo, SplitModel, Task

logger = logging.getLogger(__name__)

CLASSES: dict[int, str] = {0: "background", 1: "catheter", 2: "guidewire"}
FOREGROUND: dict[int, str] = {1: "catheter", 2: "guidewire"}

# random-stream ids (see synth.stream)
_TRAIN, _TEST, _SHARED_TEST, _FINETUNE = 1, 2, 3, 4


@dataclass(frozen=True)
class SourceStyle:
    """How one data source looks. Attenuations are line integrals (exp(-mu) = transmission)."""

    name: str
    tissue: float  # mean soft-tissue attenuation (higher: darker frame)
    texture: float  # relative amplitude of the soft-tissue texture
    texture_sigma: float  # texture correlation length, fraction of the frame side
    vessels: int  # contrast-filled vessel trees per frame
    vessel_mu: float  # vessel attenuation on the axis
    ribs: int  # rib-like bands per frame
    spine: bool  # draw a vertebral column
    bone_mu: float  # bone attenuation on the axis
    catheter_mu: float  # catheter attenuation on the axis
    guidewire_mu: float  # guidewire attenuation on the axis
    curvature: float  # tortuosity of device and vessel paths (radians per frame side)
    photons: float | None  # detected photons per pixel at full transmission; None: no Poisson
    read_noise: float  # Gaussian electronic noise (transmission units)
    blur: float  # detector blur sigma in pixels at 64 px
    gain: float  # display window: image = gain * transmission + offset
    offset: float
    wire_only: float  # probability that a frame shows a guidewire without catheter


SOURCES: tuple[SourceStyle, ...] = (
    SourceStyle("simulator", tissue=0.25, texture=0.05, texture_sigma=0.25, vessels=0,
                vessel_mu=0.0, ribs=0, spine=False, bone_mu=0.0, catheter_mu=1.0,
                guidewire_mu=0.9, curvature=1.5, photons=None, read_noise=0.01, blur=0.0,
                gain=1.0, offset=0.0, wire_only=0.1),
    SourceStyle("phantom", tissue=0.55, texture=0.08, texture_sigma=0.15, vessels=2,
                vessel_mu=0.2, ribs=0, spine=False, bone_mu=0.0, catheter_mu=0.9,
                guidewire_mu=0.8, curvature=2.5, photons=3000.0, read_noise=0.01, blur=0.5,
                gain=1.2, offset=-0.05, wire_only=0.1),
    SourceStyle("animal", tissue=0.9, texture=0.15, texture_sigma=0.08, vessels=1,
                vessel_mu=0.25, ribs=3, spine=False, bone_mu=0.35, catheter_mu=0.8,
                guidewire_mu=0.7, curvature=3.5, photons=1500.0, read_noise=0.015, blur=0.7,
                gain=1.4, offset=0.02, wire_only=0.15),
    SourceStyle("clinical", tissue=1.2, texture=0.1, texture_sigma=0.08, vessels=3,
                vessel_mu=0.25, ribs=2, spine=True, bone_mu=0.3, catheter_mu=0.75,
                guidewire_mu=0.7, curvature=4.5, photons=1000.0, read_noise=0.02, blur=0.8,
                gain=1.5, offset=0.0, wire_only=0.2),
)  # fmt: skip
SOURCE_NAMES: tuple[str, ...] = tuple(s.name for s in SOURCES)
_SOURCE_INDEX = {s.name: i for i, s in enumerate(SOURCES)}


@dataclass(frozen=True)
class CatheterConfig:
    """Data layout and model choice; any field can be overridden per federation."""

    image_size: int = 64  # frame side in pixels; geometry scales with it
    arch: str = "unet"  # "unet" or "vit" (the FedEFM foundation backbone)
    n_train: int = 128  # training frames per silo, split evenly over its sources
    n_test: int = 32  # frames in each silo's own test set (its sources)
    n_test_source: int = 64  # frames in each shared per-source test set
    n_finetune: int = 32  # downstream fine-tuning frames of the held-out source
    sources: tuple[str, ...] = SOURCE_NAMES  # sources present in the federation
    sources_per_silo: int = 2  # ring-wise: silo i sees sources i .. i+k-1 (mod #sources)
    holdout_source: str | None = None  # kept out of all silos (downstream source)
    catheter_radius: float = 1.5  # pixels at 64 px
    guidewire_radius: float = 0.7  # pixels at 64 px (at least half a pixel is drawn)


def _heading_at(path: np.ndarray, i: int) -> float:
    j = min(max(i, 1), len(path) - 1)
    d = path[j] - path[j - 1]
    return float(np.arctan2(d[0], d[1]))


def _tube(mu: np.ndarray, points: np.ndarray, radius: float, strength: float, size: int) -> np.ndarray:
    """Add a tube's attenuation in place; return the distance map to its axis."""
    dist = curve_distance(points * size, (mu.shape[0], mu.shape[1]), reach=radius + 1.0)
    mu += strength * tube_profile(dist, radius)
    return dist


def render_frame(rng: np.random.Generator, style: SourceStyle, cfg: CatheterConfig) -> tuple[np.ndarray, np.ndarray]:
    """Draw one frame of ``style``.

    Returns:
        image ``(H, W)`` float32 in [0, 1] and mask ``(H, W)`` int64 in {0, 1, 2}.
    """
    size = cfg.image_size
    scale = size / 64.0
    shape = (size, size)
    yy, xx = np.mgrid[0 : 1 : size * 1j, 0 : 1 : size * 1j]

    # soft tissue: mean level, texture, a thickness gradient across the body
    mu = np.full(shape, style.tissue)
    mu += style.tissue * style.texture * smooth_noise(rng, shape, style.texture_sigma * size)
    g = rng.uniform(-0.3, 0.3, size=2)
    mu += style.tissue * (g[0] * (yy - 0.5) + g[1] * (xx - 0.5))

    # bones: broad gently curved bands (ribs) and a column of vertebrae
    for _ in range(style.ribs):
        start, heading = border_start(rng, margin=0.1)
        rib = random_curve(rng, start, heading, rng.uniform(1.0, 1.6), 1.5)
        _tube(mu, rib, rng.uniform(4.5, 7.0) * scale, style.bone_mu, size)
    if style.spine:
        x0, half = rng.uniform(0.3, 0.7), rng.uniform(0.08, 0.12)
        across = np.sqrt(np.clip(1.0 - ((xx - x0) / half) ** 2, 0.0, 1.0))
        period, phase = rng.uniform(0.18, 0.25), rng.uniform(0, 1)
        vertebrae = 0.75 + 0.25 * np.cos(2 * np.pi * (yy / period + phase))
        mu += style.bone_mu * 1.5 * across * vertebrae

    # contrast-filled vessel trees: a trunk with a few thinner branches
    for _ in range(style.vessels):
        start, heading = border_start(rng)
        trunk = random_curve(rng, start, heading, rng.uniform(0.8, 1.4), 0.7 * style.curvature)
        radius = rng.uniform(1.2, 2.5) * scale
        _tube(mu, trunk, radius, style.vessel_mu, size)
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(len(trunk) // 4, len(trunk)))
            turn = rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.0)
            branch = random_curve(rng, trunk[i], _heading_at(trunk, i) + turn, rng.uniform(0.2, 0.6), style.curvature)
            _tube(mu, branch, radius * rng.uniform(0.5, 0.8), style.vessel_mu, size)

    # devices: one path; the catheter first, the guidewire protruding from its tip
    start, heading = border_start(rng, margin=0.05)
    path = random_curve(rng, start, heading, rng.uniform(0.9, 1.5), style.curvature, correlation=0.2)
    cut = 0 if rng.random() < style.wire_only else int(len(path) * rng.uniform(0.45, 0.85))
    r_cath = cfg.catheter_radius * scale * rng.uniform(0.85, 1.15)
    r_wire = max(0.5, cfg.guidewire_radius * scale)
    mask = np.zeros(shape, dtype=np.int64)
    if cut > 1:
        d_cath = _tube(mu, path[:cut], r_cath, style.catheter_mu, size)
        mask[d_cath <= r_cath] = 1
    d_wire = _tube(mu, path[max(cut - 1, 0) :], r_wire, style.guidewire_mu, size)
    mask[(d_wire <= r_wire) & (mask == 0)] = 2

    # imaging chain: transmission, detector blur, quantum and read noise, display window
    img = np.exp(-mu)
    if style.blur > 0:
        img = ndimage.gaussian_filter(img, style.blur * scale)
    if style.photons is not None:
        img = rng.poisson(img * style.photons) / style.photons
    img = img + rng.normal(0.0, style.read_noise, shape)
    img = np.clip(style.gain * img + style.offset, 0.0, 1.0)
    return img.astype(np.float32), mask


def generate(source: str, n: int, rng: np.random.Generator, cfg: CatheterConfig) -> ArrayDataset:
    """``n`` frames of one source: ``image`` (N, 1, H, W), ``mask`` (N, H, W), ``source`` (N,).

    Raises:
        ValueError: for an unknown source.
    """
    if source not in _SOURCE_INDEX:
        raise ValueError(f"unknown source {source!r}; known: {', '.join(SOURCE_NAMES)}")
    style = SOURCES[_SOURCE_INDEX[source]]
    size = cfg.image_size
    images = np.empty((n, 1, size, size), dtype=np.float32)
    masks = np.empty((n, size, size), dtype=np.int64)
    for i in range(n):
        images[i, 0], masks[i] = render_frame(rng, style, cfg)
    index = np.full(n, _SOURCE_INDEX[source], dtype=np.int64)
    return ArrayDataset({"image": images, "mask": masks, "source": index}, "mask")


def _split_counts(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class CatheterTask(Task):
    """Catheter / guidewire segmentation over sources with distinct styles."""

    name = "catheter"
    metric = "dice"

    def __init__(self, config: CatheterConfig | None = None, **overrides: Any) -> None:
        self.config = self._checked(apply_options(config or CatheterConfig(), overrides, self.name))

    @staticmethod
    def _checked(cfg: CatheterConfig) -> CatheterConfig:
        unknown = [s for s in cfg.sources if s not in _SOURCE_INDEX]
        if unknown or not cfg.sources:
            raise ValueError(f"unknown sources {unknown}; known: {', '.join(SOURCE_NAMES)}")
        if cfg.holdout_source is not None and cfg.holdout_source not in cfg.sources:
            raise ValueError(f"holdout_source {cfg.holdout_source!r} is not among {cfg.sources}")
        if cfg.arch not in ("unet", "vit"):
            raise ValueError(f"unknown architecture {cfg.arch!r}; choose 'unet' or 'vit'")
        if cfg.image_size < 16 or cfg.sources_per_silo < 1:
            raise ValueError("image_size must be >= 16 and sources_per_silo >= 1")
        return cfg

    def training_sources(self, cfg: CatheterConfig | None = None) -> list[str]:
        """Sources silos may train on (all but the held-out one), in ring order."""
        cfg = cfg or self.config
        return [s for s in cfg.sources if s != cfg.holdout_source]

    def silo_sources(self, silo: int, cfg: CatheterConfig | None = None) -> list[str]:
        """The sources silo ``silo`` sees: ``k`` consecutive ones, ring-wise."""
        pool = self.training_sources(cfg)
        if not pool:
            raise ValueError("no training source left after the holdout")
        k = min((cfg or self.config).sources_per_silo, len(pool))
        return [pool[(silo + j) % len(pool)] for j in range(k)]

    def source_test(self, source: str, seed: int, cfg: CatheterConfig | None = None) -> ArrayDataset:
        """The shared test set of one source (same for any number of silos)."""
        cfg = cfg or self.config
        return generate(source, cfg.n_test_source, stream(seed, _SHARED_TEST, _SOURCE_INDEX[source]), cfg)

    def make_federation(self, n_silos: int, seed: int, **options: Any) -> Federation:
        """Silo ``i`` trains on its ring-assigned sources; see the module docstring."""
        if n_silos < 1:
            raise ValueError(f"n_silos must be >= 1, got {n_silos}")
        cfg = self._checked(apply_options(self.config, options, self.name, fixed=("arch",)))
        silos = []
        for i in range(n_silos):
            names = self.silo_sources(i, cfg)
            parts = zip(names, _split_counts(cfg.n_train, len(names)), strict=True)
            train = concat([
                generate(s, n, stream(seed, _TRAIN, i, _SOURCE_INDEX[s]), cfg) for s, n in parts
            ])  # fmt: skip
            tparts = zip(names, _split_counts(cfg.n_test, len(names)), strict=True)
            test = concat([
                generate(s, n, stream(seed, _TEST, i, _SOURCE_INDEX[s]), cfg) for s, n in tparts
            ])  # fmt: skip
            info = {"sources": names, "holdout_source": cfg.holdout_source}
            silos.append(Silo(f"silo{i}", train, test, info))
        tests = {f"source:{s}": self.source_test(s, seed, cfg) for s in cfg.sources}
        tests["all"] = concat(list(tests.values()))
        logger.debug("catheter: %d silos, seed %d, sources %s", n_silos, seed, cfg.sources)
        return Federation(self.name, seed, silos, tests)

    def downstream_split(
        self, seed: int, source: str | None = None, **options: Any
    ) -> tuple[ArrayDataset, ArrayDataset]:
        """Fine-tune and test data of the downstream (held-out) source.

        The test part equals ``make_federation(..., seed).tests["source:<source>"]``.

        Raises:
            ValueError: if no source is given and the config has no ``holdout_source``.
        """
        cfg = self._checked(apply_options(self.config, options, self.name, fixed=("arch",)))
        source = source or cfg.holdout_source
        if source is None:
            raise ValueError("give a source or set holdout_source")
        idx = _SOURCE_INDEX.get(source)
        if idx is None:
            raise ValueError(f"unknown source {source!r}; known: {', '.join(SOURCE_NAMES)}")
        finetune = generate(source, cfg.n_finetune, stream(seed, _FINETUNE, idx), cfg)
        return finetune, self.source_test(source, seed, cfg)

    def make_model(self, size: str = "tiny", seed: int = 0) -> SplitModel:
        """A U-Net (or ViT, ``arch="vit"``) with 3 softmax outputs."""
        cfg = self.config
        return build_segmenter(cfg.arch, size, seed, in_channels=1, out_channels=3, image_size=cfg.image_size)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy + soft Dice on catheter and guidewire."""
        return multiclass_loss(model(batch["image"]), batch["mask"], list(FOREGROUND))

    @torch.no_grad()
    def predict(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Label map ``(B, H, W)`` from images ``(B, 1, H, W)``."""
        return model(images).argmax(1)

    def evaluate(self, model: nn.Module, data: ArrayDataset) -> dict[str, float]:
        """``dice`` (mean of catheter and guidewire), ``iou``, and per class."""
        pred = predict_dataset(model, data, self.predict)
        return segmentation_report(pred, data["mask"], FOREGROUND)
