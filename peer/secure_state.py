"""What a peer keeps in memory between secure-aggregation messages, as aggregator and as member.

:class:`SecureState` lives in the round context (one per peer); the member's side
(:mod:`silomesh.peer.secure_member`) and the aggregator's (:mod:`silomesh.peer.secure_rounds`)
read and fill it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from silomesh.protocol.identity import Identity
from silomesh.protocol.secagg import Group, Member
from silomesh.protocol.secagg_policy import ReleasePolicy
from silomesh.strategies import StateDict

#: trained models kept for neighbours whose rounds lag behind ours
KEEP_ROUNDS = 3


@dataclass(frozen=True)
class Trained:
    """Our shared model of one round, as we would send it, and the samples behind it."""

    round: int
    state: StateDict
    n_samples: int
    #: the round's mean training loss (fedmix weights by it; NaN when unknown)
    loss: float = float("nan")


@dataclass(frozen=True)
class Outcome:
    """What we learnt as aggregator in one round: the group, the commit, the survivors'
    sample counts and the error bound of the result (kept for the last rounds)."""

    group_digest: bytes
    commit_digest: bytes
    survivors: dict[str, int]
    bound: float


@dataclass
class Joined:
    """A group we joined as a member: its description, our seeds and shares, who dealt to us."""

    group: Group
    member: Member
    dealers: frozenset[bytes] | None = None


@dataclass
class SecureState:
    """What a peer remembers between secure-aggregation messages (one per peer, in memory).

    A restart forgets the seeds and shares of the groups joined: an aggregator's later
    requests for them are refused, and the peer is a dropout in those rounds. What it joined
    is in its audit log (``secagg-group`` entries), and :meth:`recall` reads it back at start:
    a group of the same aggregator and round, the same or another, is then refused, as before
    the restart (two overlapping sums would reveal a member by their difference).
    """

    _policy: ReleasePolicy | None = None
    joined: dict[bytes, Joined] = field(default_factory=dict)
    trained: dict[int, Trained] = field(default_factory=dict)
    #: neighbour -> the sample count it weighted with last (for the next weight_cap)
    last_samples: dict[str, int] = field(default_factory=dict)
    #: round -> what our own group's sum was made of
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    #: bytes sent as a member (deals, masked vectors, releases) not yet counted in a round's row
    member_bytes: int = 0
    #: (aggregator PeerID, round) -> group digest (hex) joined before this process started
    before_restart: dict[tuple[str, int], str] = field(default_factory=dict)
    _offered: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)

    def policy(self, identity: Identity) -> ReleasePolicy:
        if self._policy is None:
            self._policy = ReleasePolicy(identity)
        return self._policy

    def offer(self, trained: Trained) -> None:
        """Our model of ``trained.round`` may now be masked for neighbours' groups."""
        self.trained[trained.round] = trained
        for old in sorted(self.trained)[:-KEEP_ROUNDS]:
            del self.trained[old]
        self.joined = {d: j for d, j in self.joined.items() if j.group.round >= trained.round - KEEP_ROUNDS}
        self.outcomes = {r: o for r, o in self.outcomes.items() if r >= trained.round - KEEP_ROUNDS}
        self.before_restart = {k: d for k, d in self.before_restart.items() if k[1] >= trained.round - KEEP_ROUNDS}
        self.policy_forget(trained.round - KEEP_ROUNDS)
        self._offered.unpark_all()

    def recall(self, joined: Iterable[Mapping[str, Any]]) -> None:
        """Remember the groups our audit log says we joined (``peer``: the aggregator, ``round``,
        ``payload_digest``: the group digest), so that none of them is joined again."""
        for row in joined:
            self.before_restart[(str(row["peer"]), int(row["round"]))] = str(row["payload_digest"])

    def policy_forget(self, before_round: int) -> None:
        if self._policy is not None:
            self._policy.forget(before_round)

    def take_member_bytes(self) -> int:
        """The bytes sent as a member since the last call (a round's row counts them)."""
        sent, self.member_bytes = self.member_bytes, 0
        return sent

    def ready(self, round: int) -> Trained | None:
        """Our model of ``round``, or of the first later round we trained (we ran ahead)."""
        later = [r for r in self.trained if r >= round]
        return self.trained[min(later)] if later else None

    async def wait_trained(self, round: int) -> Trained:
        """Wait until :meth:`ready` has a model for ``round``."""
        while (got := self.ready(round)) is None:
            await self._offered.park()
        return got
