"""catheter task: generator, source layout, holdout split, loss, evaluation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from silomesh.models.catheter import SOURCE_NAMES, CatheterTask, generate
from silomesh.models.synth import stream
from silomesh.models.task import Federation
from silomesh.models.train import train_local

SMALL = {"image_size": 32, "n_train": 16, "n_test": 8, "n_test_source": 8, "n_finetune": 8}


@pytest.fixture(scope="module")
def task() -> CatheterTask:
    return CatheterTask(**SMALL)


@pytest.fixture(scope="module")
def fed(task: CatheterTask) -> Federation:
    return task.make_federation(4, seed=0)


def test_frames_have_declared_shapes_range_and_classes(fed: Federation) -> None:
    train = fed.silos[0].train
    assert train["image"].shape == (16, 1, 32, 32) and train["image"].dtype == np.float32
    assert train["mask"].shape == (16, 32, 32) and train["mask"].dtype == np.int64
    assert train["image"].min() >= 0.0 and train["image"].max() <= 1.0
    assert set(np.unique(train["mask"])) == {0, 1, 2}


def test_same_seed_gives_identical_data_and_another_seed_differs(task: CatheterTask) -> None:
    a = task.make_federation(2, seed=3)
    b = task.make_federation(2, seed=3)
    c = task.make_federation(2, seed=4)
    assert np.array_equal(a.silos[1].train["image"], b.silos[1].train["image"])
    assert np.array_equal(a.tests["all"]["mask"], b.tests["all"]["mask"])
    assert not np.array_equal(a.silos[1].train["image"], c.silos[1].train["image"])


def test_ring_assignment_gives_silo_i_sources_i_and_i_plus_1(fed: Federation) -> None:
    for i, silo in enumerate(fed.silos):
        expected = [SOURCE_NAMES[i], SOURCE_NAMES[(i + 1) % 4]]
        assert silo.info["sources"] == expected
        seen = {SOURCE_NAMES[s] for s in np.unique(silo.train["source"])}
        assert seen == set(expected)


def test_every_source_is_unseen_by_some_silo_and_has_a_test_set(fed: Federation) -> None:
    for name in SOURCE_NAMES:
        assert f"source:{name}" in fed.tests
        assert any(name not in silo.info["sources"] for silo in fed.silos)
    assert len(fed.tests["all"]) == 4 * 8


def test_shared_source_test_sets_do_not_depend_on_silo_count(task: CatheterTask) -> None:
    two = task.make_federation(2, seed=0).tests["source:animal"]
    five = task.make_federation(5, seed=0).tests["source:animal"]
    assert np.array_equal(two["image"], five["image"])


def test_sources_differ_in_intensity_and_noise() -> None:
    task = CatheterTask(image_size=48)
    means, noise = [], []
    for name in SOURCE_NAMES:
        data = generate(name, 12, stream(0, 99), task.config)
        img = data["image"][:, 0]
        means.append(float(img.mean()))
        # noise: median absolute high-pass residual away from the devices
        residual = img - ndimage.gaussian_filter(img, (0, 1.0, 1.0))
        near_device = ndimage.binary_dilation(data["mask"] > 0, np.ones((1, 7, 7)))
        noise.append(float(np.median(np.abs(residual[~near_device]))))
    gaps = [abs(a - b) for i, a in enumerate(means) for b in means[i + 1 :]]
    assert min(gaps) > 0.03
    # simulator -> phantom -> animal -> clinical: darker and noisier
    assert means == sorted(means, reverse=True)
    assert noise == sorted(noise)
    assert noise[-1] > 2 * noise[0]


def test_holdout_source_is_kept_from_every_silo(task: CatheterTask) -> None:
    fed = task.make_federation(3, seed=0, holdout_source="clinical")
    for silo in fed.silos:
        assert "clinical" not in silo.info["sources"]
        assert SOURCE_NAMES.index("clinical") not in silo.train["source"]
    assert "source:clinical" in fed.tests


def test_downstream_split_gives_finetune_data_and_the_shared_test_set(task: CatheterTask) -> None:
    fed = task.make_federation(2, seed=0, holdout_source="phantom")
    finetune, test = task.downstream_split(0, holdout_source="phantom")
    assert len(finetune) == 8
    assert np.all(finetune["source"] == SOURCE_NAMES.index("phantom"))
    assert np.array_equal(test["image"], fed.tests["source:phantom"]["image"])
    assert not np.array_equal(finetune["image"], test["image"])


def test_downstream_split_without_a_source_is_an_error(task: CatheterTask) -> None:
    with pytest.raises(ValueError, match="holdout_source"):
        task.downstream_split(0)


def test_unknown_source_and_unknown_option_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown sources"):
        CatheterTask(sources=("simulator", "mars"))
    with pytest.raises(ValueError, match="unknown option"):
        CatheterTask(colour="red")


def test_a_few_steps_reduce_the_loss(task: CatheterTask, fed: Federation) -> None:
    model = task.make_model("tiny", seed=0)
    losses = train_local(task, model, fed.silos[0].train, steps=30, batch_size=4, lr=1e-2)
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5])


def test_evaluate_reports_dice_per_class_and_vit_backbone_works(fed: Federation) -> None:
    task = CatheterTask(arch="vit", **SMALL)
    model = task.make_model("tiny", seed=0)
    report = task.evaluate(model, fed.tests["source:simulator"])
    assert {"dice", "iou", "dice_catheter", "dice_guidewire", "iou_guidewire"} <= set(report)
    assert all(0.0 <= v <= 1.0 for v in report.values())
