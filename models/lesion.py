"""Lesion segmentation under mixed supervision (FedMix, Wicaksana et al., TMI 2022).

Images are dermoscopy-like RGB photographs: a skin-toned background with illumination
fall-off (the dark corners of a dermoscope), texture and hairs, and — in
``present_prob`` of the images — one pigmented lesion with an irregular, fuzzy border
and variegated colour. Some images show small freckles, which are not lesions. Each silo
has its own camera style (skin tone, vignetting, hair density, lesion contrast, noise).

Each silo has one **supervision level** (``ArrayDataset.label_kind``):

- ``"mask"``: ``mask`` (N, H, W) int64 {0, 1};
- ``"box"``: ``box`` (N, 4) float32 ``(y0, x0, y1, x1)`` in pixels, half-open, jittered
  by ``box_jitter`` of the box size (all zeros when absent), plus ``present`` (N,);
- ``"present"``: ``present`` (N,) float32 {0, 1} only.

Test sets always carry ``mask`` and ``present``. The model has one sigmoid output
(lesion logit). :meth:`LesionTask.loss_terms` returns one term per kind of supervision
found in a batch, and :meth:`LesionTask.loss` sums them, so a strategy can reweight:

- ``pixel``: BCE + soft Dice against ``mask``;
- ``pseudo``: the same against ``pseudo`` (N, H, W): int64 {0, 1, -1 = ignore} or float
  soft targets in [0, 1] — FedMix's pseudo-labels plug in here;
- ``box``: BCE + soft Dice against a weak mask from the box: the inscribed ellipse
  (shrunk to 80%) is lesion, everything outside the box (grown by 10%) is background,
  the ring between is ignored;
- ``present``: BCE of the image-level logit, the mean of the top 2% pixel logits (a
  smooth max-pool), against ``present``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import special
from torch import nn

from silomesh.models.segmentation import (
    IGNORE,
    apply_options,
    binary_loss,
    build_segmenter,
    predict_dataset,
    segmentation_report,
)
from silomesh.models.synth import (
    border_start,
    concat,
    curve_distance,
    irregular_blob,
    random_curve,
    smooth_noise,
    stream,
    tube_profile,
)
from silomesh.models.task import ArrayDataset, Federation, Silo, SplitModel, Task

logger = logging.getLogger(__name__)

LABEL_KINDS: tuple[str, ...] = ("mask", "box", "present")
TOPK_FRACTION = 0.02  # share of pixels averaged into the image-level logit

# random-stream ids
_TRAIN, _TEST, _STYLE = 1, 2, 3


@dataclass(frozen=True)
class LesionConfig:
    """Data layout and model choice; any field can be overridden per federation."""

    image_size: int = 64  # image side in pixels
    n_train: int = 128  # training images per silo
    # training images kept at the pixel-mask silos (None: n_train); FedMix's premise is
    # that pixel labels are scarce and weak labels plentiful. The kept images are the
    # first n_train_mask of the n_train the silo would otherwise have.
    n_train_mask: int | None = None
    n_test: int = 32  # test images per silo (always with masks)
    label_kinds: tuple[str, ...] = LABEL_KINDS  # silo i gets label_kinds[i % len]
    present_prob: float = 0.7  # share of images with a lesion
    box_jitter: float = 0.1  # std of box corner jitter, as a fraction of box size
    arch: str = "unet"  # "unet" or "vit"


@dataclass(frozen=True)
class CameraStyle:
    """Per-silo acquisition differences."""

    skin: tuple[float, float, float]  # mean skin colour (RGB in [0, 1])
    vignette: float  # strength of the dark-corner fall-off
    hairs: float  # mean number of hairs per image
    contrast: float  # opacity of the lesion pigment (low: faint lesions)
    noise: float  # Gaussian noise std


def camera_style(seed: int, silo: int) -> CameraStyle:
    """The camera of one silo (deterministic per seed and silo)."""
    rng = stream(seed, _STYLE, silo)
    tone = rng.uniform(0.0, 1.0)  # light to darker skin
    skin = (0.92 - 0.25 * tone, 0.72 - 0.25 * tone, 0.62 - 0.22 * tone)
    return CameraStyle(
        skin=tuple(float(c + rng.normal(0, 0.02)) for c in skin),  # type: ignore[arg-type]
        vignette=float(rng.uniform(0.0, 0.8)),
        hairs=float(rng.uniform(0.0, 4.0)),
        contrast=float(rng.uniform(0.45, 0.85)),
        noise=float(rng.uniform(0.01, 0.04)),
    )


def render_image(
    rng: np.random.Generator, style: CameraStyle, size: int, present: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image.

    Returns:
        image ``(3, H, W)`` float32 in [0, 1] and mask ``(H, W)`` int64 {0, 1}.
    """
    shape = (size, size)
    px = size / 64.0
    yy, xx = np.mgrid[0 : 1 : size * 1j, 0 : 1 : size * 1j]
    skin = np.asarray(style.skin) + rng.normal(0.0, 0.03, 3)
    shade = 1.0 + 0.04 * smooth_noise(rng, shape, 6.0 * px) + 0.02 * smooth_noise(rng, shape, px)
    img = skin[:, None, None] * shade[None]  # (3, H, W)
    mask = np.zeros(shape, dtype=np.int64)
    grid = (yy, xx)

    for _ in range(int(rng.poisson(0.6))):  # freckles: small, not lesions
        c = rng.uniform(0.1, 0.9, 2)
        r = rng.uniform(0.015, 0.035)
        spot = irregular_blob(rng, grid, c, (r, r), 0.0, 0.0) <= 1.0
        img[:, spot] *= 0.8

    if present:
        centre = rng.uniform(0.3, 0.7, 2)
        radius = rng.uniform(0.12, 0.3)
        radii = (radius * rng.uniform(0.7, 1.0), radius)
        level = irregular_blob(
            rng,
            grid,
            centre,
            radii,
            rng.uniform(0, np.pi),
            0.35,
            5.0 * px,
        )
        mask[level <= 1.0] = 1
        border = rng.uniform(0.1, 0.35)  # fuzziness of the border
        alpha = style.contrast * special.expit((1.0 - level) / border)
        pigment = np.asarray([0.42, 0.26, 0.17]) * rng.uniform(0.6, 1.1)
        variegation = 1.0 + 0.25 * smooth_noise(rng, shape, 3.0 * px)
        lesion = pigment[:, None, None] * variegation[None]
        img = (1.0 - alpha[None]) * img + alpha[None] * lesion

    for _ in range(int(rng.poisson(style.hairs))):  # hairs: thin dark curves
        start, heading = border_start(rng, margin=0.05)
        hair = random_curve(rng, start, heading, rng.uniform(0.4, 1.2), 2.0)
        r = max(0.5, 0.6 * px)
        prof = tube_profile(curve_distance(hair * size, shape, r + 1.0), r)
        img = img * (1.0 - 0.7 * prof[None])

    radius2 = (yy - 0.5) ** 2 + (xx - 0.5) ** 2
    img = img * (1.0 - style.vignette * np.clip(radius2 / 0.5, 0, 1) ** 2)[None]
    img = img + rng.normal(0.0, style.noise, img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32), mask


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight half-open box ``(y0, x0, y1, x1)`` of a binary mask (zeros if empty)."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return np.zeros(4, dtype=np.float32)
    return np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], dtype=np.float32)


def box_masks(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Binary masks ``(N, H, W)`` filling each box ``(y0, x0, y1, x1)`` (rounded outwards).

    Useful where a strategy wants boxes as masks (e.g. to restrict pseudo-labels).
    """
    h, w = shape
    out = np.zeros((len(boxes), h, w), dtype=bool)
    for i, (y0, x0, y1, x1) in enumerate(np.asarray(boxes, dtype=np.float64)):
        r0, c0 = max(0, int(np.floor(y0))), max(0, int(np.floor(x0)))
        r1, c1 = min(h, int(np.ceil(y1))), min(w, int(np.ceil(x1)))
        out[i, r0:r1, c0:c1] = True
    return out


def generate(n: int, rng: np.random.Generator, cfg: LesionConfig, style: CameraStyle, label_kind: str) -> ArrayDataset:
    """``n`` images with the arrays of one supervision level (see module docstring).

    Raises:
        ValueError: for an unknown label kind.
    """
    if label_kind not in LABEL_KINDS:
        raise ValueError(f"unknown label kind {label_kind!r}; choose from {LABEL_KINDS}")
    size = cfg.image_size
    images = np.empty((n, 3, size, size), dtype=np.float32)
    masks = np.empty((n, size, size), dtype=np.int64)
    present = (rng.random(n) < cfg.present_prob).astype(np.float32)
    for i in range(n):
        images[i], masks[i] = render_image(rng, style, size, bool(present[i]))
    present = (masks.reshape(n, -1).max(axis=1) > 0).astype(np.float32)  # blob may be empty
    arrays: dict[str, np.ndarray] = {"image": images}
    if label_kind == "mask":
        arrays["mask"] = masks
    elif label_kind == "box":
        boxes = np.stack([mask_box(m) for m in masks])
        hw = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, axis=1)
        boxes = boxes + rng.normal(0.0, cfg.box_jitter, boxes.shape) * hw
        boxes = np.clip(boxes, 0, size).astype(np.float32) * present[:, None]
        arrays["box"] = boxes
        arrays["present"] = present
    else:
        arrays["present"] = present
    return ArrayDataset(arrays, label_kind)


def box_weak_mask(box: torch.Tensor, present: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
    """Weak pixel target from boxes: 1 inside the inscribed ellipse (80%), 0 outside the
    box grown by 10%, :data:`IGNORE` in between; all 0 where ``present`` is 0.

    Args:
        box: ``(B, 4)`` ``(y0, x0, y1, x1)`` pixels.
        present: ``(B,)`` or ``None``.
        shape: ``(H, W)``.

    Returns:
        ``(B, H, W)`` int64.
    """
    h, w = shape
    yy = torch.arange(h, device=box.device, dtype=box.dtype).view(1, h, 1) + 0.5
    xx = torch.arange(w, device=box.device, dtype=box.dtype).view(1, 1, w) + 0.5
    y0, x0, y1, x1 = (box[:, i].view(-1, 1, 1) for i in range(4))
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    ry, rx = ((y1 - y0) / 2).clamp(min=0.5), ((x1 - x0) / 2).clamp(min=0.5)
    inside = ((yy - cy) / (0.8 * ry)) ** 2 + ((xx - cx) / (0.8 * rx)) ** 2 <= 1.0
    grown = ((yy - cy).abs() <= 1.1 * ry) & ((xx - cx).abs() <= 1.1 * rx)
    target = torch.full((box.shape[0], h, w), IGNORE, dtype=torch.long, device=box.device)
    target[~grown] = 0
    target[inside] = 1
    if present is not None:
        target[present.view(-1) < 0.5] = 0
    return target


def image_logit(logits: torch.Tensor) -> torch.Tensor:
    """Image-level lesion logit: mean of the top :data:`TOPK_FRACTION` pixel logits.

    Args:
        logits: ``(B, 1, H, W)``.

    Returns:
        ``(B,)``.
    """
    flat = logits.flatten(1)  # (B, H*W)
    k = max(1, math.ceil(TOPK_FRACTION * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(dim=1)


def _pixel_term(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + Dice against an int target with :data:`IGNORE` or a float soft target."""
    if target.dtype.is_floating_point:
        return binary_loss(logits, target.unsqueeze(1))
    valid = (target != IGNORE).unsqueeze(1)
    return binary_loss(logits, target.clamp(min=0).unsqueeze(1).to(logits.dtype), valid)


class LesionTask(Task):
    """Binary lesion segmentation; silos differ in how they are supervised."""

    name = "lesion"
    metric = "dice"

    def __init__(self, config: LesionConfig | None = None, **overrides: Any) -> None:
        self.config = self._checked(apply_options(config or LesionConfig(), overrides, self.name))

    @staticmethod
    def _checked(cfg: LesionConfig) -> LesionConfig:
        bad = [k for k in cfg.label_kinds if k not in LABEL_KINDS]
        if bad or not cfg.label_kinds:
            raise ValueError(f"unknown label kinds {bad}; choose from {LABEL_KINDS}")
        if cfg.arch not in ("unet", "vit"):
            raise ValueError(f"unknown architecture {cfg.arch!r}; choose 'unet' or 'vit'")
        m = cfg.n_train_mask
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= cfg.n_train):
            raise ValueError(f"option 'n_train_mask' must be an integer from 1 to n_train ({cfg.n_train}) "
                             f"or unset (= n_train), got {m!r}")
        return cfg

    def make_federation(self, n_silos: int, seed: int, **options: Any) -> Federation:
        """Silo ``i`` has supervision ``label_kinds[i % len(label_kinds)]``.

        Pixel-mask silos keep ``n_train_mask`` training images when it is set.

        Raises:
            ValueError: for ``n_silos < 1`` or an invalid option.
        """
        if n_silos < 1:
            raise ValueError(f"n_silos must be >= 1, got {n_silos}")
        cfg = self._checked(apply_options(self.config, options, self.name, fixed=("arch",)))
        silos = []
        for i in range(n_silos):
            style = camera_style(seed, i)
            kind = cfg.label_kinds[i % len(cfg.label_kinds)]
            train = generate(cfg.n_train, stream(seed, _TRAIN, i), cfg, style, kind)
            if kind == "mask" and cfg.n_train_mask is not None:
                train = train.subset(np.arange(cfg.n_train_mask))
            test = self._with_present(generate(cfg.n_test, stream(seed, _TEST, i), cfg, style, "mask"))
            silos.append(Silo(f"silo{i}", train, test, {"label_kind": kind, "camera": asdict(style)}))
        tests = {"all": concat([s.test for s in silos])}
        logger.debug("lesion: %d silos, seed %d, kinds %s", n_silos, seed, cfg.label_kinds)
        return Federation(self.name, seed, silos, tests)

    @staticmethod
    def _with_present(data: ArrayDataset) -> ArrayDataset:
        present = (data["mask"].reshape(len(data), -1).max(axis=1) > 0).astype(np.float32)
        return ArrayDataset({**data.arrays, "present": present}, "mask")

    def make_model(self, size: str = "tiny", seed: int = 0) -> SplitModel:
        """A U-Net (or ViT) with one sigmoid lesion output on RGB input."""
        cfg = self.config
        return build_segmenter(cfg.arch, size, seed, in_channels=3, out_channels=1, image_size=cfg.image_size)

    def loss_terms(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One loss term per kind of supervision in ``batch`` (see module docstring).

        Raises:
            ValueError: if the batch carries no supervision at all.
        """
        logits = model(batch["image"])  # (B, 1, H, W)
        terms: dict[str, torch.Tensor] = {}
        if "mask" in batch:
            terms["pixel"] = _pixel_term(logits, batch["mask"].long())
        if "pseudo" in batch:
            terms["pseudo"] = _pixel_term(logits, batch["pseudo"])
        if "box" in batch:
            weak = box_weak_mask(batch["box"].float(), batch.get("present"), logits.shape[-2:])
            terms["box"] = _pixel_term(logits, weak)
        if "present" in batch and "mask" not in batch:
            target = batch["present"].to(logits.dtype).view(-1)
            terms["present"] = F.binary_cross_entropy_with_logits(image_logit(logits), target)
        if "teacher_logits" in batch and "mask" not in batch:
            terms["teacher"] = _pixel_term(logits, self.teacher_targets(batch, logits.shape[-2:]))
        if not terms:
            raise ValueError("batch has no supervision: expected mask, pseudo, box or present")
        return terms

    distills = True

    @staticmethod
    def teacher_targets(batch: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """Soft pixel targets ``(B, H, W)`` for a weakly labelled batch with ``teacher_logits``:
        the teacher's lesion probability where the weak label says nothing (the ring of a box,
        an image labelled present), the weak label where it does (0 outside a box and on absent
        images, 1 inside a box's inscribed ellipse)."""
        soft = torch.sigmoid(batch["teacher_logits"][:, 0].float())
        if "box" in batch:
            weak = box_weak_mask(batch["box"].float(), batch.get("present"), shape)
            return torch.where(weak == IGNORE, soft, weak.float())
        if "present" in batch:
            return soft * (batch["present"].float().view(-1, 1, 1) >= 0.5)
        return soft

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of :meth:`loss_terms`."""
        return torch.stack(list(self.loss_terms(model, batch).values())).sum()

    @torch.no_grad()
    def predict(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Label map ``(B, H, W)``: lesion where its probability exceeds 0.5."""
        return (model(images)[:, 0] > 0).long()

    @torch.no_grad()
    def predict_proba(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Lesion probability ``(B, H, W)`` (e.g. to make pseudo-labels)."""
        return torch.sigmoid(model(images)[:, 0])

    def evaluate(self, model: nn.Module, data: ArrayDataset) -> dict[str, float]:
        """Pixel ``dice`` / ``iou`` of the lesion and image-level ``accuracy``."""
        pred = predict_dataset(model, data, self.predict)
        report = segmentation_report(pred, data["mask"], {1: "lesion"})
        present = data["mask"].reshape(len(data), -1).max(axis=1) > 0
        found = pred.reshape(len(data), -1).sum(axis=1) >= max(1, math.ceil(TOPK_FRACTION * pred[0].size))
        report["accuracy"] = float(np.mean(found == present))
        return report
