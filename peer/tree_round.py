"""The tree round of ``fedavg`` with ``reduce = "tree"``: subtree means up, the federation's mean down."""

from __future__ import annotations

import logging

import numpy as np
import trio

from silomesh.peer.context import Received, RoundContext
from silomesh.peer.dialer import UpdateMaker, skip_reason
from silomesh.peer.round_steps import (
    MAX_CONCURRENT_PUSHES,
    RoundReport,
    account_privacy,
    aggregate,
    deliver,
    own_metrics,
    refuse_dropped,
    selected_or_skipped,
)
from silomesh.peer.safety import UpdateGuard
from silomesh.strategies import Contribution, FedAvgConfig, StateDict
from silomesh.strategies.fedavg import TREE_COUNT

log = logging.getLogger(__name__)

#: the share of a round's time (from its start) in which the subtree means travel up the
#: tree; a peer at depth ``d`` of a tree of height ``h`` waits for its children until
#: ``(h - d) / h`` of it, so that its parent still waits when its mean comes. The rest of
#: the round is for the federation's mean coming down.
TREE_UP_SHARE = 2 / 3


async def tree_round(
    ctx: RoundContext, round: int, selected: list[str], deadline: float, report: RoundReport, guard: UpdateGuard
) -> StateDict:
    """``fedavg`` with ``reduce = "tree"``: the exact sample-weighted mean of every peer of the tree.

    Local step; wait for each child's subtree mean (until this depth's share of the round,
    :data:`TREE_UP_SHARE`); average it with our model, weighted by samples; push that mean,
    with its subtree's samples and count, to the parent; wait for the parent's mean (the
    federation's, until the deadline) and push it to the children. The root's own average
    is the federation's. A child whose mean does not come in time (or fails its checks) is
    left out of the round's mean; a parent whose mean does not come leaves this peer with its
    subtree's mean, which it also passes down. A parent or child not selected this round is
    skipped like one that did not answer.
    """
    cfg = ctx.learner.strategy.config
    assert isinstance(cfg, FedAvgConfig)
    me, size = ctx.peer_id, len(cfg.order)
    parent, children = cfg.tree_parent(me), cfg.tree_children(me)
    height, depth = max(cfg.tree_height(), 1), cfg.tree_depth(me)
    start = trio.current_time()
    up_time = max(deadline - start, 0.0) * TREE_UP_SHARE
    ctx.progress.phase = "training"
    trained = await ctx.compute.run(ctx.learner.train, ctx.rounds.local_steps)
    account_privacy(ctx, round)  # logged before the trained model can leave the peer
    report.train_loss = trained.mean_loss
    ctx.progress.phase = "exchanging"
    metrics = own_metrics(ctx, trained.mean_loss)

    def checked(n: str, got: Received | None, what: str) -> Contribution | None:
        if got is None:
            report.skipped.setdefault(n, f"missed the deadline ({what})")
            return None
        count = got.tree_count
        why = (f"tree_count {count!r} is not a whole number in 1..{size}"
               if count is None or not count.is_integer() or not 1 <= count <= size else None)
        why = why or guard.check(n, trained.state, got.state)
        if why is not None:
            refuse_dropped(ctx, report, {n: f"{what}: {why}"}, "update", "safety")
            return None
        return Contribution(peer_id=n, state=got.state, n_samples=max(got.n_samples, 1))

    waited = selected_or_skipped(report, children, selected)
    for c in waited:
        ctx.progress.waiting_on[c] = "the mean of its subtree"
    with trio.move_on_at(start + up_time * (height - depth) / height):
        await ctx.inbox.wait_for(set(waited), round)
    for c in waited:
        ctx.progress.waiting_on.pop(c, None)
    counts: dict[str, int] = {}
    contributions = []
    for c in waited:
        got = ctx.inbox.get(c, round)
        if (contribution := checked(c, got, "its subtree's mean")) is not None:
            assert got is not None and got.tree_count is not None
            contributions.append(contribution)
            counts[c] = int(got.tree_count)
    mean = aggregate(ctx, trained.state, contributions, report)
    used = set(report.contributors)
    count = 1 + sum(counts[c] for c in used)
    samples = int(ctx.learner.n_samples) + sum(c.n_samples for c in contributions if c.peer_id in used)

    def count_bytes(sent: int) -> None:
        report.bytes_sent += sent

    if parent is not None and selected_or_skipped(report, (parent,), selected):
        up = UpdateMaker(ctx, round, ctx.faults.outgoing_state(me, round, ctx.learner.shared(mean)),
                         {**metrics, TREE_COUNT: float(count)}, ctx.rounds.codec, n_samples=samples)
        parent_waits = start + up_time * (height - depth + 1) / height
        failed = await deliver(ctx, round, parent, up, count_bytes, parent_waits, note="push: our subtree's mean")
        if failed is not None:
            log.warning("%s: could not send our subtree's mean to %s in round %d: %s", me[-8:], parent[-8:], round,
                        failed)
            report.skipped[parent] = report.undelivered[parent] = skip_reason(failed)
        else:
            ctx.progress.waiting_on[parent] = "the federation's mean, from our parent in the tree"
            with trio.move_on_at(deadline):
                await ctx.inbox.wait_for({parent}, round)
            ctx.progress.waiting_on.pop(parent, None)
            got = ctx.inbox.get(parent, round)
            if (down := checked(parent, got, "the federation's mean")) is not None:
                assert got is not None and got.tree_count is not None
                keep_own = cfg.int_policy == "own"
                mean = {**mean, **{k: v for k, v in down.state.items()
                                   if not (keep_own and not np.issubdtype(np.asarray(v).dtype, np.floating))}}
                count, samples = int(got.tree_count), down.n_samples
                report.contributors = sorted(used | {parent})
    report.tree_count = count
    ctx.progress.phase = "exchanging"
    targets = [c for c in children if c in selected]
    if targets:
        down_maker = UpdateMaker(ctx, round, ctx.faults.outgoing_state(me, round, ctx.learner.shared(mean)),
                                 {**metrics, TREE_COUNT: float(count)}, ctx.rounds.codec, n_samples=samples)
        pushing = trio.CapacityLimiter(MAX_CONCURRENT_PUSHES)

        async def push_down(c: str) -> None:
            failed = await deliver(ctx, round, c, down_maker, count_bytes, deadline, pushing,
                                   note="push: the federation's mean")
            if failed is not None:
                log.info("%s: the federation's mean did not reach %s in round %d: %s", me[-8:], c[-8:], round,
                         failed)
                report.undelivered[c] = skip_reason(failed)

        async with trio.open_nursery() as nursery:
            for c in targets:
                nursery.start_soon(push_down, c)
    return mean
