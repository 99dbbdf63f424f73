"""Loaders for real formats (PNG, npy, NIfTI, DICOM), their errors, and the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from silomesh.models.data_io import (
    DatasetError,
    digest_arrays,
    folder_manifest,
    load_array_folder,
    load_dicom_series,
    load_folder,
    manifest_for,
    read_folder,
)
from silomesh.models.task import ArrayDataset


def _png_pairs(root: Path, n: int = 3, shape: tuple[int, int] = (8, 10)) -> np.ndarray:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    for i in range(n):
        Image.fromarray(images[i]).save(root / "images" / f"case{i}.png")
        Image.fromarray((images[i] > 128).astype(np.uint8) * 2).save(root / "masks" / f"case{i}.png")
    return images


def _write_dicom(path: Path, pixels: np.ndarray, z: float, instance: int) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.InstanceNumber = instance
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_png_pairs_round_trip(tmp_path: Path) -> None:
    images = _png_pairs(tmp_path)
    data = load_folder(tmp_path)
    assert data.label_kind == "mask"
    assert data["image"].shape == (3, 1, 8, 10) and data["image"].dtype == np.float32
    assert np.allclose(data["image"][:, 0], images / 255.0)
    assert np.array_equal(data["mask"], (images > 128).astype(np.int64) * 2)


def test_rgb_and_16_bit_png_are_scaled_to_unit_range(tmp_path: Path) -> None:
    (tmp_path / "rgb" / "images").mkdir(parents=True)
    rgb = np.random.default_rng(1).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb" / "images" / "a.png")
    loaded = load_folder(tmp_path / "rgb")
    assert loaded["image"].shape == (1, 3, 6, 7)
    assert np.allclose(loaded["image"][0], np.moveaxis(rgb, -1, 0) / 255.0)
    assert loaded.label_kind == "none"
    (tmp_path / "deep" / "images").mkdir(parents=True)
    deep = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep" / "images" / "b.png")
    assert np.allclose(load_folder(tmp_path / "deep")["image"][0, 0], deep / 65535.0)


def test_npy_pairs_round_trip(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    img = np.random.default_rng(2).normal(size=(2, 5, 6)).astype(np.float32)
    mask = np.arange(30).reshape(5, 6) % 3
    np.save(tmp_path / "images" / "x.npy", img)
    np.save(tmp_path / "masks" / "x.npy", mask)
    data = load_folder(tmp_path)
    assert np.array_equal(data["image"][0], img)
    assert np.array_equal(data["mask"][0], mask)


def test_nifti_volumes_round_trip_as_depth_first_and_as_slices(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    vol = np.random.default_rng(3).normal(0, 100, (6, 5, 4)).astype(np.float32)  # (i, j, k)
    seg = (vol > 0).astype(np.uint8)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "images" / "ct.nii.gz")
    nib.save(nib.Nifti1Image(seg, np.eye(4)), tmp_path / "masks" / "ct.nii.gz")
    data = load_folder(tmp_path)
    assert data["image"].shape == (1, 1, 4, 5, 6)  # (N, C, D=k, H=j, W=i)
    assert np.allclose(data["image"][0, 0], vol.transpose(2, 1, 0), atol=1e-3)
    assert np.array_equal(data["mask"][0], seg.transpose(2, 1, 0))
    sliced = read_folder(tmp_path, as_slices=True, window=(-100.0, 100.0))
    assert sliced.data["image"].shape == (4, 1, 5, 6)
    assert sliced.names[:2] == ["ct#0", "ct#1"]
    assert sliced.data["image"].min() >= 0.0 and sliced.data["image"].max() <= 1.0


def test_dicom_series_is_sorted_by_position_and_rescaled(tmp_path: Path) -> None:
    series = tmp_path / "images" / "patient1"
    series.mkdir(parents=True)
    slices = [np.full((4, 5), 100 * (k + 1), dtype=np.uint16) for k in range(3)]
    # file names deliberately out of anatomical order
    for name, k in (("b.dcm", 2), ("a.dcm", 0), ("c.dcm", 1)):
        _write_dicom(series / name, slices[k], z=10.0 * k, instance=k + 1)
    volume = load_dicom_series(series)
    assert volume.shape == (1, 3, 4, 5)
    assert np.allclose(volume[0, :, 0, 0], [2 * 100 - 1024, 2 * 200 - 1024, 2 * 300 - 1024])
    assert load_folder(tmp_path)["image"].shape == (1, 1, 3, 4, 5)


def test_boxes_and_labels_csv_set_the_label_kind(tmp_path: Path) -> None:
    _png_pairs(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "masks")
    (tmp_path / "boxes.csv").write_text("name,y0,x0,y1,x1\ncase0,1,2,5,6\ncase1,,,,\ncase2,0,0,8,10\n")
    data = load_folder(tmp_path)
    assert data.label_kind == "box"
    assert np.array_equal(data["box"][0], [1, 2, 5, 6])
    assert list(data["present"]) == [1.0, 0.0, 1.0]
    (tmp_path / "boxes.csv").unlink()
    (tmp_path / "labels.csv").write_text("name,present\ncase0,1\ncase1,0\ncase2,1\n")
    data = load_folder(tmp_path)
    assert data.label_kind == "present" and list(data["present"]) == [1.0, 0.0, 1.0]


def test_empty_images_folder_is_named_in_the_error(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match="images: folder is empty") as info:
        load_folder(tmp_path)
    assert info.value.path == tmp_path / "images"


def test_missing_images_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no images/ folder"):
        load_folder(tmp_path)


def test_unreadable_png_is_named_in_the_error(tmp_path: Path) -> None:
    _png_pairs(tmp_path)
    (tmp_path / "images" / "case1.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match=r"case1\.png: not a readable PNG"):
        load_folder(tmp_path)


def test_mask_shape_mismatch_names_the_mask(tmp_path: Path) -> None:
    _png_pairs(tmp_path)
    Image.fromarray(np.zeros((8, 9), dtype=np.uint8)).save(tmp_path / "masks" / "case2.png")
    with pytest.raises(DatasetError, match=r"masks/case2\.png: mask shape \(8, 9\)"):
        load_folder(tmp_path)


def test_missing_mask_names_the_image(tmp_path: Path) -> None:
    _png_pairs(tmp_path)
    (tmp_path / "masks" / "case0.png").unlink()
    with pytest.raises(DatasetError, match=r"no mask for image case0\.png"):
        load_folder(tmp_path)


def test_images_of_different_shapes_name_the_odd_file(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    np.save(tmp_path / "images" / "a.npy", np.zeros((4, 4)))
    np.save(tmp_path / "images" / "b.npy", np.zeros((4, 5)))
    with pytest.raises(DatasetError, match=r"b\.npy: shape \(1, 4, 5\) differs"):
        load_folder(tmp_path)


def test_npy_with_nan_or_pickled_objects_is_refused(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    np.save(tmp_path / "images" / "a.npy", np.array([[np.nan, 1.0]]))
    with pytest.raises(DatasetError, match=r"a\.npy: array contains NaN"):
        load_folder(tmp_path)
    (tmp_path / "images" / "a.npy").unlink()
    np.save(tmp_path / "images" / "b.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DatasetError, match=r"b\.npy: not a readable \.npy"):
        load_folder(tmp_path)


def test_unsupported_file_type_is_named(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError, match=r"notes\.txt: unsupported image type"):
        load_folder(tmp_path)


def test_array_folder_stacks_sinograms_and_refuses_mixed_shapes(tmp_path: Path) -> None:
    for i in range(3):
        np.save(tmp_path / f"s{i}.npy", np.full((6, 8), i, dtype=np.float32))
    names, stack = load_array_folder(tmp_path)
    assert names == ["s0", "s1", "s2"] and stack.shape == (3, 6, 8)
    np.save(tmp_path / "s3.npy", np.zeros((6, 9), dtype=np.float32))
    with pytest.raises(DatasetError, match=r"s3\.npy: shape \(6, 9\) differs"):
        load_array_folder(tmp_path)
    with pytest.raises(DatasetError, match="no files matching"):
        load_array_folder(tmp_path, pattern="*.nothing")


def test_manifest_describes_without_data_and_digest_tracks_content(tmp_path: Path) -> None:
    _png_pairs(tmp_path)
    first = folder_manifest(tmp_path)
    again = folder_manifest(tmp_path)
    assert first == again
    assert (first.count, first.image_shape, first.label_kind) == (3, (1, 8, 10), "mask")
    assert first.files == 6 and first.digest_of == "files" and len(first.digest) == 64
    as_json = json.loads(json.dumps(first.to_dict()))
    assert as_json["image_shape"] == [1, 8, 10] and as_json["formats"] == [".png"]
    Image.fromarray(np.zeros((8, 10), dtype=np.uint8)).save(tmp_path / "images" / "case1.png")
    assert folder_manifest(tmp_path).digest != first.digest


def test_manifest_of_in_memory_data_digests_the_arrays() -> None:
    a = ArrayDataset({"image": np.zeros((2, 1, 4, 4), np.float32), "present": np.ones(2, np.float32)}, "present")
    b = ArrayDataset({"image": np.ones((2, 1, 4, 4), np.float32), "present": np.ones(2, np.float32)}, "present")
    m = manifest_for(a)
    assert m.digest == digest_arrays(a) != digest_arrays(b)
    assert m.formats == ("synthetic",) and m.label_keys == ("present",) and m.files == 0


def test_bad_or_missing_csv_rows_name_the_csv(tmp_path: Path) -> None:
    _png_pairs(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "masks")
    (tmp_path / "labels.csv").write_text("name,present\ncase0,1\ncase1,yes\ncase2,0\n")
    with pytest.raises(DatasetError, match=r"labels\.csv: row 'case1'"):
        load_folder(tmp_path)
    (tmp_path / "labels.csv").write_text("name,present\ncase0,1\ncase2,0\n")
    with pytest.raises(DatasetError, match=r"labels\.csv: no row for image 'case1'"):
        load_folder(tmp_path)
