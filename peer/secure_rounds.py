"""Secure aggregation, the aggregator's side: a round that learns only the neighbours' sum.

With ``secure_aggregation`` on (fedavg), :func:`secure_exchange_round` replaces the push of
updates (PROTOCOL.md section 9a, docs/SECURE-AGGREGATION.md section 3):

1. train locally; offer the trained model to the neighbours' groups we are a member of
   (:mod:`silomesh.peer.secure_member` masks it when they ask);
2. name the round's group (the selected neighbours), sign it and audit it (``secagg-group``);
   dial each member with ``secagg-group`` and collect its ``secagg-deal`` (until 30 % of the
   time left);
3. forward to each dealer the shares dealt to it (``secagg-shares``) and collect its masked
   vector (``secagg-masked``, until 70 %);
4. commit the survivors: sign the set, **write it to our audit log first** (``secagg-commit``),
   then send it to each survivor and collect its ``secagg-release`` (until the deadline);
5. unmask the sum and combine it with our own model (:func:`silomesh.strategies.secagg.combine`);
   audit the result's digest (``secagg-sum``).

A member that deals but sends no masked vector in time is a dropout: the survivors release
its pairwise shares, never its self-mask's. Fewer dealers or survivors than the group's
threshold, or fewer releases than it, leave the round with our own model (each neighbour
skipped with the reason). The per-neighbour update bound (:mod:`silomesh.peer.safety`) cannot
look at a model it never sees; the round loop still checks the result.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import trio

from silomesh.audit.secagg import COMMIT_KIND, GROUP_KIND, SUM_KIND
from silomesh.peer import privacy
from silomesh.peer.context import RoundContext
from silomesh.peer.dialer import Dropped, answer, open_wire, skip_reason
from silomesh.peer.exchange import ConversationError, Wire
from silomesh.peer.round_steps import UNDELIVERED, RoundReport
from silomesh.peer.safety import UpdateGuard
from silomesh.peer.secure_member import audit, group_fields, peer_ids
from silomesh.peer.secure_state import Outcome, Trained
from silomesh.protocol import ProtocolError, state_digest
from silomesh.protocol.fixedpoint import FixedPoint
from silomesh.protocol.secagg import (
    MIN_OTHER_MEMBERS,
    Commit,
    Group,
    Release,
    sign_commit,
    sign_group,
    unmask,
)
from silomesh.protocol.secagg_messages import (
    SecaggCommit,
    SecaggDeal,
    SecaggGroup,
    SecaggMasked,
    SecaggRelease,
    SecaggShares,
)
from silomesh.strategies import StateDict
from silomesh.strategies.secagg import (
    FEDMIX,
    SecureSum,
    combine,
    combine_fedmix,
    flatten,
    result_bound,
    weight_cap,
)

log = logging.getLogger(__name__)

#: the share of the time left at the round's start by which deals, then masked vectors, must be in
DEAL_SHARE = 0.3
MASKED_SHARE = 0.7

PlainRound = Callable[..., Awaitable[StateDict]]


@dataclass
class _Member:
    """One member of our group in this round: its stream and what it sent."""

    peer_id: str
    key: bytes
    wire: Wire | None = None
    deal: SecaggDeal | None = None
    masked: SecaggMasked | None = None
    release: SecaggRelease | None = None


async def secure_exchange_round(
    ctx: RoundContext, round: int, selected: list[str], deadline: float, report: RoundReport, guard: UpdateGuard,
    *, plain: PlainRound,
) -> StateDict:
    """Train, offer our model to the neighbours' groups, and aggregate our own group's sum.

    ``report`` is the round loop's :class:`~silomesh.peer.round_steps.RoundReport`; ``plain`` is
    the plain exchange round, run instead when fewer than 2 neighbours are selected and the
    operator allowed the fallback (``secure_fallback``).
    """
    secure = ctx.learner.strategy.secure_sum
    assert secure is not None  # the strategy picked this round shape because it is on
    if len(selected) < MIN_OTHER_MEMBERS and secure.fallback:
        return await plain(ctx, round, selected, deadline, report, guard)
    ctx.progress.phase = "training"
    trained = await ctx.compute.run(ctx.learner.train, ctx.rounds.local_steps)
    privacy.record_round(ctx.endpoint.journal.audit_log, ctx.learner.dp, round)  # before the model leaves
    report.train_loss = trained.mean_loss
    shared = ctx.faults.outgoing_state(ctx.peer_id, round, ctx.learner.shared(trained.state))
    ctx.secure.offer(Trained(round, shared, ctx.learner.n_samples, trained.mean_loss))
    ctx.progress.phase = "exchanging"
    skipped = report.skipped
    if len(selected) < MIN_OTHER_MEMBERS:
        report.bytes_sent += ctx.secure.take_member_bytes()
        for n in selected:
            skipped[n] = f"secure aggregation: {len(selected)} neighbour(s) selected, {MIN_OTHER_MEMBERS} needed"
        return trained.state
    own_shared = ctx.learner.shared(trained.state)
    sent = _Counter()
    try:
        mixed = await _aggregate(ctx, round, selected, deadline, secure, own_shared, trained.mean_loss, skipped,
                                 report, sent)
    finally:  # what we sent as aggregator, and as a member of our neighbours' groups since the last round
        report.bytes_sent += sent.total + ctx.secure.take_member_bytes()
    return trained.state if mixed is None else {**trained.state, **mixed}


@dataclass
class _Counter:
    total: int = 0


async def _aggregate(ctx: RoundContext, round: int, selected: list[str], deadline: float, secure: SecureSum,
                     own: StateDict, own_loss: float, skipped: dict[str, str], report: RoundReport,
                     sent: _Counter) -> StateDict | None:
    identity = ctx.endpoint.crypto
    members = {ctx.trust.public_key_of(n): _Member(n, ctx.trust.public_key_of(n)) for n in selected}
    length = secure.vector_length(flatten(own).size)
    fp = FixedPoint.for_group(len(members), secure.clip, secure.ring_bits)
    cap = 0
    if secure.weighs_samples:
        cap = weight_cap([ctx.learner.n_samples, *(ctx.secure.last_samples.get(n, 0) for n in selected)])
    group = Group.of(identity.public_key, round, members, length, fp,
                     threshold=secure.threshold_of(len(members)), weight_cap=cap)
    digest = group.digest
    signature = sign_group(identity, group)
    audit(ctx, "", GROUP_KIND, round, digest, group_fields(group, sorted(selected)))
    start = trio.current_time()
    left = max(deadline - start, 0.0)
    timeout = ctx.endpoint.timeouts.reply

    async def ask_group(m: _Member) -> None:
        await _before_send(ctx, m, "secagg-group", round)
        m.wire = await open_wire(ctx, m.peer_id)
        await m.wire.send(SecaggGroup.of(group, signature, **ctx.endpoint.routing(m.key, round)))
        reply = await answer(ctx, m.wire, m.peer_id, timeout)
        if reply is None or not isinstance(reply.message, SecaggDeal):
            raise ConversationError("no secagg-deal in answer to our group")
        deal = reply.message
        if deal.group_digest != digest or {h for h, _ in deal.sealed} != set(group.members):
            raise ConversationError("its deal is for another group or lacks a share per member")
        m.deal = deal

    try:
        await _phase(ctx, members.values(), ask_group, start + DEAL_SHARE * left, skipped, "no deal")
        dealers = frozenset(k for k, m in members.items() if m.deal is not None)
        if len(dealers) < group.threshold:
            _skip_all(members.values(), skipped, f"secure aggregation: {len(dealers)} of {len(members)} members "
                      f"dealt, the threshold is {group.threshold}")
            return None

        async def ask_masked(m: _Member) -> None:
            assert m.wire is not None
            await _before_send(ctx, m, "secagg-shares", round)
            sealed = tuple(sorted((d, _sealed_for(members[d].deal, m.key)) for d in dealers))
            await m.wire.send(SecaggShares(**ctx.endpoint.routing(m.key, round), group_digest=digest,
                                           dealers=tuple(sorted(dealers)), sealed=sealed))
            reply = await answer(ctx, m.wire, m.peer_id, timeout)
            if reply is None or not isinstance(reply.message, SecaggMasked):
                raise ConversationError("no secagg-masked in answer to its shares")
            masked = reply.message
            ring = masked.ring
            if masked.group_digest != digest or ring.dtype != fp.dtype or ring.shape != (length,):
                raise ConversationError("its masked vector is for another group, or of the wrong ring or length")
            if cap and masked.n_samples > cap:
                raise ConversationError(f"it claims {masked.n_samples} samples, above the weight cap {cap}")
            m.masked = masked

        dealing = [m for k, m in members.items() if k in dealers]
        await _phase(ctx, dealing, ask_masked, start + MASKED_SHARE * left, skipped, "no masked vector")
        survivors = frozenset(k for k in dealers if members[k].masked is not None)
        commit = Commit(digest, dealers, survivors)
        if len(survivors) < group.threshold:
            _skip_all(dealing, skipped, f"secure aggregation: {len(survivors)} masked vectors arrived, the "
                      f"threshold is {group.threshold}; nothing is committed or released")
            return None
        commit_signature = sign_commit(identity, group, commit)
        # the commit is in our signed log before any member is asked to release against it
        audit(ctx, "", COMMIT_KIND, round, commit.digest, {
            "group": digest.hex(), "dealers": peer_ids(dealers), "survivors": peer_ids(survivors),
            "dropped": peer_ids(commit.dropped), "signature": commit_signature.hex(),
        })

        async def ask_release(m: _Member) -> None:
            assert m.wire is not None
            await _before_send(ctx, m, "secagg-commit", round)
            await m.wire.send(SecaggCommit.of(commit, commit_signature, **ctx.endpoint.routing(m.key, round)))
            reply = await answer(ctx, m.wire, m.peer_id, timeout)
            if reply is None or not isinstance(reply.message, SecaggRelease):
                raise ConversationError("no secagg-release in answer to our commit")
            if reply.message.group_digest != digest:
                raise ConversationError("its release is for another group")
            m.release = reply.message

        surviving = [members[k] for k in sorted(survivors)]
        await _phase(ctx, surviving, ask_release, deadline, skipped, "no release")
        releases: list[Release] = [m.release.release for m in surviving if m.release is not None]
        masked: dict[bytes, npt.NDArray[np.unsignedinteger]] = {
            k: members[k].masked.ring for k in survivors  # type: ignore[union-attr]
        }
        commitments = {k: members[k].deal.commitment for k in dealers}  # type: ignore[union-attr]
        try:
            total = await ctx.compute.run(unmask, group, commit, masked, commitments, releases)
        except ProtocolError as exc:
            _skip_all(surviving, skipped, f"secure aggregation: the sum could not be unmasked: {exc}")
            return None
        samples = {members[k].peer_id: members[k].masked.n_samples for k in survivors}  # type: ignore[union-attr]
        for n, count in samples.items():
            ctx.secure.last_samples[n] = count
        own_samples, counts, sum_bound = float(ctx.learner.n_samples), list(samples.values()), fp.error_bound(
            len(survivors))
        if secure.weighting == FEDMIX:
            mixed, bound = combine_fedmix(own, own_samples, own_loss, total, counts, cap, secure, sum_bound)
        else:
            mixed = combine(own, own_samples, total, counts, secure.weighting, cap)
            bound = result_bound(sum_bound, own_samples, counts, secure.weighting, cap)
        for k in dealers - survivors:
            skipped.setdefault(members[k].peer_id, "secure aggregation: dropped after dealing (its pairwise masks "
                               "were removed with the survivors' shares)")
        report.contributors = sorted(samples)
        audit(ctx, "", SUM_KIND, round, state_digest(mixed), {
            "group": digest.hex(), "commit": commit.digest.hex(), "survivors": sorted(samples),
            "releases": len(releases), "bound": bound,
        })
        ctx.secure.outcomes[round] = Outcome(digest, commit.digest, samples, bound)
        return mixed
    finally:
        with trio.CancelScope(shield=True):
            for m in members.values():
                if m.wire is not None:
                    sent.total += m.wire.bytes_sent
                    await m.wire.close()


async def _phase(ctx: RoundContext, members: Iterable[_Member], step: Callable[[_Member], Awaitable[None]],
                 until: float, skipped: dict[str, str], missing: str) -> None:
    """Run ``step`` for every member concurrently until ``until``; a member that fails or is late
    is skipped (with why) and its stream closed."""
    todo = list(members)
    done: set[str] = set()

    async def one(m: _Member) -> None:
        try:
            await step(m)
            done.add(m.peer_id)
        except UNDELIVERED as exc:
            log.info("%s: secure aggregation with %s: %s", ctx.peer_id[-8:], m.peer_id[-8:], exc)
            skipped[m.peer_id] = f"secure aggregation: {skip_reason(exc)}"

    with trio.move_on_at(until):
        async with trio.open_nursery() as nursery:
            for m in todo:
                nursery.start_soon(one, m)
    for m in todo:
        if m.peer_id not in done:
            skipped.setdefault(m.peer_id, f"secure aggregation: {missing} before its deadline")
            if m.wire is not None:
                wire, m.wire = m.wire, None
                with trio.CancelScope(shield=True):
                    await wire.reset()


async def _before_send(ctx: RoundContext, m: _Member, kind: str, round: int) -> None:
    """Fault injection (simnet) may delay or drop each request, as it does updates."""
    if not await ctx.faults.before_send(ctx.peer_id, m.peer_id, kind, round):
        raise Dropped("dropped by fault injection")


def _sealed_for(deal: SecaggDeal | None, holder: bytes) -> bytes:
    assert deal is not None
    return dict(deal.sealed)[holder]


def _skip_all(members: Iterable[_Member], skipped: dict[str, str], why: str) -> None:
    for m in members:
        skipped.setdefault(m.peer_id, why)

