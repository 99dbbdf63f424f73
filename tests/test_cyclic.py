"""Cyclic weight transfer: the ring's rules, and peers passing one model round it."""

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
from silomesh.strategies import Contribution, CyclicConfig, RoundShape, get_strategy
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
