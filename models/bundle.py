"""MONAI bundles in and out: a hospital's network, starting weights and pre-processing.

A bundle is a folder MONAI's own tools read (``monai.bundle``)::

    BUNDLE/configs/metadata.json     versions, description, network_data_format
    BUNDLE/configs/inference.json    network_def (``_target_`` + arguments), preprocessing
    BUNDLE/models/model.pt           the network's state dict

:func:`read_bundle` takes from it what a peer needs: ``network_def`` as a
:class:`~silomesh.models.architecture.ModelSpec` (a network of ``monai.networks.nets``),
``models/model.pt`` as the starting weights, and the grid steps of ``preprocessing``
(``Orientationd``, ``Spacingd``, ``ScaleIntensityRanged``, ``ResizeWithPadOrCropd``,
``SpatialPadd``) as a :class:`~silomesh.models.data_io.Preprocess`. Other transforms are
listed in :attr:`Bundle.ignored` and logged, not run. The bundle is a local folder the
hospital trusts: MONAI's config parser evaluates ``$`` expressions in it, and the weights
are read with ``torch.load(weights_only=True)``. Bytes from the network are never loaded
this way.

:func:`export_bundle` writes the federated model back as a bundle with
``monai.bundle.init_bundle``; ``monai.bundle.verify_net_in_out`` and
``monai.bundle.load`` accept it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from silomesh.models.architecture import ModelSpec
from silomesh.models.monai_net import ModelSpecError, check_spec
from silomesh.models.preprocess import Preprocess

if TYPE_CHECKING:
    from monai.bundle import ConfigParser

log = logging.getLogger(__name__)

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml", "train.json", "train.yaml")
#: transforms of a bundle's preprocessing that only load or reshape and need no counterpart
_HARMLESS = {"LoadImaged", "LoadImage", "EnsureChannelFirstd", "EnsureChannelFirst", "EnsureTyped", "EnsureType",
             "ToTensord", "ToTensor", "CastToTyped", "CastToType"}


class BundleError(ValueError):
    """A bundle folder that cannot be used; the message names the file."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True)
class Bundle:
    """What a peer takes from a MONAI bundle."""

    root: Path
    spec: ModelSpec
    weights: Path | None  # models/model.pt when present
    preprocess: Preprocess | None  # None: the bundle names no grid steps
    ignored: tuple[str, ...]  # preprocessing transforms we do not apply
    config_file: Path


def _config_file(root: Path) -> Path:
    for name in CONFIG_NAMES:
        if (root / "configs" / name).is_file():
            return root / "configs" / name
    raise BundleError(root / "configs", f"no bundle config ({', '.join(CONFIG_NAMES)})")


def read_bundle(root: str | Path) -> Bundle:
    """Read ``root`` as a MONAI bundle.

    Raises:
        BundleError: naming the file for a missing folder or config, a ``network_def``
            that is not a ``monai.networks.nets`` network with JSON arguments, or
            weights that do not fit it.
    """
    from monai.bundle import ConfigParser

    root = Path(root)
    if not root.is_dir():
        raise BundleError(root, "bundle folder does not exist")
    cfg_file = _config_file(root)
    parser = ConfigParser()
    try:
        parser.read_config(str(cfg_file))
        parser["bundle_root"] = str(root)
        raw = parser.get("network_def")
    except Exception as exc:  # yaml/json errors and MONAI's own
        raise BundleError(cfg_file, f"not a readable bundle config ({exc})") from exc
    if not isinstance(raw, Mapping) or "_target_" not in raw:
        raise BundleError(cfg_file, "network_def must be a dict with a _target_")
    args: dict[str, Any] = {}
    for key, value in raw.items():
        if key.startswith("_"):
            continue
        if isinstance(value, str) and value[:1] in ("@", "$", "%"):  # a reference or expression
            try:
                value = parser.get_parsed_content(f"network_def::{key}")
            except Exception as exc:
                raise BundleError(cfg_file, f"network_def.{key}: cannot be resolved ({exc})") from exc
        args[key] = value
    try:
        spec = check_spec(str(raw["_target_"]), args, field="network_def")
    except ModelSpecError as exc:
        raise BundleError(cfg_file, str(exc)) from None
    weights = root / "models" / "model.pt"
    preprocess, ignored = _preprocess_of(parser, cfg_file)
    if ignored:
        log.warning("bundle %s: preprocessing steps not applied by silomesh: %s", root, ", ".join(ignored))
    bundle = Bundle(root, spec, weights if weights.is_file() else None, preprocess, ignored, cfg_file)
    if bundle.weights is not None:  # fail at start-up, not in the first round
        from silomesh.models.monai_net import build_network

        try:
            build_network(spec, 0, weights=bundle.weights)
        except ValueError as exc:
            raise BundleError(bundle.weights, str(exc).removeprefix(f"{bundle.weights}: ")) from None
    return bundle


def _transforms(parser: ConfigParser) -> list[Mapping[str, Any]]:
    for key in ("preprocessing", "val_preprocessing", "preprocessing_transforms"):
        node = parser.get(key, None)
        if isinstance(node, Mapping):
            node = node.get("transforms", [])
        if isinstance(node, list):
            return [t for t in node if isinstance(t, Mapping)]
    return []


def _literal(parser: ConfigParser, value: object, where: str, cfg_file: Path) -> object:
    if isinstance(value, str) and value[:1] in ("@", "$", "%"):
        try:
            return parser.get_parsed_content(where)
        except Exception as exc:
            raise BundleError(cfg_file, f"{where}: cannot be resolved ({exc})") from exc
    return value


def _preprocess_of(parser: ConfigParser, cfg_file: Path) -> tuple[Preprocess | None, tuple[str, ...]]:
    found: dict[str, Any] = {}
    ignored: list[str] = []
    for i, t in enumerate(_transforms(parser)):
        name = str(t.get("_target_", "")).rsplit(".", 1)[-1]

        def arg(key: str, t: Mapping[str, Any] = t, i: int = i) -> Any:  # noqa: ANN401 - a bundle's JSON value
            return _literal(parser, t.get(key), f"preprocessing::transforms::{i}::{key}", cfg_file)

        if name in ("Orientationd", "Orientation"):
            found["orientation"] = str(arg("axcodes"))
        elif name in ("Spacingd", "Spacing"):
            found["spacing"] = tuple(float(v) for v in arg("pixdim"))
        elif name in ("ScaleIntensityRanged", "ScaleIntensityRange"):
            found["window"] = (float(arg("a_min")), float(arg("a_max")))
        elif name in ("ResizeWithPadOrCropd", "ResizeWithPadOrCrop", "SpatialPadd", "SpatialPad"):
            found["spatial_size"] = tuple(int(v) for v in arg("spatial_size"))
        elif name not in _HARMLESS:
            ignored.append(name or "?")
    if not found:
        return None, tuple(ignored)
    found.setdefault("orientation", None)
    try:
        return Preprocess(**found), tuple(ignored)
    except (ValueError, TypeError) as exc:
        raise BundleError(cfg_file, f"preprocessing: {exc}") from None


def _preprocessing_config(pre: Preprocess | None) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
    ]
    if pre is not None and pre.orientation is not None:
        steps.append({"_target_": "Orientationd", "keys": "image", "axcodes": pre.orientation})
    if pre is not None and pre.spacing is not None:
        steps.append({"_target_": "Spacingd", "keys": "image", "pixdim": list(pre.spacing), "mode": "bilinear"})
    if pre is not None and pre.window is not None:
        lo, hi = pre.window
        steps.append({"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": lo, "a_max": hi,
                      "b_min": 0.0, "b_max": 1.0, "clip": True})
    if pre is not None and pre.spatial_size is not None:
        steps.append({"_target_": "ResizeWithPadOrCropd", "keys": "image", "spatial_size": list(pre.spatial_size)})
    steps.append({"_target_": "EnsureTyped", "keys": "image"})
    return steps


def export_bundle(
    model: nn.Module,
    spec: ModelSpec,
    out: str | Path,
    *,
    input_shape: Sequence[int],
    preprocess: Preprocess | None = None,
    name: str = "silomesh federated model",
    description: str = "",
    channel_names: Sequence[str] = (),
) -> Path:
    """Write ``model`` (built from ``spec``) as a MONAI bundle at ``out`` (must not exist).

    Args:
        input_shape: one input ``(C, *spatial)`` in the network's axis order, for
            ``network_data_format`` (what ``verify_net_in_out`` feeds the network).
        preprocess: the grid steps written into ``preprocessing``.
        channel_names: names of the output channels (e.g. background, liver).

    Raises:
        BundleError: if ``out`` exists or its parent does not.
    """
    import monai
    from monai.bundle import init_bundle

    out = Path(out)
    if out.exists():
        raise BundleError(out, "already exists; give a new folder")
    channels, *spatial = (int(v) for v in input_shape)
    with torch.no_grad():
        was = model.training
        model.eval()
        try:
            n_out = int(model(torch.zeros(1, channels, *spatial)).shape[1])
        finally:
            model.train(was)
    names = list(channel_names) or [f"class {i}" for i in range(n_out)]
    metadata = {
        "version": "0.1.0",
        "changelog": {"0.1.0": "exported by silomesh after federated training"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": __import__("numpy").__version__,
        "name": name,
        "task": "segmentation",
        "description": description or f"{spec.short_name} trained with silomesh (federated)",
        "authors": "silomesh federation",
        "copyright": "the federation's members",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "any", "num_channels": channels,
                "spatial_shape": spatial, "dtype": "float32", "value_range": [0, 1],
                "is_patch_data": False, "channel_def": {str(i): f"channel {i}" for i in range(channels)},
            }},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": n_out, "spatial_shape": spatial,
                "dtype": "float32", "value_range": [], "is_patch_data": False,
                "channel_def": {str(i): n for i, n in enumerate(names[:n_out])},
            }},
        },
        "silomesh": {"model": spec.name, "args_digest": spec.args_digest},
    }
    inference = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "network_def": {"_target_": spec.name, **json.loads(spec.canonical_args())},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": _preprocessing_config(preprocess)},
    }
    init_bundle(out, network=model, metadata_str=metadata, inference_str=inference)
    return out
