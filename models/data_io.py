"""Loading a hospital's own images from disk, and describing them in a manifest.

Folder conventions (one dataset per folder ``ROOT``; names match by stem)::

    ROOT/images/NAME.png        PNG, 8- or 16-bit grayscale, or RGB
    ROOT/images/NAME.npy        NumPy array: (H, W), (C, H, W) or (C, D, H, W)
    ROOT/images/NAME.nii[.gz]   NIfTI volume
    ROOT/images/NAME/           a DICOM series: one file per slice (any file name)
    ROOT/masks/NAME.png|.npy|.nii[.gz]   optional label map, integer class ids
    ROOT/boxes.csv              optional, header ``name,y0,x0,y1,x1`` (pixels, half-open;
                                empty coordinates: no lesion)
    ROOT/labels.csv             optional, header ``name,present`` (0 or 1)

Reading rules:

- PNG intensities are scaled to [0, 1] by the type's maximum (255 or 65535); ``.npy``
  images are taken as stored (cast to float32), a 2D array gets a channel axis.
- NIfTI volumes are reoriented to the closest canonical (RAS+) orientation and returned
  as ``(1, D, H, W)`` with D the third voxel axis (axial slices for usual CT/MR);
  scaling (slope/intercept) is applied, so CT stays in Hounsfield units.
- DICOM slices are sorted along the slice normal (``ImagePositionPatient``), else by
  ``InstanceNumber``, and rescaled with ``RescaleSlope``/``RescaleIntercept``. A DICOM
  series' mask must be a ``.npy`` of shape ``(D, H, W)`` in that slice order.
- A mask has the image's spatial shape. All images of a folder must share one shape.
- ``window=(lo, hi)`` maps intensities linearly to [0, 1] and clips (e.g. (-200, 300)
  for abdominal CT); ``as_slices=True`` cuts volumes into 2D slices for 2D tasks.
- ``preprocess=Preprocess(...)`` reads NIfTI and DICOM with MONAI's transforms instead:
  reoriented to ``orientation`` (default RAS), resampled to ``spacing`` (mm), windowed,
  and padded or cropped to ``spatial_size``, so folders from scanners with different
  spacings and orientations become arrays of one shape on one grid. ``spacing`` and
  ``spatial_size`` are in MONAI's voxel-axis order (x, y, z after reorientation), as in a
  bundle's ``Spacingd``; the arrays come out ``(1, D, H, W)`` = ``(1, z, y, x)`` as above.
  Images are resampled with bilinear, masks with nearest-neighbour interpolation.
- The label kind is ``"mask"`` (masks/ exists), else ``"box"`` (boxes.csv), else
  ``"present"`` (labels.csv), else ``"none"``.

Every problem raises :class:`DatasetError` naming the offending file. Sinograms and
other raw arrays use :func:`load_npy` / :func:`load_array_folder`.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from silomesh.models.preprocess import Preprocess
from silomesh.models.task import ArrayDataset

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".npy", ".nii", ".nii.gz")
MASK_SUFFIXES = (".png", ".npy", ".nii", ".nii.gz")


class DatasetError(ValueError):
    """A dataset on disk cannot be used; the message names the file or folder."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {problem}")


def _preprocess_volume(path: Path, pre: Preprocess, *, as_mask: bool) -> np.ndarray:
    """``(1, D, H, W)`` float32 image or ``(D, H, W)`` int64 mask through MONAI's transforms.

    Raises:
        DatasetError: naming ``path`` for anything MONAI or its readers reject.
    """
    from monai.transforms import LoadImage, Orientation, ResizeWithPadOrCrop, ScaleIntensityRange, Spacing

    reader = "PydicomReader" if path.is_dir() else "NibabelReader"
    steps: list[Any] = [LoadImage(reader=reader, image_only=True, ensure_channel_first=True)]
    if pre.orientation is not None:
        steps.append(Orientation(axcodes=pre.orientation.upper(), labels=None))
    if pre.spacing is not None:
        steps.append(Spacing(pixdim=pre.spacing, mode="nearest" if as_mask else "bilinear"))
    if pre.window is not None and not as_mask:
        lo, hi = pre.window
        steps.append(ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True))
    if pre.spatial_size is not None:
        steps.append(ResizeWithPadOrCrop(pre.spatial_size))
    try:
        data = steps[0](str(path))
        if data.ndim != 4 or data.shape[0] != 1:
            raise DatasetError(path, f"expected one 3D volume, got shape {tuple(data.shape)}")
        for step in steps[1:]:
            data = step(data)
        arr = np.asarray(data.detach().cpu().numpy() if hasattr(data, "detach") else data)
    except DatasetError:
        raise
    except Exception as exc:  # MONAI and its readers raise many types for bad files
        raise DatasetError(path, f"cannot be read and resampled ({type(exc).__name__}: {exc})") from exc
    arr = np.transpose(arr, (0, 3, 2, 1))  # (C, x, y, z) -> (C, D, H, W)
    if as_mask:  # nearest-neighbour resampling keeps the label values: they must be class ids
        labels = arr[0]
        if not np.all(np.isfinite(labels)) or not np.array_equal(labels, np.rint(labels)) or np.any(labels < 0):
            raise DatasetError(path, "mask values must be non-negative integer class ids")
        return labels.astype(np.int64)
    if not np.all(np.isfinite(arr)):
        raise DatasetError(path, "volume contains NaN or infinite values")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _is_volume(path: Path) -> bool:
    return path.is_dir() or _suffix(path) in (".nii", ".nii.gz")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _stem(path: Path) -> str:
    return path.name[: -len(_suffix(path))] if _suffix(path) else path.name


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


# ---------------------------------------------------------------- single files


def load_npy(path: str | Path) -> np.ndarray:
    """Read a ``.npy`` array safely (no pickles) and check it is real and finite.

    Raises:
        DatasetError: unreadable file, object/complex dtype, or NaN/inf values.
    """
    path = Path(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DatasetError(path, f"not a readable .npy array ({exc})") from exc
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf":
        raise DatasetError(path, f"expected a real numeric array, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise DatasetError(path, "array contains NaN or infinite values")
    return arr


def _load_png(path: Path, *, as_mask: bool) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if as_mask:
                arr = np.asarray(im.convert("L") if mode in ("RGB", "RGBA", "LA") else im)
                return arr.astype(np.int64)
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                return (np.asarray(im).astype(np.float32) / 65535.0)[None]
            rgb_like = ("RGBA", "P", "CMYK", "YCbCr")
            plain = im if mode in ("L", "RGB") else im.convert("RGB" if mode in rgb_like else "L")
            arr = np.asarray(plain).astype(np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as exc:
        raise DatasetError(path, f"not a readable PNG image ({exc})") from exc
    return arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)


def _load_nifti(path: Path, *, as_mask: bool) -> np.ndarray:
    import nibabel as nib

    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asarray(img.dataobj) if as_mask else img.get_fdata(dtype=np.float32)
    except Exception as exc:  # nibabel raises a zoo of types for bad files
        raise DatasetError(path, f"not a readable NIfTI volume ({exc})") from exc
    if data.ndim != 3:
        raise DatasetError(path, f"expected a 3D volume, got shape {data.shape}")
    data = np.transpose(data, (2, 1, 0))  # (i, j, k) -> (D, H, W)
    if as_mask:
        return np.rint(data).astype(np.int64)
    return np.ascontiguousarray(data, dtype=np.float32)[None]


def load_dicom_series(folder: str | Path) -> np.ndarray:
    """Read a DICOM series (one file per slice) as ``(1, D, H, W)`` float32.

    Raises:
        DatasetError: naming the first file that is not DICOM, has no pixels, or whose
            slice shape differs; or the folder if it is empty.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    files = [p for p in _visible(folder) if p.is_file()]
    if not files:
        raise DatasetError(folder, "DICOM series folder is empty")
    slices = []
    for f in files:
        try:
            ds = pydicom.dcmread(f)
            pixels = ds.pixel_array.astype(np.float32)
        except (InvalidDicomError, AttributeError, OSError, ValueError, KeyError) as exc:
            raise DatasetError(f, f"not a readable DICOM image ({exc})") from exc
        if pixels.ndim != 2:
            raise DatasetError(f, f"expected one 2D slice per file, got shape {pixels.shape}")
        slope = float(getattr(ds, "RescaleSlope", 1.0))
        intercept = float(getattr(ds, "RescaleIntercept", 0.0))
        slices.append((ds, f, pixels * slope + intercept))
    shape = slices[0][2].shape
    for _, f, px in slices:
        if px.shape != shape:
            raise DatasetError(f, f"slice shape {px.shape} differs from {shape}")

    def position(item: tuple[Any, Path, np.ndarray]) -> tuple[float, str]:
        ds, f, _ = item
        ipp, iop = (
            getattr(ds, "ImagePositionPatient", None),
            getattr(ds, "ImageOrientationPatient", None),
        )
        if ipp is not None and iop is not None:
            normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
            return float(np.dot(normal, np.asarray(ipp, float))), f.name
        return float(getattr(ds, "InstanceNumber", 0) or 0), f.name

    slices.sort(key=position)
    return np.stack([px for _, _, px in slices])[None]


def load_image(path: str | Path) -> np.ndarray:
    """One image: ``(C, H, W)`` for 2D files, ``(C, D, H, W)`` for volumes; float32.

    Raises:
        DatasetError: unsupported type or unreadable file.
    """
    path = Path(path)
    if path.is_dir():
        return load_dicom_series(path)
    suffix = _suffix(path)
    if suffix == ".png":
        return _load_png(path, as_mask=False)
    if suffix in (".nii", ".nii.gz"):
        return _load_nifti(path, as_mask=False)
    if suffix == ".npy":
        arr = load_npy(path).astype(np.float32)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim not in (3, 4):
            raise DatasetError(path, f"expected (H, W), (C, H, W) or (C, D, H, W), got {arr.shape}")
        return arr
    raise DatasetError(path, f"unsupported image type; use one of {', '.join(IMAGE_SUFFIXES)} or a DICOM folder")


def load_mask(path: str | Path) -> np.ndarray:
    """One label map of integer class ids: ``(H, W)`` or ``(D, H, W)``, int64.

    Raises:
        DatasetError: unsupported type, unreadable file, or non-integer labels.
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix == ".png":
        return _load_png(path, as_mask=True)
    if suffix in (".nii", ".nii.gz"):
        return _load_nifti(path, as_mask=True)
    if suffix == ".npy":
        arr = load_npy(path)
        if arr.dtype.kind == "f" and not np.array_equal(arr, np.rint(arr)):
            raise DatasetError(path, "mask values must be integer class ids")
        if arr.ndim not in (2, 3):
            raise DatasetError(path, f"expected a (H, W) or (D, H, W) mask, got {arr.shape}")
        return arr.astype(np.int64)
    raise DatasetError(path, f"unsupported mask type; use one of {', '.join(MASK_SUFFIXES)}")


def load_array_folder(folder: str | Path, pattern: str = "*.npy") -> tuple[list[str], np.ndarray]:
    """All ``.npy`` arrays of a folder stacked in name order (e.g. sinograms).

    Returns:
        (names, array of shape ``(N, *shape)``).

    Raises:
        DatasetError: empty folder, unreadable file, or shapes that differ.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(folder, "folder does not exist")
    files = sorted(folder.glob(pattern))
    if not files:
        raise DatasetError(folder, f"no files matching {pattern}")
    arrays = [load_npy(f) for f in files]
    for f, a in zip(files, arrays, strict=True):
        if a.shape != arrays[0].shape:
            raise DatasetError(f, f"shape {a.shape} differs from {arrays[0].shape} ({files[0].name})")
    return [_stem(f) for f in files], np.stack(arrays)


# ---------------------------------------------------------------- folders


@dataclass(frozen=True)
class FolderDataset:
    """A loaded folder: the data plus where each sample came from."""

    data: ArrayDataset
    names: list[str]  # one per sample ("NAME" or "NAME#slice" with as_slices)
    files: list[Path]  # every file that was read, for the manifest digest
    formats: tuple[str, ...]  # file types met, e.g. (".png",) or ("dicom",)


def _read_csv(path: Path, columns: Sequence[str]) -> dict[str, list[str]]:
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or list(reader.fieldnames[: len(columns)]) != list(columns):
                raise DatasetError(path, f"header must start with {','.join(columns)}")
            return {row["name"]: [row[c] or "" for c in columns[1:]] for row in reader}
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(path, f"not a readable CSV file ({exc})") from exc


def _find_mask(masks: Path, name: str) -> Path | None:
    for suffix in MASK_SUFFIXES:
        candidate = masks / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _weak_labels(root: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """``box``/``present`` arrays from ``boxes.csv`` or ``labels.csv``, in ``names`` order.

    Raises:
        DatasetError: naming the CSV file for a missing row or a value that is not a number.
    """
    path = root / "boxes.csv"
    columns: tuple[str, ...] = ("name", "y0", "x0", "y1", "x1")
    if not path.is_file():
        path, columns = root / "labels.csv", ("name", "present")
    table = _read_csv(path, columns)
    rows = []
    for name in names:
        if name not in table:
            raise DatasetError(path, f"no row for image {name!r}")
        try:
            rows.append([float(v) if v.strip() else 0.0 for v in table[name]])
        except ValueError as exc:
            raise DatasetError(path, f"row {name!r}: {exc}") from exc
    values = np.asarray(rows, dtype=np.float32)
    if len(columns) == 2:
        return {"present": values[:, 0]}
    present = (values[:, 2] > values[:, 0]) & (values[:, 3] > values[:, 1])
    return {"box": values, "present": present.astype(np.float32)}


def _load_entry(
    entry: Path, masks_dir: Path | None, window: tuple[float, float] | None, pre: Preprocess | None = None
) -> tuple[np.ndarray, np.ndarray | None, list[Path]]:
    """One image (file or DICOM folder), its mask if ``masks_dir``, and the files read."""
    name = _stem(entry) if entry.is_file() else entry.name
    volume = pre is not None and _is_volume(entry)
    if pre is not None and volume and window is not None:
        pre = replace(pre, window=None)  # an explicit window overrides the configured one
    if pre is not None and pre.window is not None and window is None and not volume:
        window = pre.window  # PNG/.npy: the configured window still applies
    image = _preprocess_volume(entry, pre, as_mask=False) if pre is not None and volume else load_image(entry)
    files = sorted(p for p in entry.iterdir() if p.is_file()) if entry.is_dir() else [entry]
    if window is not None:
        lo, hi = window
        image = np.clip((image - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    if masks_dir is None:
        return image, None, files
    mask_path = _find_mask(masks_dir, name)
    if mask_path is None:
        raise DatasetError(masks_dir / f"{name}.*", f"no mask for image {entry.name}")
    if pre is not None and volume and _is_volume(mask_path):
        mask = _preprocess_volume(mask_path, pre, as_mask=True)
    else:
        mask = load_mask(mask_path)
    if mask.shape != image.shape[1:]:
        raise DatasetError(mask_path, f"mask shape {mask.shape} != image shape {image.shape[1:]} ({entry.name})")
    return image, mask, [*files, mask_path]


def read_folder(
    root: str | Path,
    *,
    window: tuple[float, float] | None = None,
    as_slices: bool = False,
    preprocess: Preprocess | None = None,
) -> FolderDataset:
    """Load ``root`` following the conventions of the module docstring.

    With ``preprocess``, NIfTI and DICOM images and masks go through MONAI's transforms
    (:class:`Preprocess`); ``window`` then overrides ``preprocess.window``.

    Raises:
        DatasetError: missing or empty ``images/``, an unreadable file, a missing mask,
            an image/mask shape mismatch, images of different shapes, or a bad CSV.
    """
    root = Path(root)
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise DatasetError(root, "no images/ folder (see silomesh.models.data_io for the layout)")
    entries = _visible(images_dir)
    if not entries:
        raise DatasetError(images_dir, "folder is empty")
    masks_dir = root / "masks" if (root / "masks").is_dir() else None

    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    names: list[str] = []
    files: list[Path] = []
    for entry in entries:
        image, mask, read = _load_entry(entry, masks_dir, window, preprocess)
        if images and image.shape != images[0].shape:
            raise DatasetError(entry, f"shape {image.shape} differs from {images[0].shape} ({names[0]})")
        images.append(image)
        masks += [] if mask is None else [mask]
        names.append(_stem(entry) if entry.is_file() else entry.name)
        files += read
    formats = tuple(sorted({"dicom" if e.is_dir() else _suffix(e) for e in entries}))

    arrays: dict[str, np.ndarray] = {"image": np.stack(images).astype(np.float32)}
    kind = "none"
    if masks_dir is not None:
        kind, arrays["mask"] = "mask", np.stack(masks)
    elif (root / "boxes.csv").is_file() or (root / "labels.csv").is_file():
        arrays.update(_weak_labels(root, names))
        kind = "box" if "box" in arrays else "present"
        files.append(root / ("boxes.csv" if kind == "box" else "labels.csv"))
    if as_slices and arrays["image"].ndim == 5:  # (N, C, D, H, W) -> (N * D, C, H, W)
        n, c, depth = arrays["image"].shape[:3]
        names = [f"{name}#{k}" for name in names for k in range(depth)]
        for key, arr in arrays.items():
            if key == "image":
                arrays[key] = np.moveaxis(arr, 2, 1).reshape(n * depth, c, *arr.shape[3:])
            elif key == "mask":
                arrays[key] = arr.reshape(n * depth, *arr.shape[2:])
            else:
                arrays[key] = np.repeat(arr, depth, axis=0)
    logger.info("loaded %d samples (%s) from %s", len(names), kind, root)
    return FolderDataset(ArrayDataset(arrays, kind), names, files, formats)


def load_folder(
    root: str | Path,
    *,
    window: tuple[float, float] | None = None,
    as_slices: bool = False,
    preprocess: Preprocess | None = None,
) -> ArrayDataset:
    """:func:`read_folder` without the bookkeeping: just the :class:`ArrayDataset`."""
    return read_folder(root, window=window, as_slices=as_slices, preprocess=preprocess).data


# ---------------------------------------------------------------- manifest


@dataclass(frozen=True)
class DatasetManifest:
    """What a peer may announce about its data without revealing any of it."""

    count: int  # samples
    image_shape: tuple[int, ...]  # one sample, e.g. (1, 64, 64)
    image_dtype: str  # e.g. "float32"
    label_kind: str  # "mask", "box", "present" or "none"
    label_keys: tuple[str, ...]  # arrays next to "image", e.g. ("mask",)
    digest: str  # BLAKE2b-256 hex over the files (or arrays) the data came from
    digest_of: str  # "files" or "arrays"
    files: int  # files read (0 for in-memory data)
    bytes: int  # their total size
    formats: tuple[str, ...]  # e.g. (".nii.gz",), ("dicom",), ("synthetic",)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out


def digest_files(files: Sequence[Path], root: str | Path) -> str:
    """BLAKE2b-256 over files in path order: relative path, size and content of each.

    Raises:
        DatasetError: naming a file that cannot be read.
    """
    root = Path(root)
    h = hashlib.blake2b(digest_size=32)
    for f in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        rel = f.relative_to(root).as_posix().encode()
        h.update(len(rel).to_bytes(8, "little") + rel)
        try:
            size = f.stat().st_size
            h.update(size.to_bytes(8, "little"))
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        except OSError as exc:
            raise DatasetError(f, f"cannot read ({exc})") from exc
    return h.hexdigest()


def digest_arrays(data: ArrayDataset) -> str:
    """BLAKE2b-256 over a dataset's arrays (key, dtype, shape and bytes, in key order)."""
    h = hashlib.blake2b(digest_size=32)
    for key in sorted(data.arrays):
        arr = np.ascontiguousarray(data[key])
        h.update(f"{key}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def manifest_for(
    data: ArrayDataset, *, source: FolderDataset | None = None, root: str | Path | None = None
) -> DatasetManifest:
    """Describe ``data``.

    The digest covers the files of ``source`` (relative to ``root``) when both are given,
    else the arrays themselves (e.g. for synthetic data).
    """
    files = source.files if source is not None else []
    if source is not None and root is not None:
        digest, of = digest_files(files, root), "files"
    else:
        digest, of = digest_arrays(data), "arrays"
    return DatasetManifest(
        count=len(data),
        image_shape=tuple(int(s) for s in data["image"].shape[1:]),
        image_dtype=str(data["image"].dtype),
        label_kind=data.label_kind,
        label_keys=tuple(sorted(k for k in data.arrays if k != "image")),
        digest=digest,
        digest_of=of,
        files=len(files),
        bytes=sum(f.stat().st_size for f in files),
        formats=source.formats if source is not None else ("synthetic",),
    )


def folder_manifest(
    root: str | Path,
    *,
    window: tuple[float, float] | None = None,
    as_slices: bool = False,
    preprocess: Preprocess | None = None,
) -> DatasetManifest:
    """Load ``root`` and describe it, digesting the files read.

    Raises:
        DatasetError: as :func:`read_folder`.
    """
    loaded = read_folder(root, window=window, as_slices=as_slices, preprocess=preprocess)
    return manifest_for(loaded.data, source=loaded, root=root)
