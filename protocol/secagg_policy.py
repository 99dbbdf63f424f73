"""The member-side memory of secure aggregation: which shares it holds, what it released.

These are the rules that keep an aggregator from unmasking one member (:mod:`.secagg`):
at most one group per (aggregator, round), because two overlapping sums reveal their
difference; at most one signed commit answered per group, so never a self-mask share and a
pairwise share of the same member; only as a survivor; only when at least ``threshold``
vectors are summed.
"""

from __future__ import annotations

from .identity import Identity
from .secagg import Commit, Group, Release, Share, refuse, verify_commit

__all__ = ["ReleasePolicy"]


class ReleasePolicy:
    """A member's memory of shares held and released, across groups and rounds.

    The rules that keep an aggregator from unmasking one member:
    at most one group per (aggregator, round) (two overlapping sums reveal their difference);
    at most one commit answered per group; never a self-mask share and a pairwise share of
    the same member; only as a survivor; only when at least ``threshold`` vectors are summed.
    """

    def __init__(self, identity: Identity) -> None:
        self.me = identity.public_key
        self._groups: dict[tuple[bytes, int], bytes] = {}
        self._held: dict[bytes, dict[bytes, Share]] = {}
        self._answered: dict[bytes, tuple[Commit, bytes]] = {}
        self._kinds: dict[bytes, dict[bytes, str]] = {}

    def join(self, group: Group) -> None:
        """Accept ``group`` as this member's only group for its (aggregator, round).

        Raises:
            RemoteProtocolError: REFUSED if another group was already joined for that round.
        """
        group.index(self.me)
        key = (group.aggregator, group.round)
        known = self._groups.setdefault(key, group.digest)
        if known != group.digest:
            raise refuse("a second group from the same aggregator in the same round")

    def hold(self, group: Group, share: Share) -> None:
        """Keep a share dealt to this member in ``group``.

        Raises:
            RemoteProtocolError: REFUSED if the group was not joined, the share is for another
                holder or from a non-member, or the dealer already dealt.
        """
        digest = group.digest
        if self._groups.get((group.aggregator, group.round)) != digest:
            raise refuse("a share for a group this member did not join")
        if share.holder != self.me or share.dealer not in group.members:
            raise refuse("a share for another holder or from a non-member")
        held = self._held.setdefault(digest, {})
        if share.dealer in held and held[share.dealer] != share:
            raise refuse("a dealer dealt twice")
        held[share.dealer] = share

    def release(self, group: Group, commit: Commit, signature: bytes) -> Release:
        """Answer the aggregator's signed commit with the shares it needs, or refuse.

        The signed commit is kept (:meth:`answered`): with a second, contradicting one it is
        evidence that the aggregator equivocated.

        Raises:
            RemoteProtocolError: BAD_SIGNATURE if the aggregator did not sign the commit.
            RemoteProtocolError: REFUSED if the commit contradicts one already answered (it
                would ask for both kinds of share of some member), if this member is not a
                survivor, if fewer than ``threshold`` survive, or if the sets are inconsistent.
        """
        digest = group.digest
        if commit.group_digest != digest or self._groups.get((group.aggregator, group.round)) != digest:
            raise refuse("a commit for a group this member did not join")
        verify_commit(group, commit, signature)
        if not commit.survivors <= commit.dealers <= set(group.members):
            raise refuse("survivors must have dealt, and dealers must be members")
        wanted = dict.fromkeys(commit.survivors, "self") | dict.fromkeys(commit.dropped, "pair")
        kinds = self._kinds.setdefault(digest, {})
        previous = self._answered.get(digest)
        if previous is not None and previous[0] != commit:
            both = sorted(m.hex()[:16] for m, kind in wanted.items() if kinds.get(m, kind) != kind)
            if both:
                raise refuse(f"asked for both the self-mask and the pairwise share of {', '.join(both)}")
            raise refuse("the aggregator already committed another set for this group")
        if self.me not in commit.survivors:
            raise refuse("this member is not among the committed survivors")
        if len(commit.survivors) < group.threshold:
            raise refuse(f"{len(commit.survivors)} survivors, fewer than the threshold {group.threshold}")
        held = self._held.get(digest, {})
        missing = [m for m in wanted if m not in held]
        if missing:
            raise refuse(f"no share held from {len(missing)} of the committed dealers")
        kinds.update(wanted)
        self._answered[digest] = (commit, signature)
        return Release(
            holder=self.me,
            group_digest=digest,
            self_parts={m: held[m].self_part for m in commit.survivors},
            pair_parts={m: held[m].pair_part for m in commit.dropped},
        )

    def answered(self, group: Group) -> tuple[Commit, bytes] | None:
        """The signed commit this member answered for ``group``, if any."""
        return self._answered.get(group.digest)

    def forget(self, before_round: int) -> None:
        """Drop held shares of rounds before ``before_round`` (their answers are kept)."""
        old = {d for (_, r), d in self._groups.items() if r < before_round}
        for d in old:
            self._held.pop(d, None)
