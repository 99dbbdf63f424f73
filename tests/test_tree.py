"""``fedavg`` with ``reduce = "tree"``: the federation's exact mean, up a tree of the peers and down."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing
from memnet import MemoryNetwork, StartTogether
from peerkit import configs, identity

from silomesh.peer.context import InlineCompute
from silomesh.peer.daemon import Peer
from silomesh.peer.learner import Learner
from silomesh.peer.operator import OperatorError
from silomesh.strategies import FedAvgConfig, RoundShape, get_strategy
from silomesh.strategies.workbench import LocalStep

IDS = [identity(f"p{i}").peer_id_text for i in range(5)]


def _full(n: int) -> list[list[int]]:
    return [[j for j in range(n) if j != i] for i in range(n)]


def _tree(order: Sequence[str], **more: Any) -> dict[str, Any]:
    return {"strategy": {"name": "fedavg", "params": {"reduce": "tree", "order": list(order), **more}}}


def test_the_tree_gives_each_peer_its_parent_children_and_depth() -> None:
    cfg = FedAvgConfig(reduce="tree", order=tuple(IDS))  # p0 -> p1, p2; p1 -> p3, p4
    assert [cfg.tree_parent(p) for p in IDS] == [None, IDS[0], IDS[0], IDS[1], IDS[1]]
    assert [cfg.tree_children(p) for p in IDS] == [(IDS[1], IDS[2]), (IDS[3], IDS[4]), (), (), ()]
    assert [cfg.tree_depth(p) for p in IDS] == [0, 1, 1, 2, 2] and cfg.tree_height() == 2
    assert cfg.tree_ties(IDS[1]) == (IDS[0], IDS[3], IDS[4])
    wide = FedAvgConfig(reduce="tree", order=tuple(IDS), fanout=4)
    assert wide.tree_children(IDS[0]) == tuple(IDS[1:]) and wide.tree_height() == 1
    assert get_strategy("fedavg", {"reduce": "tree", "order": IDS}).shape is RoundShape.TREE
    assert get_strategy("fedavg", {}).shape is RoundShape.EXCHANGE
    with pytest.raises(ValueError, match="does not list this peer"):
        cfg.tree_parent(identity("stranger").peer_id_text)


@pytest.mark.parametrize("n", [2, 3, 7, 24, 48])
@pytest.mark.parametrize("fanout", [2, 3, 5])
def test_every_peer_but_the_root_has_one_parent_that_lists_it_as_a_child(n: int, fanout: int) -> None:
    order = tuple(f"q{i}" for i in range(n))
    cfg = FedAvgConfig(reduce="tree", order=order, fanout=fanout)
    children = [c for p in order for c in cfg.tree_children(p)]
    assert sorted(children) == sorted(order[1:])  # each peer but the root is someone's child, once
    for p in order[1:]:
        parent = cfg.tree_parent(p)
        assert parent is not None and p in cfg.tree_children(parent)
        assert cfg.tree_depth(p) == cfg.tree_depth(parent) + 1
        assert len(cfg.tree_children(p)) <= fanout
    assert cfg.tree_height() == max(cfg.tree_depth(p) for p in order)


@pytest.mark.parametrize(("params", "match"), [
    ({"reduce": "tree"}, "at least two"),
    ({"reduce": "tree", "order": [IDS[0], IDS[1], IDS[0]]}, "twice"),
    ({"reduce": "tree", "order": IDS, "weighting": "metropolis"}, "weighting"),
    ({"reduce": "tree", "order": IDS, "robust": "median"}, "robust"),
    ({"reduce": "tree", "order": IDS, "secure_aggregation": True}, "secure_aggregation"),
    ({"reduce": "tree", "order": IDS, "fanout": 1}, "fanout"),
    ({"reduce": "star", "order": IDS}, "reduce"),
    ({"order": IDS}, "only to reduce = 'tree'"),
])
def test_bad_trees_are_refused_with_the_parameter_named(params: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_strategy("fedavg", params)


def test_a_peer_refuses_a_tree_that_does_not_list_it_or_runs_through_an_untrusted_peer(tmp_path: Path) -> None:
    ids, cfgs = configs(tmp_path, 5, neighbours=_full(5), extra=_tree(IDS[1:]))
    with pytest.raises(OperatorError, match="does not list this peer"):
        Peer(cfgs[0], identity=ids[0], serve_control_api=False)
    # the default ring does not connect p1 to its children p3 and p4
    ids, cfgs = configs(tmp_path / "b", 5, extra=_tree(IDS))
    with pytest.raises(OperatorError, match="next to this peer in the tree, is not a trusted peer"):
        Peer(cfgs[1], identity=ids[1], serve_control_api=False)


@asynccontextmanager
async def _running(peers: Sequence[Peer]) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        for p in peers:
            await nursery.start(p.run)
        yield
        nursery.cancel_scope.cancel()


def _spy_training(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """(learner, the model it started from, the model it trained) for each training, in order."""
    seen: list[tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]] = []
    original = Learner.train

    def spy(self: Learner, steps: int) -> LocalStep:
        start = self.state()
        step = original(self, steps)
        seen.append((id(self), start, {k: np.array(v, copy=True) for k, v in step.state.items()}))
        return step

    monkeypatch.setattr(Learner, "train", spy)
    return seen


async def test_every_peer_commits_the_federations_sample_weighted_mean(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five peers with 8, 12, ..., 24 training images, two rounds: each round every peer
    commits the sample-weighted mean of the five models trained that round (FedAvg), starts
    the next round from it, and the tree's updates are 2 (n - 1) a round, not n (n - 1)."""
    seen = _spy_training(monkeypatch)
    net = MemoryNetwork()
    ids, cfgs = configs(tmp_path, 5, rounds=2, neighbours=_full(5), extra=_tree(IDS))
    for i, c in enumerate(cfgs):
        c.task.options["n_train"] = 8 + 4 * i
    peers = [Peer(c, identity=i, serve_control_api=False, transport=net.open, compute=InlineCompute(),
                  faults=StartTogether(net, 5)) for i, c in zip(ids, cfgs, strict=True)]
    async with _running(peers):
        for p in peers:
            await p.done.wait()
        rows = {p.peer_id: await p.operator.rounds() for p in peers}
        committed = {p.peer_id: {m.round: p.store.load_model(m.digest) for m in p.store.models() if m.round >= 0}
                     for p in peers}
        counts = {p.peer_id: [m["value"] for m in p.store.metrics() if m["name"] == "tree_count"] for p in peers}
        samples = {id(p.learner): (p.peer_id, p.learner.n_samples) for p in peers}
        refused = sum(row["refused"] for p in peers for row in p.store.neighbours())
    assert sorted(n for _, n in samples.values()) == [8, 12, 16, 20, 24]
    assert len(seen) == 10
    floats = [k for k, v in seen[0][2].items() if v.dtype.kind == "f"]
    for round in (0, 1):
        trained = seen[5 * round: 5 * round + 5]
        weights = np.array([samples[learner][1] for learner, _, _ in trained], np.float64)
        for key in floats:
            expected = sum(w * t[key].astype(np.float64) for w, (_, _, t) in zip(weights, trained, strict=True))
            expected /= weights.sum()
            for p in IDS:
                np.testing.assert_allclose(committed[p][round][key], expected, rtol=0, atol=2e-6,
                                           err_msg=f"{p} round {round} {key}")
        if round == 1:  # and the second round started from the first round's mean
            for learner, start, _ in trained:
                peer = samples[learner][0]
                assert all(np.allclose(start[key], committed[peer][0][key], rtol=0, atol=1e-6) for key in floats)
    # the trained models themselves differ: the mean is not one of them
    assert not np.allclose(seen[0][2][floats[0]], seen[1][2][floats[0]])
    assert counts == {p: [5.0, 5.0] for p in IDS}
    assert refused == 0
    cfg = FedAvgConfig(reduce="tree", order=tuple(IDS))
    for p in IDS:
        assert [r["status"] for r in rows[p]] == ["done", "done"]
        assert all(sorted(r["contributors"]) == sorted(cfg.tree_ties(p)) for r in rows[p])
        assert all(r["skipped"] == [] for r in rows[p])
    # one update up and one down per edge: the root sends 2, p1 3 (1 up, 2 down), the leaves 1
    sent = {p: [r["bytes_sent"] for r in rows[p]] for p in IDS}
    one = sent[IDS[4]][0]
    assert one > 0 and all(sent[p][0] == pytest.approx(k * one, rel=0.02) for p, k in zip(IDS, [2, 3, 1, 1, 1],
                                                                                           strict=True))


async def test_a_dead_inner_peer_cuts_its_subtree_off_and_the_rest_still_averages(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """p1 (children p3, p4) never starts. p0 waits for it until its share of the round, then
    averages with p2 alone; p2 takes that mean from p0. p3 and p4 cannot send their means up:
    each commits its own model (a mean of one) and says why. No round fails."""
    seen = _spy_training(monkeypatch)
    net = MemoryNetwork()
    ids, cfgs = configs(tmp_path, 5, rounds=1, deadline=30.0, neighbours=_full(5), extra=_tree(IDS))
    alive = [Peer(cfgs[i], identity=ids[i], serve_control_api=False, transport=net.open, compute=InlineCompute(),
                  faults=StartTogether(net, 4)) for i in (0, 2, 3, 4)]
    async with _running(alive):
        for p in alive:
            await p.done.wait()
        rows = {p.peer_id: (await p.operator.rounds())[0] for p in alive}
        committed = {p.peer_id: p.store.load_model(p.store.latest_model().digest) for p in alive}
        counts = {p.peer_id: [m["value"] for m in p.store.metrics() if m["name"] == "tree_count"] for p in alive}
        trained = {p.peer_id: next(t for learner, _, t in seen if learner == id(p.learner)) for p in alive}
    assert all(r["status"] == "done" for r in rows.values())
    assert counts == {IDS[0]: [2.0], IDS[2]: [2.0], IDS[3]: [1.0], IDS[4]: [1.0]}
    key = next(k for k, v in trained[IDS[0]].items() if v.dtype.kind == "f")
    pair = (trained[IDS[0]][key].astype(np.float64) + trained[IDS[2]][key]) / 2  # equal samples
    for p in (IDS[0], IDS[2]):
        np.testing.assert_allclose(committed[p][key], pair, rtol=0, atol=2e-6)
    for p in (IDS[3], IDS[4]):
        np.testing.assert_array_equal(committed[p][key], trained[p][key])
        assert rows[p]["contributors"] == [] and IDS[1] in {s["peer"] for s in rows[p]["skipped"]}
    assert rows[IDS[0]]["contributors"] == [IDS[2]]
    assert {s["peer"]: s["reason"] for s in rows[IDS[0]]["skipped"]}[IDS[1]].startswith("missed the deadline")


async def test_a_child_without_a_tree_count_is_refused_audited_and_left_out(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Three peers; p2 runs plain gossip (``reduce = "neighbours"``), so its update to its
    parent p0 says nothing of how many models it holds: p0 refuses it (audited) and averages
    with p1 only. The round still commits everywhere."""
    net = MemoryNetwork()
    order = IDS[:3]
    ids, cfgs = configs(tmp_path, 3, rounds=1, deadline=20.0, neighbours=_full(3), extra=_tree(order))
    _, plain = configs(tmp_path / "plain", 3, rounds=1, deadline=20.0, neighbours=_full(3))
    cfgs[2] = plain[2]
    peers = [Peer(c, identity=i, serve_control_api=False, transport=net.open, compute=InlineCompute(),
                  faults=StartTogether(net, 3)) for i, c in zip(ids, cfgs, strict=True)]
    async with _running(peers):
        root = peers[0]
        await root.done.wait()  # read at once: p2 waits for p1's update until its deadline, and a
        row = (await root.operator.rounds())[0]  # peer stops a deadline after its last round
        audit = [e for e in root.audit_log.entries() if e["direction"] == "refused"]
        counts = [m["value"] for m in root.store.metrics() if m["name"] == "tree_count"]
    assert row["status"] == "done" and row["contributors"] == [order[1]]
    reasons = {s["peer"]: s["reason"] for s in row["skipped"]}
    assert "tree_count None is not a whole number in 1..3" in reasons[order[2]]
    assert any(e["peer"] == order[2] and "tree_count" in e["reason"] for e in audit), audit
    assert counts == [2.0]


async def test_a_parent_without_a_tree_count_is_refused_and_the_child_keeps_its_subtrees_mean(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The root p0 runs plain gossip: the update it pushes to p1 is its own model with no
    tree_count, not the federation's mean. p1 refuses it (audited) and commits the mean of
    its own subtree, which is its own model (tree_count 1)."""
    net = MemoryNetwork()
    order = IDS[:3]
    ids, cfgs = configs(tmp_path, 3, rounds=1, deadline=20.0, neighbours=_full(3), extra=_tree(order))
    _, plain = configs(tmp_path / "plain", 3, rounds=1, deadline=20.0, neighbours=_full(3))
    cfgs[0] = plain[0]
    peers = [Peer(c, identity=i, serve_control_api=False, transport=net.open, compute=InlineCompute(),
                  faults=StartTogether(net, 3)) for i, c in zip(ids, cfgs, strict=True)]
    async with _running(peers):
        child = peers[1]
        await child.done.wait()
        row = (await child.operator.rounds())[0]
        audit = [e for e in child.audit_log.entries() if e["direction"] == "refused"]
        counts = [m["value"] for m in child.store.metrics() if m["name"] == "tree_count"]
    assert row["status"] == "done" and row["contributors"] == []
    reasons = {s["peer"]: s["reason"] for s in row["skipped"]}
    assert "the federation's mean: tree_count None" in reasons[order[0]]
    assert any(e["peer"] == order[0] and "tree_count" in e["reason"] for e in audit), audit
    assert counts == [1.0]
