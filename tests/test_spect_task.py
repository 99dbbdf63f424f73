"""ReconNet and the spect task: model contract, training, federation layout, baselines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from silomesh.models.recon import BackProjector, ReconNet, recon_config
from silomesh.models.spect import SpectTask, make_dataset, run_baselines
from silomesh.models.spect_phantom import make_phantom
from silomesh.models.spect_recon import Geometry, fbp, get_projector, simulate_sinograms
from silomesh.models.task import ArrayDataset

SMALL = {"size": 16, "n_train": 8, "n_silo_test": 4, "n_test": 8}


@pytest.fixture(scope="module")
def task() -> SpectTask:
    return SpectTask(size=32, n_angles=24)


@pytest.fixture(scope="module")
def data(task: SpectTask) -> ArrayDataset:
    return make_dataset(16, 3, task.config, counts=[5e4, 5e5] * 8, infarct_rate=0.5)


def test_fresh_network_without_gain_is_exactly_fbp() -> None:
    g = Geometry(32, 24)
    net = ReconNet(recon_config("tiny", g))
    act = np.stack([make_phantom(i, 32).activity for i in range(2)])
    y = simulate_sinograms(act, g, counts=1e5, rng=np.random.default_rng(0))
    with torch.no_grad():
        out = net(torch.from_numpy(y)[:, None])[:, 0].numpy()
    np.testing.assert_allclose(out, fbp(y, g), atol=1e-4 * np.abs(out).max())


def test_back_projection_gradient_is_the_forward_projection() -> None:
    g = Geometry(16, 12)
    q = torch.randn(1, 1, 12, 16, dtype=torch.float32, requires_grad=True)
    r = torch.randn(1, 1, 16, 16)
    (BackProjector(g)(q) * r).sum().backward()
    assert q.grad is not None
    scale = np.pi / g.n_angles / g.pixel_width**2
    expected = get_projector(g).forward(r[0].numpy().astype(np.float64)) * scale
    np.testing.assert_allclose(q.grad[0].numpy(), expected, rtol=1e-4, atol=1e-4)


def test_model_splits_body_and_head_and_returns_features(task: SpectTask) -> None:
    model = task.make_model("tiny", seed=0)
    body, head = model.split_names()
    assert head and all(n.startswith("head.") for n in head)
    assert body and not any(n.startswith("head.") for n in body)
    out, feat = model.forward_features(torch.zeros(2, 1, 24, 32))
    assert out.shape == (2, 1, 32, 32)
    assert feat.ndim == 4 and feat.shape[0] == 2 and feat.shape[2:] == (32, 32)
    with pytest.raises(ValueError):
        model(torch.zeros(2, 1, 32, 32))  # wrong number of angles


def test_model_is_deterministic_per_seed_and_small_at_64() -> None:
    t = SpectTask(size=64)
    a, b, c = t.make_model("small", 1), t.make_model("small", 1), t.make_model("small", 2)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
    assert 100_000 <= sum(p.numel() for p in a.parameters()) <= 1_000_000


def test_network_loss_decreases_with_adam(task: SpectTask, data: ArrayDataset) -> None:
    torch.manual_seed(0)
    model = task.make_model("tiny", seed=0)
    batch = next(data.batches(16, np.random.default_rng(0), shuffle=False))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    with torch.no_grad():
        before = task.loss(model, batch).item()
    for _ in range(20):
        opt.zero_grad()
        task.loss(model, batch).backward()
        opt.step()
    with torch.no_grad():
        after = task.loss(model, batch).item()
    assert after < 0.8 * before, (before, after)


def test_dataset_has_declared_keys_and_normalised_scale(data: ArrayDataset) -> None:
    d = data
    assert d["image"].shape == (16, 1, 24, 32) and d["image"].dtype == np.float32
    assert d["target"].shape == (16, 1, 32, 32) and d["mu"].shape == (16, 1, 32, 32)
    assert set(np.unique(d["infarct"])) == {0, 1} and d["infarct"].sum() == 8
    # sinograms are divided by their count scale: both doses have the same mean level
    sums = d["image"].reshape(16, -1).sum(axis=1)
    low, high = sums[d["counts"] == np.float32(5e4)], sums[d["counts"] == np.float32(5e5)]
    assert 0.7 < low.mean() / high.mean() < 1.3


def test_federation_is_reproducible_from_its_seed() -> None:
    a = SpectTask(**SMALL).make_federation(3, seed=7)
    b = SpectTask(**SMALL).make_federation(3, seed=7)
    c = SpectTask(**SMALL).make_federation(3, seed=8)
    for sa, sb in zip(a.silos, b.silos, strict=True):
        assert sa.info == sb.info
        for key in sa.train.arrays:
            np.testing.assert_array_equal(sa.train[key], sb.train[key])
    np.testing.assert_array_equal(a.tests["all"]["image"], b.tests["all"]["image"])
    assert not np.array_equal(a.silos[0].train["image"], c.silos[0].train["image"])


def test_silos_differ_in_dose_and_noise_and_tests_split_by_infarct() -> None:
    fed = SpectTask(**SMALL).make_federation(3, seed=1)
    levels = [s.info["count_level"] for s in fed.silos]
    assert len(set(levels)) == 3 and max(levels) / min(levels) >= 5
    assert {s.info["dose"] for s in fed.silos} == {"low", "high"}
    for s in fed.silos:
        assert s.train["infarct"].mean() == pytest.approx(s.info["infarct_rate"], abs=1 / 8)
    assert len({s.info["infarct_rate"] for s in fed.silos}) == 3
    assert set(fed.tests) >= {"all", "infarct", "normal"}
    assert fed.tests["infarct"]["infarct"].all() and not fed.tests["normal"]["infarct"].any()
    assert len(fed.tests["infarct"]) + len(fed.tests["normal"]) == len(fed.tests["all"])


def test_low_dose_sinograms_are_noisier() -> None:
    cfg = SpectTask(size=16, attenuation=False).config
    noisy = {c: make_dataset(4, 0, cfg, counts=c, infarct_rate=0.5)["image"] for c in (1e4, 1e6)}
    clean = make_dataset(4, 0, cfg, counts=1e12, infarct_rate=0.5)["image"]
    assert np.std(noisy[1e4] - clean) > 5 * np.std(noisy[1e6] - clean)


def test_evaluate_and_baselines_report_metrics(task: SpectTask, data: ArrayDataset) -> None:
    model = task.make_model("tiny", seed=0)
    scores = task.evaluate(model, data)
    assert {"psnr", "ssim", "nrmse"} <= set(scores) and task.metric in scores
    assert np.isfinite(scores["psnr"]) and -1 <= scores["ssim"] <= 1
    res = run_baselines(data, task.geometry, model=model, mlem_iterations=5)
    assert set(res) == {"fbp", "mlem", "network"}
    for metrics in res.values():
        assert metrics["ms_per_image"] > 0 and np.isfinite(metrics["psnr"])
    # a fresh network is FBP with a population-average attenuation correction
    assert abs(res["network"]["psnr"] - res["fbp"]["psnr"]) < 2.0
