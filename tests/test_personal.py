"""Personal models: the shared model fine-tuned on the silo's data after each round."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing
from memnet import MemoryNetwork
from peerkit import TINY_CATHETER
from test_round_loop import Timeline, make, running

from silomesh.models.registry import get_task
from silomesh.peer import personal
from silomesh.peer.config import ConfigError, PersonalConfig, parse_config
from silomesh.peer.daemon import _last_good_model
from silomesh.peer.learner import Learner
from silomesh.peer.store import PERSONAL, Store, StoreError
from silomesh.protocol import state_digest
from silomesh.strategies import get_strategy


def _state(seed: int) -> dict[str, np.ndarray]:
    return {"w": np.random.default_rng(seed).standard_normal(4).astype(np.float32)}


def test_the_personal_ref_names_the_newest_personal_model_and_never_the_shared_one(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite")
    with pytest.raises(StoreError, match="no personal model yet"):
        store.model(PERSONAL)
    store.save_model(_state(0), "aa" * 32, round=0)
    store.save_model(_state(1), "bb" * 32, round=0, parent="aa" * 32, origin=PERSONAL)
    store.save_model(_state(2), "cc" * 32, round=1, parent="aa" * 32)
    store.save_model(_state(3), "dd" * 32, round=1, parent="cc" * 32, origin=PERSONAL)
    assert store.latest_model().digest == "cc" * 32  # rounds resume from, and build on, the shared one
    assert store.model(PERSONAL).digest == "dd" * 32
    with pytest.raises(StoreError, match="reserved"):
        store.rename_model("cc" * 32, PERSONAL)
    record, _ = _last_good_model(store)  # a restart resumes the shared model
    assert record.digest == "cc" * 32
    store.close()


def _raw(**personal: object) -> dict[str, object]:
    return {"federation": "f", "key_file": "k", "task": {"name": "catheter"}, "personal": personal}


def test_personal_section_is_checked_with_errors_that_name_the_field(tmp_path: Path) -> None:
    assert parse_config(_raw(), tmp_path).personal == PersonalConfig()
    assert parse_config(_raw(steps=5, lr=0.01), tmp_path).personal == PersonalConfig(5, 0.01)
    assert parse_config(_raw(steps=5, method="ditto", ditto_lambda=1), tmp_path).personal == PersonalConfig(
        5, None, "ditto", 1.0)
    for bad, field in (({"steps": -1}, "personal.steps"), ({"lr": 0.0}, "personal.lr"),
                       ({"step": 3}, "personal.step"), ({"steps": "5"}, "personal.steps"),
                       ({"method": "fedrep"}, "personal.method"), ({"ditto_lambda": -0.5}, "personal.ditto_lambda"),
                       ({"ditto_lambda": float("inf")}, "personal.ditto_lambda")):
        with pytest.raises(ConfigError, match=field):
            parse_config(_raw(**bad), tmp_path)


async def _run(root: Path, personal_steps: int, **personal: object) -> list[dict[str, object]]:
    net = MemoryNetwork()
    peers = make(root, 2, net, Timeline(net, 2), rounds=2, extra={"personal": {"steps": personal_steps, **personal}})
    out = []
    async with running(peers):
        for p in peers:
            await p.done.wait()
        for p in peers:
            models = await p.operator.models()
            rounds = await p.operator.rounds()
            out.append({"models": [(m["round"], m["origin"], m["digest"], m["parent"]) for m in models],
                        "metrics": {(r["round"], k): v for r in rounds for k, v in r["metrics"].items()}})
    return out


async def test_each_round_stores_a_personal_model_and_the_shared_models_are_unchanged(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    plain = await _run(tmp_path / "plain", 0)
    personal = await _run(tmp_path / "personal", 3)
    for without, with_ in zip(plain, personal, strict=True):
        shared = [m for m in with_["models"] if m[1] != PERSONAL]
        assert shared == without["models"]  # the same shared models, digest for digest
        tuned = [m for m in with_["models"] if m[1] == PERSONAL]
        assert [m[0] for m in tuned] == [0, 1]
        assert [m[3] for m in tuned] == [m[2] for m in shared]  # each one's parent is its round's shared model
        assert {m[2] for m in tuned}.isdisjoint(m[2] for m in shared)  # and it did train
        for r in (0, 1):
            assert np.isfinite(with_["metrics"][(r, "personal_dice")])
            assert (r, "personal_dice") not in without["metrics"]


async def test_ditto_goes_on_from_the_stored_personal_model_every_round(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 0 starts from the shared model; round 1 from round 0's stored personal model (read
    from the store, as after a restart); the shared models are those of a run without one."""
    calls: list[tuple[int, dict[str, np.ndarray] | None]] = []
    real = personal.fine_tune

    def spy(learner: Learner, config: PersonalConfig, lr: float, round: int,
            previous: dict[str, np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        assert config.method == "ditto" and config.ditto_lambda == 0.5
        calls.append((round, previous))
        return real(learner, config, lr, round, previous)

    monkeypatch.setattr(personal, "fine_tune", spy)
    plain = await _run(tmp_path / "plain", 0)
    ditto = await _run(tmp_path / "ditto", 3, method="ditto", ditto_lambda=0.5)
    assert sorted(r for r, _ in calls) == [0, 0, 1, 1]
    assert all(prev is None for r, prev in calls if r == 0)
    stored = {}
    for i, (without, with_) in enumerate(zip(plain, ditto, strict=True)):
        assert [m for m in with_["models"] if m[1] != PERSONAL] == without["models"]
        tuned = [m for m in with_["models"] if m[1] == PERSONAL]
        assert [m[0] for m in tuned] == [0, 1]
        store = Store(next((tmp_path / "ditto" / f"p{i}").rglob("store.sqlite")))
        stored[tuned[0][2]] = store.load_model(tuned[0][2])
        store.close()
    for r, prev in calls:
        if r == 1:
            assert prev is not None
            digest = state_digest(prev).hex()
            assert digest in stored  # one of the two peers' round-0 personal models
            assert all(np.array_equal(prev[k], stored[digest][k]) for k in prev)


def test_ditto_with_no_pull_is_the_fine_tune_of_the_previous_model_and_a_pull_stays_nearer_shared() -> None:
    task = get_task("catheter", **TINY_CATHETER)
    learner = Learner(task, task.make_federation(2, seed=0).silos[0], size="tiny", init_seed=7, batch_size=4,
                      lr=0.01, strategy=get_strategy("fedavg", {}))
    shared = learner.state()
    rng = np.random.default_rng(0)
    previous = {k: (v + rng.standard_normal(v.shape).astype(v.dtype) * 0.05 if v.dtype.kind == "f" else v)
                for k, v in shared.items()}

    def ditto(lam: float, prev: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        return personal.fine_tune(learner, PersonalConfig(4, 0.01, "ditto", lam), 0.01, 1, prev)[0]

    free = ditto(0.0, previous)
    learner.load(previous)  # a fine-tune of the previous model: the same steps, no pull
    tuned = personal.fine_tune(learner, PersonalConfig(4, 0.01), 0.01, 1)[0]
    learner.load(shared)
    assert all(np.array_equal(free[k], tuned[k]) for k in free)
    pulled = ditto(100.0, previous)

    def gap(state: dict[str, np.ndarray]) -> float:
        return float(sum(((state[k] - shared[k]) ** 2).sum() for k in shared if shared[k].dtype.kind == "f"))

    assert gap(pulled) < 0.5 * gap(free), (gap(pulled), gap(free))
    # a previous model of another shape is not used: Ditto starts again from the shared model
    misfit = {k: v for k, v in previous.items() if k != next(iter(previous))}
    assert all(np.array_equal(a, b) for a, b in zip(ditto(0.5, misfit).values(), ditto(0.5, None).values(),
                                                      strict=True))


def test_the_head_method_trains_the_head_only_and_needs_a_model_with_one() -> None:
    task = get_task("catheter", **TINY_CATHETER)
    learner = Learner(task, task.make_federation(2, seed=0).silos[0], size="tiny", init_seed=7, batch_size=4,
                      lr=0.01, strategy=get_strategy("fedavg", {}))
    shared = learner.state()
    tuned, metrics = personal.fine_tune(learner, PersonalConfig(4, 0.01, "head"), 0.01, 1)
    head = [k for k in shared if k.startswith(learner.model.head_prefixes)]
    assert head and all(np.array_equal(tuned[k], shared[k]) for k in shared if k not in head)  # the body, BN included
    assert any(not np.array_equal(tuned[k], shared[k]) for k in head)
    assert np.isfinite(metrics["dice"])
    assert all(np.array_equal(v, shared[k]) for k, v in learner.state().items())  # the learner's model is untouched
    learner.model.head_prefixes = ()
    with pytest.raises(ValueError, match="task head"):
        personal.fine_tune(learner, PersonalConfig(4, 0.01, "head"), 0.01, 1)
