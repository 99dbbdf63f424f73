"""NIfTI folders through MONAI's transforms: one grid and orientation for every site."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monaikit import write_site

from silomesh.models.data_io import DatasetError, read_folder
from silomesh.models.preprocess import Preprocess

GRID = Preprocess(orientation="RAS", spacing=(2.0, 2.0, 2.0), window=(-200.0, 400.0), spatial_size=(12, 12, 12))


def test_sites_with_different_spacing_and_orientation_land_on_one_grid(tmp_path: Path) -> None:
    a = read_folder(write_site(tmp_path / "a", (1.0, 1.0, 3.0), flip_x=False), preprocess=GRID).data
    b = read_folder(write_site(tmp_path / "b", (3.0, 2.0, 1.0), flip_x=True), preprocess=GRID).data
    assert a["image"].shape == b["image"].shape == (2, 1, 12, 12, 12)
    assert a["mask"].shape == b["mask"].shape == (2, 12, 12, 12)
    # the same ramp in physical space: equal away from the borders, where each site's
    # field of view ends at a different place
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2), slice(2, -2))
    assert np.abs(a["image"][inner] - b["image"][inner]).max() < 1e-4
    # x grows along the last axis (W) in both, so the flipped site was reoriented
    assert (np.diff(a["image"][0, 0, 6, 6, 2:-2]) > 0).all() and (np.diff(b["image"][0, 0, 6, 6, 2:-2]) > 0).all()
    assert a["image"].min() >= 0.0 and a["image"].max() <= 1.0  # windowed
    assert set(np.unique(a["mask"])) == set(np.unique(b["mask"])) == {0, 1, 2}  # nearest: labels stay labels
    agree = (a["mask"][:, 2:-2, 2:-2, 2:-2] == b["mask"][:, 2:-2, 2:-2, 2:-2]).mean()
    assert agree == 1.0


def test_without_preprocess_the_loader_keeps_each_sites_own_grid(tmp_path: Path) -> None:
    a = read_folder(write_site(tmp_path / "a", (1.0, 1.0, 3.0), flip_x=False)).data
    b = read_folder(write_site(tmp_path / "b", (3.0, 2.0, 1.0), flip_x=True)).data
    assert a["image"].shape != b["image"].shape  # the reason the task needs a grid


def test_an_unreadable_volume_is_named_in_the_error(tmp_path: Path) -> None:
    root = write_site(tmp_path / "a", (2.0, 2.0, 2.0), flip_x=False)
    (root / "images" / "case1.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DatasetError) as err:
        read_folder(root, preprocess=GRID)
    assert err.value.path == root / "images" / "case1.nii.gz"


def test_a_mask_on_another_grid_is_named_in_the_error(tmp_path: Path) -> None:
    root = write_site(tmp_path / "a", (2.0, 2.0, 2.0), flip_x=False)
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.uint8), np.eye(4)), root / "masks" / "case0.nii.gz")
    no_resize = Preprocess(orientation="RAS", spacing=(2.0, 2.0, 2.0))
    with pytest.raises(DatasetError, match="mask shape") as err:
        read_folder(root, preprocess=no_resize)
    assert err.value.path == root / "masks" / "case0.nii.gz"


@pytest.mark.parametrize("bad", [np.nan, 0.5, -1.0])
def test_a_mask_that_is_not_class_ids_is_named_in_the_error(tmp_path: Path, bad: float) -> None:
    root = write_site(tmp_path / "a", (2.0, 2.0, 2.0), flip_x=False)
    mask_path = root / "masks" / "case0.nii.gz"
    img = nib.load(mask_path)
    labels = np.asarray(img.dataobj, dtype=np.float32)
    labels[tuple(s // 2 for s in labels.shape)] = bad  # one voxel: a probability, a NaN or a negative id
    nib.save(nib.Nifti1Image(labels, img.affine), mask_path)
    with pytest.raises(DatasetError, match="integer class ids") as err:
        read_folder(root, preprocess=Preprocess(orientation="RAS"))
    assert err.value.path == mask_path


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"orientation": "RAX"}, "orientation"), ({"spacing": (1.0, 0.0, 1.0)}, "spacing"),
     ({"window": (5.0, 5.0)}, "window"), ({"spatial_size": (8, 8)}, "spatial_size")],
)
def test_bad_preprocess_settings_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        Preprocess(**kwargs)  # type: ignore[arg-type]


def test_a_dicom_series_is_resampled_to_the_task_spacing(tmp_path: Path) -> None:
    """Three slices of pydicom's CT sample (0.66 x 0.66 mm, 5 mm apart) onto a 1 x 1 x 2.5 mm grid."""
    import pydicom
    from pydicom.data import get_testdata_file

    sample = get_testdata_file("CT_small.dcm")
    assert sample is not None
    series = tmp_path / "images" / "series1"
    series.mkdir(parents=True)
    for k in range(3):
        ds = pydicom.dcmread(sample)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 5.0 * k]
        ds.InstanceNumber = k + 1
        ds.save_as(series / f"slice{k}.dcm")
    window = (-200.0, 300.0)
    native = read_folder(tmp_path, window=window).data["image"]
    resampled = read_folder(tmp_path, preprocess=Preprocess(spacing=(1.0, 1.0, 2.5), window=window)).data["image"]
    assert native.shape == (1, 1, 3, 128, 128)
    assert resampled.shape == (1, 1, 5, 85, 85)  # 128 x 0.66 mm = 85 mm; 3 slices 5 mm apart = 5 at 2.5 mm
    assert abs(float(resampled.mean()) - float(native.mean())) < 0.02
