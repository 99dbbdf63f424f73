"""How a hospital's NIfTI/DICOM volumes are brought onto the task's grid.

Pure settings (no torch, no MONAI import), so ``peer.toml`` can be checked cheaply;
:mod:`silomesh.models.data_io` applies them with MONAI's transforms.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Preprocess:
    """How NIfTI/DICOM volumes are brought onto the task's grid (MONAI transforms).

    Every field is optional; ``None`` leaves that step out.
    """

    #: axis codes of the target orientation, e.g. ``"RAS"`` (MONAI ``Orientation``)
    orientation: str | None = "RAS"
    #: target voxel size in mm along (x, y, z) (MONAI ``Spacing``)
    spacing: tuple[float, ...] | None = None
    #: intensity window ``(lo, hi)`` mapped to [0, 1] and clipped (``ScaleIntensityRange``)
    window: tuple[float, float] | None = None
    #: final size along (x, y, z), centre-padded or cropped (``ResizeWithPadOrCrop``)
    spatial_size: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.orientation is not None and (
            len(self.orientation) != 3 or sorted(self.orientation.upper()) not in _AXIS_SETS
        ):
            raise ValueError(f"orientation: expected three axis codes such as 'RAS' or 'LPS', got {self.orientation!r}")
        if self.spacing is not None and (len(self.spacing) != 3 or not all(s > 0 for s in self.spacing)):
            raise ValueError(f"spacing: expected three positive sizes in mm, got {self.spacing!r}")
        if self.window is not None and (len(self.window) != 2 or not self.window[0] < self.window[1]):
            raise ValueError(f"window: expected [lo, hi] with lo < hi, got {self.window!r}")
        if self.spatial_size is not None and (
            len(self.spatial_size) != 3 or not all(isinstance(n, int) and n > 0 for n in self.spatial_size)
        ):
            raise ValueError(f"spatial_size: expected three positive integers, got {self.spatial_size!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


_AXIS_SETS = [sorted(a + b + c) for a in "LR" for b in "AP" for c in "IS"]
