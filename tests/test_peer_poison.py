"""One neighbour's update never crashes the peer: bounded before use, failed rounds roll back.

A trusted neighbour's weights of 1e30 (or one 3e38) are finite, pass the wire, and used to
be averaged, after which training raised ``loss is nan`` and the peer exited, on every
restart again. Real peers on the in-memory transport under trio's MockClock.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing
from handkit import Neighbour
from memnet import MemoryNetwork, StartTogether
from peerkit import configs

from silomesh.peer.config import PeerConfig
from silomesh.peer.context import InlineCompute
from silomesh.peer.daemon import Peer
from silomesh.peer.faults import FaultHooks
from silomesh.peer.identity import PeerIdentity
from silomesh.peer.safety import UpdateBound, UpdateGuard, measure_update, state_violation, update_violation
from silomesh.peer.store import Store
from silomesh.protocol import Ack, OpenedEnvelope, state_digest
from silomesh.strategies import Contribution, LocalStep

Clock = trio.testing.MockClock


def _state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(0, 0.1, (8, 4, 3, 3)).astype(np.float32),
        "conv.bias": np.zeros(8, np.float32),
        "bn.num_batches_tracked": np.array(7, np.int64),
    }


def _violation(own: dict[str, np.ndarray], theirs: dict[str, np.ndarray], bound: UpdateBound) -> str | None:
    return update_violation(measure_update(own, theirs), bound)


def test_the_update_bound_lets_benign_models_through_and_stops_huge_ones() -> None:
    own, bound = _state(), UpdateBound()
    rng = np.random.default_rng(1)
    trained = {k: v + rng.normal(0, 0.05, v.shape).astype(v.dtype) if v.dtype.kind == "f" else v
               for k, v in own.items()}
    assert _violation(own, trained, bound) is None
    assert _violation(own, _state(seed=2), bound) is None, "another silo's model from another start"
    huge = {k: np.full_like(v, 1e30) if v.dtype.kind == "f" else v for k, v in own.items()}
    assert "largest weight" in str(_violation(own, huge, bound))
    one = {k: v.copy() for k, v in own.items()}
    one["conv.weight"].flat[3] = 3.0e38
    assert "largest weight 3e+38" in str(_violation(own, one, bound))
    far = {k: v * 50 if v.dtype.kind == "f" else v for k, v in own.items()}  # no single weight stands out
    assert "moves the model by 49 x our norm" in str(_violation(own, far, bound))
    assert _violation(own, far, UpdateBound(max_update_ratio=0)) is None, "0 switches the check off"
    nan = {k: v.copy() for k, v in own.items()}
    nan["conv.bias"][0] = np.nan
    assert "non-finite" in str(_violation(own, nan, bound))


def test_the_update_is_measured_in_float64_over_the_float_tensors_both_hold() -> None:
    own = {"w": np.array([3.0, 4.0], np.float32), "steps": np.array(7, np.int64), "only_ours": np.ones(3, np.float32)}
    theirs = {"w": np.array([3.0, 4.0 + 3.0e38], np.float32), "steps": np.array(10**9, np.int64),
              "only_theirs": np.full(2, 1e30, np.float32)}
    m = measure_update(own, theirs)
    assert (m.own_norm, m.own_max) == (5.0, 4.0)
    assert math.isclose(m.distance, 3.0e38, rel_tol=1e-6) and math.isfinite(m.distance), "no float32 overflow"
    assert math.isclose(m.ratio, 6.0e37, rel_tol=1e-6)


def test_a_sudden_jump_from_a_senders_usual_distance_is_dropped_until_it_becomes_usual() -> None:
    own = _state()
    guard = UpdateGuard(UpdateBound())

    def moved(by: float) -> dict[str, np.ndarray]:  # a model `by` times our norm away
        return {k: v * (1 + by) if v.dtype.kind == "f" else v for k, v in own.items()}

    assert [guard.check("a", own, moved(0.1)) for _ in range(3)] == [None] * 3
    assert guard.usual("a") == pytest.approx(0.1)
    assert guard.check("b", own, moved(3.0)) is None, "a sender without history: only the absolute bounds"
    jump = guard.check("a", own, moved(3.0))
    assert jump is not None and "x its usual" in jump, "30 x its usual distance"
    assert guard.check("a", own, moved(1.5)) is None, "15 x: within the default growth of 20"
    assert guard.check("a", own, moved(50.0)) is not None
    assert guard.usual("a") == pytest.approx(0.1), "what the absolute bounds dropped does not count"
    later = [guard.check("a", own, moved(3.0)) for _ in range(3)]
    assert later[0] is not None and later[-1] is None, "a change that persists becomes the usual"
    assert UpdateGuard(UpdateBound(max_update_growth=0)).check("a", own, moved(3.0)) is None


def test_a_result_with_non_finite_weights_or_metrics_may_not_be_committed() -> None:
    assert state_violation(_state(), {"dice": 0.5}) is None
    bad = _state()
    bad["conv.bias"][1] = np.inf
    assert "conv.bias" in str(state_violation(bad, {"dice": 0.5}))
    assert "dice" in str(state_violation(_state(), {"dice": math.nan}))


class Gate(StartTogether):
    """Rounds start only when the test opens the gate (after it sent what it wanted)."""

    def __init__(self, network: MemoryNetwork, count: int) -> None:
        super().__init__(network, count)
        self.open = trio.Event()

    async def round_start(self, peer_id: str, round: int) -> None:
        await super().round_start(peer_id, round)
        await self.open.wait()


def _peer(
    tmp_path: Path, net: MemoryNetwork, faults: FaultHooks, rounds: int
) -> tuple[Peer, list[PeerIdentity], list[PeerConfig]]:
    ids, cfgs = configs(tmp_path, 2, rounds=rounds, deadline=30.0)
    peer = Peer(cfgs[0], identity=ids[0], serve_control_api=False, transport=net.open, compute=InlineCompute(),
                faults=faults)
    return peer, ids, cfgs


@pytest.mark.parametrize("poison", ["all-1e30", "one-3e38"])
async def test_a_poisoned_update_is_dropped_and_the_peer_keeps_committing_finite_models(
    tmp_path: Path, autojump_clock: Clock, poison: str
) -> None:
    net = MemoryNetwork()
    gate = Gate(net, 2)
    victim, ids, cfgs = _peer(tmp_path, net, gate, rounds=2)
    hand = Neighbour(ids[1].seed, ids[0].public_key, cfgs[0].federation)
    async with trio.open_nursery() as nursery:
        await nursery.start(victim.run)
        async with net.open(ids[1], "", {ids[0].peer_id_text: ""}) as transport:
            assert await transport.connect(victim.peer_id)
            state = {k: v.copy() for k, v in victim.learner.state().items()}
            for v in state.values():
                if v.dtype.kind == "f":
                    if poison == "all-1e30":
                        v[...] = 1e30
                    elif v.size:
                        v.flat[0] = 3.0e38
                        break
            stream = await transport.open_stream(victim.peer_id)
            session, _ = await hand.hello(stream)
            await stream.write(session.send(hand.update(state)).to_frame())
            reply = await hand.next(session, stream)
            assert isinstance(reply, OpenedEnvelope) and isinstance(reply.message, Ack), "it passes the wire"
            gate.open.set()
            await victim.done.wait()
            rows = await victim.operator.rounds()
            models = [victim.store.load_model(m.digest) for m in victim.store.models()]
            refused = [e for e in victim.audit_log.entries() if e["direction"] == "refused"]
        nursery.cancel_scope.cancel()
    assert [r["status"] for r in rows] == ["done", "done"]
    assert rows[0]["contributors"] == []
    (skip,) = [s for s in rows[0]["skipped"] if s["peer"] == ids[1].peer_id_text]
    assert skip["reason"].startswith("dropped: update bound: largest weight")
    assert [str(e["reason"]).split(":")[0] for e in refused] == ["safety"]
    assert len(models) == 2 and all(state_violation(m, {}) is None for m in models)


async def test_a_round_whose_training_diverges_is_rolled_back_and_the_next_one_runs(
    tmp_path: Path, autojump_clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    net = MemoryNetwork()
    peer, _, _ = _peer(tmp_path, net, gate := Gate(net, 1), rounds=3)
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        start = {k: v.copy() for k, v in peer.learner.state().items()}
        train, calls = peer.learner.train, []

        def diverges_once(steps: int) -> LocalStep:
            calls.append(state_digest(peer.learner.state()))  # the model each round starts from
            if len(calls) == 1:
                train(steps)  # the model moved before the loss went NaN
                raise FloatingPointError("loss is nan at step 2")
            return train(steps)

        peer.learner.train = diverges_once  # type: ignore[method-assign]
        gate.open.set()
        await peer.done.wait()
        rows = await peer.operator.rounds()
        models = peer.store.models()
        nursery.cancel_scope.cancel()
    assert [r["status"] for r in rows] == ["failed", "done", "done"]
    assert rows[0]["note"] == "FloatingPointError: loss is nan at step 2"
    (logged,) = [r for r in caplog.records if "rolled back" in r.getMessage()]
    assert logged.levelname == "WARNING" and logged.getMessage().endswith("FloatingPointError: loss is nan at step 2")
    assert [m.round for m in models] == [1, 2], "nothing committed for the failed round"
    assert calls[0] == calls[1] == state_digest(start), "round 1 started from the model round 0 rolled back to"


async def test_a_non_finite_evaluation_is_not_committed(tmp_path: Path, autojump_clock: Clock) -> None:
    net = MemoryNetwork()
    peer, _, _ = _peer(tmp_path, net, gate := Gate(net, 1), rounds=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        evaluate, calls = peer.learner.evaluate, []

        def nan_once() -> dict[str, float]:
            calls.append(1)
            metrics = evaluate()
            return dict.fromkeys(metrics, math.nan) if len(calls) == 1 else metrics

        peer.learner.evaluate = nan_once  # type: ignore[method-assign]
        gate.open.set()
        await peer.done.wait()
        rows = await peer.operator.rounds()
        committed = [m.round for m in peer.store.models()]
        nursery.cancel_scope.cancel()
    assert [r["status"] for r in rows] == ["failed", "done"]
    assert rows[0]["note"].startswith("non-finite evaluation")
    assert committed == [1]


async def test_rounds_that_keep_failing_make_the_peer_degraded_not_dead(
    tmp_path: Path, autojump_clock: Clock
) -> None:
    net = MemoryNetwork()
    peer, _, _ = _peer(tmp_path, net, gate := Gate(net, 1), rounds=5)
    phases = []
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)

        def always_diverges(steps: int) -> LocalStep:
            raise FloatingPointError("loss is nan at step 0")

        peer.learner.train = always_diverges  # type: ignore[method-assign]
        gate.open.set()
        start = trio.current_time()
        while not peer.done.is_set():
            phases.append(peer.phase)
            await trio.sleep(1)
        took = trio.current_time() - start
        rows = await peer.operator.rounds()
        status = await peer.operator.status()
        audited = [e for e in peer.audit_log.entries() if e["kind"] == "round"]
        nursery.cancel_scope.cancel()
    assert [r["status"] for r in rows] == ["failed"] * 5
    assert "degraded" in phases
    assert (status["health"], status["failed_rounds_in_a_row"]) == ("degraded", 5)
    assert [(e["direction"], e["round"]) for e in audited] == [("refused", r) for r in range(5)]
    assert audited[0]["reason"] == "rolled back: FloatingPointError: loss is nan at step 0"
    assert took >= 3 * 30.0, "it paused between tries after the third failure"


async def test_a_poisoned_expert_in_a_train_request_round_is_dropped_before_distillation(
    tmp_path: Path, autojump_clock: Clock
) -> None:
    net = MemoryNetwork()
    ids, cfgs = configs(tmp_path, 2, strategy="fedefm", rounds=2, deadline=30.0)
    gate = Gate(net, 2)
    peers = [Peer(c, identity=i, serve_control_api=False, transport=net.open, compute=InlineCompute(),
                  faults=gate) for i, c in zip(ids, cfgs, strict=True)]
    victim, hostile = peers
    distilled: list[list[str]] = []

    def recorded(experts: list[Contribution]) -> dict[str, Any]:
        distilled.append([c.peer_id for c in experts])
        return learn(experts)

    def poisoned(state: Mapping[str, np.ndarray], steps: int, **_: Any) -> LocalStep:
        return LocalStep({k: np.full_like(v, 1e30) if v.dtype.kind == "f" else v for k, v in state.items()},
                         0.1, steps)

    async with trio.open_nursery() as nursery:
        for p in peers:
            await nursery.start(p.run)
        learn = victim.learner.learn_from_experts
        victim.learner.learn_from_experts = recorded  # type: ignore[method-assign]
        hostile.learner.serve_train_request = poisoned  # type: ignore[method-assign]
        gate.open.set()
        await victim.done.wait()
        rows = await victim.operator.rounds()
        models = [victim.store.load_model(m.digest) for m in victim.store.models()]
        refused = [e for e in victim.audit_log.entries() if e["direction"] == "refused"]
        nursery.cancel_scope.cancel()
    assert [r["status"] for r in rows] == ["done", "done"]
    assert distilled == [], "the only expert was dropped: nothing distilled"
    for r in rows:
        (skip,) = r["skipped"]
        assert skip["reason"].startswith("dropped: update bound: largest weight")
    assert [(e["kind"], str(e["reason"]).split(":")[0]) for e in refused] == [("train-result", "safety")] * 2
    assert len(models) == 2 and all(state_violation(m, {}) is None for m in models)


async def test_a_restart_after_a_poisoned_commit_resumes_the_last_finite_model(
    tmp_path: Path, autojump_clock: Clock
) -> None:
    net = MemoryNetwork()
    peer, ids, cfgs = _peer(tmp_path, net, StartTogether(net, 1), rounds=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        await peer.done.wait()
        good = peer.store.latest_model()
        nursery.cancel_scope.cancel()
    assert good is not None
    # what an older version could commit: a round whose weights overflowed
    store = Store(cfgs[0].store)
    poisoned = {k: np.full_like(v, np.inf) if v.dtype.kind == "f" else v
                for k, v in store.load_model(good.digest).items()}
    digest = state_digest(poisoned).hex()
    store.write_model_file(poisoned, digest)
    store.save_model(poisoned, digest, round=1, parent=good.digest)
    store.record_round(1, status="done", started_at=0.0, finished_at=0.0, model=digest)
    store.close()

    config = dataclasses.replace(cfgs[0], rounds=dataclasses.replace(cfgs[0].rounds, count=3))
    again = Peer(config, identity=ids[0], serve_control_api=False, transport=net.open, compute=InlineCompute(),
                 faults=(gate := Gate(net, 1)))
    async with trio.open_nursery() as nursery:
        await nursery.start(again.run)
        resumed = state_digest(again.learner.state()).hex()  # before its first round trains
        gate.open.set()
        await again.done.wait()
        rows = await again.operator.rounds()
        nursery.cancel_scope.cancel()
    assert resumed == good.digest
    assert [r["round"] for r in rows if r["status"] == "done"][-1] == 2
