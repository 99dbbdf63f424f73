"""The round loop under trio's MockClock, over the in-memory transport: exact and instant.

Deadlines, stragglers, backoff, reconnects after a partition and approval expiry are
checked at exact virtual times. Torch work runs inline (``InlineCompute``) so virtual
time stands still while a peer trains; everything else is the production peer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import trio
import trio.testing
from memnet import MemoryNetwork, StartTogether
from peerkit import configs
from peerkit import identity as seeded_identity
from torch import nn

from silomesh.peer import rounds
from silomesh.peer.context import Inbox, InlineCompute, Received, RoundContext
from silomesh.peer.daemon import Peer
from silomesh.peer.dialer import Expert
from silomesh.peer.operator import OperatorError
from silomesh.strategies import (
    AggregationResult,
    Contribution,
    LocalStep,
    Strategy,
    Workbench,
    average_states,
)
from silomesh.strategies.fedefm import FedEFMStrategy
from silomesh.strategies.registry import STRATEGIES


class Timeline(StartTogether):
    """Records the virtual time each peer's rounds start; optional per-peer send delays."""

    def __init__(self, network: MemoryNetwork, count: int, delays: dict[str, float] | None = None) -> None:
        super().__init__(network, count)
        self.started: dict[tuple[str, int], float] = {}
        self.delays = delays or {}

    async def round_start(self, peer_id: str, round: int) -> None:
        self.started[(peer_id, round)] = trio.current_time()
        await super().round_start(peer_id, round)

    async def before_send(self, peer_id: str, neighbour: str, kind: str, round: int) -> bool:
        if peer_id in self.delays:
            await trio.sleep(self.delays[peer_id])
        return True


def make(
    tmp_path: Path,
    n: int,
    net: MemoryNetwork,
    faults: Timeline,
    *,
    participation: Sequence[str] | None = None,
    **kwargs: Any,
) -> list[Peer]:
    ids, cfgs = configs(tmp_path, n, **kwargs)
    out = []
    for i, (identity, cfg) in enumerate(zip(ids, cfgs, strict=True)):
        if participation is not None:
            import dataclasses

            cfg = dataclasses.replace(cfg, participation=participation[i])
        out.append(
            Peer(cfg, identity=identity, serve_control_api=False, transport=net.open, compute=InlineCompute(),
                 faults=faults)
        )
    return out


@asynccontextmanager
async def running(peers: Sequence[Peer]) -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        for p in peers:
            await nursery.start(p.run)
        yield nursery
        nursery.cancel_scope.cancel()


def test_a_round_takes_each_neighbours_model_of_that_round_not_a_faster_neighbours_next() -> None:
    """A neighbour that finished our round and sent its next model before we aggregated does
    not change what our round averages (it did: the newest model replaced the round's, so
    results depended on the peers' speed); a neighbour ahead of us counts with its newest."""
    inbox = Inbox()
    inbox.new_round(0)
    a0, a1, b3 = (Received(p, r, {}, 1) for p, r in (("a", 0), ("a", 1), ("b", 3)))
    for entry in (a0, a1, b3):
        inbox.put(entry)
    assert inbox.get("a", 0) is a0 and inbox.get("a", 1) is a1 and inbox.get("a", 2) is None
    assert inbox.get("b", 0) is b3 and inbox.get("b", 3) is b3 and inbox.get("b", 4) is None
    assert inbox.waiting({"a", "b", "c"}, 0) == {"c"} and inbox.waiting({"a", "b"}, 2) == {"a"}
    inbox.new_round(1)  # models of rounds before ours go, each newest stays: one model per neighbour in step
    assert inbox.get("a", 0) is a1 and inbox.get("a", 1) is a1 and inbox.get("b", 1) is b3
    inbox.put(Received("a", 0, {}, 1))  # a late model of a round we passed is not kept
    assert inbox.get("a", 0) is a1
    second = Received("a", 1, {"w": np.zeros(1)}, 2)  # the same round again (a resend): the later one
    inbox.put(second)
    assert inbox.get("a", 1) is second
    inbox.new_round(2)  # cyclic's first peer asks for the round before: its predecessor's newest is kept
    assert inbox.get("a", 1) is second and inbox.waiting({"a", "b"}, 2) == {"a"}
    a2 = Received("a", 2, {}, 1)
    inbox.put(a2)  # round 1's model is no longer the newest: it goes
    assert inbox.get("a", 1) is a2 and inbox.get("a", 2) is a2


async def test_two_peers_average_each_other_over_the_in_memory_transport(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    net = MemoryNetwork()
    timeline = Timeline(net, 2)
    a, b = peers = make(tmp_path, 2, net, timeline, rounds=2)
    async with running(peers):
        await a.done.wait()
        await b.done.wait()
        seen = {p.peer_id: await p.operator.rounds() for p in peers}
    for p, other in ((a, b), (b, a)):
        assert [r["status"] for r in seen[p.peer_id]] == ["done", "done"]
        assert all(r["contributors"] == [other.peer_id] for r in seen[p.peer_id])


async def test_a_round_averages_the_same_models_however_fast_the_neighbours_are(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A line a - b - c, with c's updates 10 s late: a finishes round 0 with b alone and sends
    b its round-1 model while b still waits for c's round 0. b's round-0 model must be the
    one it makes when nobody is late (it took a's round-1 model instead: the newest won)."""

    async def run(folder: Path, delays: dict[str, float]) -> tuple[list[dict[str, Any]], list[Peer]]:
        net = MemoryNetwork()
        peers = make(folder, 3, net, Timeline(net, 3, delays), rounds=2, neighbours=[[1], [0, 2], [1]])
        async with running(peers):
            for p in peers:
                await p.done.wait()
            return await peers[1].operator.rounds(), peers

    on_time, _ = await run(tmp_path / "on-time", {})
    late, peers = await run(tmp_path / "late", {str(seeded_identity("p2").peer_id): 10.0})
    a, _, c = peers
    assert [set(r["contributors"]) for r in late] == [{a.peer_id, c.peer_id}] * 2, late
    assert [r["model"] for r in late] == [r["model"] for r in on_time]


async def test_straggler_is_skipped_exactly_at_the_round_deadline(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    net = MemoryNetwork()
    ids, _ = configs(tmp_path, 2)
    slow = ids[1].peer_id_text
    timeline = Timeline(net, 2, delays={slow: 100.0})  # its updates leave 100 s after it tries
    a, b = peers = make(tmp_path, 2, net, timeline, rounds=1, deadline=30.0)
    async with running(peers):
        await a.done.wait()
        finished = trio.current_time()
        await b.done.wait()
        seen = {p.peer_id: await p.operator.rounds() for p in peers}
    assert finished - timeline.started[(a.peer_id, 0)] == pytest.approx(30.0, abs=1e-9)
    (round_a,) = seen[a.peer_id]
    assert round_a["contributors"] == []
    assert round_a["skipped"] == [{"peer": slow, "reason": "missed the deadline"}]
    (round_b,) = seen[b.peer_id]  # the straggler itself got a's update in time
    assert round_b["contributors"] == [a.peer_id]


async def test_a_neighbour_our_update_did_not_reach_is_undelivered_not_skipped_when_its_model_came(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """b's outgoing model is non-finite, so b's own sealing refuses it and a never gets it;
    a's model reaches b and b uses it: b neither gives up on a (its push failed at b's end,
    not a's) nor retries the push. b's round row lists a as a contributor and as undelivered,
    not as skipped (the two lists used to share it); a skips b at the deadline."""
    net = MemoryNetwork()
    poisoned: list[str] = []

    class Poison(Timeline):
        def outgoing_state(self, peer_id: str, round: int, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if peer_id != poisoned[0]:
                return state
            return {k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v for k, v in state.items()}

    a, b = peers = make(tmp_path, 2, net, Poison(net, 2), rounds=1, deadline=30.0)
    poisoned.append(b.peer_id)
    rows: dict[str, dict[str, Any]] = {}
    hellos: dict[str, int] = {}

    async def row_when_done(p: Peer) -> None:  # a peer closes its store a deadline after its last round
        await p.done.wait()
        rows[p.peer_id] = (await p.operator.rounds())[0]
        hellos[p.peer_id] = sum(e["direction"] == "sent" and e["kind"] == "hello" for e in p.audit_log.entries())

    async with running(peers), trio.open_nursery() as waiting:
        for p in peers:
            waiting.start_soon(row_when_done, p)
    row_b = rows[b.peer_id]
    assert row_b["contributors"] == [a.peer_id]
    assert row_b["skipped"] == []
    assert [u["peer"] for u in row_b["undelivered"]] == [a.peer_id]
    assert row_b["undelivered"][0]["reason"].startswith("not sent: NON_FINITE")
    # one push, not tried again (sealing our NaN model fails the same way every time), and
    # the hello answering a's push: two (the three tries before made four)
    assert hellos[b.peer_id] == 2
    row_a = rows[a.peer_id]
    assert row_a["contributors"] == [] and row_a["undelivered"] == []
    assert row_a["skipped"] == [{"peer": b.peer_id, "reason": "missed the deadline"}]


async def test_unreachable_neighbour_is_redialled_with_exponential_backoff_until_it_comes_up(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    net = MemoryNetwork()
    # manual participation: no round dials, only the connect loop's
    a, b = make(tmp_path, 2, net, Timeline(net, 2), participation=["manual", "manual"], rounds=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await trio.sleep(40.0)
        failed = [t for t, src, dst, ok in net.dials if src == a.peer_id and dst == b.peer_id and not ok]
        await nursery.start(b.run)
        await trio.sleep(1.0)
        assert b.peer_id in a.transport.connected and a.peer_id in b.transport.connected
        nursery.cancel_scope.cancel()
    first = failed[0]
    assert [t - first for t in failed] == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]


async def test_partitioned_neighbour_is_skipped_then_used_again_after_the_link_heals(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    net = MemoryNetwork()

    class Partition(Timeline):
        """Cut the link when the first peer starts round 1; round 2 starts 30 s later."""

        cut = trio.Event()

        async def round_start(self, peer_id: str, round: int) -> None:
            await super().round_start(peer_id, round)
            if round == 1 and not self.cut.is_set():
                net.cut(*net.hosts)
                self.cut.set()
            if round == 2:
                await trio.sleep(30.0)

    async def heal_after_20_seconds() -> None:
        await timeline.cut.wait()
        await trio.sleep(20.0)
        net.heal(*net.hosts)

    timeline = Partition(net, 2)
    a, b = peers = make(tmp_path, 2, net, timeline, rounds=3, deadline=60.0)
    async with running(peers) as nursery:
        nursery.start_soon(heal_after_20_seconds)
        await a.done.wait()
        await b.done.wait()
        seen = {p.peer_id: await p.operator.rounds() for p in peers}
    for p, other in ((a, b), (b, a)):
        r0, r1, r2 = seen[p.peer_id]
        assert r0["contributors"] == [other.peer_id]
        assert r1["contributors"] == [] and r1["skipped"][0]["peer"] == other.peer_id
        assert r1["skipped"][0]["reason"].startswith("unreachable")
        assert r2["contributors"] == [other.peer_id], r2


async def test_unanswered_train_request_approval_expires_exactly_at_the_deadline(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    net = MemoryNetwork()
    timeline = Timeline(net, 2)
    requester, trainer = peers = make(
        tmp_path, 2, net, timeline, participation=["auto", "manual"], rounds=1, deadline=30.0, strategy="fedefm"
    )

    async def train_request() -> dict[str, Any]:
        (row,) = [r for r in await trainer.operator.approvals() if r["kind"] == "train-request"]
        return row

    async with running(peers):
        await trio.sleep(1.0)
        asked = timeline.started[(requester.peer_id, 0)]
        assert (await train_request())["status"] == "pending"
        await trio.sleep_until(asked + 29.999)
        assert (await train_request())["status"] == "pending"
        await trio.sleep_until(asked + 30.001)
        ask = await train_request()
        assert ask["status"] == "expired"
        with pytest.raises(OperatorError) as late:
            await trainer.operator.decide(ask["id"], True)
        assert late.value.status == 409
        await requester.done.wait()
        rounds_ = await requester.operator.rounds()
    assert [s["peer"] for s in rounds_[0]["skipped"]] == [trainer.peer_id]


# -- the strategy owns its round ---------------------------------------------------------


class RecordingStrategy(Strategy):
    """A strategy that exists only in this test: plain averaging, recording its hooks."""

    name = "recording"
    calls: ClassVar[list[tuple[str, object]]] = []

    def prepared_for(self, model: nn.Module) -> Strategy:
        self.calls.append(("prepared_for", type(model).__name__))
        return self

    def local_step(self, bench: Workbench, steps: int) -> LocalStep:
        self.calls.append(("local_step", steps))
        return bench.train_plain(steps)

    def aggregate(
        self,
        own: Mapping[str, np.ndarray],
        own_weight: float,
        neighbours: Sequence[Contribution],
        *,
        own_degree: int | None = None,
        own_loss: float | None = None,
    ) -> AggregationResult:
        self.calls.append(("aggregate", sorted(c.peer_id for c in neighbours)))
        return AggregationResult(average_states([own, *[c.state for c in neighbours]]), {})

    def adopt(self, bench: Workbench) -> bool:
        self.calls.append(("adopt", None))
        return False


async def test_a_strategy_registered_only_here_runs_its_own_round_through_its_hooks(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(STRATEGIES, RecordingStrategy.name, RecordingStrategy)  # the one registry line
    monkeypatch.setattr(RecordingStrategy, "calls", [])
    net = MemoryNetwork()
    timeline = Timeline(net, 2)
    a, b = peers = make(tmp_path, 2, net, timeline, rounds=1, strategy="recording", local_steps=2)
    async with running(peers):
        await a.done.wait()
        await b.done.wait()
        committed = {p.peer_id: p.store.load_model(p.store.latest_model().digest) for p in peers}  # type: ignore[union-attr]
        sent = {p.peer_id: p.context.bases.acked for p in peers}
    kinds = [c[0] for c in RecordingStrategy.calls]
    assert kinds.count("prepared_for") == 2 and kinds.count("adopt") == 2
    for p in peers:
        assert ("aggregate", [q.peer_id for q in peers if q is not p]) in RecordingStrategy.calls
    assert ("local_step", 2) in RecordingStrategy.calls
    # each committed the average of what the two sent each other (full snapshots in round 0)
    sent_by_a, sent_by_b = sent[a.peer_id][b.peer_id].state, sent[b.peer_id][a.peer_id].state
    for p in peers:
        for k, v in committed[p.peer_id].items():
            np.testing.assert_allclose(v, (sent_by_a[k] + sent_by_b[k]) / 2, rtol=1e-6, atol=1e-7, err_msg=k)


async def test_fedefm_experts_that_are_non_finite_or_misshaped_never_reach_distillation(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = MemoryNetwork()
    ids, _ = configs(tmp_path, 4, neighbours=[[1, 2, 3], [0], [0], [0]])
    asker, nan_peer, odd_peer, good_peer = (i.peer_id_text for i in ids)
    real_request = rounds.request_training

    async def corrupted(ctx: RoundContext, neighbour: str, *args: Any) -> Expert:
        """What a decoder bug would let through: the screening hook is the last line."""
        expert = await real_request(ctx, neighbour, *args)
        if ctx.peer_id != asker or neighbour == good_peer:
            return expert
        state = {k: v.copy() for k, v in expert.state.items()}
        key = next(k for k, v in state.items() if v.dtype.kind == "f" and v.ndim > 1)
        if neighbour == nan_peer:
            state[key][...] = np.nan
        else:
            state[key] = state[key][:1]
        return Expert(state, expert.n_samples, expert.loss, expert.bytes)

    learned_from: list[list[str]] = []
    real_learn = FedEFMStrategy.learn_from_experts

    def spy(self: FedEFMStrategy, bench: Workbench, experts: Sequence[Contribution]) -> dict[str, Any]:
        learned_from.append([c.peer_id for c in experts])
        for c in experts:
            assert all(np.isfinite(v).all() for v in c.state.values())
        return real_learn(self, bench, experts)

    monkeypatch.setattr(rounds, "request_training", corrupted)
    monkeypatch.setattr(FedEFMStrategy, "learn_from_experts", spy)
    timeline = Timeline(net, 4)
    peers = make(tmp_path, 4, net, timeline, rounds=1, strategy="fedefm", neighbours=[[1, 2, 3], [0], [0], [0]])
    async with running(peers):
        for p in peers:
            await p.done.wait()
        seen = await peers[0].operator.rounds()
        audit = peers[0].audit_log.entries()
    assert [good_peer] in learned_from
    assert not any(nan_peer in names or odd_peer in names for names in learned_from)
    (round0,) = seen
    assert round0["contributors"] == [good_peer]
    reasons = {s["peer"]: s["reason"] for s in round0["skipped"]}
    assert reasons[nan_peer].startswith("dropped:") and reasons[odd_peer].startswith("dropped:")
    # the update bound (stage "safety") drops the NaN expert before the strategy screens the misshaped one
    stages = ("screening:", "safety:")
    refused = {e["peer"] for e in audit if e["direction"] == "refused" and e["reason"].startswith(stages)}
    assert refused == {nan_peer, odd_peer}


async def test_fedefm_learns_from_its_experts_in_trust_list_order_whatever_order_they_arrive_in(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The experts' order reaches the distillation and the mean (float sums): it must not be
    the order in which the neighbours happened to answer (it was), or results depend on speed."""
    graph = [[1, 2, 3], [0], [0], [0]]
    ids, _ = configs(tmp_path, 4, neighbours=graph)
    asker, *leaves = (i.peer_id_text for i in ids)
    real_request = rounds.request_training

    async def last_first(ctx: RoundContext, neighbour: str, *args: Any) -> Expert:
        if ctx.peer_id == asker:
            await trio.sleep(3.0 - leaves.index(neighbour))  # the first in the trust list answers last
        return await real_request(ctx, neighbour, *args)

    learned_from: list[list[str]] = []
    real_learn = FedEFMStrategy.learn_from_experts

    def spy(self: FedEFMStrategy, bench: Workbench, experts: Sequence[Contribution]) -> dict[str, Any]:
        learned_from.append([c.peer_id for c in experts])
        return real_learn(self, bench, experts)

    monkeypatch.setattr(rounds, "request_training", last_first)
    monkeypatch.setattr(FedEFMStrategy, "learn_from_experts", spy)
    net = MemoryNetwork()
    peers = make(tmp_path, 4, net, Timeline(net, 4), rounds=1, strategy="fedefm", neighbours=graph)
    async with running(peers):
        for p in peers:
            await p.done.wait()
    assert [names for names in learned_from if len(names) == 3] == [leaves]


async def test_a_peer_runs_one_compute_job_at_a_time_even_with_shared_slots_free() -> None:
    """simnet shares one slot per core between its peers; a peer's own jobs (its training, a
    neighbour's train-request) must still not run at once: they share the learner's model
    and its seed sequence (two of them ran together when the shared limiter had room)."""
    import threading
    import time as wall

    from silomesh.peer.context import ThreadCompute

    shared = trio.CapacityLimiter(4)
    ours, other = ThreadCompute(shared), ThreadCompute(shared)
    lock, running, most = threading.Lock(), {"ours": 0, "all": 0}, {"ours": 0, "all": 0}

    def job(mine: bool) -> None:
        with lock:
            running["all"] += 1
            running["ours"] += mine
            most["all"], most["ours"] = max(most["all"], running["all"]), max(most["ours"], running["ours"])
        wall.sleep(0.05)
        with lock:
            running["all"] -= 1
            running["ours"] -= mine

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(ours.run, job, True)
        nursery.start_soon(other.run, job, False)
    assert most["ours"] == 1 and running == {"ours": 0, "all": 0}
    assert shared.borrowed_tokens == 0
