"""Real peers on 127.0.0.1 run federated rounds through the production code path."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
from peerkit import configs

from silomesh.audit.verify import verify_chain
from silomesh.peer.daemon import Peer

pytestmark = pytest.mark.slow


async def _run_all(peers: list[Peer]) -> dict[str, dict[str, Any]]:
    """Run the peers until each finished its rounds; return what each recorded.

    No deadline of its own: each test bounds it with ``trio.fail_after``.
    """
    seen: dict[str, dict[str, Any]] = {}
    async with trio.open_nursery() as nursery:
        for p in peers:
            await nursery.start(p.run)
        for p in peers:
            await p.done.wait()
        for p in peers:
            seen[p.peer_id] = {
                "rounds": await p.operator.rounds(),
                "models": await p.operator.models(),
                "audit": p.audit_log.entries(),
            }
        nursery.cancel_scope.cancel()
    return seen


async def test_two_peers_complete_rounds_and_average_each_others_models(tmp_path: Path) -> None:
    ids, cfgs = configs(tmp_path, 2, rounds=2)
    peers = [Peer(c, identity=i, serve_control_api=False) for i, c in zip(ids, cfgs, strict=True)]
    with trio.fail_after(120):
        seen = await _run_all(peers)
    for p, other in ((peers[0], peers[1]), (peers[1], peers[0])):
        rounds = seen[p.peer_id]["rounds"]
        assert [r["status"] for r in rounds] == ["done", "done"]
        assert all(r["contributors"] == [other.peer_id] for r in rounds)
        assert "dice" in rounds[-1]["metrics"]
        kinds = {(e["direction"], e["kind"]) for e in seen[p.peer_id]["audit"]}
        assert {("sent", "update"), ("received", "update"), ("received", "ack")} <= kinds
        assert verify_chain(seen[p.peer_id]["audit"], p.identity.public_key) == []


@pytest.mark.parametrize("strategy", ["fedavg", "fedefm"])
async def test_five_peers_on_a_ring_complete_every_round(tmp_path: Path, strategy: str) -> None:
    ids, cfgs = configs(tmp_path, 5, rounds=2, strategy=strategy)
    peers = [Peer(c, identity=i, serve_control_api=False) for i, c in zip(ids, cfgs, strict=True)]
    with trio.fail_after(180):
        seen = await _run_all(peers)
    for p in peers:
        rounds = seen[p.peer_id]["rounds"]
        assert [r["status"] for r in rounds] == ["done", "done"]
        assert len(rounds[-1]["contributors"]) == 2, rounds[-1]


async def test_peer_whose_neighbour_is_dead_still_finishes_its_rounds(tmp_path: Path) -> None:
    ids, cfgs = configs(tmp_path, 3, rounds=2, deadline=4.0)
    alive = [Peer(cfgs[i], identity=ids[i], serve_control_api=False) for i in (0, 1)]  # peer 2 never starts
    with trio.fail_after(90):
        seen = await _run_all(alive)
    for p in alive:
        rounds = seen[p.peer_id]["rounds"]
        assert [r["status"] for r in rounds] == ["done", "done"]
        skipped = {s["peer"] for r in rounds for s in r["skipped"]}
        assert ids[2].peer_id_text in skipped


async def test_restarted_peer_resumes_after_its_last_committed_round(tmp_path: Path) -> None:
    ids, cfgs = configs(tmp_path, 2, rounds=1)
    with trio.fail_after(120):
        await _run_all([Peer(c, identity=i, serve_control_api=False) for i, c in zip(ids, cfgs, strict=True)])
    ids, cfgs = configs(tmp_path, 2, rounds=3)  # same identities and stores, more rounds
    peers = [Peer(c, identity=i, serve_control_api=False) for i, c in zip(ids, cfgs, strict=True)]
    with trio.fail_after(120):
        seen = await _run_all(peers)
    for p in peers:
        rounds = seen[p.peer_id]["rounds"]
        assert [r["round"] for r in rounds] == [0, 1, 2]
        models = seen[p.peer_id]["models"]
        assert models[-1]["round"] == 2
        assert models[1]["parent"] == models[0]["digest"]
        assert verify_chain(seen[p.peer_id]["audit"], p.identity.public_key) == []


async def test_segviz_peer_commits_its_head_fine_tuned_on_the_aggregated_body(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    from silomesh.peer.learner import Learner
    from silomesh.protocol import state_digest

    adopted: dict[int, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    original = Learner.adopt

    def spy(self: Learner, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        aggregated = {k: np.array(v, copy=True) for k, v in state.items()}
        committed = original(self, state)
        adopted.setdefault(id(self), []).append((aggregated, committed))
        return committed

    monkeypatch.setattr(Learner, "adopt", spy)
    ids, cfgs = configs(tmp_path, 2, rounds=1, strategy="segviz",
                        extra={"strategy": {"name": "segviz", "params": {"finetune_steps": 5, "finetune_lr": 0.01}}})
    peers = [Peer(c, identity=i, serve_control_api=False) for i, c in zip(ids, cfgs, strict=True)]
    with trio.fail_after(120):
        seen = await _run_all(peers)
    assert len(adopted) == 2 and all(len(v) == 1 for v in adopted.values())
    for p in peers:
        aggregated, committed = adopted[id(p.learner)][0]
        assert seen[p.peer_id]["models"][-1]["digest"] == state_digest(committed).hex()  # committed as tuned
        heads = tuple(p.learner.strategy.config.head_prefixes)
        assert heads and committed.keys() == aggregated.keys()
        for k, v in committed.items():
            if not k.startswith(heads):
                np.testing.assert_array_equal(v, aggregated[k], err_msg=k)  # body untouched
        assert any(not np.array_equal(committed[k], aggregated[k]) for k in committed if k.startswith(heads))
