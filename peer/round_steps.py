"""What every round shape is made of (:mod:`silomesh.peer.rounds` runs the shapes).

* :class:`RoundReport`: what a round did, for its row in the store;
* :func:`deliver`: push an update to a neighbour, trying again while it is worth it;
* :func:`screen` and :func:`aggregate`: the strategy's hooks, each contribution they drop
  reported as skipped and audited as refused (:func:`refuse_dropped`);
* :func:`account_privacy`: log the DP steps trained before their model can leave the peer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from silomesh.peer import privacy
from silomesh.peer.context import RoundContext
from silomesh.peer.dialer import DIAL_TIMEOUT, MAX_BACKOFF, Dropped, Refused, UpdateMaker, push_update
from silomesh.peer.exchange import ConversationError, Silent
from silomesh.peer.safety import UpdateBound, UpdateGuard
from silomesh.peer.transport import StreamClosed
from silomesh.protocol import LocalProtocolError, ProtocolError
from silomesh.strategies import Contribution, StateDict

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


@dataclass
class RoundReport:
    """What a round did, for the round's row in the store."""

    round: int
    #: neighbour -> why it did not contribute ("unreachable: ...", "missed the deadline", "dropped: ..."),
    #: or, under secure aggregation, the step it missed although its vector is in the sum
    skipped: dict[str, str] = field(default_factory=dict)
    #: neighbour -> why our update did not reach it (its own model may still have come and been used)
    undelivered: dict[str, str] = field(default_factory=dict)
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

    def skipped_rows(self) -> list[dict[str, str]]:
        """The round row's ``skipped``: each neighbour, and why."""
        return [{"peer": p, "reason": r} for p, r in self.skipped.items()]

    def undelivered_rows(self) -> list[dict[str, str]]:
        """The round row's ``undelivered``: each neighbour our update did not reach, and why."""
        return [{"peer": p, "reason": r} for p, r in self.undelivered.items()]


RoundShapeFn = Callable[[RoundContext, int, list[str], float, RoundReport, UpdateGuard], Awaitable[StateDict]]


def own_metrics(ctx: RoundContext, mean_loss: float) -> dict[str, float]:
    """The metrics our update carries: our degree, and our training loss when finite."""
    metrics = {"degree": float(len(ctx.trust))}
    if math.isfinite(mean_loss):
        metrics["loss"] = mean_loss
    return metrics


def account_privacy(ctx: RoundContext, round: int) -> None:
    """Log the DP steps trained since the last entry, right after they ran: before their
    model is sent or committed, so that a crash can never leave spending unlogged that a
    restart would then not count (nothing is logged when no DP step ran)."""
    privacy.record_round(ctx.endpoint.journal.audit_log, ctx.learner.dp, round)


async def _worth_retrying(
    ctx: RoundContext, n: str, exc: Exception, deadline: float, attempt: int, resumable: bool = False
) -> bool:
    """After a failed push: pause, then True if the round's deadline leaves room and ``n`` can
    be dialled again (a connection that broke mid-push, not a neighbour that is down or refused).

    ``resumable``: the push broke off mid-envelope and the neighbour keeps what arrived
    (PROTOCOL.md 4.1); then the link is dialled with backoff until the deadline, so that a
    link that comes back within the round resumes the transfer instead of losing it.
    """
    if isinstance(exc, Refused | Dropped | LocalProtocolError) or (isinstance(exc, Silent) and not resumable):
        # an answer, a message simnet meant to lose, one of ours that cannot be sent (it would
        # fail the same way again), or a neighbour that stopped answering
        return False
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


def selected_or_skipped(report: RoundReport, peers: tuple[str, ...], selected: list[str]) -> list[str]:
    """The ``peers`` selected this round; the others are reported as skipped."""
    chosen = [p for p in peers if p in selected]
    for p in peers:
        if p not in chosen:
            report.skipped[p] = "not selected this round"
    return chosen


def update_bound(ctx: RoundContext) -> UpdateBound:
    cfg = ctx.rounds
    return UpdateBound(cfg.max_update_ratio, cfg.max_weight_factor, cfg.max_update_growth)


def screen(
    ctx: RoundContext, own: StateDict, contributions: list[Contribution], report: RoundReport
) -> list[Contribution]:
    """The contributions the strategy accepts; each dropped one is reported and audited."""
    screened = ctx.learner.strategy.screen(own, contributions)
    refuse_dropped(ctx, report, screened.dropped, "train-result", "screening")
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
    refuse_dropped(ctx, report, result.dropped, "update", "aggregation")
    report.contributors = sorted({c.peer_id for c in contributions} - set(result.dropped))
    return {**own, **result.state}


def refuse_dropped(ctx: RoundContext, report: RoundReport, dropped: dict[str, str], kind: str, stage: str) -> None:
    """Report each contribution the strategy dropped as skipped, and audit it as refused."""
    for n, reason in dropped.items():
        report.skipped[n] = f"dropped: {reason}"
        ctx.endpoint.journal.refused(n, kind, f"{stage}: {reason}", round=report.round)
