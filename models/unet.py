"""U-Net (Ronneberger et al., 2015) for 2D images and 3D volumes.

One class covers both: ``UNetConfig.dims`` picks ``Conv2d`` or ``Conv3d``. Each level is
two 3x3 convolutions with GroupNorm and ReLU; GroupNorm rather than BatchNorm because
federated peers train on small, differently distributed batches and BatchNorm's running
statistics would have to be averaged too. Inputs whose sides are not multiples of
``2**depth`` are padded and the output cropped back, so real scans of any size work.

State-dict layout (what strategies split on)::

    encoder.<level>.*   contracting path           (shared body)
    bottleneck.*        deepest block              (shared body) -> forward_features
    up.<level>.*        transposed convolutions    (shared body)
    decoder.<level>.*   expanding path             (shared body)
    head.*              1x1 conv to the outputs    (task head, ``head_prefixes``)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from silomesh.models.task import SplitModel

#: (width, depth) per named size and dimensionality; parameter counts with 1 input
#: channel and 3 outputs: 2D tiny ~29k, small ~0.47M, base ~1.9M; 3D tiny ~21k,
#: small ~85k, base ~1.4M.
PRESETS: dict[int, dict[str, tuple[int, int]]] = {
    2: {"tiny": (8, 2), "small": (16, 3), "base": (32, 3)},
    3: {"tiny": (4, 2), "small": (8, 2), "base": (16, 3)},
}


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of a :class:`UNet`."""

    in_channels: int = 1  # image channels (1 for X-ray / CT, 3 for RGB photographs)
    out_channels: int = 2  # logits per pixel: classes (softmax) or heads (sigmoid)
    width: int = 16  # channels of the first level; doubles at every level down
    depth: int = 3  # number of 2x downsamplings
    dims: int = 2  # 2: images (B, C, H, W); 3: volumes (B, C, D, H, W)
    groups: int = 4  # GroupNorm groups (reduced to a divisor of the channel count)
    head_bias: float = 0.0  # initial output bias; e.g. -2.0 makes sigmoid heads start "absent"

    @classmethod
    def preset(cls, size: str, dims: int = 2, **overrides: Any) -> UNetConfig:
        """Config for a named size (``tiny``, ``small``, ``base``).

        Raises:
            ValueError: for an unknown size or dimensionality.
        """
        if dims not in PRESETS:
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        if size not in PRESETS[dims]:
            raise ValueError(f"unknown U-Net size {size!r}; choose from {sorted(PRESETS[dims])}")
        width, depth = PRESETS[dims][size]
        return replace(cls(width=width, depth=depth, dims=dims), **overrides)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class ConvBlock(nn.Sequential):
    """(conv 3x3 -> GroupNorm -> ReLU) x 2."""

    def __init__(self, c_in: int, c_out: int, dims: int, groups: int) -> None:
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        super().__init__(
            conv(c_in, c_out, 3, padding=1, bias=False),
            _norm(c_out, groups),
            nn.ReLU(inplace=True),
            conv(c_out, c_out, 3, padding=1, bias=False),
            _norm(c_out, groups),
            nn.ReLU(inplace=True),
        )


class UNet(SplitModel):
    """2D or 3D U-Net returning per-pixel logits and its bottleneck features."""

    head_prefixes = ("head.",)

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or UNetConfig()
        if cfg.dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {cfg.dims}")
        conv = nn.Conv2d if cfg.dims == 2 else nn.Conv3d
        up = nn.ConvTranspose2d if cfg.dims == 2 else nn.ConvTranspose3d
        widths = [cfg.width * 2**i for i in range(cfg.depth + 1)]  # e.g. 16, 32, 64, 128

        self.encoder = nn.ModuleList()
        c_prev = cfg.in_channels
        for c in widths[:-1]:
            self.encoder.append(ConvBlock(c_prev, c, cfg.dims, cfg.groups))
            c_prev = c
        self.bottleneck = ConvBlock(widths[-2], widths[-1], cfg.dims, cfg.groups)
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for c in reversed(widths[:-1]):
            self.up.append(up(2 * c, c, kernel_size=2, stride=2))
            self.decoder.append(ConvBlock(2 * c, c, cfg.dims, cfg.groups))
        self.head = conv(widths[0], cfg.out_channels, kernel_size=1)
        if self.head.bias is not None:
            nn.init.constant_(self.head.bias, cfg.head_bias)
        self.pool = nn.MaxPool2d(2) if cfg.dims == 2 else nn.MaxPool3d(2)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits, bottleneck)``.

        Args:
            x: ``(B, C_in, H, W)`` (or ``(B, C_in, D, H, W)`` for ``dims=3``).

        Returns:
            logits ``(B, C_out, H, W)`` and bottleneck features
            ``(B, width * 2**depth, H / 2**depth, W / 2**depth)`` (with a D axis in 3D).
        """
        cfg = self.config
        if x.dim() != cfg.dims + 2:
            raise ValueError(f"expected a {cfg.dims + 2}-D input, got shape {tuple(x.shape)}")
        spatial = x.shape[2:]
        multiple = 2**cfg.depth
        pad: list[int] = []
        for s in reversed(spatial):  # F.pad wants the last axis first
            pad += [0, (-s) % multiple]
        if any(pad):
            x = F.pad(x, pad)  # (B, C_in, S') with every side divisible by 2**depth

        skips = []
        for block in self.encoder:
            x = block(x)  # (B, width * 2**i, S / 2**i)
            skips.append(x)
            x = self.pool(x)  # (B, width * 2**i, S / 2**(i+1))
        features = self.bottleneck(x)  # (B, width * 2**depth, S / 2**depth)
        x = features
        for up, block, skip in zip(self.up, self.decoder, reversed(skips), strict=True):
            x = up(x)  # (B, c, 2 * s): halves the channels, doubles the sides
            x = block(torch.cat([x, skip], dim=1))  # (B, c, 2 * s)
        logits = self.head(x)  # (B, C_out, S')
        crop = tuple(slice(0, s) for s in spatial)
        return logits[(Ellipsis, *crop)], features
