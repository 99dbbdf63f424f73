"""A small Vision Transformer encoder with a segmentation head.

This is the FedEFM foundation backbone: the ViT encoder (patch embedding, learned
positional embedding, pre-norm transformer blocks) is the part that is pre-trained and
shared; the decoder upsamples the token grid back to full resolution and fuses a shallow
full-resolution image stem so one-pixel structures such as guidewires survive the
``patch_size`` downsampling.

State-dict layout::

    encoder.*   patch embedding, positional embedding, blocks    (shared body)
    decoder.*   upsampling head + full-resolution stem + 1x1 out (task head)

``forward_features`` returns the encoder's token grid ``(B, dim, H/p, W/p)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from silomesh.models.task import SplitModel

#: (dim, depth, heads, decoder_width) per named size; parameter counts with 1 input
#: channel, 3 outputs and 64x64 images: tiny ~29k, small ~0.16M, base ~0.87M.
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (32, 2, 2, 8),
    "small": (64, 4, 4, 16),
    "base": (128, 6, 4, 32),
}


@dataclass(frozen=True)
class ViTConfig:
    """Hyper-parameters of a :class:`ViTSeg`."""

    in_channels: int = 1  # image channels
    out_channels: int = 3  # logits per pixel
    image_size: int = 64  # side the positional embedding is made for (resized otherwise)
    patch_size: int = 4  # side of a patch; tokens = (image_size / patch_size) ** 2
    dim: int = 64  # token width
    depth: int = 4  # transformer blocks
    heads: int = 4  # attention heads (dim must divide by heads)
    mlp_ratio: float = 2.0  # MLP hidden width = mlp_ratio * dim
    decoder_width: int = 16  # channels in the upsampling segmentation head
    dropout: float = 0.0  # dropout in attention and MLP

    @classmethod
    def preset(cls, size: str, **overrides: Any) -> ViTConfig:
        """Config for a named size (``tiny``, ``small``, ``base``).

        Raises:
            ValueError: for an unknown size.
        """
        if size not in PRESETS:
            raise ValueError(f"unknown ViT size {size!r}; choose from {sorted(PRESETS)}")
        dim, depth, heads, dec = PRESETS[size]
        return replace(cls(dim=dim, depth=depth, heads=heads, decoder_width=dec), **overrides)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        if cfg.dim % cfg.heads:
            raise ValueError(f"dim {cfg.dim} is not divisible by heads {cfg.heads}")
        self.heads = cfg.heads
        self.dropout = cfg.dropout
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim)
        hidden = int(cfg.mlp_ratio * cfg.dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, hidden),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(hidden, cfg.dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape  # (B, N tokens, dim)
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, dim / heads)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, heads, N, dim / heads)
        x = x + self.proj(y.transpose(1, 2).reshape(b, n, d))  # (B, N, dim)
        return x + self.mlp(self.norm2(x))  # (B, N, dim)


class ViTEncoder(nn.Module):
    """Patchify, add positions, run the transformer; return a token grid."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        grid = cfg.image_size // cfg.patch_size
        self.patch = nn.Conv2d(cfg.in_channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.pos = nn.Parameter(torch.randn(1, cfg.dim, grid, grid) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x)  # (B, dim, h, w) with h = H / patch
        h, w = x.shape[2:]
        pos: torch.Tensor = self.pos
        if pos.shape[2:] != (h, w):
            pos = F.interpolate(pos, size=(h, w), mode="bilinear", align_corners=False)
        x = (x + pos).flatten(2).transpose(1, 2)  # (B, h*w, dim)
        for block in self.blocks:
            x = block(x)  # (B, h*w, dim)
        x = self.norm(x)
        return x.transpose(1, 2).reshape(x.shape[0], -1, h, w)  # (B, dim, h, w)


def _conv_gn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.GroupNorm(math.gcd(4, c_out), c_out),
        nn.ReLU(inplace=True),
    )


class SegDecoder(nn.Module):
    """Progressive x2 upsampling of the token grid, fused with a full-resolution stem."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        stages = int(math.log2(cfg.patch_size))
        if 2**stages != cfg.patch_size:
            raise ValueError(f"patch_size must be a power of two, got {cfg.patch_size}")
        c = cfg.decoder_width
        self.proj = nn.Conv2d(cfg.dim, c, 1)
        self.ups = nn.ModuleList(_conv_gn_relu(c, c) for _ in range(stages))
        self.stem = _conv_gn_relu(cfg.in_channels, c)
        self.fuse = _conv_gn_relu(2 * c, c)
        self.out = nn.Conv2d(c, cfg.out_channels, 1)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.proj(tokens)  # (B, c, h, w)
        for up in self.ups:
            x = up(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
        x = F.interpolate(x, size=image.shape[2:], mode="bilinear", align_corners=False)
        x = self.fuse(torch.cat([x, self.stem(image)], dim=1))  # (B, c, H, W)
        return self.out(x)  # (B, C_out, H, W)


class ViTSeg(SplitModel):
    """ViT encoder + segmentation decoder; the decoder is the task head."""

    head_prefixes = ("decoder.",)

    def __init__(self, config: ViTConfig | None = None) -> None:
        super().__init__()
        self.config = config or ViTConfig()
        self.encoder = ViTEncoder(self.config)
        self.decoder = SegDecoder(self.config)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits, tokens)``.

        Args:
            x: ``(B, C_in, H, W)``; H and W are padded up to a multiple of ``patch_size``.

        Returns:
            logits ``(B, C_out, H, W)`` and the token grid ``(B, dim, H/p, W/p)``.
        """
        h, w = x.shape[2:]
        p = self.config.patch_size
        padded = F.pad(x, [0, (-w) % p, 0, (-h) % p])  # (B, C_in, H', W')
        tokens = self.encoder(padded)  # (B, dim, H'/p, W'/p)
        logits = self.decoder(tokens, padded)  # (B, C_out, H', W')
        return logits[..., :h, :w], tokens
