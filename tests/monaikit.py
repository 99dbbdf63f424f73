"""Small NIfTI sites for the MONAI tests (not a test module)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def ramp_volume(spacing: tuple[float, float, float], flip_x: bool, extent: float = 24.0) -> nib.Nifti1Image:
    """A CT-like volume whose value is a linear ramp of the physical position (mm).

    ``value = 20 * x + 5 * y + z - 200``: linear, so resampling by linear interpolation
    reproduces it, and a flip of the x axis is visible unless reoriented.
    """
    shape = tuple(round(extent / s) for s in spacing)
    i, j, k = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing, strict=True)), indexing="ij")
    x = i if not flip_x else i[::-1]
    data = (20 * x + 5 * j + k - 200).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    if flip_x:  # stored right-to-left (LAS): voxel 0 is the largest x
        affine[0, 0] = -spacing[0]
        affine[0, 3] = (shape[0] - 1) * spacing[0]
    return nib.Nifti1Image(data, affine)


def write_site(
    root: Path, spacing: tuple[float, float, float], flip_x: bool, n: int = 2, extent: float = 24.0
) -> Path:
    """A hospital folder: ``n`` ramp volumes and masks (label 1 where x < 8 mm, 2 where z > 16 mm)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for s in range(n):
        img = ramp_volume(spacing, flip_x, extent)
        ijk = np.indices(img.shape).reshape(3, -1).T
        xyz = nib.affines.apply_affine(img.affine, ijk).reshape(*img.shape, 3)
        mask = np.where(xyz[..., 0] < 8, 1, np.where(xyz[..., 2] > 16, 2, 0)).astype(np.uint8)
        nib.save(img, root / "images" / f"case{s}.nii.gz")
        nib.save(nib.Nifti1Image(mask, img.affine), root / "masks" / f"case{s}.nii.gz")
    return root
