"""Secure aggregation over the in-memory transport: the production peer, MockClock, inline torch.

Four peers, each the neighbour of the other three: each aggregates a group of three members.
The result must equal plain fedavg over the same trained models within the stated bound;
a member that deals and then falls silent is a dropout the survivors unmask around; and the
aggregator's store and audit log hold no member's model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing
from memnet import MemoryNetwork
from peerkit import configs, identity
from test_round_loop import Timeline, make, running

from silomesh.audit.logfile import load_log
from silomesh.audit.reconcile import reconcile
from silomesh.peer.config import ConfigError, StrategyConfig
from silomesh.peer.context import InlineCompute
from silomesh.peer.daemon import Peer
from silomesh.peer.secure_member import on_group
from silomesh.protocol import RemoteProtocolError, state_digest
from silomesh.protocol.fixedpoint import FixedPoint
from silomesh.protocol.secagg import Group, sign_group
from silomesh.protocol.secagg_messages import SecaggGroup
from silomesh.strategies import Contribution
from silomesh.strategies.fedavg import FedAvgConfig, FedAvgStrategy
from silomesh.strategies.fedmix import FedMixConfig, FedMixStrategy
from silomesh.strategies.secagg import FEDMIX_LOSS_CAP, combine_fedmix, flatten, member_vector, weight_cap

FULL4 = [[j for j in range(4) if j != i] for i in range(4)]


def _secure_peers(tmp_path: Path, net: MemoryNetwork, timeline: Timeline, **params: Any) -> list[Peer]:
    extra = {"strategy": {"name": "fedavg", "params": {"secure_aggregation": True, **params}}}
    return make(tmp_path, 4, net, timeline, rounds=1, deadline=30.0, neighbours=FULL4, extra=extra)


def _plain_fedavg(own: Peer, members: list[Peer]) -> dict[str, np.ndarray]:
    """Plain fedavg over the models each peer trained (and offered) in round 0."""
    mine = own.context.secure.trained[0]
    contributions = [
        Contribution(m.peer_id, m.context.secure.trained[0].state, n_samples=m.context.secure.trained[0].n_samples)
        for m in members
    ]
    return FedAvgStrategy(FedAvgConfig()).aggregate(mine.state, float(mine.n_samples), contributions).state


def _assert_within_bound(peer: Peer, expected: dict[str, np.ndarray]) -> None:
    bound = peer.context.secure.outcomes[0].bound
    assert 0 < bound < 1e-5
    got = peer.learner.state()
    for name, want in expected.items():
        if not np.issubdtype(want.dtype, np.floating):
            continue
        assert got[name].dtype == want.dtype
        # the stated bound on the float64 result, plus one float32 rounding of each side
        tolerance = bound + 2 * np.spacing(np.abs(want).astype(np.float32))
        assert np.all(np.abs(got[name].astype(np.float64) - want.astype(np.float64)) <= tolerance), name


async def test_secure_sum_equals_plain_fedavg_within_the_stated_bound(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    net = MemoryNetwork()
    peers = _secure_peers(tmp_path, net, Timeline(net, 4))
    async with running(peers):
        for p in peers:
            await p.done.wait()
        rows = {p.peer_id: await p.operator.rounds() for p in peers}
    for p in peers:
        others = [q for q in peers if q is not p]
        (row,) = rows[p.peer_id]
        assert row["status"] == "done" and row["contributors"] == sorted(q.peer_id for q in others), row
        # its row counts what it sent as a member too: a 32-bit masked vector to each of 3 aggregators
        ring_bytes = 4 * sum(v.size for v in p.context.secure.trained[0].state.values())
        assert 3 * ring_bytes < row["bytes_sent"] < 4 * ring_bytes, row["bytes_sent"]
        largest = max(np.abs(v).max() for q in peers for v in q.context.secure.trained[0].state.values())
        assert largest < 8.0  # the default clip: nothing was clipped, so plain fedavg is the reference
        _assert_within_bound(p, _plain_fedavg(p, others))
        assert p.learner.state().keys() == _plain_fedavg(p, others).keys()


async def test_segviz_secure_sum_averages_the_shared_body_and_keeps_each_head_local(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    net = MemoryNetwork()
    extra = {"strategy": {"name": "segviz", "params": {"secure_aggregation": True}}}
    peers = make(tmp_path, 4, net, Timeline(net, 4), rounds=1, deadline=30.0, neighbours=FULL4, extra=extra)
    async with running(peers):
        for p in peers:
            await p.done.wait()
    for p in peers:
        strategy = p.learner.strategy
        mine = p.context.secure.trained[0]
        head = [k for k in p.learner.state() if k not in mine.state]
        assert head and mine.state  # the head stays out of what is masked
        others = [q.context.secure.trained[0] for q in peers if q is not p]
        plain = strategy.aggregate(mine.state, float(mine.n_samples), [
            Contribution(q.peer_id, t.state, n_samples=t.n_samples)
            for q, t in zip([q for q in peers if q is not p], others, strict=True)
        ]).state
        _assert_within_bound(p, plain)
        assert p.learner.state().keys() == {*mine.state, *head}


async def test_fedmix_secure_sum_equals_plain_fedmix_weights_within_the_stated_bound(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """fedmix weights by size and by training loss; members mask both weighted copies and
    their loss score, and each peer's result is plain fedmix over the same models and losses."""
    net = MemoryNetwork()
    extra = {"strategy": {"name": "fedmix", "params": {"secure_aggregation": True}}}
    peers = make(tmp_path, 4, net, Timeline(net, 4), rounds=1, deadline=30.0, neighbours=FULL4, extra=extra)
    async with running(peers):
        for p in peers:
            await p.done.wait()
        rows = {p.peer_id: await p.operator.rounds() for p in peers}
    trained = {p.peer_id: p.context.secure.trained[0] for p in peers}
    losses = [t.loss for t in trained.values()]
    assert all(np.isfinite(v) and 0 < v**1.5 < FEDMIX_LOSS_CAP for v in losses), losses
    assert len(set(losses)) == 4  # the loss shares differ from the size shares
    for p in peers:
        (row,) = rows[p.peer_id]
        assert row["status"] == "done" and row["contributors"] == sorted(q.peer_id for q in peers if q is not p)
        mine = trained[p.peer_id]
        # a member masks 2 * len + 1 values: its bytes per aggregator are twice fedavg's
        ring_bytes = 4 * (2 * sum(v.size for v in mine.state.values()) + 1)
        assert 3 * ring_bytes < row["bytes_sent"] < 4 * ring_bytes, row["bytes_sent"]
        plain = p.learner.strategy.aggregate(mine.state, float(mine.n_samples), [
            Contribution(q.peer_id, trained[q.peer_id].state, n_samples=trained[q.peer_id].n_samples,
                         loss=trained[q.peer_id].loss) for q in peers if q is not p
        ], own_loss=mine.loss).state
        _assert_within_bound(p, plain)
        # and it is not fedavg's size-weighted average (the loss shares changed it)
        sizes = _plain_fedavg(p, [q for q in peers if q is not p])
        assert any(not np.allclose(sizes[k], plain[k], rtol=0, atol=1e-6) for k in plain
                   if np.issubdtype(plain[k].dtype, np.floating))


def test_fedmix_combine_matches_fedmix_weights_with_dropouts_and_zero_losses() -> None:
    """combine_fedmix on exact sums (no ring) is plain fedmix over own + survivors; with every
    loss 0 it is the size-weighted average, as fedmix_weights says."""
    rng = np.random.default_rng(5)
    secure = FedMixStrategy(FedMixConfig.from_dict({"secure_aggregation": True})).secure_sum
    assert secure is not None and secure.lam == 10.0 and secure.beta == 1.5
    own = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    for losses in ([0.3, 0.9, 0.1, 1.2], [0.0, 0.0, 0.0, 0.0]):
        members = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in own.items()} for _ in range(3)]
        samples = [40, 7, 19]
        cap = weight_cap([25, *samples])
        total = np.zeros(2 * flatten(own).size + 1)
        for m, n, loss in zip(members, samples, losses[1:], strict=True):
            values, weight = member_vector(flatten(m), secure, n / cap, loss, secure.clip)
            assert weight == 1.0
            total += values
        got, bound = combine_fedmix(own, 25.0, losses[0], total, samples, cap, secure, 1e-12)
        want = FedMixStrategy(FedMixConfig()).aggregate(own, 25.0, [
            Contribution(f"p{i}", m, n_samples=n, loss=loss)
            for i, (m, n, loss) in enumerate(zip(members, samples, losses[1:], strict=True))
        ], own_loss=losses[0]).state
        assert 0 < bound < 1e-9
        for k in own:
            assert np.allclose(got[k], want[k], rtol=0, atol=2e-7), (losses, k)


async def test_a_restarted_member_refuses_a_group_of_a_round_it_joined_before_the_restart(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The seeds of a joined group die with the process; its audit log remembers the join, so
    after a restart the member refuses that aggregator's round again, the same group or another
    (two overlapping sums would reveal a member by difference)."""
    net = MemoryNetwork()
    peers = _secure_peers(tmp_path, net, Timeline(net, 4))
    async with running(peers):
        for p in peers:
            await p.done.wait()
    aggregator, member = peers[0], peers[1]
    again = Peer(member.config, identity=member.identity, serve_control_api=False, transport=net.open,
                 compute=InlineCompute(), faults=member._faults)
    async with running([again]):
        await again.done.wait()
    assert set(again.context.secure.before_restart) == {(q.peer_id, 0) for q in peers if q is not member}
    agg_ctx = aggregator.context
    keys = sorted(agg_ctx.trust.public_key_of(q.peer_id) for q in peers[1:3])  # another group: 2 members
    fp = FixedPoint.for_group(2, 8.0, 32)
    length = flatten(member.learner.shared(member.learner.state())).size
    group = Group.of(agg_ctx.endpoint.crypto.public_key, 0, keys, length, fp, weight_cap=64)
    msg = SecaggGroup.of(group, sign_group(agg_ctx.endpoint.crypto, group),
                         **agg_ctx.endpoint.routing(agg_ctx.trust.public_key_of(member.peer_id), 0))
    with pytest.raises(RemoteProtocolError, match="before we restarted"):
        on_group(again.context, msg)
    # a fresh member (no join in its log) would have dealt for the same group
    assert not peers[2].context.secure.before_restart


class SilentAfterDealing(Timeline):
    """One peer starts its round (and trains) only long after everyone's deadline: it answers
    the groups it is asked to join, deals, and never sends a masked vector in time."""

    def __init__(self, network: MemoryNetwork, count: int, late: str) -> None:
        super().__init__(network, count)
        self.late = late

    async def round_start(self, peer_id: str, round: int) -> None:
        await super().round_start(peer_id, round)
        if peer_id == self.late:
            await trio.sleep(1000.0)


async def test_a_member_that_drops_after_dealing_is_unmasked_around_and_the_commit_precedes_releases(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    net = MemoryNetwork()
    late_id = identity("p3").peer_id_text
    timeline = SilentAfterDealing(net, 4, late_id)
    peers = _secure_peers(tmp_path, net, timeline)
    on_time, late = peers[:3], peers[3]
    async with running(peers):
        for p in on_time:
            await p.done.wait()
        rows = {p.peer_id: await p.operator.rounds() for p in on_time}
        logs = {p.peer_id: p.audit_log.entries() for p in peers}
    for p in on_time:
        others = [q for q in on_time if q is not p]
        (row,) = rows[p.peer_id]
        assert row["contributors"] == sorted(q.peer_id for q in others), row
        (skip,) = row["skipped"]
        assert skip["peer"] == late.peer_id and "no masked vector" in skip["reason"]
        _assert_within_bound(p, _plain_fedavg(p, others))
        entries = logs[p.peer_id]
        commit = next(e for e in entries if e["kind"] == "secagg-commit" and e["direction"] == "local")
        fields = json.loads(commit["reason"])
        assert fields["dropped"] == [late.peer_id] and fields["survivors"] == sorted(q.peer_id for q in others)
        sent = [e["seq"] for e in entries if e["kind"] == "secagg-commit" and e["direction"] == "sent"]
        assert len(sent) == 2 and min(sent) > commit["seq"]  # audited before any member saw it
        sums = [e for e in entries if e["kind"] == "secagg-sum"]
        assert len(sums) == 1 and json.loads(sums[0]["reason"])["survivors"] == sorted(q.peer_id for q in others)
        assert sums[0]["payload_digest"] == state_digest(p.learner.state()).hex()  # the committed model
        # as members, the on-time peers released the late one's pairwise shares to the others
        releases = [e for e in entries if e["kind"] == "secagg-release" and e["direction"] == "local"]
        assert len(releases) == 2 and all(json.loads(e["reason"])["dropped"] == [late.peer_id] for e in releases)
    # the late peer dealt in each group but released nothing: it was not a survivor
    late_kinds = [e["kind"] for e in logs[late.peer_id] if e["direction"] == "local"]
    assert late_kinds.count("secagg-group") == 3 and "secagg-release" not in late_kinds


def _files_bytes(root: Path) -> bytes:
    return b"".join(f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file())


async def test_the_aggregators_store_and_audit_log_hold_no_members_model(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    net = MemoryNetwork()
    peers = _secure_peers(tmp_path, net, Timeline(net, 4))
    async with running(peers):
        for p in peers:
            await p.done.wait()
        entries = peers[0].audit_log.entries()
    aggregator, members = peers[0], peers[1:]
    stored = _files_bytes(aggregator.config.data_dir)

    def probe(state: dict[str, np.ndarray]) -> bytes:
        name = max((k for k in state if np.issubdtype(state[k].dtype, np.floating)), key=lambda k: state[k].size)
        flat = np.ascontiguousarray(state[name], dtype=np.float32).reshape(-1)
        middle = flat.size // 2
        return flat[middle:middle + 16].tobytes()  # 64 bytes: never there by chance

    # the check can see a model where there is one: the aggregator's own committed model is stored
    assert probe(aggregator.learner.state()) in stored
    for m in members:
        assert probe(m.context.secure.trained[0].state) not in stored, m.peer_id
    kinds = {(e["direction"], e["kind"]) for e in entries}
    assert ("received", "update") not in kinds
    assert {("received", "secagg-masked"), ("received", "secagg-deal"), ("received", "secagg-release"),
            ("local", "secagg-group"), ("local", "secagg-commit"), ("local", "secagg-sum")} <= kinds
    masked = [e for e in entries if e["kind"] == "secagg-masked" and e["direction"] == "received"]
    assert len(masked) == 3


@pytest.mark.parametrize("params, why", [
    ({"robust": "median"}, "need each neighbour's model"),
    ({"robust": "trimmed_mean"}, "need each neighbour's model"),
    ({"robust": "clip", "clip_norm": 1.0}, "need each neighbour's model"),
    ({"weighting": "metropolis"}, "under a rule the whole group shares"),
])
def test_secure_aggregation_refuses_what_needs_individual_models(params: dict[str, Any], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        FedAvgConfig.from_dict({"secure_aggregation": True, **params})


async def test_with_one_neighbour_and_the_fallback_allowed_peers_run_plain_rounds(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    net = MemoryNetwork()
    extra = {"strategy": {"name": "fedavg", "params": {"secure_aggregation": True, "secure_fallback": True}}}
    a, b = peers = make(tmp_path, 2, net, Timeline(net, 2), rounds=1, extra=extra)
    async with running(peers):
        await a.done.wait()
        await b.done.wait()
        rows = {p.peer_id: await p.operator.rounds() for p in peers}
        kinds = {e["kind"] for e in a.audit_log.entries()}
    assert rows[a.peer_id][0]["contributors"] == [b.peer_id]
    assert "update" in kinds and not any(k.startswith("secagg") for k in kinds)


async def test_a_neighbour_with_secure_aggregation_off_refuses_the_group_and_is_skipped(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    net = MemoryNetwork()
    peers = _secure_peers(tmp_path, net, Timeline(net, 4))
    plain_cfg = dataclasses.replace(peers[3].config, strategy=StrategyConfig("fedavg", {}))
    peers[3] = Peer(plain_cfg, identity=peers[3].identity, serve_control_api=False, transport=net.open,
                    compute=InlineCompute(), faults=peers[3]._faults)
    async with running(peers):
        for p in peers[:3]:
            await p.done.wait()
        rows = {p.peer_id: await p.operator.rounds() for p in peers[:3]}
    for p in peers[:3]:
        (row,) = rows[p.peer_id]
        assert row["contributors"] == sorted(q.peer_id for q in peers[:3] if q is not p)
        (skip,) = row["skipped"]
        assert skip["peer"] == peers[3].peer_id and "secure aggregation is off on this peer" in skip["reason"]


async def test_a_member_refuses_a_group_whose_threshold_is_below_its_secure_threshold(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Peer 3 asks for every member's shares (secure_threshold = 1): it names 3 of 3 in its own
    group, which the others join, and refuses their groups of threshold 2 of 3."""
    net = MemoryNetwork()
    peers = _secure_peers(tmp_path, net, Timeline(net, 4))
    strict = StrategyConfig("fedavg", {"secure_aggregation": True, "secure_threshold": 1.0})
    peers[3] = Peer(dataclasses.replace(peers[3].config, strategy=strict), identity=peers[3].identity,
                    serve_control_api=False, transport=net.open, compute=InlineCompute(), faults=peers[3]._faults)
    async with running(peers):
        for p in peers:
            await p.done.wait()
        rows = {p.peer_id: (await p.operator.rounds())[0] for p in peers}
        groups = {p.peer_id: [json.loads(e["reason"]) for e in p.audit_log.entries()
                              if e["kind"] == "secagg-group" and e["peer"] == ""] for p in peers}
    assert [g["threshold"] for g in groups[peers[3].peer_id]] == [3]
    assert rows[peers[3].peer_id]["contributors"] == sorted(q.peer_id for q in peers[:3])
    for p in peers[:3]:
        assert [g["threshold"] for g in groups[p.peer_id]] == [2]
        row = rows[p.peer_id]
        assert row["contributors"] == sorted(q.peer_id for q in peers[:3] if q is not p)
        (skip,) = row["skipped"]
        assert skip["peer"] == peers[3].peer_id and "asks for at least 3" in skip["reason"], skip


@pytest.mark.parametrize("share, members, want", [
    (0.5, 2, 2), (0.5, 3, 2), (0.5, 5, 3), (0.5, 8, 5), (0.6, 5, 3), (0.75, 8, 6), (0.8, 5, 4), (1.0, 5, 5),
])
def test_secure_threshold_is_at_least_a_majority_and_rounds_up(share: float, members: int, want: int) -> None:
    secure = FedAvgConfig.from_dict({"secure_aggregation": True, "secure_threshold": share}).secure_sum("samples")
    assert secure is not None and secure.threshold_of(members) == want


@pytest.mark.parametrize("share", [0.4, 1.01, float("nan")])
def test_secure_threshold_outside_a_majority_to_all_is_refused(share: float) -> None:
    with pytest.raises(ValueError, match="secure_threshold"):
        FedAvgConfig.from_dict({"secure_aggregation": True, "secure_threshold": share})


def test_config_refuses_secure_aggregation_with_one_neighbour_unless_the_fallback_is_allowed(tmp_path: Path) -> None:
    secure = {"strategy": {"name": "fedavg", "params": {"secure_aggregation": True}}}
    with pytest.raises(ConfigError, match="needs at least 2 trusted neighbours, got 1: the sum of one"):
        configs(tmp_path, 2, extra=secure)
    fallback = {"strategy": {"name": "fedavg", "params": {"secure_aggregation": True, "secure_fallback": True}}}
    configs(tmp_path, 2, extra=fallback)
    configs(tmp_path, 3, extra=secure)  # a ring of three: two neighbours each


def test_config_says_fedefm_is_not_covered_by_secure_aggregation(tmp_path: Path) -> None:
    fedefm = {"strategy": {"name": "fedefm", "params": {"secure_aggregation": True}}}
    with pytest.raises(ConfigError, match="not an aggregation, and secure aggregation does not cover it"):
        configs(tmp_path, 3, extra=fedefm)
    fedmix = {"strategy": {"name": "fedmix", "params": {"secure_aggregation": True}}}
    configs(tmp_path / "fedmix", 3, extra=fedmix)  # covered: its weighted average is a sum
    with pytest.raises(ValueError, match="need each neighbour's model"):
        FedMixConfig.from_dict({"secure_aggregation": True, "robust": "median"})


async def test_reconcile_matches_commits_and_releases_and_catches_a_lying_or_equivocating_aggregator(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    net = MemoryNetwork()
    timeline = SilentAfterDealing(net, 4, identity("p3").peer_id_text)
    peers = _secure_peers(tmp_path, net, timeline)
    async with running(peers):
        for p in peers[:3]:
            await p.done.wait()
    logs = [load_log(p.config.data_dir) for p in peers]
    report = reconcile(logs)
    assert report.ok and report.matched > 0, report.discrepancies  # envelopes and commits agree
    by_writer = {lg.writer_peer_id: lg for lg in logs}
    aggregator, member = peers[0].peer_id, peers[1].peer_id
    # the aggregator's commit claims a member whose vector it recorded receiving had dropped
    commit = next(e for e in by_writer[aggregator].entries if e["kind"] == "secagg-commit")
    fields = json.loads(commit["reason"])
    lied = {**fields, "survivors": [p for p in fields["survivors"] if p != member],
            "dropped": sorted([*fields["dropped"], member])}
    commit["reason"] = json.dumps(lied)
    codes = {(d.code, d.recipient) for d in reconcile(logs).discrepancies}
    assert ("secagg-commit-mismatch", member) in codes
    commit["reason"] = json.dumps(fields)
    # a member's release answered a commit the aggregator never logged: the aggregator showed it another one
    release = next(e for e in by_writer[member].entries if e["kind"] == "secagg-release" and e["peer"] == aggregator)
    release["payload_digest"] = "ab" * 32
    found = [d for d in reconcile(logs).discrepancies if d.code.startswith("secagg")]
    assert [(d.code, d.sender, d.recipient) for d in found] == [("secagg-equivocation", aggregator, member)]
