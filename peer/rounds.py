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
   * :func:`relay_round` (``cyclic``): the predecessor's model, trained, passed on;
   * :func:`tree_round` (``fedavg`` with ``reduce = "tree"``): the local step; the children's
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
import trio

from silomesh.peer import memory, privacy
from silomesh.peer.announces import publish
from silomesh.peer.context import Base, Received, RoundContext
from silomesh.peer.dialer import (
    DIAL_TIMEOUT,
    MAX_BACKOFF,
    Dropped,
    Expert,
    Refused,
    UpdateMaker,
    push_update,
    request_training,
    skip_reason,
)
from silomesh.peer.exchange import ConversationError, Silent
from silomesh.peer.personal import personalise
from silomesh.peer.safety import UpdateBound, UpdateGuard, measure_update, state_violation, update_violation
from silomesh.peer.secure_rounds import secure_exchange_round
from silomesh.peer.transport import StreamClosed
from silomesh.protocol import ProtocolError, UpdateAvailable, state_digest
from silomesh.strategies import Contribution, CyclicConfig, FedAvgConfig, RoundShape, StateDict
from silomesh.strategies.cyclic import LAP_COUNT, CyclicStrategy, split_lap, with_lap
from silomesh.strategies.fedavg import TREE_COUNT

log = logging.getLogger(__name__)

#: what cannot be delivered to a neighbour ends that neighbour's part in the round
UNDELIVERED = (ConversationError, StreamClosed, ProtocolError)
#: pushes of one round in flight at once: with 15 neighbours (N = 16, full topology) all at
#: once, 240 stream negotiations on one process timed out ("failed to open a stream")
MAX_CONCURRENT_PUSHES = 4
#: a push that fails while the neighbour can still be dialled is tried this often in a round
PUSH_ATTEMPTS = 3
#: ... and this often when it broke off mid-envelope on a resumable stream (each try resumes
#: where the last one stopped, so a link that flaps costs little)
RESUMABLE_PUSH_ATTEMPTS = 8
#: the pause before the second try (seconds), doubled before each further one
PUSH_RETRY_PAUSE = 1.0
#: ``reduce = "tree"``: the share of a round's time (from its start) in which the subtree means
#: travel up the tree; a peer at depth ``d`` of a tree of height ``h`` waits for its children
#: until ``(h - d) / h`` of it, so that its parent still waits when its mean comes. The rest of
#: the round is for the federation's mean coming down.
TREE_UP_SHARE = 2 / 3
#: after this many failed rounds in a row the peer reports itself degraded and pauses between tries
MAX_FAILED_ROUNDS = 3
#: the first pause (seconds), doubled after each further failure, never above the round deadline
FAILED_ROUND_PAUSE = 30.0


@dataclass
class RoundReport:
    """What a round did, for the round's row in the store."""

    round: int
    #: neighbour -> why it did not contribute ("unreachable: ...", "missed the deadline", "dropped: ...")
    skipped: dict[str, str] = field(default_factory=dict)
    contributors: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    train_loss: float | None = None
    #: train-request rounds: each accepted expert's weight in the strategy's learning step
    expert_weights: dict[str, float] = field(default_factory=dict)
    #: ``cyclic`` with ``commit = "lap_mean"``: how many of the ring's models the committed mean holds
    lap_count: int | None = None
    #: ``fedavg`` with ``reduce = "tree"``: how many peers' models the committed mean holds
    tree_count: int | None = None
    #: the round's model, metrics and row are in the store
    committed: bool = False


RoundShapeFn = Callable[[RoundContext, int, list[str], float, RoundReport, UpdateGuard], Awaitable[StateDict]]


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


async def _worth_retrying(
    ctx: RoundContext, n: str, exc: Exception, deadline: float, attempt: int, resumable: bool = False
) -> bool:
    """After a failed push: pause, then True if the round's deadline leaves room and ``n`` can
    be dialled again (a connection that broke mid-push, not a neighbour that is down or refused).

    ``resumable``: the push broke off mid-envelope and the neighbour keeps what arrived
    (PROTOCOL.md 4.1); then the link is dialled with backoff until the deadline, so that a
    link that comes back within the round resumes the transfer instead of losing it.
    """
    if isinstance(exc, Refused | Dropped) or (isinstance(exc, Silent) and not resumable):
        return False  # an answer, a message simnet meant to lose, or a neighbour that stopped answering
    pause = min(PUSH_RETRY_PAUSE * 2**attempt, MAX_BACKOFF)
    if resumable:
        # the link broke under a transfer: its connection is suspect (libp2p may keep a dead one
        # for the length of three pings, and a redial would reuse it), so close it and dial anew
        ctx.transport.drop_connection(n)
    while trio.current_time() + pause < deadline:
        ctx.progress.waiting_on[n] = f"push failed ({str(exc)[:80]}); trying again in {pause:.0f} s"
        await trio.sleep(pause)
        ctx.transport.forget(n)  # the failed connection may still be listed: dial afresh
        left = max(deadline - trio.current_time(), 0.0)
        if await ctx.transport.connect(n, timeout=min(DIAL_TIMEOUT, left)):
            return True
        if not resumable:
            return False
        pause = min(pause * 2, MAX_BACKOFF)
    return False


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


def account_privacy(ctx: RoundContext, round: int) -> None:
    """Log the DP steps trained since the last entry, right after they ran: before their
    model is sent or committed, so that a crash can never leave spending unlogged that a
    restart would then not count (nothing is logged when no DP step ran)."""
    privacy.record_round(ctx.endpoint.journal.audit_log, ctx.learner.dp, round)


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
                skipped=[{"peer": p, "reason": r} for p, r in report.skipped.items()],
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
    metrics = {"degree": float(len(ctx.trust))}
    if math.isfinite(trained.mean_loss):
        metrics["loss"] = trained.mean_loss
    ours = ctx.learner.shared(trained.state)
    maker = UpdateMaker(ctx, round, ctx.faults.outgoing_state(ctx.peer_id, round, ours), metrics, ctx.rounds.codec)

    def count(sent: int) -> None:
        # a callback, not `report.bytes_sent += await ...`: that reads the sum before the
        # await, so concurrent pushes overwrote each other's bytes and only the last one counted
        report.bytes_sent += sent

    pushing = trio.CapacityLimiter(MAX_CONCURRENT_PUSHES)

    async def push(n: str) -> None:
        failed = await deliver(ctx, round, n, maker, count, deadline, pushing)
        if failed is not None:
            log.info("%s: no update delivered to %s in round %d: %s", ctx.peer_id[-8:], n[-8:], round, failed)
            ctx.inbox.unreachable(n)
            report.skipped[n] = skip_reason(failed)

    with trio.move_on_at(deadline):
        async with trio.open_nursery() as nursery:
            for n in selected:
                nursery.start_soon(push, n)
    with trio.move_on_at(deadline):
        await ctx.inbox.wait_for(set(selected), round)
    contributions = []
    for n in selected:
        got = ctx.inbox.get(n, round)
        if got is None:
            report.skipped.setdefault(n, "missed the deadline")
            continue
        why = guard.check(n, trained.state, got.state)
        if why is not None:
            _refuse_dropped(ctx, report, {n: f"update bound: {why}"}, "update", "safety")
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
            _refuse_dropped(ctx, report, {n: f"update bound: {why}"}, "train-result", "safety")
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
                _refuse_dropped(ctx, report, {before: f"update bound: {why}"}, "update", "safety")
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
    metrics = {"degree": float(len(ctx.trust))}
    if math.isfinite(trained.mean_loss):
        metrics["loss"] = trained.mean_loss
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
    metrics = {"degree": float(len(ctx.trust))}
    if math.isfinite(trained.mean_loss):
        metrics["loss"] = trained.mean_loss

    def checked(n: str, got: Received | None, what: str) -> Contribution | None:
        if got is None:
            report.skipped.setdefault(n, f"missed the deadline ({what})")
            return None
        count = got.tree_count
        why = (f"tree_count {count!r} is not a whole number in 1..{size}"
               if count is None or not count.is_integer() or not 1 <= count <= size else None)
        why = why or guard.check(n, trained.state, got.state)
        if why is not None:
            _refuse_dropped(ctx, report, {n: f"{what}: {why}"}, "update", "safety")
            return None
        return Contribution(peer_id=n, state=got.state, n_samples=max(got.n_samples, 1))

    waited = _selected_or_skipped(report, children, selected)
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

    if parent is not None and _selected_or_skipped(report, (parent,), selected):
        up = UpdateMaker(ctx, round, ctx.faults.outgoing_state(me, round, ctx.learner.shared(mean)),
                         {**metrics, TREE_COUNT: float(count)}, ctx.rounds.codec, n_samples=samples)
        parent_waits = start + up_time * (height - depth + 1) / height
        failed = await deliver(ctx, round, parent, up, count_bytes, parent_waits, note="push: our subtree's mean")
        if failed is not None:
            log.warning("%s: could not send our subtree's mean to %s in round %d: %s", me[-8:], parent[-8:], round,
                        failed)
            report.skipped[parent] = skip_reason(failed)
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

        async with trio.open_nursery() as nursery:
            for c in targets:
                nursery.start_soon(push_down, c)
    return mean


def _selected_or_skipped(report: RoundReport, peers: tuple[str, ...], selected: list[str]) -> list[str]:
    """The ``peers`` selected this round; the others are reported as skipped."""
    chosen = [p for p in peers if p in selected]
    for p in peers:
        if p not in chosen:
            report.skipped[p] = "not selected this round"
    return chosen


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
        report.skipped[after] = skip_reason(failed)


async def deliver(
    ctx: RoundContext,
    round: int,
    n: str,
    maker: UpdateMaker,
    count: Callable[[int], None],
    retry_until: float,
    limiter: trio.CapacityLimiter | None = None,
    note: str = "push: queued behind our other pushes",
) -> Exception | None:
    """Push ``maker``'s update to ``n``, trying again while it is worth it (:func:`_worth_retrying`):
    up to :data:`PUSH_ATTEMPTS` tries, or :data:`RESUMABLE_PUSH_ATTEMPTS` while ``n`` keeps
    what arrived of a streamed update that broke off (each try resumes it), until
    ``retry_until``. Returns None once delivered, else the last error."""
    attempt = 0
    try:
        while True:
            try:
                ctx.progress.waiting_on[n] = note
                if limiter is None:
                    await push_update(ctx, n, maker, count)
                else:
                    async with limiter:
                        await push_update(ctx, n, maker, count)
                return None
            except UNDELIVERED as exc:
                broken = maker.unfinished.get(n)  # it keeps what arrived: worth waiting for the link
                resumable = broken is not None and broken.resumable
                attempts = RESUMABLE_PUSH_ATTEMPTS if resumable else PUSH_ATTEMPTS
                if attempt + 1 < attempts and await _worth_retrying(ctx, n, exc, retry_until, attempt, resumable):
                    log.info("%s: push to %s in round %d failed (%s); the link is up, pushing again",
                             ctx.peer_id[-8:], n[-8:], round, exc)
                    attempt += 1
                    continue
                return exc
    finally:
        ctx.progress.waiting_on.pop(n, None)


#: the round each shape runs; a strategy picks one with its ``shape``
SHAPES: dict[RoundShape, RoundShapeFn] = {
    RoundShape.EXCHANGE: exchange_round,
    RoundShape.TRAIN_REQUEST: train_request_round,
    RoundShape.SECURE_EXCHANGE: functools.partial(secure_exchange_round, plain=exchange_round),
    RoundShape.RELAY: relay_round,
    RoundShape.TREE: tree_round,
}


def update_bound(ctx: RoundContext) -> UpdateBound:
    cfg = ctx.rounds
    return UpdateBound(cfg.max_update_ratio, cfg.max_weight_factor, cfg.max_update_growth)


def screen(
    ctx: RoundContext, own: StateDict, contributions: list[Contribution], report: RoundReport
) -> list[Contribution]:
    """The contributions the strategy accepts; each dropped one is reported and audited."""
    screened = ctx.learner.strategy.screen(own, contributions)
    _refuse_dropped(ctx, report, screened.dropped, "train-result", "screening")
    return list(screened.accepted)


def aggregate(
    ctx: RoundContext,
    own: StateDict,
    contributions: list[Contribution],
    report: RoundReport,
    own_loss: float | None = None,
) -> StateDict:
    """The strategy's aggregation; each dropped contribution is reported and audited."""
    result = ctx.learner.strategy.aggregate(
        own,
        float(ctx.learner.n_samples),
        contributions,
        own_degree=len(ctx.trust),
        own_loss=own_loss if own_loss is not None and math.isfinite(own_loss) else None,
    )
    _refuse_dropped(ctx, report, result.dropped, "update", "aggregation")
    report.contributors = sorted({c.peer_id for c in contributions} - set(result.dropped))
    return {**own, **result.state}


def _refuse_dropped(ctx: RoundContext, report: RoundReport, dropped: dict[str, str], kind: str, stage: str) -> None:
    """Report each contribution the strategy dropped as skipped, and audit it as refused."""
    for n, reason in dropped.items():
        report.skipped[n] = f"dropped: {reason}"
        ctx.endpoint.journal.refused(n, kind, f"{stage}: {reason}", round=report.round)


async def commit_round(
    ctx: RoundContext, state: StateDict, metrics: dict[str, float], report: RoundReport, started: float
) -> None:
    """Save the model file, then model row, metrics, round row and an audit checkpoint in one transaction."""
    store, round = ctx.store, report.round
    digest = state_digest(state).hex()
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
                skipped=[{"peer": p, "reason": r} for p, r in report.skipped.items()],
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
        len(report.skipped),
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
