"""The common part of every exchange message: its kind, routing fields and validation.

:class:`Message` and :class:`TensorMessage` are the base classes of the concrete messages in
:mod:`.messages` and :mod:`.secagg_messages`; they live here so that both modules can build
on them without importing each other.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np

from .codec import Codec
from .errors import ErrorCode, LocalProtocolError
from .limits import DIGEST_SIZE, KEY_SIZE, PROTOCOL_VERSION
from .wire import (
    check_bytes,
    check_federation,
    check_float,
    check_keys,
    check_optional_bytes,
    check_str,
    check_uint,
)

__all__ = ["MAX_LABEL", "MAX_METRICS", "MAX_TEXT", "Kind", "Message", "TensorMessage"]

MAX_TEXT = 1024
"""Longest free-text field (UTF-8 bytes)."""
MAX_LABEL = 128
"""Longest agent/model label (UTF-8 bytes)."""
MAX_METRICS = 64
"""Most entries in a metrics map (update, train-result)."""


class Kind(enum.StrEnum):
    """Message kinds as they appear in the ``kind`` field."""

    HELLO = "hello"
    UPDATE = "update"
    TRAIN_REQUEST = "train-request"
    TRAIN_RESULT = "train-result"
    NEED_BASE = "need-base"
    ACK = "ack"
    ERROR = "error"
    ANNOUNCE = "announce"
    # secure aggregation (classes in :mod:`.secagg_messages`)
    SECAGG_GROUP = "secagg-group"
    SECAGG_DEAL = "secagg-deal"
    SECAGG_SHARES = "secagg-shares"
    SECAGG_MASKED = "secagg-masked"
    SECAGG_COMMIT = "secagg-commit"
    SECAGG_RELEASE = "secagg-release"


def _check_reply_to(value: object) -> int | None:
    return None if value is None else check_uint("reply_to", value)


def _check_metrics(value: object, *, decoded: bool = False) -> Mapping[str, float]:
    """Validate a metrics map (name -> finite float); return a read-only ``float`` copy.

    Shared by every message with a ``metrics`` field (update, train-result). Checks, in
    this order: a map of at most 64 entries (``BAD_TYPE``), then each entry in order:
    the name is a str of at most 128 UTF-8 bytes (``BAD_TYPE`` / ``TOO_LARGE``), the
    value is a float (``BAD_TYPE``) and finite (``BAD_TYPE``).

    Args:
        value: The map to check.
        decoded: True for a map decoded from the wire, whose values must be msgpack
            floats exactly (an integer, even 3, is ``BAD_TYPE``). Local callers may also
            pass any mapping with ``int`` or numpy floating values, normalised to
            ``float`` (so the encoder always writes ``float 64``).

    Raises:
        LocalProtocolError: ``BAD_TYPE`` (or ``TOO_LARGE`` for an overlong name).
    """
    if decoded and type(value) is not dict:
        raise LocalProtocolError(ErrorCode.BAD_TYPE, "metrics must be a map")
    if not isinstance(value, Mapping) or len(value) > MAX_METRICS:
        raise LocalProtocolError(ErrorCode.BAD_TYPE, f"metrics: a map of <= {MAX_METRICS}")
    clean: dict[str, float] = {}
    for key, item in value.items():
        check_str("metric name", key, MAX_LABEL)
        if decoded and type(item) is not float:
            raise LocalProtocolError(ErrorCode.BAD_TYPE, f"metric {key!r} must be a float")
        if isinstance(item, bool) or not isinstance(item, int | float | np.floating):
            raise LocalProtocolError(ErrorCode.BAD_TYPE, f"metric {key!r} must be a float")
        clean[key] = check_float(f"metric {key!r}", float(item))
    return MappingProxyType(clean)


@dataclass(frozen=True, kw_only=True)
class Message:
    """Fields common to every exchange message.

    Attributes:
        federation: Federation id (``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``).
        sender: Sender's raw 32-byte Ed25519 public key.
        recipient: Recipient's raw 32-byte Ed25519 public key.
        round: The sender's round number.
        sequence: The sender's message counter; (sender, round, sequence) is unique.
        version: Protocol version (only 2 is spoken).
    """

    kind: ClassVar[Kind]
    BODY_KEYS: ClassVar[tuple[str, ...]] = ()

    federation: str
    sender: bytes
    recipient: bytes
    round: int
    sequence: int
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if type(self.version) is not int or self.version != PROTOCOL_VERSION:
            raise LocalProtocolError(ErrorCode.UNKNOWN_VERSION, f"version {self.version!r}")
        check_federation(self.federation)
        check_bytes("sender", self.sender, KEY_SIZE)
        check_bytes("recipient", self.recipient, KEY_SIZE)
        check_uint("round", self.round)
        check_uint("sequence", self.sequence)

    def body(self) -> dict[str, Any]:
        """The kind-specific fields as a msgpack-ready map (tensors excluded)."""
        raise NotImplementedError

    @classmethod
    def from_body(cls, routing: Mapping[str, Any], body: Mapping[str, Any]) -> Message:
        """Build from routing fields and a decoded body map (tensors already decoded).

        Raises:
            LocalProtocolError: If any field is missing, extra, or invalid.
        """
        check_keys(cls.kind.value, body, cls.BODY_KEYS)
        return cls(**routing, **cls._body_kwargs(body))

    @classmethod
    def _body_kwargs(cls, body: Mapping[str, Any]) -> dict[str, Any]:
        return dict(body)


@dataclass(frozen=True, kw_only=True, eq=False)
class TensorMessage(Message):
    """A message carrying a state dict (full snapshot or delta).

    Attributes:
        tensors: name -> numpy array. A delta if ``base_digest`` is set, else a
            full snapshot (keyframe).
        base_digest: :func:`~.state.state_digest` of the base the delta applies to.
        codec: How floating tensors are encoded (float32, float16, int8, int4, topk).
    """

    tensors: Mapping[str, np.ndarray]
    base_digest: bytes | None = None
    codec: Codec = Codec.FLOAT32

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.tensors, Mapping):
            raise LocalProtocolError(ErrorCode.BAD_TYPE, "tensors must be a mapping")
        for name, arr in self.tensors.items():
            if type(name) is not str or not isinstance(arr, np.ndarray):
                raise LocalProtocolError(ErrorCode.BAD_TYPE, "tensors must map str -> ndarray")
        check_optional_bytes("base_digest", self.base_digest, DIGEST_SIZE)
        try:
            codec = Codec(self.codec)
        except ValueError:
            raise LocalProtocolError(ErrorCode.BAD_TYPE, f"unknown codec {self.codec!r}") from None
        if codec is Codec.NONE:
            raise LocalProtocolError(ErrorCode.BAD_TYPE, "tensor messages need a tensor codec")
        object.__setattr__(self, "codec", codec)
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))

    def __eq__(self, other: object) -> bool:
        """Equal if same class, same fields and bit-identical tensors (same dtypes)."""
        if other.__class__ is not self.__class__ or not isinstance(other, TensorMessage):
            return NotImplemented
        for f in fields(self):
            if f.name != "tensors" and getattr(self, f.name) != getattr(other, f.name):
                return False
        if self.tensors.keys() != other.tensors.keys():
            return False
        return all(
            a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
            for a, b in ((self.tensors[k], other.tensors[k]) for k in self.tensors)
        )

    __hash__ = None  # type: ignore[assignment]  # holds arrays: not hashable

    @property
    def is_delta(self) -> bool:
        """True for a delta against ``base_digest``, False for a full snapshot."""
        return self.base_digest is not None


