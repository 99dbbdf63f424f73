"""Secure aggregation without a server: the pure cryptographic core (no wire format yet).

Aggregator *i* names, for round *r*, a :class:`Group` of its neighbours. Each member *j*
encodes its weighted model in fixed point in the ring Z_{2^b} (:class:`FixedPoint`) and
sends ``y_j = q_j + PRG(b_j) + sum_k ±PRG(s_jk)``: a fresh self-mask seed ``b_j`` and, for
every other member *k*, a pairwise seed ``s_jk`` both can derive without a round trip from
their X25519 shared key (each PeerID's Ed25519 key gives its X25519 key) bound to *i*, *r*
and the group (:func:`pair_seed`). The smaller public key adds, the larger subtracts, so
pairwise masks cancel in the sum (Bonawitz et al., CCS 2017, "double masking").

Before masking, each member deals Shamir shares (PyCryptodome's ``Shamir`` over
GF(2^128), one split per 16-byte block) of ``b_j`` and of its per-group pairwise seeds to
every member (:meth:`Member.deal`). Only these per-group seeds are ever shared, never the
long-term identity key. After the deadline the aggregator commits the set of masked
vectors it received (:class:`Commit`); each survivor's release policy
(:mod:`.secagg_policy`) then releases self-mask shares of survivors and pairwise shares of
the dropped, never both kinds for one member, and only one commit per (aggregator, round). With a threshold ``t`` of at
least a strict majority of the ``n`` members (the default), two commits that contradict
each other cannot both gather ``t`` honest releases, so an aggregator that lies about who
dropped learns nothing more than the sum unless ``2t - n`` members collude with it.
:func:`unmask` removes the masks and decodes the sum.

Threat model and limits: an aggregator that follows the protocol, colluding with fewer
than ``t`` members, learns only the sum of the committed members' weighted models (and
their weights); one that lies about dropouts needs ``2t - n`` colluders
(:attr:`Group.tolerated_colluders`). Nothing stops a member from sending a wrong vector.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import nacl.bindings
import nacl.exceptions
import numpy as np
import numpy.typing as npt
from Crypto.Cipher import ChaCha20
from Crypto.Protocol.SecretSharing import Shamir

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .fixedpoint import FixedPoint
from .identity import Identity, verify_signature
from .limits import KEY_SIZE, NONCE_SIZE

__all__ = [
    "COMMIT_SIGNING_DOMAIN",
    "GROUP_SIGNING_DOMAIN",
    "MIN_OTHER_MEMBERS",
    "SEED_SIZE",
    "Commit",
    "Dealing",
    "Group",
    "Member",
    "Release",
    "Share",
    "ShareCommitment",
    "expand",
    "open_share",
    "pair_seed",
    "recover_pair_seeds",
    "recover_self_seed",
    "refuse",
    "seal_share",
    "sign_commit",
    "sign_group",
    "unmask",
    "verify_commit",
    "verify_group",
]

MIN_OTHER_MEMBERS: Final = 2
"""A group needs at least two members besides the aggregator: with one, its sum is its model."""

SEED_SIZE: Final = 32
"""Self-mask and pairwise seeds are ChaCha20 keys."""

GROUP_SIGNING_DOMAIN: Final = b"silomesh/secagg/group/v1\x00"
"""The aggregator signs ``GROUP_SIGNING_DOMAIN || group.digest`` to name a round's group."""

COMMIT_SIGNING_DOMAIN: Final = b"silomesh/secagg/commit/v1\x00"
"""The aggregator signs ``COMMIT_SIGNING_DOMAIN || commit.digest``; two such signatures over
different sets for one group are evidence of equivocation."""

_BLOCK = 16  # PyCryptodome's Shamir shares 16-byte secrets
_NONCE = bytes(12)  # every ChaCha20 key here is used for one stream only
_GROUP_PERSON = b"silomesh/sa-grp1"
_PAIR_PERSON = b"silomesh/sa-pair"
_SELF_COMMIT_PERSON = b"silomesh/sa-self"
_PAIR_COMMIT_PERSON = b"silomesh/sa-pcom"
_COMMIT_PERSON = b"silomesh/sa-cmit"


def refuse(message: str) -> RemoteProtocolError:
    """A REFUSED remote error: the aggregator or a member asked for what the rules forbid."""
    return RemoteProtocolError(ErrorCode.REFUSED, message)


# --- keyed PRG and seeds --------------------------------------------------------------------


def expand(seed: bytes, length: int, dtype: np.dtype[np.unsignedinteger]) -> npt.NDArray[np.unsignedinteger]:
    """ChaCha20's keystream under ``seed`` as ``length`` little-endian ring elements."""
    if len(seed) != SEED_SIZE:
        raise LocalProtocolError(ErrorCode.BAD_TYPE, "a mask seed is 32 bytes")
    out = np.zeros(length, dtype=dtype.newbyteorder("<"))
    view = out.view(np.uint8).data
    ChaCha20.new(key=seed, nonce=_NONCE).encrypt(view, output=view)
    return out.astype(dtype, copy=False)


def pair_seed(shared_key: bytes, group_digest: bytes) -> bytes:
    """The pairwise seed of two members: keyed BLAKE2b of the group digest under their shared key.

    The shared key (``crypto_box_beforenm`` of X25519) is symmetric, so both members get the
    same seed; the group digest binds it to the aggregator, round, members and encoding.
    """
    if len(shared_key) != KEY_SIZE:
        raise LocalProtocolError(ErrorCode.BAD_TYPE, "a shared key is 32 bytes")
    return hashlib.blake2b(group_digest, key=shared_key, digest_size=SEED_SIZE, person=_PAIR_PERSON).digest()


def _commit(secret: bytes, person: bytes, group_digest: bytes) -> bytes:
    return hashlib.blake2b(group_digest + secret, digest_size=32, person=person).digest()


# --- the group ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """One aggregator's secure-aggregation group for one round.

    Attributes:
        aggregator: The aggregator's 32-byte Ed25519 public key (not a member).
        round: The round number.
        members: The members' public keys, sorted and unique; Shamir index = position + 1.
        length: Number of coordinates of each vector.
        fixed_point: The encoding every member uses.
        threshold: Shares needed to recover a secret, from a strict majority ``floor(n/2) + 1``
            (0, the default, picks it) up to ``n``. At least a majority: any two sets of
            ``t`` holders then intersect and an honest holder answers one commit, so
            contradicting commits cannot both be served. A lying aggregator with ``c``
            colluding members unmasks someone only if ``c >= 2t - n``; a higher ``t`` raises
            that bar and tolerates fewer dropouts (``n - t``).
        weight_cap: How members weight their vectors, bound into the digest so that every
            member weights under the same rule (a member told another rule masks with other
            seeds, and the sum is noise): ``0`` means weight 1 each; ``W > 0`` means weight
            ``min(n_samples, W) / W``. An aggregator that could name a different rule to each
            member could weight all but one member to zero and read that one's model.
    """

    aggregator: bytes
    round: int
    members: tuple[bytes, ...]
    length: int
    fixed_point: FixedPoint
    threshold: int = 0
    weight_cap: int = 0

    def __post_init__(self) -> None:
        keys = (self.aggregator, *self.members)
        if any(type(k) is not bytes or len(k) != KEY_SIZE for k in keys):
            raise LocalProtocolError(ErrorCode.BAD_TYPE, "member and aggregator keys are 32 bytes")
        if tuple(sorted(set(self.members))) != self.members:
            raise LocalProtocolError(ErrorCode.BAD_TYPE, "members must be sorted and unique")
        if self.aggregator in self.members:
            raise LocalProtocolError(ErrorCode.BAD_TYPE, "the aggregator is not a member of its own group")
        if len(self.members) < MIN_OTHER_MEMBERS:
            raise LocalProtocolError(
                ErrorCode.REFUSED,
                f"a secure-aggregation group needs at least {MIN_OTHER_MEMBERS} members besides the "
                f"aggregator, got {len(self.members)}: the sum of one member is its model",
            )
        if len(self.members) > self.fixed_point.max_members:
            raise LocalProtocolError(ErrorCode.TOO_LARGE, "more members than the encoding has headroom for")
        if self.round < 0 or self.length < 1 or self.weight_cap < 0:
            raise LocalProtocolError(ErrorCode.BAD_TYPE, "round, weight_cap must be >= 0 and length >= 1")
        n = len(self.members)
        if self.threshold == 0:
            object.__setattr__(self, "threshold", n // 2 + 1)
        if not n // 2 + 1 <= self.threshold <= n:
            raise LocalProtocolError(
                ErrorCode.BAD_TYPE,
                f"threshold {self.threshold} of {n}: it must be a strict majority ({n // 2 + 1}) up to {n}",
            )

    @classmethod
    def of(cls, aggregator: bytes, round: int, members: Iterable[bytes], length: int,
           fixed_point: FixedPoint, threshold: int = 0, weight_cap: int = 0) -> Group:
        """A group with ``members`` in canonical (sorted) order."""
        return cls(aggregator, round, tuple(sorted(set(members))), length, fixed_point, threshold, weight_cap)

    def weight(self, n_samples: int) -> float:
        """The weight a member with ``n_samples`` gives its vector under :attr:`weight_cap`."""
        if self.weight_cap == 0:
            return 1.0
        return min(max(n_samples, 0), self.weight_cap) / self.weight_cap

    @property
    def tolerated_colluders(self) -> int:
        """Members that may collude with a lying aggregator without unmasking anyone: ``2t - n - 1``."""
        return 2 * self.threshold - len(self.members) - 1

    @property
    def digest(self) -> bytes:
        """BLAKE2b-256 of the canonical encoding of every field (binds seeds and commits)."""
        fp = self.fixed_point
        h = hashlib.blake2b(digest_size=32, person=_GROUP_PERSON)
        h.update(self.aggregator)
        h.update(struct.pack(">QQBdd", self.round, self.length, fp.bits, fp.scale, fp.clip))
        h.update(struct.pack(">III", fp.max_members, self.threshold, len(self.members)))
        for m in self.members:
            h.update(m)
        if self.weight_cap:  # absent when 0, so groups without a weight rule keep their digest
            h.update(struct.pack(">Q", self.weight_cap))
        return h.digest()

    def index(self, member: bytes) -> int:
        """The Shamir x-coordinate of ``member`` (1-based)."""
        try:
            return self.members.index(member) + 1
        except ValueError:
            raise LocalProtocolError(ErrorCode.BAD_TYPE, "not a member of this group") from None

    def others(self, member: bytes) -> tuple[bytes, ...]:
        """Every member but ``member``, in group order (the order of its pairwise seeds)."""
        return tuple(m for m in self.members if m != member)


# --- shares ---------------------------------------------------------------------------------


def _split(secret: bytes, threshold: int, n: int) -> list[bytes]:
    """Shamir-split ``secret`` (a multiple of 16 bytes) block by block; entry i is holder i+1's."""
    parts = [b""] * n
    for off in range(0, len(secret), _BLOCK):
        for idx, piece in Shamir.split(threshold, n, secret[off:off + _BLOCK]):
            parts[idx - 1] += piece
    return parts


def _combine(shares: Sequence[tuple[int, bytes]], threshold: int, size: int) -> bytes:
    if len(shares) < threshold:
        raise refuse(f"{len(shares)} shares, {threshold} needed")
    chosen = sorted(shares)[:threshold]  # PyCryptodome's combine wants exactly t shares
    if any(len(piece) != size for _, piece in chosen):
        raise refuse("a share has the wrong length")
    return b"".join(
        Shamir.combine([(idx, piece[off:off + _BLOCK]) for idx, piece in chosen])
        for off in range(0, size, _BLOCK)
    )


@dataclass(frozen=True)
class ShareCommitment:
    """What a dealer publishes so that recovered secrets can be checked (hiding: seeds are random)."""

    dealer: bytes
    self_digest: bytes
    pair_digest: bytes


@dataclass(frozen=True)
class Share:
    """The dealer's shares for one holder: of its self-mask seed and of its pairwise seeds.

    ``pair_part`` shares the concatenation of the dealer's pairwise seeds with
    ``group.others(dealer)``, in that order. On the wire it travels encrypted to the holder.
    """

    dealer: bytes
    holder: bytes
    self_part: bytes
    pair_part: bytes


@dataclass(frozen=True)
class Dealing:
    """A member's commitment and one :class:`Share` per member (itself included)."""

    commitment: ShareCommitment
    shares: tuple[Share, ...]


def seal_share(identity: Identity, group: Group, share: Share) -> bytes:
    """Encrypt a share from its dealer to its holder (it travels through the aggregator).

    ``nonce || Box(dealer, holder)`` of ``group.digest || self_part || pair_part``; the nonce
    is random, the group digest inside binds the share to its group.
    """
    if identity.public_key != share.dealer:
        raise LocalProtocolError(ErrorCode.BAD_TYPE, "only the dealer seals its share")
    nonce = secrets.token_bytes(NONCE_SIZE)
    plain = group.digest + share.self_part + share.pair_part
    return nonce + nacl.bindings.crypto_box_easy_afternm(plain, nonce, identity.shared_key(share.holder))


def open_share(identity: Identity, group: Group, dealer: bytes, sealed: bytes) -> Share:
    """Decrypt a share dealt to this member by ``dealer`` in ``group``.

    Raises:
        RemoteProtocolError: DECRYPT_FAILED if it does not authenticate; BAD_TYPE if it is
            for another group or has the wrong length.
    """
    group.index(dealer)
    try:
        plain = nacl.bindings.crypto_box_open_easy_afternm(
            sealed[NONCE_SIZE:], sealed[:NONCE_SIZE], identity.shared_key(dealer)
        )
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise RemoteProtocolError(ErrorCode.DECRYPT_FAILED, "a sealed share does not open") from None
    digest = group.digest
    pair_size = SEED_SIZE * (len(group.members) - 1)
    if len(plain) != len(digest) + SEED_SIZE + pair_size or plain[:len(digest)] != digest:
        raise RemoteProtocolError(ErrorCode.BAD_TYPE, "a sealed share of another group or of the wrong size")
    body = plain[len(digest):]
    return Share(dealer, identity.public_key, body[:SEED_SIZE], body[SEED_SIZE:])


@dataclass(frozen=True)
class Commit:
    """The aggregator's signed statement of which members dealt and whose vectors arrived.

    Attributes:
        group_digest: :attr:`Group.digest`.
        dealers: Members whose shares were forwarded before masking (they mask with each other).
        survivors: Members whose masked vectors arrived (a subset of ``dealers``).
    """

    group_digest: bytes
    dealers: frozenset[bytes]
    survivors: frozenset[bytes]

    @property
    def dropped(self) -> frozenset[bytes]:
        """Dealers whose masked vectors did not arrive."""
        return self.dealers - self.survivors

    @property
    def digest(self) -> bytes:
        """BLAKE2b-256 over the group digest and both sets in canonical order (signed, audited)."""
        h = hashlib.blake2b(self.group_digest, digest_size=32, person=_COMMIT_PERSON)
        for members in (self.dealers, self.survivors):
            h.update(struct.pack(">I", len(members)))
            for m in sorted(members):
                h.update(m)
        return h.digest()


def sign_group(identity: Identity, group: Group) -> bytes:
    """The aggregator's signature naming ``group`` for its round.

    Raises:
        LocalProtocolError: BAD_TYPE if ``identity`` is not the group's aggregator.
    """
    if identity.public_key != group.aggregator:
        raise LocalProtocolError(ErrorCode.BAD_TYPE, "only the aggregator signs its group")
    return identity.sign(GROUP_SIGNING_DOMAIN + group.digest)


def verify_group(group: Group, signature: bytes) -> None:
    """Raises: RemoteProtocolError: BAD_SIGNATURE unless the aggregator signed ``group``."""
    if not verify_signature(group.aggregator, GROUP_SIGNING_DOMAIN + group.digest, signature):
        raise RemoteProtocolError(ErrorCode.BAD_SIGNATURE, "the group is not signed by its aggregator")


def sign_commit(identity: Identity, group: Group, commit: Commit) -> bytes:
    """The aggregator's signature over the set of contributions it received.

    Raises:
        LocalProtocolError: BAD_TYPE if ``identity`` is not the aggregator or the commit is
            for another group.
    """
    if identity.public_key != group.aggregator or commit.group_digest != group.digest:
        raise LocalProtocolError(ErrorCode.BAD_TYPE, "only the aggregator commits, and for its own group")
    return identity.sign(COMMIT_SIGNING_DOMAIN + commit.digest)


def verify_commit(group: Group, commit: Commit, signature: bytes) -> None:
    """Raises: RemoteProtocolError: BAD_SIGNATURE unless the group's aggregator signed ``commit``."""
    if commit.group_digest != group.digest or not verify_signature(
        group.aggregator, COMMIT_SIGNING_DOMAIN + commit.digest, signature
    ):
        raise RemoteProtocolError(ErrorCode.BAD_SIGNATURE, "the commit is not signed by the group's aggregator")


@dataclass(frozen=True)
class Release:
    """One holder's answer to a commit: self-mask shares of survivors, pairwise shares of the dropped."""

    holder: bytes
    group_digest: bytes
    self_parts: Mapping[bytes, bytes] = field(default_factory=dict)
    pair_parts: Mapping[bytes, bytes] = field(default_factory=dict)


def recover_self_seed(group: Group, commitment: ShareCommitment, releases: Sequence[Release]) -> bytes:
    """Rebuild a survivor's self-mask seed from ``threshold`` releases and check it.

    Raises:
        RemoteProtocolError: REFUSED below the threshold or if the result does not match
            the dealer's commitment (a wrong share).
    """
    dealer = commitment.dealer
    shares = [(group.index(r.holder), r.self_parts[dealer]) for r in releases if dealer in r.self_parts]
    seed = _combine(shares, group.threshold, SEED_SIZE)
    if _commit(seed, _SELF_COMMIT_PERSON, group.digest) != commitment.self_digest:
        raise refuse("the recovered self-mask seed does not match its commitment")
    return seed


def recover_pair_seeds(group: Group, commitment: ShareCommitment,
                       releases: Sequence[Release]) -> dict[bytes, bytes]:
    """Rebuild a dropped member's pairwise seeds (other member -> seed) and check them.

    Raises:
        RemoteProtocolError: REFUSED below the threshold or on a commitment mismatch.
    """
    dealer = commitment.dealer
    others = group.others(dealer)
    shares = [(group.index(r.holder), r.pair_parts[dealer]) for r in releases if dealer in r.pair_parts]
    blob = _combine(shares, group.threshold, SEED_SIZE * len(others))
    if _commit(blob, _PAIR_COMMIT_PERSON, group.digest) != commitment.pair_digest:
        raise refuse("the recovered pairwise seeds do not match their commitment")
    return {k: blob[i * SEED_SIZE:(i + 1) * SEED_SIZE] for i, k in enumerate(others)}


# --- member side ----------------------------------------------------------------------------


class Member:
    """One member's part in one group: deal shares, then mask its weighted vector once.

    Args:
        identity: The member's identity (its X25519 key gives the pairwise secrets).
        group: The group the aggregator announced (checked by the caller's signature check).
        self_seed: The self-mask seed; fresh random by default (tests pass one to be reproducible).
    """

    def __init__(self, identity: Identity, group: Group, self_seed: bytes | None = None) -> None:
        self.me = identity.public_key
        self.group = group
        group.index(self.me)  # raises if not a member
        self._self_seed = secrets.token_bytes(SEED_SIZE) if self_seed is None else self_seed
        if len(self._self_seed) != SEED_SIZE:
            raise LocalProtocolError(ErrorCode.BAD_TYPE, "a self-mask seed is 32 bytes")
        digest = group.digest
        self._pair_seeds = {k: pair_seed(identity.shared_key(k), digest) for k in group.others(self.me)}
        self._masked = False

    def pair_seed(self, other: bytes) -> bytes:
        """The seed this member shares with ``other`` in this group."""
        return self._pair_seeds[other]

    def deal(self) -> Dealing:
        """Shamir shares of the self-mask seed and of the pairwise seeds, one per member."""
        group, n, t = self.group, len(self.group.members), self.group.threshold
        blob = b"".join(self._pair_seeds[k] for k in group.others(self.me))
        self_parts, pair_parts = _split(self._self_seed, t, n), _split(blob, t, n)
        commitment = ShareCommitment(
            dealer=self.me,
            self_digest=_commit(self._self_seed, _SELF_COMMIT_PERSON, group.digest),
            pair_digest=_commit(blob, _PAIR_COMMIT_PERSON, group.digest),
        )
        shares = tuple(Share(self.me, holder, self_parts[i], pair_parts[i]) for i, holder in enumerate(group.members))
        return Dealing(commitment, shares)

    def mask(self, values: npt.ArrayLike, weight: float, dealers: Iterable[bytes] | None = None
             ) -> npt.NDArray[np.unsignedinteger]:
        """``encode(values, weight) + PRG(b) + sum_k ±PRG(s_k)`` over the members who dealt.

        Only once per group: a second vector under the same masks would reveal differences.

        Raises:
            LocalProtocolError: if called twice, if the length is wrong, or if this member
                is not among ``dealers``.
        """
        if self._masked:
            raise LocalProtocolError(ErrorCode.REFUSED, "this member already masked a vector for this group")
        group = self.group
        peers = set(group.members if dealers is None else dealers)
        if self.me not in peers or not peers <= set(group.members):
            raise LocalProtocolError(ErrorCode.BAD_TYPE, "dealers must be members and include this member")
        fp = group.fixed_point
        y = fp.encode(values, weight)
        if y.size != group.length:
            raise LocalProtocolError(ErrorCode.BAD_SHAPE, f"{y.size} values, the group expects {group.length}")
        y += expand(self._self_seed, group.length, fp.dtype)
        for k in group.others(self.me):
            if k in peers:
                if self.me < k:
                    y += expand(self._pair_seeds[k], group.length, fp.dtype)
                else:
                    y -= expand(self._pair_seeds[k], group.length, fp.dtype)
        self._masked = True
        return y


# --- aggregator side ------------------------------------------------------------------------


def unmask(group: Group, commit: Commit, masked: Mapping[bytes, npt.NDArray[np.unsignedinteger]],
           commitments: Mapping[bytes, ShareCommitment], releases: Sequence[Release]
           ) -> npt.NDArray[np.float64]:
    """The decoded sum ``sum_{j in survivors} w_j * clip(x_j)`` (within the encoding's bound).

    Raises:
        RemoteProtocolError: REFUSED if vectors are missing or extra, if fewer than
            ``threshold`` releases answer, or if a recovered secret fails its commitment.
    """
    if commit.group_digest != group.digest or set(masked) != commit.survivors:
        raise refuse("the masked vectors are not those of the committed survivors")
    if not commit.survivors <= commit.dealers <= set(group.members):
        raise refuse("inconsistent commit")
    by_holder: dict[bytes, Release] = {}
    for r in releases:
        if r.group_digest == group.digest and r.holder in commit.survivors:
            by_holder.setdefault(r.holder, r)
    releases = list(by_holder.values())
    fp = group.fixed_point
    total = np.zeros(group.length, dtype=fp.dtype)
    for j in sorted(commit.survivors):
        vector = np.asarray(masked[j])
        if vector.dtype != fp.dtype or vector.shape != (group.length,):
            raise refuse("a masked vector has the wrong dtype or length")
        total += vector
        total -= expand(recover_self_seed(group, commitments[j], releases), group.length, fp.dtype)
    for k in sorted(commit.dropped):
        seeds = recover_pair_seeds(group, commitments[k], releases)
        for j in sorted(commit.survivors):
            stream = expand(seeds[j], group.length, fp.dtype)
            if j < k:  # j added the pair's mask, k would have subtracted it
                total -= stream
            else:
                total += stream
    return fp.decode(total)
