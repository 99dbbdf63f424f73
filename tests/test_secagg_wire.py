"""The secure-aggregation messages and the group's weight rule, sans I/O.

A whole group's three request/reply pairs run through real sealed envelopes between
in-memory sessions (as h11's tests connect two Connections), and the decoded sum is
checked against ``np.average``. The weight rule is bound into the group digest: members
told different rules mask with different seeds, and the sum is noise.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from silomesh.protocol import OpenedEnvelope, Role, Session
from silomesh.protocol.errors import LocalProtocolError
from silomesh.protocol.fixedpoint import FixedPoint
from silomesh.protocol.identity import Identity
from silomesh.protocol.messages import Hello, Message
from silomesh.protocol.secagg import Commit, Group, Member, open_share, seal_share, sign_commit, sign_group, unmask
from silomesh.protocol.secagg_messages import (
    SecaggCommit,
    SecaggDeal,
    SecaggGroup,
    SecaggMasked,
    SecaggRelease,
    SecaggShares,
)
from silomesh.protocol.secagg_policy import ReleasePolicy

FED = "hospitals"
AGGREGATOR = Identity.from_seed(bytes([90]) * 32)
MEMBERS = [Identity.from_seed(bytes([91 + i]) * 32) for i in range(4)]
LENGTH = 50


class Link:
    """One stream between the aggregator (dialer) and one member (listener), hellos done."""

    def __init__(self, member: Identity) -> None:
        self.member = member
        self.seq = itertools.count(1)
        self.dialer = Session(Role.DIALER, identity=AGGREGATOR, peer=member.public_key, federation=FED)
        self.listener = Session(Role.LISTENER, identity=member, peer=AGGREGATOR.public_key, federation=FED)
        self.request(Hello(**self.routing(to=member)))
        self.reply(Hello(**self.routing(to=AGGREGATOR, sender=member)))

    def routing(self, *, to: Identity, sender: Identity = AGGREGATOR) -> dict[str, object]:
        return {"federation": FED, "sender": sender.public_key, "recipient": to.public_key, "round": 5,
                "sequence": next(self.seq)}

    @staticmethod
    def _carry(message: Message, sender: Session, receiver: Session) -> Message:
        for part in sender.send(message).frame_parts():
            receiver.receive_data(bytes(part))
        event = receiver.next_event()
        assert isinstance(event, OpenedEnvelope)
        return event.message

    def request(self, message: Message) -> Message:
        return self._carry(message, self.dialer, self.listener)

    def reply(self, message: Message) -> Message:
        return self._carry(message, self.listener, self.dialer)


def group(weight_cap: int = 64) -> Group:
    return Group.of(AGGREGATOR.public_key, 5, [m.public_key for m in MEMBERS], LENGTH,
                    FixedPoint.for_group(len(MEMBERS), 4.0, 32), weight_cap=weight_cap)


def test_a_group_with_one_dropout_sums_through_real_envelopes_to_np_average() -> None:
    rng = np.random.default_rng(3)
    models = {m.public_key: rng.uniform(-3, 3, LENGTH) for m in MEMBERS}
    samples = {m.public_key: int(s) for m, s in zip(MEMBERS, (10, 20, 30, 40), strict=True)}
    g = group()
    links = {m.public_key: Link(m) for m in MEMBERS}
    members: dict[bytes, Member] = {}
    policies = {m.public_key: ReleasePolicy(m) for m in MEMBERS}
    deals: dict[bytes, SecaggDeal] = {}
    for me, link in links.items():  # 1: group -> deal
        got = link.request(SecaggGroup.of(g, sign_group(AGGREGATOR, g), **link.routing(to=link.member)))
        assert isinstance(got, SecaggGroup) and got.group() == g
        policies[me].join(g)
        members[me] = Member(link.member, g)
        dealing = members[me].deal()
        deal = SecaggDeal(**link.routing(to=AGGREGATOR, sender=link.member), group_digest=g.digest,
                          self_digest=dealing.commitment.self_digest, pair_digest=dealing.commitment.pair_digest,
                          sealed=tuple(sorted((s.holder, seal_share(link.member, g, s)) for s in dealing.shares)))
        answered = link.reply(deal)
        assert isinstance(answered, SecaggDeal)
        deals[me] = answered
    dealers = tuple(sorted(deals))
    dropped = dealers[1]
    masked: dict[bytes, np.ndarray] = {}
    for me, link in links.items():  # 2: shares -> masked (one member falls silent)
        sealed = tuple(sorted((d, dict(deals[d].sealed)[me]) for d in dealers))
        got = link.request(SecaggShares(**link.routing(to=link.member), group_digest=g.digest, dealers=dealers,
                                        sealed=sealed))
        assert isinstance(got, SecaggShares)
        for dealer, blob in got.sealed:
            policies[me].hold(g, open_share(link.member, g, dealer, blob))
        if me == dropped:
            continue
        ring = members[me].mask(models[me], g.weight(samples[me]), dealers)
        answer = link.reply(SecaggMasked.of(ring, **link.routing(to=AGGREGATOR, sender=link.member),
                                            group_digest=g.digest, n_samples=samples[me]))
        assert isinstance(answer, SecaggMasked) and np.array_equal(answer.ring, ring)
        masked[me] = answer.ring
    commit = Commit(g.digest, frozenset(dealers), frozenset(masked))
    signature = sign_commit(AGGREGATOR, g, commit)
    releases = []
    for me in masked:  # 3: commit -> release
        link = links[me]
        got = link.request(SecaggCommit.of(commit, signature, **link.routing(to=link.member)))
        assert isinstance(got, SecaggCommit) and got.commit == commit
        release = policies[me].release(g, got.commit, got.signature)
        answer = link.reply(SecaggRelease.of(release, **link.routing(to=AGGREGATOR, sender=link.member)))
        assert isinstance(answer, SecaggRelease) and answer.release == release
        releases.append(answer.release)
    total = unmask(g, commit, masked, {k: d.commitment for k, d in deals.items()}, releases)
    survivors = sorted(masked)
    expected = np.average([models[k] for k in survivors], axis=0, weights=[samples[k] for k in survivors])
    decoded = total * g.weight_cap / sum(samples[k] for k in survivors)
    bound = g.fixed_point.error_bound(len(survivors)) * g.weight_cap / sum(samples[k] for k in survivors)
    assert np.max(np.abs(decoded - expected)) <= bound


def test_the_weight_rule_is_part_of_the_group_digest_and_unset_keeps_the_old_digest() -> None:
    assert group(64).digest != group(128).digest != group(0).digest
    plain = Group.of(AGGREGATOR.public_key, 5, [m.public_key for m in MEMBERS], LENGTH,
                     FixedPoint.for_group(len(MEMBERS), 4.0, 32))
    assert plain.digest == group(0).digest
    assert group(64).weight(16) == 0.25 and group(64).weight(100) == 1.0 and group(0).weight(100) == 1.0


def test_members_told_different_weight_rules_produce_noise_not_one_members_model() -> None:
    # an aggregator that tells member 0 "weight_cap 1" and the others a huge cap would, without
    # the binding, read member 0's model almost alone; bound into the digest, the masks do not cancel
    rng = np.random.default_rng(4)
    honest, lied = group(1), group(1 << 40)
    first = Member(MEMBERS[0], honest)
    others = [Member(m, lied) for m in MEMBERS[1:]]
    x0 = rng.uniform(-3, 3, LENGTH)
    total = first.mask(x0, honest.weight(1))
    for member in others:
        total = total + member.mask(rng.uniform(-3, 3, LENGTH), lied.weight(1))
    decoded = honest.fixed_point.decode(total)
    assert np.max(np.abs(decoded - x0)) > 1.0  # uniformly spread over the ring, nowhere near x0


def test_secagg_masked_carries_one_int_ring_tensor_only() -> None:
    routing = {"federation": FED, "sender": AGGREGATOR.public_key, "recipient": MEMBERS[0].public_key,
               "round": 1, "sequence": 1}
    ring = np.array([0, 1, 2**32 - 1], np.uint32)
    message = SecaggMasked.of(ring, **routing, group_digest=bytes(32))
    assert message.tensors["masked"].dtype == np.int32 and message.ring.dtype == np.uint32
    assert np.array_equal(message.ring, ring)
    with pytest.raises(LocalProtocolError):
        SecaggMasked(**routing, group_digest=bytes(32), tensors={"masked": np.zeros(3, np.float32)})
    with pytest.raises(LocalProtocolError):
        SecaggRelease(**routing, group_digest=bytes(32), self_parts=((bytes(32), b"a"),),
                      pair_parts=((bytes(32), b"b"),))
