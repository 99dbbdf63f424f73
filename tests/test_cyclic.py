"""Cyclic weight transfer: the ring's rules, and peers passing one model round it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing
from memnet import MemoryNetwork, StartTogether
from peerkit import configs, identity

from silomesh.peer.config import RoundConfig
from silomesh.peer.context import InlineCompute
from silomesh.peer.daemon import Peer
from silomesh.peer.learner import Learner
from silomesh.peer.operator import OperatorError
from silomesh.peer.relay_round import _checked_lap
from silomesh.peer.round_steps import RoundReport
from silomesh.strategies import Contribution, CyclicConfig, RoundShape, get_strategy
from silomesh.strategies.cyclic import lap_update, split_lap, with_lap
from silomesh.strategies.workbench import LocalStep

IDS = [identity(f"p{i}").peer_id_text for i in range(3)]


def test_the_ring_gives_each_peer_its_predecessor_and_successor() -> None:
    cfg = CyclicConfig(order=tuple(IDS))
    assert cfg.neighbours(IDS[0]) == (IDS[2], IDS[1])
    assert cfg.neighbours(IDS[2]) == (IDS[1], IDS[0])
    assert cfg.first(IDS[0]) and not cfg.first(IDS[1])
    with pytest.raises(ValueError, match="does not list this peer"):
        cfg.neighbours(identity("stranger").peer_id_text)
    assert get_strategy("cyclic", {"order": IDS}).shape is RoundShape.RELAY


@pytest.mark.parametrize(("params", "match"), [
    ({"order": IDS[:1]}, "at least two"),
    ({"order": [IDS[0], IDS[1], IDS[0]]}, "twice"),
    ({"order": IDS, "robust": "median"}, "robust"),
    ({"order": "p0,p1"}, "order"),
])
def test_bad_rings_are_refused_with_the_parameter_named(params: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_strategy("cyclic", params)


def test_aggregate_takes_the_incoming_model_whole_or_keeps_our_own() -> None:
    strategy = get_strategy("cyclic", {"order": IDS})
    own = {"w": np.zeros(3, np.float32)}
    incoming = Contribution(peer_id=IDS[2], state={"w": np.ones(3, np.float32)}, n_samples=5)
    result = strategy.aggregate(own, 1.0, [incoming])
    np.testing.assert_array_equal(result.state["w"], np.ones(3))
    assert result.weights == {IDS[2]: 1.0}
    alone = strategy.aggregate(own, 1.0, [])
    np.testing.assert_array_equal(alone.state["w"], np.zeros(3))


def _cyclic(order: Sequence[str]) -> dict[str, Any]:
    return {"strategy": {"name": "cyclic", "params": {"order": list(order)}}}


@asynccontextmanager
async def _running(peers: Sequence[Peer]) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        for p in peers:
            await nursery.start(p.run)
        yield
        nursery.cancel_scope.cancel()


async def test_peers_pass_one_model_round_the_ring(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three peers on a ring, two rounds: each round a peer trains exactly the model its
    predecessor committed (the first peer: the last peer's of the round before), so the model
    that leaves p2 in round 1 has been trained by p0, p1, p2, p0, p1, p2 in turn."""
    starts: list[tuple[int, dict[str, np.ndarray]]] = []  # (learner, the model it starts training from)
    original = Learner.train

    def spy(self: Learner, steps: int) -> LocalStep:
        starts.append((id(self), self.state()))
        return original(self, steps)

    monkeypatch.setattr(Learner, "train", spy)
    net = MemoryNetwork()
    ids, cfgs = configs(tmp_path, 3, rounds=2, extra=_cyclic(IDS))
    peers = [Peer(c, identity=i, serve_control_api=False, transport=net.open, compute=InlineCompute(),
                  faults=StartTogether(net, 3)) for i, c in zip(ids, cfgs, strict=True)]
    async with _running(peers):
        for p in peers:
            await p.done.wait()
        seen = {p.peer_id: await p.operator.rounds() for p in peers}
        models = {p.peer_id: {m.round: p.store.load_model(m.digest) for m in p.store.models() if m.round >= 0}
                  for p in peers}
        learners = {id(p.learner): p.peer_id for p in peers}
    order = [learners[n] for n, _ in starts]
    assert order == IDS * 2, "the peers did not train in the ring's order"
    # each starts from its predecessor's committed model (equal up to the float32 rounding of
    # a delta applied to its base) and not from its own
    for k, (_, start) in enumerate(starts[1:], start=1):
        before, mine = models[order[k - 1]][(k - 1) // 3], models[order[k]].get(k // 3 - 1)
        assert all(np.allclose(start[key], before[key], rtol=0, atol=1e-6) for key in before), k
        if mine is not None:
            assert not all(np.allclose(start[key], mine[key], rtol=0, atol=1e-6) for key in mine), k
    for i, p in enumerate(IDS):
        rows = seen[p]
        assert [r["status"] for r in rows] == ["done", "done"]
        expected = [[], [IDS[2]]] if i == 0 else [[IDS[i - 1]], [IDS[i - 1]]]
        assert [r["contributors"] for r in rows] == expected


async def test_a_missing_predecessor_is_skipped_at_the_deadline_and_the_ring_goes_on(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """p2 never starts: p0 waits for its model until the deadline in round 1, goes on from
    its own, and p1 still receives p0's model every round."""
    net = MemoryNetwork()
    ids, cfgs = configs(tmp_path, 3, rounds=2, deadline=20.0, extra=_cyclic(IDS))
    alive = [Peer(cfgs[i], identity=ids[i], serve_control_api=False, transport=net.open, compute=InlineCompute(),
                  faults=StartTogether(net, 2)) for i in (0, 1)]
    async with _running(alive):
        for p in alive:
            await p.done.wait()
        seen = {p.peer_id: await p.operator.rounds() for p in alive}
    first, second = seen[IDS[0]], seen[IDS[1]]
    assert [r["status"] for r in first] == ["done", "done"]
    assert IDS[2] in {s["peer"] for s in first[1]["skipped"]}
    assert [r["contributors"] for r in second] == [[IDS[0]], [IDS[0]]]


def test_a_peer_refuses_a_ring_that_does_not_list_it_or_runs_through_an_untrusted_peer(tmp_path: Path) -> None:
    ids, cfgs = configs(tmp_path, 3, extra=_cyclic([IDS[1], IDS[2]]))
    with pytest.raises(OperatorError, match="does not list this peer"):
        Peer(cfgs[0], identity=ids[0], serve_control_api=False)
    ids, cfgs = configs(tmp_path / "b", 3, neighbours=[[1], [0, 2], [1]], extra=_cyclic(IDS))
    with pytest.raises(OperatorError, match="not a trusted peer"):
        Peer(cfgs[0], identity=ids[0], serve_control_api=False)


# -- commit = "lap_mean": each hospital commits the mean of the ring's last lap ---------------

def _ring_walk(n: int, laps: int, seed: int = 0) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Pass random models round a ring of ``n`` for ``laps`` laps, as the peers do: the models
    passed on, in ring order, and the lap mean each position forwards."""
    rng = np.random.default_rng(seed)
    passed: list[dict[str, np.ndarray]] = []
    means: list[dict[str, np.ndarray]] = []
    last: dict[int, dict[str, np.ndarray]] = {}
    mean: dict[str, np.ndarray] | None = None
    count = 0
    for k in range(n * laps):
        trained = {"w": rng.normal(size=(2, 3)).astype(np.float32), "steps": np.array(k, np.int64)}
        mean, count = lap_update(trained, last.get(k % n), mean, count, n)
        last[k % n] = trained
        passed.append(trained)
        means.append(mean)
    return passed, means


def test_the_lap_mean_is_the_mean_of_the_last_n_models_passed_on() -> None:
    n = 4
    passed, means = _ring_walk(n, laps=5)
    for k, mean in enumerate(means):
        window = passed[max(0, k - n + 1): k + 1]
        expected = np.mean([p["w"].astype(np.float64) for p in window], axis=0)
        np.testing.assert_allclose(mean["w"], expected, rtol=0, atol=1e-6)
        assert mean["w"].dtype == np.float32
        assert int(mean["steps"]) == k  # counters are the passed model's, not averaged


def test_lap_update_refuses_a_count_outside_the_ring_and_forgets_gracefully() -> None:
    trained = {"w": np.ones(2, np.float32)}
    mean = {"w": np.zeros(2, np.float32)}
    for bad in (0, 4):
        with pytest.raises(ValueError, match=r"outside 1\.\.3"):
            lap_update(trained, None, mean, bad, 3)
    with pytest.raises(ValueError, match="does not name"):
        lap_update(trained, None, {"v": np.zeros(2, np.float32)}, 1, 3)
    # a full lap without the model we passed a lap ago (after a restart): the mean stands in for it
    got, count = lap_update(trained, None, mean, 3, 3)
    np.testing.assert_allclose(got["w"], 1 / 3)
    assert count == 3
    assert lap_update(trained, None, None, 0, 3)[1] == 1  # no incoming lap: a new one


def test_lap_mean_updates_carry_the_mean_under_its_own_names_and_only_then() -> None:
    passed = get_strategy("cyclic", {"order": IDS})
    lapped = get_strategy("cyclic", {"order": IDS, "commit": "lap_mean"})
    assert passed.carried_keys(["a", "b"]) == {}
    assert lapped.carried_keys(["a", "b"]) == {"lap.a": "a", "lap.b": "b"}
    model, lap = split_lap(with_lap({"a": np.zeros(1)}, {"a": np.ones(1)}))
    assert set(model) == {"a"} and float(lap["a"][0]) == 1.0
    with pytest.raises(ValueError, match="commit"):
        get_strategy("cyclic", {"order": IDS, "commit": "mean"})


async def test_peers_commit_the_lap_mean_and_pass_the_ring_model_on(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three peers, three rounds with commit = "lap_mean": each peer still trains exactly the
    model its predecessor passed on, but commits the mean of the last three models passed on
    (fewer in the first lap), which reached it over the wire as the update's lap tensors."""
    starts: list[dict[str, np.ndarray]] = []
    trained: list[dict[str, np.ndarray]] = []
    original = Learner.train

    def spy(self: Learner, steps: int) -> LocalStep:
        starts.append(self.state())
        step = original(self, steps)
        trained.append({k: np.array(v, copy=True) for k, v in step.state.items()})
        return step

    monkeypatch.setattr(Learner, "train", spy)
    net = MemoryNetwork()
    extra = {"strategy": {"name": "cyclic", "params": {"order": IDS, "commit": "lap_mean"}}}
    ids, cfgs = configs(tmp_path, 3, rounds=3, extra=extra)
    peers = [Peer(c, identity=i, serve_control_api=False, transport=net.open, compute=InlineCompute(),
                  faults=StartTogether(net, 3)) for i, c in zip(ids, cfgs, strict=True)]
    async with _running(peers):
        for p in peers:
            await p.done.wait()
        committed = {p.peer_id: {m.round: p.store.load_model(m.digest) for m in p.store.models() if m.round >= 0}
                     for p in peers}
        refused = sum(row["refused"] for p in peers for row in p.store.neighbours())
        counts = {p.peer_id: [m["value"] for m in p.store.metrics() if m["name"] == "lap_count"] for p in peers}
    assert len(trained) == 9
    floats = [k for k, v in trained[0].items() if v.dtype.kind == "f"]
    for k in range(1, 9):  # the ring goes on with the model passed on, not the committed mean
        assert all(np.allclose(starts[k][key], trained[k - 1][key], rtol=0, atol=1e-6) for key in floats), k
    for k in range(9):
        peer, round = IDS[k % 3], k // 3
        window = trained[max(0, k - 2): k + 1]
        for key in floats:
            expected = np.mean([t[key].astype(np.float64) for t in window], axis=0)
            np.testing.assert_allclose(committed[peer][round][key], expected, rtol=0, atol=1e-5, err_msg=f"{k} {key}")
        if k >= 1:  # and it is not the model passed on
            assert not all(np.allclose(committed[peer][round][key], trained[k][key], atol=1e-6) for key in floats)
    assert refused == 0
    # each round's row says how many models its mean holds: 1, 2, 3 in the first lap, then 3
    assert counts == {p: [min(i + 1, 3), 3, 3] for i, p in enumerate(IDS)}


@pytest.mark.parametrize(("lap", "count", "why"), [
    ({}, None, "no lap mean"),
    ({"w": np.ones(4, np.float32)}, 4.0, "not a whole number in 1..3"),
    ({"w": np.ones(4, np.float32)}, 1.5, "not a whole number"),
    ({"v": np.ones(4, np.float32)}, 1.0, "does not name"),
    ({"w": np.full(4, 1e6, np.float32)}, 2.0, "largest weight"),
])
def test_a_bad_lap_mean_is_refused_and_audited_and_a_new_lap_starts(
    lap: dict[str, np.ndarray], count: float | None, why: str
) -> None:
    refused: list[tuple[str, str, str]] = []
    journal = SimpleNamespace(refused=lambda peer, kind, reason, round: refused.append((peer, kind, reason)))
    ctx: Any = SimpleNamespace(peer_id=IDS[0], rounds=RoundConfig(),
                               learner=SimpleNamespace(strategy=get_strategy("cyclic", {"order": IDS,
                                                                                      "commit": "lap_mean"})),
                               endpoint=SimpleNamespace(journal=journal))
    own = passed = {"w": np.ones(4, np.float32)}
    assert _checked_lap(ctx, RoundReport(1), IDS[2], own, passed, lap, count) == (None, 0)
    assert len(refused) == 1 and refused[0][0] == IDS[2] and why in refused[0][2]
    good = {"w": np.full(4, 1.1, np.float32)}
    got, n = _checked_lap(ctx, RoundReport(1), IDS[2], own, passed, good, 2.0)
    assert got is good and n == 2 and len(refused) == 1


@pytest.mark.slow
async def test_a_model_passed_on_over_a_link_that_drops_mid_update_resumes(tmp_path: Path) -> None:
    """A ring of two, the "small" U-Net (1.9 MB, streamed in 30 chunks of 64 KiB): p0's first pass to
    p1 breaks after 1.3 MB and the link is down for 2 s. p0 dials again with backoff, p1
    answers with the chunk it holds, and only the rest travels; p1 takes p0's model in both
    rounds. On the real clock (sealing runs in worker threads)."""
    import dataclasses

    net = MemoryNetwork()
    ring = _cyclic(IDS[:2])
    ids, cfgs = configs(tmp_path, 2, rounds=2, extra={**ring, "network": {"stream_threshold_mb": 1.0}})
    cfgs = [dataclasses.replace(c, task=dataclasses.replace(c.task, size="small")) for c in cfgs]
    peers = [Peer(c, identity=i, serve_control_api=False, transport=net.open, compute=InlineCompute(),
                  faults=StartTogether(net, 2)) for i, c in zip(ids, cfgs, strict=True)]
    a, b = peers[0].peer_id, peers[1].peer_id
    net.break_next_stream(a, b, after=1_300_000, down_for=2.0)
    with trio.fail_after(120):
        async with _running(peers):
            for p in peers:
                await p.done.wait()
            rows = {p.peer_id: await p.operator.rounds() for p in peers}
            stats = {p.peer_id: p.context.endpoint.transfers.stats for p in peers}
    assert len(net.outages) == 1
    assert [r["contributors"] for r in rows[b]] == [[a], [a]], rows[b]
    # the pass went through within its round
    assert [(r["skipped"], r["undelivered"]) for r in rows[a]] == [([], []), ([], [])], rows[a]
    assert stats[b].resumed_receives == 1 and 1_000_000 < stats[b].bytes_resumed <= 1_300_000
    assert stats[a].resumed_sends == 1 and stats[a].bytes_not_resent == stats[b].bytes_resumed
