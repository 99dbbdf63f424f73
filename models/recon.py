"""ReconNet: a small sinogram-to-image network for SPECT (FBP-initialised domain transform).

The network follows the classical pipeline and learns each stage:

1. a residual CNN denoises the sinogram (angles x detector bins);
2. a bank of learnable 1D filters along the detector axis, initialised to Hann-windowed
   ramp filters of decreasing cutoff (channel 0 is exactly the FBP filter);
3. a *fixed* back projection (the transpose of the task's sparse system matrix, so the
   network shares the classical reconstructions' geometry) turns each filtered
   sinogram into an image, multiplied by a learnable per-pixel gain (attenuation
   compensation, initialised by the task to the population's mean Chang factor): at
   initialisation channel 0 is the (Chang-corrected) FBP image;
4. a small U-Net refines the back-projected channels; the head adds its output to the
   FBP channel (residual learning).

The back projection has no parameters and is not in the state dict, so federated
strategies only see the learnable layers. :attr:`ReconNet.head_prefixes` names the
final layers (``head.``).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from silomesh.models.spect_recon import Geometry, get_projector, ramp_filter
from silomesh.models.task import SplitModel

if TYPE_CHECKING:
    import scipy.sparse as sp

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconConfig:
    """Geometry and widths of a :class:`ReconNet`."""

    geometry: Geometry = field(default_factory=Geometry)  # must match the data
    channels: int = 8  # filtered sinograms back-projected (channel 0 = FBP)
    sino_width: int = 16  # width of the sinogram denoiser
    width: int = 24  # U-Net base width (doubles at each level)
    depth: int = 2  # U-Net down-samplings; size must be divisible by 2**depth


#: scale of the learned correction to the ramp filter taps
FILTER_STEP = 0.01

#: widths of the named model sizes
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"channels": 4, "sino_width": 8, "width": 8, "depth": 1},
    "small": {"channels": 8, "sino_width": 16, "width": 16, "depth": 2},
    "base": {"channels": 12, "sino_width": 32, "width": 32, "depth": 2},
}


def recon_config(size: str, geometry: Geometry) -> ReconConfig:
    """The :class:`ReconConfig` of a named size (``tiny``, ``small``, ``base``).

    Raises:
        ValueError: for an unknown size.
    """
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose from {sorted(SIZES)}")
    return ReconConfig(geometry=geometry, **SIZES[size])


class _BackProjectFn(torch.autograd.Function):
    """``out = A^T q`` with a fixed sparse ``A``; its gradient is ``A g``."""

    # ``ctx`` is Any as in torch's own Function signatures: FunctionCtx has no field for the
    # matrix kept on it between forward and backward.
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, a_t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:  # noqa: ANN401 - torch's Function signature
        ctx.a = a
        return torch.sparse.mm(a_t, q)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ANN401 - torch's Function signature
        return torch.sparse.mm(ctx.a, grad.contiguous()), None, None


def _csr(m: sp.csr_matrix) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(
            torch.from_numpy(m.indptr.astype(np.int64)),
            torch.from_numpy(m.indices.astype(np.int64)),
            torch.from_numpy(m.data.astype(np.float32)),
            size=m.shape,
            check_invariants=False,
        )


@lru_cache(maxsize=8)
def _system_tensors(geometry: Geometry) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    proj = get_projector(geometry)
    return _csr(proj.matrix_t), _csr(proj.matrix), torch.from_numpy(proj.index)


class BackProjector:
    """Fixed FBP back projection ``(B, C, A, D) -> (B, C, H, W)`` shared between models.

    Scaled by ``pi / (n_angles * w^2)`` so a ramp-filtered sinogram gives the FBP image.
    Copies of a model share one instance (it holds no learnable state).
    """

    def __init__(self, geometry: Geometry) -> None:
        self.geometry = geometry
        self._by_device: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def __deepcopy__(self, memo: dict[int, Any]) -> BackProjector:
        return self

    def _tensors(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._by_device:
            self._by_device[device] = tuple(t.to(device) for t in _system_tensors(self.geometry))
        return self._by_device[device]

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        b, c = q.shape[:2]
        a_t, a, index = self._tensors(q.device)
        flat = q.reshape(b * c, g.n_angles * g.n_det).t()  # (A*D, B*C)
        vals = _BackProjectFn.apply(flat, a_t, a).t()  # (B*C, n_support)
        out = q.new_zeros(b * c, g.size * g.size)
        out = out.index_copy(1, index, vals * (np.pi / g.n_angles / g.pixel_width**2))
        return out.reshape(b, c, g.size, g.size)


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.ReLU(inplace=True),
    )


class ReconNet(SplitModel):
    """Sinogram ``(B, 1, A, D)`` -> activity image ``(B, 1, H, W)``.

    ``forward_features`` returns the image and the last decoder feature map
    ``(B, width, H, W)`` (the input of the head).
    """

    head_prefixes = ("head.",)
    _ramp: torch.Tensor  # buffers, registered in __init__
    _toeplitz: torch.Tensor

    def __init__(self, config: ReconConfig | None = None, gain: np.ndarray | None = None) -> None:
        """Build the network.

        Args:
            config: geometry and widths.
            gain: initial per-pixel gain ``(H, W)`` of the back projection (e.g. a mean
                attenuation correction); ones when ``None``.
        """
        super().__init__()
        self.config = cfg = config or ReconConfig()
        g = cfg.geometry
        if g.size % (2**cfg.depth):
            raise ValueError(f"image size {g.size} not divisible by 2**depth={2**cfg.depth}")
        self._circular = g.arc_deg == 360.0
        sw = cfg.sino_width
        last = nn.Conv2d(sw, 1, 3)
        for p in last.parameters():
            nn.init.zeros_(p)  # the denoiser starts as the identity (residual)
        self.sino = nn.ModuleList([nn.Conv2d(1, sw, 3), nn.Conv2d(sw, sw, 3), last])
        # filter taps -(D-1)..(D-1) per channel, applied along the detector axis: ramp
        # filters plus a learned correction, scaled down because the ramp's taps are
        # small (~1/n^2) and a raw Adam step would swamp them
        taps = [_ramp_kernel(g.n_det, 0.7**ch) for ch in range(cfg.channels)]
        self.register_buffer("_ramp", torch.from_numpy(np.stack(taps)), persistent=False)
        self.filter = nn.Parameter(torch.zeros(cfg.channels, 2 * g.n_det - 1))
        d = torch.arange(g.n_det)
        self.register_buffer("_toeplitz", d[None, :] - d[:, None] + g.n_det - 1, persistent=False)
        self.backproject = BackProjector(g)
        log_gain = np.zeros((g.size, g.size)) if gain is None else np.log(gain)
        self.log_gain = nn.Parameter(torch.tensor(log_gain, dtype=torch.float32)[None, None])
        w = cfg.width
        widths = [w * 2**i for i in range(cfg.depth + 1)]
        self.down = nn.ModuleList()
        c_in = cfg.channels
        for c_out in widths:
            self.down.append(_conv_block(c_in, c_out))
            c_in = c_out
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for c_skip in reversed(widths[:-1]):
            self.up.append(nn.Conv2d(c_in, c_skip, 3, padding=1))
            self.merge.append(_conv_block(2 * c_skip, c_skip))
            c_in = c_skip
        out = nn.Conv2d(w, 1, 1)
        for p in out.parameters():
            nn.init.zeros_(p)  # the network starts as the (gain-corrected) FBP image
        self.head = nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.ReLU(inplace=True), out)

    def _sino_pad(self, x: torch.Tensor) -> torch.Tensor:
        # angles wrap around on a 360 degree arc; detector edges are zero padded
        if self._circular:
            x = torch.cat([x[:, :, -1:], x, x[:, :, :1]], dim=2)
            return F.pad(x, (1, 1, 0, 0))
        return F.pad(x, (1, 1, 1, 1))

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.config.geometry
        if x.shape[1:] != (1, g.n_angles, g.n_det):
            raise ValueError(
                f"expected sinograms (B, 1, {g.n_angles}, {g.n_det}), got {tuple(x.shape)}"
            )
        h = F.relu(self.sino[0](self._sino_pad(x)))
        h = F.relu(self.sino[1](self._sino_pad(h)))
        sino = x + self.sino[2](self._sino_pad(h))  # (B, 1, A, D) denoised
        taps = self._ramp + FILTER_STEP * self.filter  # (C, 2D-1)
        toeplitz = taps[:, self._toeplitz]  # (C, D, D): out[n] = sum_k w[k-n] x[k]
        filtered = torch.matmul(sino, toeplitz.transpose(1, 2))  # (B, C, A, D)
        images = self.backproject(filtered)  # (B, channels, H, W); [:, 0] = FBP
        images = images * torch.exp(self.log_gain)
        skips = []
        h = images
        for i, block in enumerate(self.down):
            if i:
                h = F.avg_pool2d(h, 2)
            h = block(h)
            skips.append(h)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1]), strict=True):
            h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
            h = merge(torch.cat([h, skip], dim=1))  # (B, width_i, H_i, W_i)
        out = images[:, :1] + self.head(h)  # (B, 1, H, W)
        return out, h

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _ramp_kernel(n_det: int, cutoff: float) -> np.ndarray:
    """Spatial taps ``-(n_det-1) .. n_det-1`` of the Hann-windowed ramp filter."""
    response = ramp_filter(n_det, "hann", cutoff)
    kernel = np.real(np.fft.ifft(response))
    taps = np.concatenate([kernel[-(n_det - 1) :], kernel[:n_det]])
    return taps.astype(np.float32)
