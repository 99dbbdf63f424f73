"""Partially labelled multi-organ segmentation in abdominal CT (SegViz, Kanhere et al.).

A phantom is painted in Hounsfield units, axial slice by slice: air, a body outline with
a subcutaneous fat layer, textured visceral fat and bowel loops (some with gas), back
muscles, spine, aorta and vena cava, and the labelled organs — liver, spleen, kidneys,
pancreas — as rough ellipsoids placed like the anatomy (radiological convention: the
patient's right is on the image's left). Scanner noise is added and the abdominal window
[-200, 300] HU is mapped to [0, 1]. 2D data are single axial slices at a random height;
the 3D option makes small volumes ``(D, H, W)`` of the same phantom.

**Partial labels**: silo ``k`` annotates only organ ``k mod #organs``; the other organs
are background in its masks. Every dataset carries ``labelled`` ``(N, #organs)`` (bool),
saying which organs an image's mask annotates, so losses and metrics ignore what was
never annotated. Test sets are fully labelled.

**Model output**: one sigmoid channel per organ (no background channel); channel ``k`` is
organ ``k`` (label value ``k + 1``). Row ``k`` of the head (``head.weight[k]``) is organ
``k``'s detector, so SegViz can keep each silo's head local, or assemble a full model
from the organ rows of different silos. Prediction: the most probable organ where its
probability exceeds 0.5, else background.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from silomesh.models.metrics import dice_per_class, iou_per_class
from silomesh.models.segmentation import (
    apply_options,
    binary_loss,
    build_segmenter,
    predict_dataset,
)
from silomesh.models.synth import concat, irregular_blob, smooth_noise, stream
from silomesh.models.task import ArrayDataset, Federation, Silo, SplitModel, Task

logger = logging.getLogger(__name__)

ORGANS: tuple[str, ...] = ("liver", "spleen", "kidneys", "pancreas")
WINDOW_HU = (-200.0, 300.0)

# (centre z, y, x), (radii z, y, x), in-plane angle, mean HU — one row per ellipsoid
_Ellipsoid = tuple[tuple[float, float, float], tuple[float, float, float], float, float]
_ANATOMY: dict[str, list[_Ellipsoid]] = {
    "liver": [((-0.25, -0.05, -0.38), (0.7, 0.42, 0.40), 0.0, 105.0),
              ((-0.35, -0.30, 0.02), (0.45, 0.17, 0.30), 0.3, 105.0)],
    "spleen": [((-0.2, 0.15, 0.58), (0.45, 0.25, 0.14), -0.6, 118.0)],
    "kidneys": [((0.30, 0.40, 0.40), (0.45, 0.16, 0.11), 0.5, 170.0),
                ((0.38, 0.40, -0.40), (0.45, 0.16, 0.11), -0.5, 170.0)],
    "pancreas": [((0.05, 0.12, 0.12), (0.22, 0.07, 0.30), -0.35, 85.0)],
}  # fmt: skip

# random-stream ids
_TRAIN, _TEST, _STYLE = 1, 2, 3


@dataclass(frozen=True)
class OrgansConfig:
    """Data layout and model choice; any field can be overridden per federation."""

    organs: tuple[str, ...] = ORGANS  # labelled organs, in channel order
    dims: int = 2  # 2: axial slices (N, 1, H, W); 3: volumes (N, 1, D, H, W)
    image_size: int = 64  # slice side for dims=2
    volume_shape: tuple[int, int, int] = (16, 32, 32)  # (D, H, W) for dims=3
    n_train: int = 96  # training images (or volumes) per silo
    n_test: int = 32  # fully labelled test images per silo
    partial: bool = True  # silo k annotates only organ k; False: fully labelled silos
    arch: str = "unet"  # "unet" (2D or 3D) or "vit" (2D only)


@dataclass(frozen=True)
class ScannerStyle:
    """Per-silo acquisition differences."""

    noise_hu: float  # Gaussian noise std in HU
    offset_hu: float  # calibration offset
    enhancement: float  # contrast-phase factor on organ and vessel enhancement
    blur: float  # reconstruction-kernel blur in pixels at 64 px


def scanner_style(seed: int, silo: int) -> ScannerStyle:
    """The scanner of one silo (deterministic per seed and silo)."""
    rng = stream(seed, _STYLE, silo)
    return ScannerStyle(
        noise_hu=float(rng.uniform(10.0, 30.0)),
        offset_hu=float(rng.uniform(-15.0, 15.0)),
        enhancement=float(rng.uniform(0.85, 1.15)),
        blur=float(rng.uniform(0.3, 0.9)),
    )


def _grid(cfg: OrgansConfig, z: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised (z, y, x) coordinates: one slice at ``z`` (2D) or a volume (3D)."""
    if cfg.dims == 2:
        d, h, w = 1, cfg.image_size, cfg.image_size
        zs = np.array([z])
    else:
        d, h, w = cfg.volume_shape
        zs = np.linspace(-0.8, 0.8, d)
    zz, yy, xx = np.meshgrid(zs, np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    return zz, yy, xx


def render_phantom(rng: np.random.Generator, cfg: OrgansConfig, style: ScannerStyle) -> tuple[np.ndarray, np.ndarray]:
    """Draw one slice or volume.

    Returns:
        image ``(D, H, W)`` float32 in [0, 1] (``D == 1`` in 2D) and mask ``(D, H, W)``
        int64 with organ ``k`` as ``k + 1`` (for ``cfg.organs``).
    """
    grid = _grid(cfg, float(rng.uniform(-0.2, 0.3)))
    zz, yy, xx = grid
    shape = zz.shape
    px = shape[-1] / 64.0  # pixels per pixel-at-64
    shift = rng.normal(0.0, 0.03, size=2)
    grow = rng.uniform(0.92, 1.08)
    yy, xx = (yy - shift[0]) / grow, (xx - shift[1]) / grow
    grid = (zz, yy, xx)
    sigma = (0.5, 3.0 * px, 3.0 * px) if cfg.dims == 3 else (0.0, 3.0 * px, 3.0 * px)
    hu = np.full(shape, -1000.0)
    mask = np.zeros(shape, dtype=np.int64)

    def blob(centre: tuple[float, ...], radii: tuple[float, ...], angle: float, rough: float) -> np.ndarray:
        return irregular_blob(rng, grid, centre, radii, angle, rough, sigma) <= 1.0

    inf = np.inf
    body = blob((0.0, 0.05, 0.0), (inf, 0.72, 0.92), 0.0, 0.03)
    inner = blob((0.0, 0.05, 0.0), (inf, 0.64, 0.84), 0.0, 0.05)
    hu[body] = -100.0  # subcutaneous fat
    texture = smooth_noise(rng, shape, sigma)
    hu[inner] = np.where(texture[inner] > 0.3, 40.0, -90.0)  # muscle / bowel wall vs visceral fat
    for side in (-1.0, 1.0):  # back muscles
        hu[blob((0.0, 0.58, side * 0.2), (inf, 0.12, 0.15), 0.0, 0.1)] = 50.0
    for _ in range(int(rng.integers(4, 9))):  # bowel loops, fluid or gas
        c = (
            float(rng.uniform(-0.6, 0.6)),
            float(rng.uniform(-0.4, 0.3)),
            float(rng.uniform(-0.4, 0.5)),
        )
        r = float(rng.uniform(0.05, 0.1))
        hu[blob(c, (0.3, r, r), 0.0, 0.1) & inner] = -700.0 if rng.random() < 0.4 else 20.0
    hu[blob((0.0, 0.25, 0.06), (inf, 0.055, 0.055), 0.0, 0.0)] = 180.0 * style.enhancement  # aorta
    hu[blob((0.0, 0.22, -0.12), (inf, 0.06, 0.07), 0.0, 0.05)] = 130.0 * style.enhancement  # IVC

    for k, organ in enumerate(cfg.organs):
        for centre, radii, angle, level in _ANATOMY[organ]:
            oc = tuple(float(v) for v in np.asarray(centre) + rng.normal(0.0, 0.03, 3))
            orad = tuple(float(v) for v in np.asarray(radii) * rng.uniform(0.85, 1.15, 3))
            inside = blob(oc, orad, angle + float(rng.normal(0.0, 0.1)), 0.15) & inner
            hu[inside] = level * style.enhancement + rng.normal(0.0, 5.0)
            mask[inside] = k + 1
            if organ == "kidneys":  # darker medulla inside the cortex
                med = blob(oc, tuple(v * 0.55 for v in orad), angle, 0.1) & inside
                hu[med] = 0.7 * level * style.enhancement

    vertebra = blob((0.0, 0.45, 0.0), (inf, 0.11, 0.11), 0.0, 0.0)
    hu[vertebra] = 700.0  # cortical shell
    hu[blob((0.0, 0.45, 0.0), (inf, 0.085, 0.085), 0.0, 0.0)] = 300.0  # cancellous bone
    mask[vertebra] = 0

    hu = hu + 15.0 * smooth_noise(rng, shape, sigma) * (hu > -500)  # tissue inhomogeneity
    blur = (0.0, style.blur * px, style.blur * px)
    hu = ndimage.gaussian_filter(hu, blur) + rng.normal(0.0, style.noise_hu, shape)
    lo, hi = WINDOW_HU
    img = np.clip((hu + style.offset_hu - lo) / (hi - lo), 0.0, 1.0)
    return img.astype(np.float32), mask


def generate(
    n: int, rng: np.random.Generator, cfg: OrgansConfig, style: ScannerStyle, organ: int | None
) -> ArrayDataset:
    """``n`` images; ``organ`` is the only annotated organ index, or ``None`` for all.

    Returns:
        ``image`` (N, 1, H, W) or (N, 1, D, H, W), ``mask`` (N, [D,] H, W) int64 and
        ``labelled`` (N, #organs) bool.
    """
    images, masks = [], []
    for _ in range(n):
        img, mask = render_phantom(rng, cfg, style)
        if organ is not None:
            mask = np.where(mask == organ + 1, mask, 0)
        if cfg.dims == 2:
            img, mask = img[0], mask[0]
        images.append(img[None])
        masks.append(mask)
    labelled = np.zeros((n, len(cfg.organs)), dtype=bool)
    labelled[:, slice(None) if organ is None else organ] = True
    return ArrayDataset({"image": np.stack(images), "mask": np.stack(masks), "labelled": labelled}, "mask")


class OrgansTask(Task):
    """Multi-organ segmentation where each silo annotates one organ (2D or 3D)."""

    name = "organs"
    metric = "dice"

    def __init__(self, config: OrgansConfig | None = None, **overrides: Any) -> None:
        self.config = self._checked(apply_options(config or OrgansConfig(), overrides, self.name))

    @staticmethod
    def _checked(cfg: OrgansConfig) -> OrgansConfig:
        unknown = [o for o in cfg.organs if o not in _ANATOMY]
        if unknown or not cfg.organs:
            raise ValueError(f"unknown organs {unknown}; known: {', '.join(ORGANS)}")
        if cfg.dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {cfg.dims}")
        if cfg.arch == "vit" and cfg.dims == 3:
            raise ValueError("the ViT backbone is 2D only")
        return cfg

    def make_federation(self, n_silos: int, seed: int, **options: Any) -> Federation:
        """Silo ``k`` annotates organ ``k mod #organs`` (all organs if ``partial=False``)."""
        if n_silos < 1:
            raise ValueError(f"n_silos must be >= 1, got {n_silos}")
        fixed = ("organs", "dims", "arch")
        cfg = self._checked(apply_options(self.config, options, self.name, fixed=fixed))
        silos = []
        for i in range(n_silos):
            style = scanner_style(seed, i)
            organ = i % len(cfg.organs) if cfg.partial else None
            train = generate(cfg.n_train, stream(seed, _TRAIN, i), cfg, style, organ)
            test = generate(cfg.n_test, stream(seed, _TEST, i), cfg, style, None)
            info = {
                "organ": None if organ is None else cfg.organs[organ],
                "labelled_organs": list(cfg.organs) if organ is None else [cfg.organs[organ]],
                "scanner": asdict(style),
            }
            silos.append(Silo(f"silo{i}", train, test, info))
        tests = {"all": concat([s.test for s in silos])}
        logger.debug("organs federation: %d silos, seed %d, dims %d", n_silos, seed, cfg.dims)
        return Federation(self.name, seed, silos, tests)

    def make_model(self, size: str = "tiny", seed: int = 0) -> SplitModel:
        """A 2D/3D U-Net (or 2D ViT) with one sigmoid output per organ, biased to absent."""
        cfg = self.config
        return build_segmenter(
            cfg.arch, size, seed, in_channels=1, out_channels=len(cfg.organs), dims=cfg.dims,
            image_size=cfg.image_size, head_bias=-2.0,
        )  # fmt: skip

    distills = True

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """BCE + soft Dice on the annotated organ channels only (:meth:`targets`).

        With ``batch["teacher_logits"]`` (see :attr:`Task.distills`) the organs the batch
        does not annotate are trained too, with the teacher's probabilities as soft targets
        under the same BCE + soft Dice: what the model knew of the other silos' organs when
        it arrived is kept rather than left to drift. The Dice term does not stop at the
        teacher's probabilities but sharpens them (soft pseudo-labels); BCE alone on those
        channels, a plain distillation, did far worse in ``bench/probe_pooled.py --distill``
        (docs/RESULTS.md, "Organs: keeping what a silo does not label").
        """
        logits = model(batch["image"])  # (B, K, *S)
        target, valid = self.targets(batch, logits.shape[1], logits.dim() - 2)
        return binary_loss(logits, target.to(logits.dtype), valid)

    @staticmethod
    def targets(batch: dict[str, torch.Tensor], organs: int, spatial: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-channel targets ``(B, K, *S)`` and pixel weights (None: every pixel counts).

        Annotated organs: the mask. Without a teacher the other channels weigh nothing.
        With ``teacher_logits`` they count everywhere, towards the teacher's probability,
        except on pixels annotated as another organ, where they are 0 (organs do not overlap).
        """
        mask = batch["mask"]
        organ_ids = torch.arange(1, organs + 1, device=mask.device).view(1, organs, *([1] * spatial))
        target = (mask.unsqueeze(1) == organ_ids).float()  # (B, K, *S)
        labelled = batch.get("labelled")
        if labelled is None:
            return target, None
        valid = labelled.float().view(*labelled.shape, *([1] * spatial))
        teacher = batch.get("teacher_logits")
        if teacher is None:
            return target, valid
        taken = (target * valid).amax(dim=1, keepdim=True)  # pixels annotated as some organ
        soft = torch.sigmoid(teacher.float()) * (1 - taken)
        return valid * target + (1 - valid) * soft, None

    @torch.no_grad()
    def predict(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Label map: most probable organ above 0.5, else background."""
        probs = torch.sigmoid(model(images))  # (B, K, *S)
        best, idx = probs.max(dim=1)
        return torch.where(best > 0.5, idx + 1, torch.zeros_like(idx))

    def evaluate(self, model: nn.Module, data: ArrayDataset) -> dict[str, float]:
        """Per-organ Dice and IoU over the images that annotate the organ; ``dice`` = mean."""
        pred = predict_dataset(model, data, self.predict, batch_size=16)
        target = data["mask"]
        labelled = data.arrays.get("labelled")
        report: dict[str, float] = {}
        dices, ious = [], []
        for k, organ in enumerate(self.config.organs):
            rows = np.ones(len(data), dtype=bool) if labelled is None else labelled[:, k]
            if not rows.any():
                continue
            p = pred[rows] == k + 1
            t = target[rows] == k + 1
            report[f"dice_{organ}"] = dice_per_class(p.astype(np.int64), t.astype(np.int64), [1])[1]
            report[f"iou_{organ}"] = iou_per_class(p.astype(np.int64), t.astype(np.int64), [1])[1]
            dices.append(report[f"dice_{organ}"])
            ious.append(report[f"iou_{organ}"])
        report["dice"] = float(np.mean(dices)) if dices else float("nan")
        report["iou"] = float(np.mean(ious)) if ious else float("nan")
        return report
