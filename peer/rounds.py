"""The decentralised round loop. Each peer runs its own round clock.

A round (:func:`round_loop`):

1. waits for operator approval when the participation policy is ``manual``;
2. runs the round's shape, as the strategy declares it (``Strategy.shape``):

   * :func:`exchange_round`: the strategy's local step; push the shared part of the
     model to every selected neighbour (a delta against what it acknowledged, or a full
     snapshot); wait until every reachable selected neighbour's update of this round
     (or a later one) is in the inbox, or the deadline; aggregate;
   * :func:`train_request_round`: send our model to every selected neighbour as a
     train-request; gather the trained copies until the deadline; screen them; the
     strategy learns from the accepted ones (or takes a local step when none came);
     aggregate;
   * :func:`~silomesh.peer.secure_rounds.secure_exchange_round` (``secure_aggregation``):
     the local step, then the neighbours' masked vectors, of which only the sum is learnt;
   * :func:`~silomesh.peer.relay_round.relay_round` (``cyclic``): the predecessor's model, trained, passed on;
   * :func:`~silomesh.peer.tree_round.tree_round` (``fedavg`` with ``reduce = "tree"``): the local step; the children's
     subtree means, averaged with ours, go up to the parent; the federation's mean comes down;

3. loads the result (the strategy's ``adopt`` hook may fine-tune), evaluates on our own
   test data, and commits model, metrics, round row and a signed audit checkpoint in
   one transaction (:func:`commit_round`); then announces the new model.

A neighbour's contribution that moves our model further than the update bound allows
(:mod:`silomesh.peer.safety`) is dropped before the strategy sees it. A round that fails
(training diverges, a model or its evaluation is not finite, any error in the round's
work) is rolled back to the model it started from and recorded as ``failed`` with why;
the peer goes on with the next round, and after :data:`MAX_FAILED_ROUNDS` failures in a
row reports itself ``degraded`` and pauses between tries.

A neighbour that cannot be reached or misses the deadline is skipped for the round and
never blocks the peer; a contribution the strategy drops is audited as refused.
"""

from __future__ import annotations

import functools
import logging
import math
import time

import numpy as np
import trio

from silomesh.peer import memory, privacy
from silomesh.peer.announces import publish
from silomesh.peer.context import Base, RoundContext
from silomesh.peer.dialer import Expert, UpdateMaker, request_training, skip_reason
from silomesh.peer.personal import personalise
from silomesh.peer.relay_round import relay_round
from silomesh.peer.round_steps import (
    MAX_CONCURRENT_PUSHES,
    UNDELIVERED,
    RoundReport,
    RoundShapeFn,
    account_privacy,
    aggregate,
    deliver,
    own_metrics,
    refuse_dropped,
    screen,
    update_bound,
)
from silomesh.peer.safety import UpdateGuard, state_violation
from silomesh.peer.secure_rounds import secure_exchange_round
from silomesh.peer.tree_round import tree_round
from silomesh.protocol import LocalProtocolError, UpdateAvailable, state_digest
from silomesh.strategies import Contribution, RoundShape, StateDict
from silomesh.strategies.cyclic import LAP_COUNT
from silomesh.strategies.fedavg import TREE_COUNT

log = logging.getLogger(__name__)

#: after this many failed rounds in a row the peer reports itself degraded and pauses between tries
MAX_FAILED_ROUNDS = 3
#: the first pause (seconds), doubled after each further failure, never above the round deadline
FAILED_ROUND_PAUSE = 30.0


async def round_loop(ctx: RoundContext) -> None:
    """Run rounds until ``rounds.count`` is reached (forever when 0)."""
    cfg = ctx.rounds
    round = ctx.store.last_committed_round() + 1
    failures = ctx.store.failed_rounds_in_a_row()  # rounds in a row that failed (before a restart too)
    guard = UpdateGuard(update_bound(ctx))
    while cfg.count == 0 or round < cfg.count:
        ahead = ctx.catch_up_round(round)
        if ahead != round:
            log.warning("%s is %d rounds behind its neighbours: continuing at round %d", ctx.peer_id[-8:],
                        ahead - round, ahead)
            round = ahead
            if cfg.count and round >= cfg.count:
                break
        ctx.progress.round = round
        if not privacy.can_afford(ctx.learner.dp, ctx.rounds.local_steps):  # never trains past its budget
            if ctx.learner.dp is not None:
                ctx.learner.dp.exhausted = True  # nor for a neighbour's train-request from now on
            ctx.progress.phase = privacy.PHASE_EXHAUSTED
            budget = privacy.budget_status(ctx.learner.dp, exhausted=True) or {}
            ctx.store.record_round(round, status=privacy.PHASE_EXHAUSTED, started_at=time.time(),
                                   finished_at=time.time(), note=budget.get("reason", ""))
            log.warning("%s: %s (from round %d)", ctx.peer_id[-8:], budget.get("reason"), round)
            return
        if ctx.participation == "manual":
            ctx.progress.phase = "waiting-approval"
            if not await ctx.consent.wait("round", round, detail=f"take part in round {round}"):
                log.info("operator declined round %d", round)
                ctx.store.record_round(round, status="declined", started_at=time.time(), finished_at=time.time())
                round += 1
                continue
        started = time.time()
        deadline = trio.current_time() + cfg.deadline_seconds
        selected = ctx.selected_neighbours()
        ctx.progress.awaiting = frozenset(selected)
        ctx.progress.waiting_on.clear()
        ctx.inbox.new_round(round)
        report = RoundReport(round)
        ctx.progress.phase = "exchanging"
        await ctx.faults.round_start(ctx.peer_id, round)
        before = {k: np.array(v, copy=True) for k, v in ctx.learner.state().items()}  # the last good model
        this_round = round
        try:
            state = await SHAPES[ctx.learner.strategy.shape](ctx, round, selected, deadline, report, guard)
            ctx.progress.phase = "evaluating"
            state, metrics = await ctx.compute.run(_adopt_and_evaluate, ctx, state)
            why = state_violation(state, metrics)
            if why is not None:
                raise RoundFailed(why)
            await commit_round(ctx, state, metrics, report, started)
            failures = 0
            if ctx.personal.steps > 0:
                ctx.progress.phase = "personalising"
                await personalise(ctx, round, state_digest(state).hex())
        except Exception as exc:  # a failed round never stops the peer (cancellation is no Exception)
            if report.committed:  # it failed after its commit: the round stands
                log.exception("%s round %d: error after its commit", ctx.peer_id[-8:], round)
                failures = 0
                round += 1
                continue
            failures += 1
            await _roll_back(ctx, before, report, started, exc)
            if failures >= MAX_FAILED_ROUNDS:
                ctx.progress.phase = "degraded"
                pause = min(cfg.deadline_seconds, FAILED_ROUND_PAUSE * 2 ** (failures - MAX_FAILED_ROUNDS))
                log.error("%s: %d rounds in a row failed; next try in %.0f s", ctx.peer_id[-8:], failures, pause)
                await trio.sleep(pause)
        finally:  # a rolled-back round spent its privacy too (whatever was not logged yet)
            account_privacy(ctx, this_round)
            memory.trim()  # the round's buffers are garbage now: give their pages back
        round += 1


def waiting_report(ctx: RoundContext) -> dict[str, str]:
    """Neighbour -> what the current round still waits for from it (empty outside an exchange).

    A push still in progress says how far it got; a neighbour whose own update has not
    arrived is waited for until the deadline; one found unreachable is not waited for.
    """
    progress = ctx.progress
    out = dict(progress.waiting_on)
    if progress.phase == "exchanging":
        for n in sorted(ctx.inbox.waiting(set(progress.awaiting), progress.round)):
            out.setdefault(n, f"its update of round {progress.round} has not arrived")
    return out


class RoundFailed(Exception):
    """The round's result may not be committed (why: the message)."""


async def _roll_back(ctx: RoundContext, before: StateDict, report: RoundReport, started: float, exc: Exception) -> None:
    """Back to the model the round started from; the round is recorded as failed, with why."""
    why = str(exc) if isinstance(exc, RoundFailed) else f"{type(exc).__name__}: {exc}"
    if isinstance(exc, RoundFailed | FloatingPointError):  # a result or a training that diverged
        log.warning("%s round %d failed and was rolled back: %s", ctx.peer_id[-8:], report.round, why)
    else:  # an error in the round's work: its traceback says where
        log.exception("%s round %d failed and was rolled back", ctx.peer_id[-8:], report.round)
    with trio.CancelScope(shield=True):
        await ctx.compute.run(ctx.learner.load, before)
    try:
        with ctx.store.atomic():
            ctx.store.record_round(
                report.round,
                status="failed",
                started_at=started,
                finished_at=time.time(),
                contributors=[],
                skipped=report.skipped_rows(),
                undelivered=report.undelivered_rows(),
                bytes_sent=report.bytes_sent,
                note=why[:1000],
            )
            # no neighbour's message is refused: the peer declined its own round's result
            ctx.endpoint.journal.audit_log.append("refused", "", "round", round=report.round,
                                                  reason=f"rolled back: {why[:500]}")
    except Exception:  # the rollback itself is done; the store's trouble is logged
        log.exception("%s round %d: the failed round could not be recorded", ctx.peer_id[-8:], report.round)


def _adopt_and_evaluate(ctx: RoundContext, state: StateDict) -> tuple[StateDict, dict[str, float]]:
    committed = ctx.learner.adopt(state)
    return committed, ctx.learner.evaluate()


async def exchange_round(
    ctx: RoundContext, round: int, selected: list[str], deadline: float, report: RoundReport, guard: UpdateGuard
) -> StateDict:
    """Local step, push our update to every neighbour, gather theirs, aggregate."""
    ctx.progress.phase = "training"
    trained = await ctx.compute.run(ctx.learner.train, ctx.rounds.local_steps)
    account_privacy(ctx, round)  # logged before the trained model can leave the peer
    ctx.progress.phase = "exchanging"
    report.train_loss = trained.mean_loss
    metrics = own_metrics(ctx, trained.mean_loss)
    ours = ctx.learner.shared(trained.state)
    maker = UpdateMaker(ctx, round, ctx.faults.outgoing_state(ctx.peer_id, round, ours), metrics, ctx.rounds.codec)

    def count(sent: int) -> None:
        # a callback, not `report.bytes_sent += await ...`: that reads the sum before the
        # await, so concurrent pushes overwrote each other's bytes and only the last one counted
        report.bytes_sent += sent

    pushing = trio.CapacityLimiter(MAX_CONCURRENT_PUSHES)
    gave_up: set[str] = set()  # not waited for: they could not be reached

    async def push(n: str) -> None:
        failed = await deliver(ctx, round, n, maker, count, deadline, pushing)
        if failed is not None:
            log.info("%s: no update delivered to %s in round %d: %s", ctx.peer_id[-8:], n[-8:], round, failed)
            report.undelivered[n] = skip_reason(failed)
            if not isinstance(failed, LocalProtocolError):  # ours could not be sent: its own may still come
                ctx.inbox.unreachable(n)
                gave_up.add(n)

    with trio.move_on_at(deadline):
        async with trio.open_nursery() as nursery:
            for n in selected:
                nursery.start_soon(push, n)
    with trio.move_on_at(deadline):
        await ctx.inbox.wait_for(set(selected), round)
    contributions = []
    for n in selected:
        got = ctx.inbox.get(n, round)
        if got is None:  # one we could not reach, and so did not wait for, is skipped for that reason
            report.skipped.setdefault(n, report.undelivered[n] if n in gave_up else "missed the deadline")
            continue
        why = guard.check(n, trained.state, got.state)
        if why is not None:
            refuse_dropped(ctx, report, {n: f"update bound: {why}"}, "update", "safety")
            continue
        state = got.state
        if n in ctx.bases.sparse:  # it holds only what our topk deltas sent of our model
            state = consensus_view(state, ours, ctx.bases.acked.get(n), ctx.rounds.consensus_step)
        contributions.append(
            Contribution(peer_id=n, state=state, n_samples=max(got.n_samples, 1), loss=got.loss, degree=got.degree)
        )
    return aggregate(ctx, trained.state, contributions, report, own_loss=trained.mean_loss)


def consensus_view(theirs: StateDict, ours: StateDict, held: Base | None, step: float) -> StateDict:
    """What a neighbour's model counts as in our mean under the topk codec:
    ``ours + step * (theirs - held)``.

    Under topk a neighbour holds only part of our model (``held``, its base of ours: the
    values sent so far); the rest waits in our next deltas, and ``theirs`` is likewise only
    what we hold of the neighbour. Averaging ``theirs`` with our full model would shrink our
    unsent part by our weight in the mean while the neighbours never see it: the federation's
    average drifts. Averaging these views instead moves us by
    ``step * sum_j w_j (theirs_j - held_j)``: the consensus step of CHOCO-gossip (Koloskova,
    Stich and Jaggi, 2019) with step size ``step``, which keeps the average (for symmetric
    weights). ``step`` 1 makes it ``theirs + (ours - held)``; the theory asks for a step below
    1 the sparser the deltas are (with a tenth of the values kept, step 1 makes the models
    drift apart; tests/test_update_codecs.py). Floating tensors the neighbour does not hold
    of ours (no base yet, another set) are left as they are.

    Used only for the neighbours whose acknowledged base of ours came from a topk delta
    (``Bases.sparse``): one not set to topk is sent int8 and sends int8, both hold all of
    each other's model, and the plain mean is right (with the view such a pair would settle
    five times nearer the topk peer than the other at step 0.2, not halfway).
    """
    if held is None:
        return theirs
    out = dict(theirs)
    for name, value in theirs.items():
        mine, base = ours.get(name), held.state.get(name)
        if (mine is None or base is None or value.dtype.kind != "f" or mine.shape != value.shape
                or base.shape != value.shape):
            continue
        exact = np.result_type(mine, value, base)  # float64 models stay float64 until the cast back
        gap = value.astype(exact, copy=False) - base.astype(exact, copy=False)
        moved = mine.astype(exact, copy=False) + step * gap
        out[name] = moved.astype(value.dtype, copy=False)
    return out


async def train_request_round(
    ctx: RoundContext, round: int, selected: list[str], deadline: float, report: RoundReport, guard: UpdateGuard
) -> StateDict:
    """Train-requests to every neighbour, screen the trained copies, learn from them, aggregate."""
    own = ctx.learner.state()
    experts: dict[str, Expert] = {}
    deadline_ms = int((time.time() + max(deadline - trio.current_time(), 0)) * 1000)

    async def ask(n: str) -> None:
        ctx.progress.waiting_on[n] = "train-request: waiting for our model trained on its data"
        try:
            experts[n] = expert = await request_training(ctx, n, round, own, deadline_ms)
            report.bytes_sent += expert.bytes
        except UNDELIVERED as exc:
            log.info("%s: no expert from %s in round %d: %s", ctx.peer_id[-8:], n[-8:], round, exc)
            report.skipped[n] = skip_reason(exc)
        finally:
            ctx.progress.waiting_on.pop(n, None)

    with trio.move_on_at(deadline):
        async with trio.open_nursery() as nursery:
            for n in selected:
                nursery.start_soon(ask, n)
    for n in selected:
        if n not in experts:
            report.skipped.setdefault(n, "missed the deadline")
    returned = []
    for n, e in ((n, experts[n]) for n in selected if n in experts):  # in trust-list order, not arrival order
        why = guard.check(n, own, e.state)
        if why is not None:
            refuse_dropped(ctx, report, {n: f"update bound: {why}"}, "train-result", "safety")
            continue
        returned.append(Contribution(peer_id=n, state=e.state, n_samples=max(e.n_samples, 1), loss=e.loss))
    accepted = screen(ctx, own, returned, report)
    if accepted:
        info = await ctx.compute.run(ctx.learner.learn_from_experts, accepted)
        account_privacy(ctx, round)
        report.expert_weights = dict(zip([c.peer_id for c in accepted], info.get("weights", []), strict=False))
    else:
        trained = await ctx.compute.run(ctx.learner.train, ctx.rounds.local_steps)
        account_privacy(ctx, round)
        report.train_loss = trained.mean_loss
    return aggregate(ctx, ctx.learner.state(), accepted, report)


#: the round each shape runs; a strategy picks one with its ``shape``
SHAPES: dict[RoundShape, RoundShapeFn] = {
    RoundShape.EXCHANGE: exchange_round,
    RoundShape.TRAIN_REQUEST: train_request_round,
    RoundShape.SECURE_EXCHANGE: functools.partial(secure_exchange_round, plain=exchange_round),
    RoundShape.RELAY: relay_round,
    RoundShape.TREE: tree_round,
}


async def commit_round(
    ctx: RoundContext, state: StateDict, metrics: dict[str, float], report: RoundReport, started: float
) -> None:
    """Save the model file, then model row, metrics, round row and an audit checkpoint in one transaction."""
    store, round = ctx.store, report.round
    digest = state_digest(state).hex()
    skipped = report.skipped_rows()
    parent = store.latest_model()
    with trio.CancelScope(shield=True):
        await ctx.compute.run_blocking(store.write_model_file, state, digest)
        with store.atomic():
            store.save_model(state, digest, round=round, parent=parent.digest if parent else None)
            for name, value in metrics.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    store.record_metric(round, name, float(value))
            if report.train_loss is not None and math.isfinite(report.train_loss):
                store.record_metric(round, "train_loss", report.train_loss)
            if report.expert_weights:  # how far the strategy's expert weighting is from uniform (1/n)
                store.record_metric(round, "expert_weight_max", max(report.expert_weights.values()))
            if report.lap_count is not None:
                store.record_metric(round, LAP_COUNT, report.lap_count)
            if report.tree_count is not None:
                store.record_metric(round, TREE_COUNT, report.tree_count)
            store.record_round(
                round,
                status="done",
                started_at=started,
                finished_at=time.time(),
                model=digest,
                contributors=report.contributors,
                skipped=skipped,
                undelivered=report.undelivered_rows(),
                bytes_sent=report.bytes_sent,
            )
            ctx.endpoint.journal.audit_log.checkpoint()  # signed tree head over the audit log, with the round
        report.committed = True
    metric = ctx.learner.task.metric
    log.info(
        "%s round %d done: %s=%.4f, %d contributors, %d skipped",
        ctx.peer_id[-8:],
        round,
        metric,
        metrics.get(metric, float("nan")),
        len(report.contributors),
        len(skipped),
    )
    if report.expert_weights:
        log.debug("%s round %d expert weights: %s", ctx.peer_id[-8:], round, report.expert_weights)
    await publish(
        ctx.endpoint,
        UpdateAvailable(
            **ctx.endpoint.announce_routing(round),
            digest=bytes.fromhex(digest),
            size=sum(a.nbytes for a in state.values()),
        ),
    )
