"""Personal models: the shared model fine-tuned on the silo's data after each round."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing
from memnet import MemoryNetwork
from test_round_loop import Timeline, make, running

from silomesh.peer.config import ConfigError, PersonalConfig, parse_config
from silomesh.peer.daemon import _last_good_model
from silomesh.peer.store import PERSONAL, Store, StoreError


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
    for bad, field in (({"steps": -1}, "personal.steps"), ({"lr": 0.0}, "personal.lr"),
                       ({"step": 3}, "personal.step"), ({"steps": "5"}, "personal.steps")):
        with pytest.raises(ConfigError, match=field):
            parse_config(_raw(**bad), tmp_path)


async def _run(root: Path, personal_steps: int) -> list[dict[str, object]]:
    net = MemoryNetwork()
    peers = make(root, 2, net, Timeline(net, 2), rounds=2, extra={"personal": {"steps": personal_steps}})
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
