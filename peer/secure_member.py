"""Secure aggregation, the member's side: answer a neighbour aggregator's three requests.

A neighbour that aggregates securely dials us and asks, in order (PROTOCOL.md section 9a):

1. ``secagg-group``: we check its signature, that we are a member, that the vector length and
   the weight rule are ours, and that it is the only group of that aggregator and round
   (:meth:`~silomesh.protocol.secagg_policy.ReleasePolicy.join`); we deal shares of fresh
   seeds (``secagg-deal``) and write a ``secagg-group`` entry to our audit log;
2. ``secagg-shares``: we open and keep the shares dealt to us, wait (up to the round
   deadline) for our own model of that round, and answer with it masked (``secagg-masked``);
3. ``secagg-commit``: our :class:`~silomesh.protocol.secagg_policy.ReleasePolicy` releases
   self-mask shares of the survivors and pairwise shares of the dropped, never both for one
   member, for one signed commit per group (``secagg-release``); the release is audited.

Each function returns the reply or raises :class:`~silomesh.protocol.RemoteProtocolError`
(or :class:`~silomesh.protocol.LocalProtocolError` for a group that does not validate); the
handler answers those with a signed ``error`` and the stream goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import trio

from silomesh.audit.secagg import GROUP_KIND, RELEASE_KIND, canonical
from silomesh.peer.secure_state import Joined, Trained
from silomesh.protocol import ErrorCode, RemoteProtocolError
from silomesh.protocol.peerid import peer_id_from_public_key
from silomesh.protocol.secagg import Group, Member, open_share, refuse, seal_share, verify_group
from silomesh.protocol.secagg_messages import (
    SecaggCommit,
    SecaggDeal,
    SecaggGroup,
    SecaggMasked,
    SecaggRelease,
    SecaggShares,
)
from silomesh.strategies.secagg import flatten, member_vector

if TYPE_CHECKING:
    from silomesh.peer.context import RoundContext

__all__ = ["audit", "group_fields", "on_commit", "on_group", "on_shares", "peer_ids"]

log = logging.getLogger(__name__)

def audit(ctx: RoundContext, peer: str, kind: str, round: int, digest: bytes, fields: dict[str, Any]) -> None:
    """A ``local`` secure-aggregation entry (its reason canonical JSON, :mod:`silomesh.audit.secagg`)."""
    ctx.endpoint.journal.audit_log.append("local", peer, kind, round=round, payload_digest=digest.hex(),
                                          reason=canonical(fields))


def peer_ids(keys: Iterable[bytes]) -> list[str]:
    """Members as sorted PeerIDs (how audit entries name them)."""
    return sorted(peer_id_from_public_key(k) for k in keys)


def group_fields(group: Group, members: int | list[str]) -> dict[str, Any]:
    """A ``secagg-group`` entry's fields; ``members``: their PeerIDs (aggregator) or their count (member)."""
    fp = group.fixed_point
    return {"group": group.digest.hex(), "members": members, "threshold": group.threshold,
            "weight_cap": group.weight_cap, "bits": fp.bits, "clip": fp.clip}


def _joined(ctx: RoundContext, group_digest: bytes) -> Joined:
    joined = ctx.secure.joined.get(group_digest)
    if joined is None:
        raise refuse("no group with this digest was joined (or it was forgotten)")
    return joined


def on_group(ctx: RoundContext, msg: SecaggGroup) -> SecaggDeal:
    """Join the aggregator's group and deal shares of fresh seeds.

    Raises:
        RemoteProtocolError: REFUSED when secure aggregation is off here, or the group is not
            one we can join (length, weight rule, a second group this round); BAD_SIGNATURE.
        LocalProtocolError: the group's fields do not make a valid group.
    """
    secure = ctx.learner.strategy.secure_sum
    if secure is None:
        raise refuse("secure aggregation is off on this peer")
    group = msg.group()
    identity = ctx.endpoint.crypto
    group.index(identity.public_key)
    verify_group(group, msg.signature)
    length = secure.vector_length(flatten(ctx.learner.shared(ctx.learner.state())).size)
    if group.length != length:
        raise RemoteProtocolError(ErrorCode.BAD_SHAPE,
                                  f"the group expects {group.length} values, we mask {length} "
                                  f"({secure.weighting} weighting)")
    if (group.weight_cap > 0) != secure.weighs_samples:
        raise refuse(f"the group's weight rule (weight_cap {group.weight_cap}) is not our weighting "
                     f"{secure.weighting!r}")
    wanted = secure.threshold_of(len(group.members))
    if group.threshold < wanted:
        raise refuse(f"the group's threshold is {group.threshold} of {len(group.members)}, our "
                     f"secure_threshold ({secure.threshold}) asks for at least {wanted}")
    aggregator = peer_id_from_public_key(group.aggregator)
    if (aggregator, group.round) in ctx.secure.before_restart:
        raise refuse(f"we joined a group of this aggregator for round {group.round} before we restarted: its "
                     "seeds are gone, and a second group of that round could reveal a member by difference")
    ctx.secure.policy(identity).join(group)
    member = Member(identity, group)
    dealing = member.deal()
    digest = group.digest
    ctx.secure.joined[digest] = Joined(group, member)
    audit(ctx, aggregator, GROUP_KIND, group.round, digest, group_fields(group, len(group.members)))
    return SecaggDeal(
        **ctx.endpoint.reply_routing(msg, round=msg.round),
        group_digest=digest,
        self_digest=dealing.commitment.self_digest,
        pair_digest=dealing.commitment.pair_digest,
        sealed=tuple(sorted((s.holder, seal_share(identity, group, s)) for s in dealing.shares)),
    )


async def on_shares(ctx: RoundContext, msg: SecaggShares) -> SecaggMasked:
    """Keep the shares dealt to us; answer with our model of the round, masked.

    Raises:
        RemoteProtocolError: REFUSED for an unknown group, dealers that are not members or
            fewer than the threshold, a share missing or not opening, no model of ours
            before the round deadline, or a second vector for the group.
    """
    secure = ctx.learner.strategy.secure_sum
    if secure is None:
        raise refuse("secure aggregation is off on this peer")
    joined = _joined(ctx, msg.group_digest)
    group, me = joined.group, ctx.endpoint.crypto.public_key
    dealers = frozenset(msg.dealers)
    if me not in dealers or not dealers <= set(group.members):
        raise refuse("the dealers must be members of the group and include us")
    if len(dealers) < group.threshold:
        raise refuse(f"{len(dealers)} dealers, fewer than the threshold {group.threshold}: nothing could be unmasked")
    if {d for d, _ in msg.sealed} != dealers:
        raise refuse("one sealed share from each dealer, no more")
    if joined.dealers is not None and joined.dealers != dealers:
        raise refuse("the aggregator already named other dealers for this group")
    policy = ctx.secure.policy(ctx.endpoint.crypto)
    for dealer, sealed in msg.sealed:
        policy.hold(group, open_share(ctx.endpoint.crypto, group, dealer, sealed))
    joined.dealers = dealers
    trained: Trained | None = None
    with trio.move_on_after(ctx.rounds.deadline_seconds):
        trained = await ctx.secure.wait_trained(group.round)
    if trained is None:
        raise refuse(f"no model of ours for round {group.round} before the deadline")
    n = min(trained.n_samples, group.weight_cap) if group.weight_cap else trained.n_samples
    values, weight = member_vector(flatten(trained.state), secure, group.weight(n), trained.loss,
                                   group.fixed_point.clip)
    ring = joined.member.mask(values, weight, dealers)
    return SecaggMasked.of(ring, **ctx.endpoint.reply_routing(msg, round=msg.round), group_digest=group.digest,
                           n_samples=n)


def on_commit(ctx: RoundContext, msg: SecaggCommit) -> SecaggRelease:
    """Release what the signed commit asks for, if the release policy allows it (audited).

    Raises:
        RemoteProtocolError: REFUSED or BAD_SIGNATURE from the release policy.
    """
    joined = _joined(ctx, msg.group_digest)
    group, commit = joined.group, msg.commit
    if joined.dealers is not None and commit.dealers != joined.dealers:
        raise refuse("the commit names other dealers than those we masked with")
    release = ctx.secure.policy(ctx.endpoint.crypto).release(group, commit, msg.signature)
    audit(ctx, peer_id_from_public_key(group.aggregator), RELEASE_KIND, group.round, commit.digest, {
        "group": group.digest.hex(), "commit": commit.digest.hex(), "signature": msg.signature.hex(),
        "survivors": len(commit.survivors), "dropped": peer_ids(commit.dropped),
    })
    return SecaggRelease.of(release, **ctx.endpoint.reply_routing(msg, round=msg.round))
