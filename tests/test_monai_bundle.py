"""MONAI bundles in and out: what a peer takes from one, and what MONAI's tools read back."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import monai.bundle
import pytest
import torch

from silomesh.models.bundle import BundleError, export_bundle, read_bundle
from silomesh.models.monai_net import build_network, check_spec
from silomesh.models.preprocess import Preprocess
from silomesh.peer.config import ConfigError, parse_config
from silomesh.peer.learner import build_task

ARGS_3D = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "features": [4, 4, 8, 8, 16, 4]}
GRID = Preprocess(orientation="RAS", spacing=(2.0, 2.0, 2.0), window=(-200.0, 400.0), spatial_size=(32, 32, 32))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _exported(tmp_path: Path, seed: int = 5) -> tuple[Path, torch.nn.Module]:
    spec = check_spec("BasicUNet", ARGS_3D)
    net = build_network(spec, seed=seed)
    out = export_bundle(net, spec, tmp_path / "bundle", input_shape=(1, 32, 32, 32), preprocess=GRID,
                        channel_names=("background", "catheter", "guidewire"))
    return out, net


def test_exported_bundle_passes_monais_own_checks_and_loads_with_monai(tmp_path: Path) -> None:
    out, net = _exported(tmp_path)
    config, meta = out / "configs" / "inference.json", out / "configs" / "metadata.json"
    # MONAI's verifier builds network_def and runs the input shape of metadata.json through it
    monai.bundle.verify_net_in_out(net_id="network_def", meta_file=str(meta), config_file=str(config))
    # MONAI's ConfigParser builds the network; the weights are ours, bit for bit
    parser = monai.bundle.ConfigParser()
    parser.read_config(str(config))
    rebuilt = parser.get_parsed_content("network_def")
    rebuilt.load_state_dict(torch.load(out / "models" / "model.pt", weights_only=True))
    assert _same(rebuilt, net)
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), net.eval()(x))
    # monai.bundle.load reads a local bundle into a network
    fresh = build_network(check_spec("BasicUNet", ARGS_3D))
    loaded = monai.bundle.load(name="bundle", bundle_dir=str(tmp_path), model=fresh)
    assert isinstance(loaded, torch.nn.Module) and _same(loaded, net)
    # the preprocessing MONAI would run for inference resamples like the peer did
    steps = parser.get_parsed_content("preprocessing").transforms
    assert [type(t).__name__ for t in steps] == [
        "LoadImaged", "EnsureChannelFirstd", "Orientationd", "Spacingd", "ScaleIntensityRanged",
        "ResizeWithPadOrCropd", "EnsureTyped",
    ]


def test_reading_an_exported_bundle_gives_back_network_weights_and_preprocessing(tmp_path: Path) -> None:
    out, net = _exported(tmp_path)
    bundle = read_bundle(out)
    assert bundle.spec == check_spec("BasicUNet", ARGS_3D)
    assert bundle.preprocess == GRID and bundle.ignored == ()
    assert bundle.weights == out / "models" / "model.pt"
    assert _same(build_network(bundle.spec, seed=0, weights=bundle.weights), net)


def test_peer_config_takes_a_bundle_and_starts_every_model_from_its_weights(tmp_path: Path) -> None:
    _, net = _exported(tmp_path)
    raw: dict[str, Any] = {"federation": "f", "key_file": "k",
                           "task": {"name": "catheter", "bundle": "bundle", "preprocess": {"window": [0, 100]}}}
    cfg = parse_config(raw, tmp_path)
    assert cfg.task.spec == check_spec("BasicUNet", ARGS_3D)
    assert cfg.task.preprocess == Preprocess(orientation="RAS", spacing=(2.0, 2.0, 2.0), window=(0.0, 100.0),
                                             spatial_size=(32, 32, 32))  # [task.preprocess] over the bundle's
    task = build_task(cfg.task)
    assert _same(task.make_model(seed=1), net) and _same(task.make_model(seed=2), net)


def test_a_bundle_with_a_reference_in_network_def_resolves_it(tmp_path: Path) -> None:
    out, _ = _exported(tmp_path)
    config = out / "configs" / "inference.json"
    data = json.loads(config.read_text())
    data["n_classes"] = 3
    data["network_def"]["out_channels"] = "@n_classes"
    config.write_text(json.dumps(data))
    assert read_bundle(out).spec == check_spec("BasicUNet", ARGS_3D)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("network_def"), "network_def must be a dict"),
        (lambda d: d["network_def"].update(_target_="torch.nn.Linear"), "network_def: expected a network of"),
        (lambda d: d["network_def"].update(out_channels=2),
         r"model\.pt: final_conv\.weight has shape \(3, 4, 1, 1, 1\), the network's is \(2,"),
        (lambda d: d["network_def"].update(colour="red"), "network_def_args.colour: BasicUNet takes no argument"),
    ],
)
def test_a_bundle_that_cannot_be_used_is_named_in_the_error(
    tmp_path: Path, edit: Callable[[dict[str, Any]], object], message: str
) -> None:
    out, _ = _exported(tmp_path)
    config = out / "configs" / "inference.json"
    data = json.loads(config.read_text())
    edit(data)
    config.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=message):
        read_bundle(out)
    with pytest.raises(ConfigError, match=r"^task\.bundle: .*bundle"):
        parse_config({"federation": "f", "key_file": "k", "task": {"bundle": str(out)}}, tmp_path)


def test_export_refuses_to_overwrite(tmp_path: Path) -> None:
    out, net = _exported(tmp_path)
    with pytest.raises(BundleError, match="already exists"):
        export_bundle(net, check_spec("BasicUNet", ARGS_3D), out, input_shape=(1, 32, 32, 32))


def test_silomesh_train_takes_a_bundle_and_a_nifti_folder_and_exports_a_bundle(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from monaikit import write_site

    from silomesh.peer.cli import cli

    bundle, _ = _exported(tmp_path)
    site = write_site(tmp_path / "site", (3.0, 2.0, 1.0), flip_x=True, n=5, extent=48.0)
    out = tmp_path / "trained"
    result = CliRunner().invoke(cli, ["train", "--task", "catheter", "--bundle", str(bundle), "--dataset", str(site),
                                      "--steps", "2", "--batch-size", "2", "--export-bundle", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["model"] == "monai.networks.nets.BasicUNet" and report["train_samples"] == 4
    assert set(report["results"]) == {"own"} and "dice" in report["results"]["own"]
    again = read_bundle(out)
    assert again.spec == check_spec("BasicUNet", ARGS_3D) and again.preprocess == GRID
    bad = CliRunner().invoke(cli, ["train", "--task", "catheter", "--model", "BasicUNet", "--model-arg", "colour=1"])
    assert bad.exit_code != 0 and "--model-arg.colour: BasicUNet takes no argument" in bad.output


def test_export_bundle_command_writes_a_peers_model_with_its_task_settings(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from monaikit import write_site

    from silomesh.peer.cli import cli

    site = write_site(tmp_path / "site", (1.0, 1.5, 3.0), flip_x=False, n=2, extent=48.0)
    (tmp_path / "peer.toml").write_text(f"""
federation = "ct-2026"
key_file = "peer.key"
[task]
name = "catheter"
model = "monai.networks.nets.BasicUNet"
dataset = "{site}"
[task.model_args]
spatial_dims = 3
in_channels = 1
out_channels = 3
features = [4, 4, 8, 8, 16, 4]
[task.preprocess]
orientation = "RAS"
spacing = [2.0, 2.0, 2.0]
window = [-200, 400]
spatial_size = [32, 32, 32]
""")
    net = build_network(check_spec("BasicUNet", ARGS_3D), seed=9)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    args = ["export-bundle", "--config", str(tmp_path / "peer.toml"), "--weights", str(tmp_path / "model.pt")]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    bundle = read_bundle(tmp_path / "b")
    assert bundle.preprocess == GRID and bundle.weights is not None
    assert _same(build_network(bundle.spec, weights=bundle.weights), net)
    again = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "b")])
    assert again.exit_code != 0 and "already exists" in again.output
