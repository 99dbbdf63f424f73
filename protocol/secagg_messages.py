"""The six secure-aggregation messages (PROTOCOL.md section 9a): three request/reply pairs.

Aggregator *i* dials each member *j* of its round's group and asks, on one stream or
several:

====================  ====================  ===============================================
i sends (dialer)      j answers (listener)  what travels
====================  ====================  ===============================================
``secagg-group``      ``secagg-deal``       the signed group; j's share commitments and
                                            one Box-sealed share per holder
``secagg-shares``     ``secagg-masked``     the dealers and the shares sealed for j; j's
                                            masked ring vector (a tensor message)
``secagg-commit``     ``secagg-release``    the signed set of survivors; j's released shares
====================  ====================  ===============================================

Either request may also be answered with ``error``. Keys are raw 32-byte Ed25519 public
keys; maps keyed by a member travel as arrays of ``[key, value]`` pairs in canonical
(sorted, unique) order. The masked vector travels as the single tensor ``masked``: the ring
elements reinterpreted as ``int32`` or ``int64`` (two's complement, little-endian), since
the wire's dtypes are signed; the receiver views them back as unsigned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from .errors import ErrorCode, LocalProtocolError
from .fixedpoint import FixedPoint
from .limits import DIGEST_SIZE, KEY_SIZE, SIGNATURE_SIZE
from .message_base import Kind, Message, TensorMessage
from .secagg import Commit, Group, Release, ShareCommitment
from .wire import check_bytes, check_float, check_uint

__all__ = [
    "MASKED_TENSOR",
    "MAX_GROUP_MEMBERS",
    "MAX_SEALED_SHARE",
    "SECAGG_MESSAGES",
    "SecaggCommit",
    "SecaggDeal",
    "SecaggGroup",
    "SecaggMasked",
    "SecaggRelease",
    "SecaggShares",
]

MAX_GROUP_MEMBERS = 256
"""Most members one group may name (and so most entries in any member-keyed list)."""
MAX_SEALED_SHARE = 24 + 16 + 32 + 32 * MAX_GROUP_MEMBERS
"""Largest sealed share: nonce, MAC, group digest, self seed share, pairwise seeds' share."""
MAX_SHARE_PART = 32 * MAX_GROUP_MEMBERS
"""Largest released share part (the pairwise part of a member of the largest group)."""
MASKED_TENSOR = "masked"
"""The one tensor name of ``secagg-masked``."""

_RING: dict[int, np.dtype[np.signedinteger]] = {32: np.dtype("<i4"), 64: np.dtype("<i8")}


def _keys(name: str, value: object) -> tuple[bytes, ...]:
    """A canonical (sorted, unique) tuple of 32-byte keys, at most MAX_GROUP_MEMBERS."""
    if not isinstance(value, tuple | list) or len(value) > MAX_GROUP_MEMBERS:
        raise LocalProtocolError(ErrorCode.BAD_TYPE, f"{name}: an array of <= {MAX_GROUP_MEMBERS} keys")
    keys = tuple(check_bytes(f"{name} entry", k, KEY_SIZE) for k in value)
    if list(keys) != sorted(set(keys)):
        raise LocalProtocolError(ErrorCode.BAD_TYPE, f"{name}: keys must be sorted and unique")
    return keys


def _pairs(name: str, value: object, max_size: int) -> tuple[tuple[bytes, bytes], ...]:
    """Canonical ``[key, bytes]`` pairs (sorted by unique key), values of at most ``max_size`` bytes."""
    if isinstance(value, Mapping):
        value = sorted(value.items())
    if not isinstance(value, tuple | list) or len(value) > MAX_GROUP_MEMBERS:
        raise LocalProtocolError(ErrorCode.BAD_TYPE, f"{name}: an array of <= {MAX_GROUP_MEMBERS} pairs")
    out = []
    for pair in value:
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise LocalProtocolError(ErrorCode.BAD_TYPE, f"{name}: entries are [key, bytes] pairs")
        key, blob = pair
        check_bytes(f"{name} key", key, KEY_SIZE)
        if type(blob) is not bytes or len(blob) > max_size:
            raise LocalProtocolError(ErrorCode.BAD_TYPE, f"{name}: values are bytes of <= {max_size}")
        out.append((key, blob))
    if [k for k, _ in out] != sorted({k for k, _ in out}):
        raise LocalProtocolError(ErrorCode.BAD_TYPE, f"{name}: keys must be sorted and unique")
    return tuple(out)


def _wire_pairs(pairs: Sequence[tuple[bytes, bytes]]) -> list[list[bytes]]:
    return [[k, v] for k, v in pairs]


@dataclass(frozen=True, kw_only=True)
class SecaggGroup(Message):
    """The aggregator names its round's group (the round is the routing ``round``).

    Attributes:
        members: The members' keys, sorted and unique (the aggregator, the sender, is none).
        length, bits, scale, clip, max_members, threshold, weight_cap: the
            :class:`~.secagg.Group` and its :class:`~.fixedpoint.FixedPoint`.
        signature: :func:`~.secagg.sign_group` by the sender.
    """

    kind: ClassVar[Kind] = Kind.SECAGG_GROUP
    BODY_KEYS: ClassVar[tuple[str, ...]] = (
        "members", "length", "bits", "scale", "clip", "max_members", "threshold", "weight_cap", "signature",
    )

    members: tuple[bytes, ...]
    length: int
    bits: int
    scale: float
    clip: float
    max_members: int
    threshold: int
    weight_cap: int
    signature: bytes

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "members", _keys("members", self.members))
        check_uint("length", self.length, 2**40)
        check_uint("bits", self.bits, 64)
        check_float("scale", self.scale)
        check_float("clip", self.clip)
        check_uint("max_members", self.max_members, MAX_GROUP_MEMBERS)
        check_uint("threshold", self.threshold, MAX_GROUP_MEMBERS)
        check_uint("weight_cap", self.weight_cap)
        check_bytes("signature", self.signature, SIGNATURE_SIZE)

    @classmethod
    def of(cls, group: Group, signature: bytes, **routing: Any) -> SecaggGroup:
        """The message naming ``group`` (``routing``: federation, recipient, sequence...)."""
        fp = group.fixed_point
        return cls(**routing, members=group.members, length=group.length, bits=fp.bits, scale=fp.scale,
                   clip=fp.clip, max_members=fp.max_members, threshold=group.threshold,
                   weight_cap=group.weight_cap, signature=signature)

    def group(self) -> Group:
        """The group this message names, its aggregator being the sender.

        Raises:
            LocalProtocolError: if the fields do not make a valid group (decoding turns it
                into a remote error).
        """
        fp = FixedPoint(bits=self.bits, scale=self.scale, clip=self.clip, max_members=self.max_members)
        return Group(self.sender, self.round, self.members, self.length, fp, self.threshold, self.weight_cap)

    def body(self) -> dict[str, Any]:
        return {
            "members": list(self.members), "length": self.length, "bits": self.bits, "scale": self.scale,
            "clip": self.clip, "max_members": self.max_members, "threshold": self.threshold,
            "weight_cap": self.weight_cap, "signature": self.signature,
        }


@dataclass(frozen=True, kw_only=True)
class SecaggDeal(Message):
    """A member's shares: commitments to its secrets and one sealed share per holder.

    Attributes:
        group_digest: :attr:`~.secagg.Group.digest` of the group it joined.
        self_digest, pair_digest: its :class:`~.secagg.ShareCommitment`.
        sealed: holder -> :func:`~.secagg.seal_share` output, one per member (itself too).
    """

    kind: ClassVar[Kind] = Kind.SECAGG_DEAL
    BODY_KEYS: ClassVar[tuple[str, ...]] = ("group_digest", "self_digest", "pair_digest", "sealed")

    group_digest: bytes
    self_digest: bytes
    pair_digest: bytes
    sealed: tuple[tuple[bytes, bytes], ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("group_digest", "self_digest", "pair_digest"):
            check_bytes(name, getattr(self, name), DIGEST_SIZE)
        object.__setattr__(self, "sealed", _pairs("sealed", self.sealed, MAX_SEALED_SHARE))

    @property
    def commitment(self) -> ShareCommitment:
        """The dealer's commitment (the dealer is the sender)."""
        return ShareCommitment(self.sender, self.self_digest, self.pair_digest)

    def body(self) -> dict[str, Any]:
        return {"group_digest": self.group_digest, "self_digest": self.self_digest,
                "pair_digest": self.pair_digest, "sealed": _wire_pairs(self.sealed)}


@dataclass(frozen=True, kw_only=True)
class SecaggShares(Message):
    """The aggregator forwards to a member the shares dealt to it, and says who dealt.

    Attributes:
        group_digest: The group.
        dealers: Every member whose deal arrived (the members mask with each other only).
        sealed: dealer -> the share it sealed for the recipient.
    """

    kind: ClassVar[Kind] = Kind.SECAGG_SHARES
    BODY_KEYS: ClassVar[tuple[str, ...]] = ("group_digest", "dealers", "sealed")

    group_digest: bytes
    dealers: tuple[bytes, ...]
    sealed: tuple[tuple[bytes, bytes], ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bytes("group_digest", self.group_digest, DIGEST_SIZE)
        object.__setattr__(self, "dealers", _keys("dealers", self.dealers))
        object.__setattr__(self, "sealed", _pairs("sealed", self.sealed, MAX_SEALED_SHARE))

    def body(self) -> dict[str, Any]:
        return {"group_digest": self.group_digest, "dealers": list(self.dealers),
                "sealed": _wire_pairs(self.sealed)}


@dataclass(frozen=True, kw_only=True, eq=False)
class SecaggMasked(TensorMessage):
    """A member's masked vector: ``tensors == {"masked": ring elements as int32/int64}``.

    Attributes:
        group_digest: The group.
        n_samples: The member's sample count as it weighted its vector (at most the group's
            ``weight_cap`` when that is set); the aggregator divides the sum by the total.
    """

    kind: ClassVar[Kind] = Kind.SECAGG_MASKED
    BODY_KEYS: ClassVar[tuple[str, ...]] = ("group_digest", "n_samples")

    group_digest: bytes
    n_samples: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bytes("group_digest", self.group_digest, DIGEST_SIZE)
        check_uint("n_samples", self.n_samples)
        if self.base_digest is not None:
            raise LocalProtocolError(ErrorCode.BAD_TYPE, "a masked vector is never a delta")
        arr = self.tensors.get(MASKED_TENSOR)
        if set(self.tensors) != {MASKED_TENSOR} or arr is None or arr.ndim != 1 or arr.dtype.kind != "i" \
                or arr.dtype.itemsize not in (4, 8):
            raise LocalProtocolError(ErrorCode.BAD_TYPE, "secagg-masked carries one 1-D int32/int64 tensor 'masked'")

    @classmethod
    def of(cls, ring: npt.NDArray[np.unsignedinteger], **fields: Any) -> SecaggMasked:
        """The message carrying the ring vector ``ring`` (uint32 or uint64)."""
        signed = _RING[8 * ring.dtype.itemsize]
        return cls(**fields, tensors={MASKED_TENSOR: np.ascontiguousarray(ring).view(signed)})

    @property
    def ring(self) -> npt.NDArray[np.unsignedinteger]:
        """The masked vector as unsigned ring elements."""
        arr = np.ascontiguousarray(self.tensors[MASKED_TENSOR])
        ring: np.dtype[np.unsignedinteger] = np.dtype(np.uint64) if arr.dtype.itemsize == 8 else np.dtype(np.uint32)
        return arr.view(ring)

    def body(self) -> dict[str, Any]:
        return {"group_digest": self.group_digest, "n_samples": self.n_samples}


@dataclass(frozen=True, kw_only=True)
class SecaggCommit(Message):
    """The aggregator's signed statement of who dealt and whose masked vectors arrived.

    Attributes:
        group_digest, dealers, survivors: the :class:`~.secagg.Commit`.
        signature: :func:`~.secagg.sign_commit` by the sender.
    """

    kind: ClassVar[Kind] = Kind.SECAGG_COMMIT
    BODY_KEYS: ClassVar[tuple[str, ...]] = ("group_digest", "dealers", "survivors", "signature")

    group_digest: bytes
    dealers: tuple[bytes, ...]
    survivors: tuple[bytes, ...]
    signature: bytes

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bytes("group_digest", self.group_digest, DIGEST_SIZE)
        object.__setattr__(self, "dealers", _keys("dealers", self.dealers))
        object.__setattr__(self, "survivors", _keys("survivors", self.survivors))
        check_bytes("signature", self.signature, SIGNATURE_SIZE)

    @classmethod
    def of(cls, commit: Commit, signature: bytes, **routing: Any) -> SecaggCommit:
        return cls(**routing, group_digest=commit.group_digest, dealers=tuple(sorted(commit.dealers)),
                   survivors=tuple(sorted(commit.survivors)), signature=signature)

    @property
    def commit(self) -> Commit:
        return Commit(self.group_digest, frozenset(self.dealers), frozenset(self.survivors))

    def body(self) -> dict[str, Any]:
        return {"group_digest": self.group_digest, "dealers": list(self.dealers),
                "survivors": list(self.survivors), "signature": self.signature}


@dataclass(frozen=True, kw_only=True)
class SecaggRelease(Message):
    """A survivor's answer to a commit: self-mask shares of survivors, pairwise shares of the dropped.

    Attributes:
        group_digest: The group.
        self_parts: survivor -> the sender's share of its self-mask seed.
        pair_parts: dropped member -> the sender's share of its pairwise seeds.
    """

    kind: ClassVar[Kind] = Kind.SECAGG_RELEASE
    BODY_KEYS: ClassVar[tuple[str, ...]] = ("group_digest", "self_parts", "pair_parts")

    group_digest: bytes
    self_parts: tuple[tuple[bytes, bytes], ...] = field(default=())
    pair_parts: tuple[tuple[bytes, bytes], ...] = field(default=())

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bytes("group_digest", self.group_digest, DIGEST_SIZE)
        object.__setattr__(self, "self_parts", _pairs("self_parts", self.self_parts, MAX_SHARE_PART))
        object.__setattr__(self, "pair_parts", _pairs("pair_parts", self.pair_parts, MAX_SHARE_PART))
        if {k for k, _ in self.self_parts} & {k for k, _ in self.pair_parts}:
            raise LocalProtocolError(ErrorCode.BAD_TYPE, "a release never holds both kinds of share of one member")

    @classmethod
    def of(cls, release: Release, **routing: Any) -> SecaggRelease:
        return cls(**routing, group_digest=release.group_digest, self_parts=tuple(sorted(release.self_parts.items())),
                   pair_parts=tuple(sorted(release.pair_parts.items())))

    @property
    def release(self) -> Release:
        """The core's :class:`~.secagg.Release` (the holder is the sender)."""
        return Release(self.sender, self.group_digest, dict(self.self_parts), dict(self.pair_parts))

    def body(self) -> dict[str, Any]:
        return {"group_digest": self.group_digest, "self_parts": _wire_pairs(self.self_parts),
                "pair_parts": _wire_pairs(self.pair_parts)}


SECAGG_MESSAGES: tuple[type[Message], ...] = (
    SecaggGroup, SecaggDeal, SecaggShares, SecaggMasked, SecaggCommit, SecaggRelease,
)
"""Registered in :data:`~.messages.MESSAGE_TYPES`."""
