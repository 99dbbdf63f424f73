"""The relay round of ``cyclic`` (cyclic weight transfer): the predecessor's model, trained, passed on."""

from __future__ import annotations

import logging

import trio

from silomesh.peer.context import RoundContext
from silomesh.peer.dialer import UpdateMaker, skip_reason
from silomesh.peer.round_steps import (
    RoundReport,
    account_privacy,
    aggregate,
    deliver,
    own_metrics,
    refuse_dropped,
    update_bound,
)
from silomesh.peer.safety import UpdateGuard, measure_update, update_violation
from silomesh.strategies import Contribution, CyclicConfig, StateDict
from silomesh.strategies.cyclic import LAP_COUNT, CyclicStrategy, split_lap, with_lap

log = logging.getLogger(__name__)


async def relay_round(
    ctx: RoundContext, round: int, selected: list[str], deadline: float, report: RoundReport, guard: UpdateGuard
) -> StateDict:
    """Cyclic weight transfer: take the predecessor's model, train it, pass it to the successor.

    The first peer of the ring starts round 0 from its own model and afterwards waits for the
    last peer's model of the round before; every other peer waits for its predecessor's model
    of this round. One that does not come by the deadline (or a predecessor not selected this
    round) is skipped and the peer goes on from its own model. The trained model is pushed to
    the successor (with the exchange's retries) and is the round's model; with ``commit =
    "lap_mean"`` the update also carries the lap mean, and the lap mean is the round's model.
    """
    strategy = ctx.learner.strategy
    cfg = strategy.config
    assert isinstance(strategy, CyclicStrategy) and isinstance(cfg, CyclicConfig)
    before, after = cfg.neighbours(ctx.peer_id)
    own = ctx.learner.state()
    contributions: list[Contribution] = []
    lap_in: StateDict | None = None
    lap_count = 0
    opens = cfg.first(ctx.peer_id) and ctx.store.last_committed_round() < 0
    if not opens:
        wanted = round - 1 if cfg.first(ctx.peer_id) else round
        if before in selected:
            ctx.progress.waiting_on[before] = "the model its predecessor in the ring passes on"
            with trio.move_on_at(deadline):
                await ctx.inbox.wait_for({before}, wanted)
            ctx.progress.waiting_on.pop(before, None)
        got = ctx.inbox.get(before, wanted) if before in selected else None  # an unselected one is not used
        if got is None:
            report.skipped[before] = "missed the deadline" if before in selected else "not selected this round"
            log.info("%s: no model from %s for round %d: going on from our own", ctx.peer_id[-8:], before[-8:],
                     round)
        else:
            passed, lap = split_lap(got.state)
            why = guard.check(before, own, passed)
            if why is not None:
                refuse_dropped(ctx, report, {before: f"update bound: {why}"}, "update", "safety")
            else:
                contributions.append(Contribution(peer_id=before, state=passed, n_samples=max(got.n_samples, 1)))
                if strategy.lap_mean:
                    lap_in, lap_count = _checked_lap(ctx, report, before, own, passed, lap, got.lap_count)
    start = aggregate(ctx, own, contributions, report)
    await ctx.compute.run(ctx.learner.load, start)
    ctx.progress.phase = "training"
    trained = await ctx.compute.run(ctx.learner.train, ctx.rounds.local_steps)
    account_privacy(ctx, round)  # logged before the trained model can leave the peer
    report.train_loss = trained.mean_loss
    ctx.progress.phase = "exchanging"
    metrics = own_metrics(ctx, trained.mean_loss)
    passed_on = ctx.learner.shared(trained.state)
    result, outgoing = trained.state, passed_on
    if strategy.lap_mean:
        mean, count = await ctx.compute.run(strategy.next_lap, passed_on, lap_in, lap_count)
        metrics[LAP_COUNT] = float(count)
        report.lap_count = count
        outgoing = with_lap(passed_on, mean)
        result = {**trained.state, **mean}
    if after in selected:
        await _pass_on(ctx, round, after, outgoing, metrics, report)
    else:
        report.skipped[after] = "not selected this round"
    return result


def _checked_lap(
    ctx: RoundContext,
    report: RoundReport,
    sender: str,
    own: StateDict,
    passed: StateDict,
    lap: StateDict,
    count: float | None,
) -> tuple[StateDict | None, int]:
    """The lap mean that came with ``passed`` and its count, or (None, 0) for a new lap.

    A lap mean that does not name the model's tensors, whose count is not a whole number
    in ``1..n``, or that fails the update bound is refused (logged and audited); the model
    it came with is still used, and this peer starts a new lap.
    """
    strategy = ctx.learner.strategy
    assert isinstance(strategy, CyclicStrategy)
    why = strategy.lap_problem(passed, lap, count) or update_violation(measure_update(own, lap), update_bound(ctx))
    if why is not None:
        log.warning("%s: refused the lap mean from %s in round %d (%s): starting a new lap", ctx.peer_id[-8:],
                    sender[-8:], report.round, why)
        ctx.endpoint.journal.refused(sender, "update", f"lap mean: {why}", round=report.round)
        return None, 0
    assert count is not None
    return lap, int(count)


async def _pass_on(
    ctx: RoundContext, round: int, after: str, state: StateDict, metrics: dict[str, float], report: RoundReport
) -> None:
    """Push the round's model to the successor in the ring, with the exchange's retries (a
    broken streamed update resumes); the wait for the predecessor may have used the round's
    deadline, so the retries get a deadline of their own."""
    shared = ctx.faults.outgoing_state(ctx.peer_id, round, state)
    maker = UpdateMaker(ctx, round, shared, metrics, ctx.rounds.codec)

    def count(sent: int) -> None:
        report.bytes_sent += sent

    retry_until = trio.current_time() + ctx.rounds.deadline_seconds
    failed = await deliver(ctx, round, after, maker, count, retry_until, note="push: passing the model on")
    if failed is not None:
        log.warning("%s: could not pass the model on to %s in round %d: %s", ctx.peer_id[-8:], after[-8:],
                    round, failed)
        report.undelivered[after] = skip_reason(failed)
