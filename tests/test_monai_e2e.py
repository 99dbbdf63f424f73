"""Two real peers federate a MONAI network on NIfTI sites with different spacings and orientations.

The federated model is exported as a MONAI bundle, which MONAI loads and runs on a volume
read through the bundle's own pre-processing. A neighbour whose network arguments differ
is refused before any weights travel.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import monai.bundle
import numpy as np
import pytest
import torch
import trio
from monaikit import write_site
from peerkit import configs

from silomesh.models.bundle import export_bundle
from silomesh.peer.config import PeerConfig
from silomesh.peer.daemon import Peer

pytestmark = pytest.mark.slow

ARGS_3D = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "features": [4, 4, 8, 8, 16, 4]}
TASK = {
    "name": "catheter",  # three-class segmentation: loss, Dice and IoU come from the task
    "model": "monai.networks.nets.BasicUNet",
    "model_args": ARGS_3D,
    "preprocess": {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0], "window": [-200, 400],
                   "spatial_size": [32, 32, 32]},
}


def _sites(tmp_path: Path) -> list[Path]:
    return [
        write_site(tmp_path / "site-a", (1.0, 1.5, 3.0), flip_x=False, n=5, extent=48.0),  # RAS, thick slices
        write_site(tmp_path / "site-b", (3.0, 2.0, 1.0), flip_x=True, n=5, extent=48.0),  # LAS, thin slices
    ]


def _peers(tmp_path: Path, tasks: list[dict[str, Any]], *, rounds: int, deadline: float) -> list[Peer]:
    ids, cfgs = configs(tmp_path, 2, rounds=rounds, deadline=deadline, local_steps=2, extra={"task": tasks[0]})
    _, other = configs(tmp_path / "other", 2, extra={"task": tasks[1]})
    cfgs[1] = dataclasses.replace(cfgs[1], task=other[1].task)
    return [Peer(c, identity=i, serve_control_api=False) for i, c in zip(ids, cfgs, strict=True)]


async def _run(peers: list[Peer]) -> list[dict[str, Any]]:
    async with trio.open_nursery() as nursery:
        for p in peers:
            await nursery.start(p.run)
        for p in peers:
            await p.done.wait()
        seen = [{"rounds": await p.operator.rounds(), "audit": p.audit_log.entries()} for p in peers]
        nursery.cancel_scope.cancel()
    return seen


async def test_two_peers_federate_a_monai_network_on_nifti_sites_and_export_a_bundle_monai_runs(
    tmp_path: Path,
) -> None:
    site_a, site_b = _sites(tmp_path)
    peers = _peers(tmp_path, [{**TASK, "dataset": str(site_a)}, {**TASK, "dataset": str(site_b)}],
                   rounds=2, deadline=60.0)
    with trio.fail_after(240):
        seen = await _run(peers)
    for me, other, record in ((peers[0], peers[1], seen[0]), (peers[1], peers[0], seen[1])):
        assert [r["status"] for r in record["rounds"]] == ["done", "done"]
        assert all(r["contributors"] == [other.peer_id] for r in record["rounds"])
        assert np.isfinite(record["rounds"][-1]["metrics"]["dice"])
        assert type(me.learner.model).__name__ == "BasicUNet"
        # both sites' volumes reached the network on one grid
        assert me.learner.silo.train["image"].shape[1:] == (1, 32, 32, 32)

    config: PeerConfig = peers[0].config
    assert config.task.spec is not None
    out = export_bundle(peers[0].learner.model, config.task.spec, tmp_path / "federated-bundle",
                        input_shape=(1, 32, 32, 32), preprocess=config.task.preprocess)
    monai.bundle.verify_net_in_out(net_id="network_def", meta_file=str(out / "configs" / "metadata.json"),
                                   config_file=str(out / "configs" / "inference.json"))
    parser = monai.bundle.ConfigParser()
    parser.read_config(str(out / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(out / "models" / "model.pt", weights_only=True))
    # a volume of site b (LAS, 3 x 2 x 1 mm) through the bundle's own MONAI pre-processing
    volume = parser.get_parsed_content("preprocessing")({"image": str(site_b / "images" / "case0.nii.gz")})["image"]
    assert tuple(volume.shape) == (1, 32, 32, 32)
    with torch.no_grad():
        logits = net.eval()(volume[None].float())
        ours = peers[0].learner.model.eval()(volume[None].float())
    assert tuple(logits.shape) == (1, 3, 32, 32, 32)
    assert torch.equal(logits, ours)


async def test_a_neighbour_with_other_network_arguments_is_refused_before_weights_travel(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site_a, site_b = _sites(tmp_path)
    wider = {**TASK, "model_args": {**ARGS_3D, "features": [8, 8, 8, 8, 16, 8]}, "dataset": str(site_b)}
    peers = _peers(tmp_path, [{**TASK, "dataset": str(site_a)}, wider], rounds=1, deadline=8.0)
    with trio.fail_after(120):
        seen = await _run(peers)
    for record in seen:
        assert [r["contributors"] for r in record["rounds"]] == [[]]
        exchanged = {e["kind"] for e in record["audit"] if e["direction"] in ("sent", "received")}
        assert "hello" in exchanged and exchanged <= {"hello", "error"}  # no update, ack or need-base
    assert "runs another model (task.model_args differ" in caplog.text
    assert peers[0].context.endpoint.model_id != peers[1].context.endpoint.model_id
