"""Secure aggregation's core (protocol/secagg.py, secagg_policy.py, fixedpoint.py), checked in memory.

Every test runs whole groups synchronously: members deal shares, hold each other's, mask,
the aggregator commits and unmasks. References are computed another way: exact rational
sums (``fractions.Fraction``) for the error bound, ``np.average`` for the weighted average.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pytest
from Crypto.Protocol.SecretSharing import Shamir

from silomesh.protocol.errors import LocalProtocolError, RemoteProtocolError
from silomesh.protocol.fixedpoint import FixedPoint
from silomesh.protocol.identity import Identity
from silomesh.protocol.secagg import (
    Commit,
    Group,
    Member,
    Release,
    Share,
    ShareCommitment,
    expand,
    open_share,
    pair_seed,
    recover_pair_seeds,
    recover_self_seed,
    seal_share,
    sign_commit,
    sign_group,
    unmask,
    verify_commit,
    verify_group,
)
from silomesh.protocol.secagg_policy import ReleasePolicy

AGGREGATOR = Identity.from_seed(bytes([200]) * 32)
LENGTH = 64
CLIP = 4.0


def identities(n: int) -> list[Identity]:
    return [Identity.from_seed(bytes([i + 1]) * 32) for i in range(n)]


def make_group(ids: list[Identity], *, round: int = 7, length: int = LENGTH, clip: float = CLIP,
               bits: int = 64, aggregator: Identity = AGGREGATOR, threshold: int = 0) -> Group:
    fp = FixedPoint.for_group(len(ids), clip, bits)
    return Group.of(aggregator.public_key, round, (i.public_key for i in ids), length, fp, threshold)


@dataclass
class Run:
    """One group after dealing: members, their policies and the dealers' commitments."""

    group: Group
    ids: dict[bytes, Identity]
    members: dict[bytes, Member]
    policies: dict[bytes, ReleasePolicy]
    commitments: dict[bytes, ShareCommitment]
    dealt: dict[tuple[bytes, bytes], Share]  # (dealer, holder) -> share: what a colluder could read


def deal(ids: list[Identity], group: Group | None = None, seed: int = 0) -> Run:
    group = make_group(ids) if group is None else group
    rng = np.random.default_rng(seed)
    members = {i.public_key: Member(i, group, self_seed=rng.bytes(32)) for i in ids}
    members_ids = {i.public_key: i for i in ids}
    policies = {i.public_key: ReleasePolicy(i) for i in ids}
    for p in policies.values():
        p.join(group)
    commitments, dealt = {}, {}
    for m in members.values():
        dealing = m.deal()
        commitments[m.me] = dealing.commitment
        for share in dealing.shares:
            dealt[share.dealer, share.holder] = share  # sealed by the dealer, opened by the holder, as on the wire
            sealed = seal_share(members_ids[m.me], group, share)
            policies[share.holder].hold(group, open_share(members_ids[share.holder], group, m.me, sealed))
    return Run(group, {i.public_key: i for i in ids}, members, policies, commitments, dealt)


def release(run: Run, holder: bytes, commit: Commit) -> Release:
    """``holder`` answers ``commit`` signed by the aggregator."""
    return run.policies[holder].release(run.group, commit, sign_commit(AGGREGATOR, run.group, commit))


def inputs(run: Run, seed: int) -> tuple[dict[bytes, np.ndarray], dict[bytes, float]]:
    rng = np.random.default_rng(seed)
    values = {k: rng.uniform(-CLIP, CLIP, run.group.length).astype(np.float32) for k in run.group.members}
    raw = rng.uniform(1, 10, len(run.group.members) + 1)  # +1: the aggregator's own weight
    weights = raw / raw.sum()
    return values, dict(zip(run.group.members, weights[1:].tolist(), strict=True))


def aggregate(run: Run, values: dict[bytes, np.ndarray], weights: dict[bytes, float],
              dropped: set[bytes]) -> np.ndarray:
    members = run.group.members
    masked = {k: run.members[k].mask(values[k], weights[k]) for k in members if k not in dropped}
    commit = Commit(run.group.digest, frozenset(members), frozenset(masked))
    releases = [release(run, k, commit) for k in masked]
    return unmask(run.group, commit, masked, run.commitments, releases)


def exact_sum(values: list[np.ndarray], weights: list[float], clip: float) -> list[Fraction]:
    out = []
    for coords in zip(*values, strict=True):
        out.append(sum((Fraction(w) * Fraction(min(max(float(x), -clip), clip))
                        for w, x in zip(weights, coords, strict=True)), Fraction(0)))
    return out


CASES = [(3, 0), (3, 1), (5, 0), (5, 1), (5, 2), (8, 0), (8, 1), (8, 2)]


@pytest.mark.parametrize(("n", "drop"), CASES)
def test_masked_sum_is_the_exact_weighted_sum_within_the_stated_bound(n: int, drop: int) -> None:
    run = deal(identities(n), seed=n)
    values, weights = inputs(run, seed=10 * n + drop)
    dropped = set(run.group.members[1:1 + drop])
    got = aggregate(run, values, weights, dropped)
    survivors = [k for k in run.group.members if k not in dropped]
    exact = exact_sum([values[k] for k in survivors], [weights[k] for k in survivors], CLIP)
    worst = max(abs(Fraction(float(g)) - e) for g, e in zip(got, exact, strict=True))
    bound = run.group.fixed_point.error_bound(len(survivors))
    assert worst <= Fraction(bound)
    assert worst > 0  # the grid is finite: a zero error would mean the test compares a thing with itself


@pytest.mark.parametrize(("n", "drop"), CASES)
def test_masked_weighted_average_matches_np_average(n: int, drop: int) -> None:
    run = deal(identities(n), seed=n + 100)
    values, weights = inputs(run, seed=n + drop)
    dropped = set(run.group.members[-drop:]) if drop else set()
    survivors = [k for k in run.group.members if k not in dropped]
    total_weight = sum(weights[k] for k in survivors)
    got = aggregate(run, values, weights, dropped) / total_weight
    want = np.average(np.stack([values[k] for k in survivors]), axis=0,
                      weights=[weights[k] for k in survivors])
    bound = run.group.fixed_point.error_bound(len(survivors)) / total_weight
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=bound)


def test_three_members_with_two_dropouts_cannot_be_unmasked() -> None:
    run = deal(identities(3))
    values, weights = inputs(run, seed=1)
    with pytest.raises(RemoteProtocolError, match="fewer than the threshold"):
        aggregate(run, values, weights, set(run.group.members[1:]))


def test_pairwise_masks_cancel_exactly_in_the_ring() -> None:
    run = deal(identities(5))
    values, weights = inputs(run, seed=3)
    fp, group = run.group.fixed_point, run.group
    residue = np.zeros(group.length, dtype=fp.dtype)
    for k, member in run.members.items():
        # rebuild the self mask from the dealt shares, not from the member's private state
        commit = Commit(group.digest, frozenset(group.members), frozenset(group.members))
        releases = [Release(h, group.digest, self_parts={k: run.policies[h]._held[group.digest][k].self_part})
                    for h in group.members]
        self_mask = expand(recover_self_seed(group, run.commitments[k], releases), group.length, fp.dtype)
        residue += member.mask(values[k], weights[k]) - fp.encode(values[k], weights[k]) - self_mask
        assert commit.dropped == frozenset()
    assert np.array_equal(residue, np.zeros(group.length, dtype=fp.dtype))


def test_pair_seed_is_shared_by_both_members_and_bound_to_aggregator_and_round() -> None:
    ids = identities(3)
    a, b = ids[0], ids[1]
    group = make_group(ids)
    ma, mb = Member(a, group), Member(b, group)
    assert ma.pair_seed(b.public_key) == mb.pair_seed(a.public_key)
    other_round = make_group(ids, round=8)
    other_aggregator = make_group(ids, aggregator=Identity.from_seed(bytes([201]) * 32))
    seeds = {pair_seed(a.shared_key(b.public_key), g.digest) for g in (group, other_round, other_aggregator)}
    assert len(seeds) == 3
    assert ma.pair_seed(b.public_key) != ma.pair_seed(ids[2].public_key)


def test_masking_is_deterministic_given_the_self_seeds() -> None:
    ids = identities(3)
    values = np.linspace(-1, 1, LENGTH)
    first = deal(ids, seed=5).members[ids[0].public_key].mask(values, 0.25)
    again = deal(ids, seed=5).members[ids[0].public_key].mask(values, 0.25)
    other = deal(ids, seed=6).members[ids[0].public_key].mask(values, 0.25)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_a_masked_vector_does_not_reveal_the_plain_one() -> None:
    ids = identities(3)
    group = make_group(ids, length=20_000)
    member = deal(ids, group=group, seed=9).members[ids[0].public_key]
    plain = np.sin(np.arange(group.length) / 50.0)  # a structured signal a mask must hide
    encoded = group.fixed_point.encode(plain, 0.5)
    masked = member.mask(plain, 0.5)
    assert np.mean(masked != encoded) > 0.999
    top = (masked >> np.uint64(56)).astype(np.int64)  # the top byte of a uniform word is uniform
    counts = np.bincount(top, minlength=256)
    expected = group.length / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 330.5  # the 0.1 % critical value of chi^2 with 255 degrees of freedom
    signed = group.fixed_point.decode(masked)
    assert abs(np.corrcoef(signed, plain)[0, 1]) < 0.05


def test_releasing_both_kinds_of_share_of_one_member_is_refused() -> None:
    run = deal(identities(5))
    group, members = run.group, run.group.members
    holder, target = members[0], members[4]
    honest = Commit(group.digest, frozenset(members), frozenset(members))
    first = release(run, holder, honest)
    assert target in first.self_parts
    lying = Commit(group.digest, frozenset(members), frozenset(members) - {target})
    with pytest.raises(RemoteProtocolError, match="both the self-mask and the pairwise share"):
        release(run, holder, lying)
    assert release(run, holder, honest) == first  # a repeated commit is answered again


def test_a_member_keeps_the_signed_commit_it_answered_as_evidence_of_equivocation() -> None:
    run = deal(identities(3))
    group, members = run.group, run.group.members
    honest = Commit(group.digest, frozenset(members), frozenset(members))
    lying = Commit(group.digest, frozenset(members), frozenset(members[:2]))
    release(run, members[0], honest)
    with pytest.raises(RemoteProtocolError):
        release(run, members[0], lying)
    kept = run.policies[members[0]].answered(group)
    assert kept is not None and kept[0] == honest
    verify_commit(group, *kept)  # two verifying signatures over different sets of one group
    verify_commit(group, lying, sign_commit(AGGREGATOR, group, lying))
    assert honest.digest != lying.digest


def test_a_commit_not_signed_by_the_aggregator_is_refused() -> None:
    run = deal(identities(3))
    group, members = run.group, run.group.members
    commit = Commit(group.digest, frozenset(members), frozenset(members))
    forged = run.ids[members[1]].sign(b"silomesh/secagg/commit/v1\x00" + commit.digest)
    with pytest.raises(RemoteProtocolError, match="not signed by the group's aggregator"):
        run.policies[members[0]].release(group, commit, forged)
    assert run.policies[members[0]].answered(group) is None


def test_a_group_verifies_only_under_its_aggregators_signature() -> None:
    ids = identities(3)
    group = make_group(ids)
    verify_group(group, sign_group(AGGREGATOR, group))
    with pytest.raises(RemoteProtocolError, match="not signed by its aggregator"):
        verify_group(make_group(ids, round=8), sign_group(AGGREGATOR, group))
    with pytest.raises(LocalProtocolError, match="only the aggregator"):
        sign_group(ids[0], group)


def test_a_sealed_share_opens_only_for_its_holder_and_its_group() -> None:
    ids = identities(3)
    group = make_group(ids)
    share = next(sh for sh in Member(ids[0], group).deal().shares if sh.holder == ids[1].public_key)
    sealed = seal_share(ids[0], group, share)
    assert open_share(ids[1], group, ids[0].public_key, sealed) == share
    with pytest.raises(RemoteProtocolError, match="does not open"):
        open_share(ids[2], group, ids[0].public_key, sealed)
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    with pytest.raises(RemoteProtocolError, match="does not open"):
        open_share(ids[1], group, ids[0].public_key, bytes(tampered))
    with pytest.raises(RemoteProtocolError, match="another group"):
        open_share(ids[1], make_group(ids, round=8), ids[0].public_key, sealed)


def test_an_equivocating_aggregator_cannot_recover_both_secrets_of_one_member() -> None:
    run = deal(identities(5))
    group, members = run.group, run.group.members
    target = members[4]
    says_survived = Commit(group.digest, frozenset(members), frozenset(members))
    says_dropped = Commit(group.digest, frozenset(members), frozenset(members) - {target})
    # each holder sees one of the two commits: three the first, the fourth and the target the second
    releases_a = [release(run, h, says_survived) for h in members[:3]]
    releases_b = [release(run, members[3], says_dropped)]
    with pytest.raises(RemoteProtocolError, match="not among the committed survivors"):
        release(run, target, says_dropped)
    recover_self_seed(group, run.commitments[target], releases_a)  # a lawful survivor's seed
    with pytest.raises(RemoteProtocolError, match="1 shares, 3 needed"):
        recover_pair_seeds(group, run.commitments[target], releases_b)


def equivocate_with_a_colluder(run: Run, target: bytes, colluder: bytes, first: list[bytes],
                               second: list[bytes]) -> tuple[list[Release], list[Release]]:
    """Commit "all survived" to ``first`` and "target dropped" to ``second``; the colluder gives both."""
    group, members = run.group, run.group.members
    survived = Commit(group.digest, frozenset(members), frozenset(members))
    dropped = Commit(group.digest, frozenset(members), frozenset(members) - {target})
    leak = run.dealt[target, colluder]
    releases_a = [release(run, h, survived) for h in first]
    releases_a.append(Release(colluder, group.digest, self_parts={target: leak.self_part}))
    releases_b = [release(run, h, dropped) for h in second]
    releases_b.append(Release(colluder, group.digest, pair_parts={target: leak.pair_part}))
    return releases_a, releases_b


def test_a_lying_aggregator_with_one_colluder_unmasks_a_member_of_five_at_the_majority_threshold() -> None:
    # the documented limit: c >= 2t - n = 1 colluder suffices when n = 5, t = 3
    run = deal(identities(5))
    group, members = run.group, run.group.members
    assert (group.threshold, group.tolerated_colluders) == (3, 0)
    target, colluder = members[4], members[0]
    values, weights = inputs(run, seed=8)
    y = run.members[target].mask(values[target], weights[target])
    releases_a, releases_b = equivocate_with_a_colluder(run, target, colluder, [members[1], target],
                                                        [members[2], members[3]])
    fp = group.fixed_point
    y -= expand(recover_self_seed(group, run.commitments[target], releases_a), group.length, fp.dtype)
    for k, seed in recover_pair_seeds(group, run.commitments[target], releases_b).items():
        stream = expand(seed, group.length, fp.dtype)
        if target < k:
            y -= stream
        else:
            y += stream
    np.testing.assert_allclose(fp.decode(y), weights[target] * values[target].astype(np.float64),
                               rtol=0, atol=fp.error_bound(1))


def test_a_higher_threshold_defeats_the_same_attack() -> None:
    ids = identities(5)
    run = deal(ids, group=make_group(ids, threshold=4))
    group, members = run.group, run.group.members
    assert group.tolerated_colluders == 2
    target, colluder = members[4], members[0]
    releases_a, releases_b = equivocate_with_a_colluder(run, target, colluder, [members[1], members[2], target],
                                                        [members[3]])
    recover_self_seed(group, run.commitments[target], releases_a)
    with pytest.raises(RemoteProtocolError, match="2 shares, 4 needed"):
        recover_pair_seeds(group, run.commitments[target], releases_b)


def test_a_threshold_below_a_strict_majority_is_refused() -> None:
    ids = identities(5)
    assert make_group(ids).threshold == 3
    assert make_group(ids, threshold=5).digest != make_group(ids).digest
    with pytest.raises(LocalProtocolError, match="strict majority"):
        make_group(ids, threshold=2)
    with pytest.raises(LocalProtocolError, match="strict majority"):
        make_group(ids, threshold=6)


def test_recovery_below_the_threshold_is_refused() -> None:
    run = deal(identities(8))
    group, members = run.group, run.group.members
    assert group.threshold == 5
    commit = Commit(group.digest, frozenset(members), frozenset(members[:6]))
    releases = [release(run, h, commit) for h in members[:6]]
    dropped = members[7]
    assert recover_pair_seeds(group, run.commitments[dropped], releases[:5])[members[0]] == \
        run.members[dropped].pair_seed(members[0])
    with pytest.raises(RemoteProtocolError, match="4 shares, 5 needed"):
        recover_pair_seeds(group, run.commitments[dropped], releases[:4])
    with pytest.raises(RemoteProtocolError, match="4 shares, 5 needed"):
        recover_self_seed(group, run.commitments[members[0]], releases[:4])


def test_four_of_eight_shamir_shares_do_not_give_the_secret() -> None:
    # what the threshold check guards: PyCryptodome's combine of t-1 shares returns garbage, silently
    secret = bytes(range(16))
    shares = Shamir.split(5, 8, secret)
    assert Shamir.combine(shares[:5]) == secret
    assert Shamir.combine(shares[:4]) != secret


def test_a_wrong_share_fails_the_dealers_commitment() -> None:
    run = deal(identities(3))
    group, members = run.group, run.group.members
    commit = Commit(group.digest, frozenset(members), frozenset(members))
    releases = [release(run, h, commit) for h in members]
    forged = dict(releases[0].self_parts)
    forged[members[1]] = bytes(32)
    releases[0] = Release(releases[0].holder, group.digest, forged, releases[0].pair_parts)
    with pytest.raises(RemoteProtocolError, match="does not match its commitment"):
        recover_self_seed(group, run.commitments[members[1]], releases[:2])


def test_release_is_refused_to_a_dropped_holder_and_below_threshold() -> None:
    run = deal(identities(5))
    group, members = run.group, run.group.members
    commit = Commit(group.digest, frozenset(members), frozenset(members[:3]))
    with pytest.raises(RemoteProtocolError, match="not among the committed survivors"):
        release(run, members[4], commit)
    too_few = Commit(group.digest, frozenset(members), frozenset(members[:2]))
    with pytest.raises(RemoteProtocolError, match="fewer than the threshold 3"):
        release(run, members[0], too_few)


def test_a_second_group_in_the_same_round_is_refused() -> None:
    ids = identities(4)
    policy = ReleasePolicy(ids[0])
    policy.join(make_group(ids[:3]))
    policy.join(make_group(ids[:3]))  # the same group again is fine
    with pytest.raises(RemoteProtocolError, match="second group"):
        policy.join(make_group(ids))  # {0,1,2,3} minus {0,1,2} would be member 3's model
    policy.join(make_group(ids, round=8))


def test_a_member_masks_only_once_per_group() -> None:
    run = deal(identities(3))
    member = next(iter(run.members.values()))
    member.mask(np.zeros(LENGTH), 0.5)
    with pytest.raises(LocalProtocolError, match="already masked"):
        member.mask(np.zeros(LENGTH), 0.5)


def test_members_mask_only_with_those_who_dealt() -> None:
    run = deal(identities(5))
    group, members = run.group, run.group.members
    values, weights = inputs(run, seed=4)
    dealers = frozenset(members[:4])  # member 4 never dealt: nobody masks with it
    masked = {k: run.members[k].mask(values[k], weights[k], dealers) for k in members[:3]}
    commit = Commit(group.digest, dealers, frozenset(masked))
    releases = [release(run, k, commit) for k in masked]
    got = unmask(group, commit, masked, run.commitments, releases)
    want = sum(weights[k] * values[k].astype(np.float64) for k in members[:3])
    np.testing.assert_allclose(got, want, rtol=0, atol=group.fixed_point.error_bound(3))


def test_a_group_with_one_other_member_is_refused() -> None:
    with pytest.raises(LocalProtocolError, match="at least 2 members besides the aggregator"):
        make_group(identities(1))
    make_group(identities(2))


@pytest.mark.parametrize("bits", [32, 64])
def test_the_bound_holds_at_the_clip_edges_without_wrapping(bits: int) -> None:
    n = 8
    group = make_group(identities(n), bits=bits)
    for edge in (CLIP, -CLIP):
        run = deal(identities(n), group=group, seed=int(edge > 0))
        values = {k: np.full(LENGTH, edge * 3 if i % 2 else edge) for i, k in enumerate(group.members)}
        got = aggregate(run, values, dict.fromkeys(group.members, 1.0), set())
        # the largest sum the ring must hold; values beyond the clip count as the clip
        assert np.all(np.abs(got - n * edge) <= group.fixed_point.error_bound(n))


def test_the_scale_is_the_finest_that_cannot_overflow() -> None:
    for bits in (32, 64):
        fp = FixedPoint.for_group(8, CLIP, bits)
        assert 8 * (fp.scale * CLIP + 0.5) <= FixedPoint.headroom(bits)
        with pytest.raises(LocalProtocolError, match="could overflow"):
            FixedPoint(bits=bits, scale=fp.scale * 2, clip=CLIP, max_members=8)
    assert FixedPoint.for_group(8, CLIP, 64).error_bound(8) < 1e-11


def test_encode_refuses_non_finite_values_and_weights_outside_zero_one() -> None:
    fp = FixedPoint.for_group(4, CLIP)
    with pytest.raises(LocalProtocolError, match="NaN or infinite"):
        fp.encode([0.0, float("nan")], 0.5)
    with pytest.raises(LocalProtocolError, match=r"weight must lie in \[0, 1\]"):
        fp.encode([0.0], 1.5)
