"""Each strategy learns on the task it was made for (tiny models, a few rounds, in-process).

The exchange is simulated by passing states between :class:`Learner` objects on a ring,
doing what ``peer/rounds.py`` does each round (train, shared states as
``Contribution``\\ s, ``strategy.aggregate``, load); the network path is tested in
``test_peer_rounds.py``. Every test asserts a measurable improvement over the start.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from silomesh.models.registry import get_task
from silomesh.models.task import Federation, Task
from silomesh.peer.learner import Learner
from silomesh.strategies import Contribution, LocalStep, PseudoLabels, cps_targets, get_strategy, pseudo_labels
from silomesh.strategies.fedmix import TWIN_PREFIX, box_masks

SEED = 0


def ring(n: int) -> list[list[int]]:
    return [[1], [0]] if n == 2 else [sorted({(i - 1) % n, (i + 1) % n}) for i in range(n)]


def learners(task: Task, fed: Federation, strategy: str, params: dict[str, Any] | None = None,
             lr: float = 1e-2) -> list[Learner]:
    return [Learner(task, s, size="tiny", init_seed=SEED, batch_size=8, lr=lr,
                    strategy=get_strategy(strategy, params or {})) for s in fed.silos]


def update_round(ls: list[Learner], steps: int) -> tuple[list[LocalStep], list[Any]]:
    """One update round as peer/rounds.py runs it; returns the trainings and results."""
    graph = ring(len(ls))
    trained = [x.train(steps) for x in ls]
    results = []
    for i, x in enumerate(ls):
        contributions = [Contribution(f"p{j}", ls[j].shared(trained[j].state), ls[j].n_samples,
                                      loss=trained[j].mean_loss, degree=len(graph[j]))
                         for j in graph[i]]
        results.append(x.strategy.aggregate(trained[i].state, float(x.n_samples), contributions,
                                            own_degree=len(graph[i]), own_loss=trained[i].mean_loss))
    for x, t, r in zip(ls, trained, results, strict=True):
        x.load({**t.state, **r.state})
    return trained, results


def mean_dice(ls: list[Learner]) -> float:
    return float(np.mean([x.evaluate()["dice"] for x in ls]))


@pytest.fixture(scope="module")
def catheter() -> tuple[Task, Federation]:
    task = get_task("catheter")
    return task, task.make_federation(3, SEED, image_size=32, n_train=24, n_test=16, n_test_source=16)


def test_fedavg_lowers_loss_and_raises_dice_on_catheter(catheter: tuple[Task, Federation]) -> None:
    task, fed = catheter
    ls = learners(task, fed, "fedavg")
    start = mean_dice(ls)
    losses = [float(np.mean([t.mean_loss for t in update_round(ls, 15)[0]])) for _ in range(3)]
    assert losses[-1] < 0.8 * losses[0], losses
    assert mean_dice(ls) > start + 0.2


def test_fedefm_distils_and_mixes_experts_into_a_better_model(catheter: tuple[Task, Federation]) -> None:
    task, fed = catheter
    ls = learners(task, fed, "fedefm", {"distill_steps": 10, "lr": 1e-2, "mix": 0.5})
    ls[0].train(40)  # a shared warm start, as after a first round: FedEFM refines a model
    for x in ls[1:]:
        x.load(ls[0].state())
    graph = ring(len(ls))
    start = mean_dice(ls)
    losses = []
    for _ in range(4):
        starts = [x.state() for x in ls]
        experts = [[ls[j].train_copy(starts[i], 10) for j in graph[i]] for i in range(len(ls))]
        for i, x in enumerate(ls):
            info = x.learn_from_experts([Contribution(str(j), e.state) for j, e in enumerate(experts[i])])
            assert info["steps"] == 10 and sum(info["weights"]) == pytest.approx(1.0)
            distilled = x.state()
            assert not np.array_equal(distilled["head.weight"], starts[i]["head.weight"])
            result = x.strategy.aggregate(distilled, x.n_samples,
                                          [Contribution(f"p{j}", e.state) for j, e in
                                           zip(graph[i], experts[i], strict=True)])
            key = "head.weight"  # the mixing step: half own, half the experts' mean
            np.testing.assert_allclose(
                result.state[key],
                0.5 * distilled[key] + 0.25 * (experts[i][0].state[key] + experts[i][1].state[key]),
                rtol=1e-5, atol=1e-6)
            x.load(result.state)
        losses.append(np.mean([e.mean_loss for ex in experts for e in ex]))
    assert losses[-1] < 0.9 * losses[0], losses
    assert mean_dice(ls) > start + 0.05


@pytest.fixture(scope="module")
def organs() -> tuple[Task, Federation]:
    task = get_task("organs")
    return task, task.make_federation(4, SEED, image_size=32, n_train=24, n_test=12)


def test_segviz_keeps_trained_heads_averages_bodies_and_learns_each_organ(organs: tuple[Task, Federation]) -> None:
    task, fed = organs
    ls = learners(task, fed, "segviz")
    test = fed.tests["all"]
    names = [s.info["organ"] for s in fed.silos]

    def own_organ_dice() -> list[float]:
        return [x.evaluate(test)[f"dice_{o}"] for x, o in zip(ls, names, strict=True)]

    start = own_organ_dice()
    graph = ring(len(ls))
    losses = []
    for _ in range(4):
        trained, _ = update_round(ls, 20)
        losses.append(np.mean([t.mean_loss for t in trained]))
        for i, x in enumerate(ls):
            now = x.state()
            for k, v in now.items():
                if k.startswith("head."):  # bit-identical to what local training produced
                    assert v.tobytes() == trained[i].state[k].tobytes(), k
            hood = [i, *graph[i]]
            w = np.array([ls[j].n_samples for j in hood], float)
            body = "encoder.0.0.weight"
            np.testing.assert_allclose(
                now[body], np.average([trained[j].state[body] for j in hood], axis=0, weights=w),
                rtol=1e-5, atol=1e-6)
    assert losses[-1] < 0.8 * losses[0]
    end = own_organ_dice()
    assert np.mean(end) > np.mean(start) + 0.2, (start, end)
    assert sum(e > s for e, s in zip(end, start, strict=True)) >= 3, (start, end)


# --- FedMix's local-step helpers ------------------------------------------------------

def test_fedmix_box_masks_match_the_lesion_tasks_rounding() -> None:
    from silomesh.models.lesion import box_masks as lesion_box_masks

    rng = np.random.default_rng(3)
    boxes = np.concatenate([rng.uniform(-3, 20, (20, 2)), rng.uniform(-3, 20, (20, 2)) + 4], axis=1)
    boxes = np.concatenate([boxes, np.zeros((1, 4))]).astype(np.float32)  # "no lesion"
    np.testing.assert_array_equal(box_masks(boxes, (16, 18)), lesion_box_masks(boxes, (16, 18)))
    assert not box_masks(boxes[-1:], (16, 18)).any()


def test_cps_targets_give_each_network_the_others_label_and_ignore_dropped_samples() -> None:
    a = np.zeros((2, 2, 2), bool)
    b = np.ones((2, 2, 2), bool)
    for_a, for_b = cps_targets(PseudoLabels(a, b, np.array([True, False]), np.zeros(2)))
    assert for_a.dtype == np.int64 and for_b.dtype == np.int64
    assert (for_a[0] == 1).all() and (for_b[0] == 0).all()
    assert (for_a[1] == -1).all() and (for_b[1] == -1).all()


def test_pseudo_labels_drop_images_labelled_present_when_both_networks_miss_the_lesion() -> None:
    empty = np.full((2, 4, 4), 0.1)  # both networks see nothing in either image
    present = np.array([True, False])
    assert pseudo_labels(empty, empty, present=present).keep.tolist() == [False, True]
    assert pseudo_labels(empty, empty, present=present,
                         drop_contradicting=False).keep.tolist() == [True, True]
    box = np.zeros((2, 4, 4), bool)
    box[0, 1:3, 1:3] = True
    assert pseudo_labels(empty, empty, box=box, min_box_dice=0).keep.tolist() == [False, True]


# --- fedmix on lesion ---------------------------------------------------------------

@pytest.fixture(scope="module")
def lesion() -> tuple[Task, Federation]:
    task = get_task("lesion")
    return task, task.make_federation(3, SEED, image_size=32, n_train=32, n_test=24)


def test_fedmix_learner_keeps_a_second_network_that_round_trips_through_its_state(
    lesion: tuple[Task, Federation],
) -> None:
    task, fed = lesion
    a, b = learners(task, fed, "fedmix")[:2]
    state = a.state()
    twin = {k for k in state if k.startswith(TWIN_PREFIX)}
    assert twin and len(twin) * 2 == len(state)
    assert a.shapes == {k: v.shape for k, v in state.items()}  # what incoming updates are checked against
    assert not np.array_equal(state["head.weight"], state[TWIN_PREFIX + "head.weight"])
    a.train(2)
    b.load(a.state())  # what a restart from the store does
    assert all(np.array_equal(v, b.state()[k]) for k, v in a.state().items())
    assert learners(task, fed, "fedavg")[0].state().keys().isdisjoint(twin)


def test_fedmix_pseudo_labels_weak_silos_and_raises_the_image_level_silos_dice(lesion: tuple[Task, Federation]) -> None:
    task, fed = lesion
    ls = learners(task, fed, "fedmix")
    kinds = [x.silo.train.label_kind for x in ls]
    assert kinds == ["mask", "box", "present"]
    present = kinds.index("present")
    start = ls[present].evaluate()["dice"]
    infos: list[list[dict[str, float]]] = []
    losses = []
    for _ in range(5):
        trained, results = update_round(ls, 20)
        infos.append([t.info for t in trained])
        losses.append([t.mean_loss for t in trained])
        assert all(math.isfinite(r.weights["self"]) for r in results)
    # the pseudo-label step ran on the box and image-level silos only, every round
    for info in infos:
        assert info[0] == {}
        assert all(info[k]["pseudo_steps"] == 20 and info[k]["kept"] > 0 for k in (1, 2))
    # and it produced lesion pseudo-labels (not just background) for the image-level silo
    assert sum(info[present]["kept_foreground"] for info in infos) > 0
    assert np.mean(losses[-1]) < np.mean(losses[0])
    assert ls[present].evaluate()["dice"] > start + 0.3


@pytest.mark.slow
async def test_fedmix_peers_exchange_store_and_restore_both_networks(tmp_path: Path) -> None:
    """The second network crosses the real exchange (shape checks), the store and a restart."""
    import dataclasses

    import trio
    from peerkit import configs

    from silomesh.peer.config import TaskConfig
    from silomesh.peer.daemon import Peer

    def lesion_peers(rounds: int) -> list[Peer]:
        ids, cfgs = configs(tmp_path, 3, strategy="fedmix", rounds=rounds, local_steps=2)
        options = {"silos": 3, "seed": 0, "image_size": 32, "n_train": 8, "n_test": 4}
        cfgs = [dataclasses.replace(c, task=TaskConfig("lesion", "tiny", None, {**options, "silo": i}))
                for i, c in enumerate(cfgs)]
        return [Peer(c, identity=i, serve_control_api=False) for i, c in zip(ids, cfgs, strict=True)]

    async def run(peers: list[Peer]) -> list[tuple[list[dict[str, Any]], dict[str, np.ndarray]]]:
        """Run the peers to the end; each one's rounds and its latest stored model."""
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for p in peers:
                    await nursery.start(p.run)
                for p in peers:
                    await p.done.wait()
                out = [(await p.operator.rounds(), p.store.load_model(p.store.latest_model().digest)) for p in peers]
                nursery.cancel_scope.cancel()
        return out

    peers = lesion_peers(1)
    saved = []
    for p, (rounds, stored) in zip(peers, await run(peers), strict=True):
        assert [r["status"] for r in rounds] == ["done"]
        assert len(rounds[0]["contributors"]) == 2, rounds[0]  # twin keys passed the shape check
        assert any(k.startswith(TWIN_PREFIX) for k in stored) and set(stored) == set(p.learner.shapes)
        saved.append(stored)
    restarted = lesion_peers(1)  # same stores: resumes from the committed round, twin included
    for p, state in zip(restarted, saved, strict=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(p.run)
            now = p.learner.state()
            nursery.cancel_scope.cancel()
        assert all(np.array_equal(now[k], v) for k, v in state.items())
