"""Exchange messages: frozen dataclasses that validate themselves.

Every message carries the routing fields (version, federation, sender, recipient,
round, sequence); the envelope copies them into its signed header. Kind-specific
fields travel in the encrypted payload's msgpack *body*; tensor-carrying messages
(update, train-request, train-result) also carry a tensor table and blob (see
:mod:`.codec`).

Constructing an invalid message raises :class:`LocalProtocolError`; decoding one from
the wire raises :class:`RemoteProtocolError` with the same code.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np

from .codec import Codec
from .errors import ErrorCode, LocalProtocolError
from .limits import (
    DEFAULT_MAX_FRAME_SIZE,
    DIGEST_SIZE,
    KEY_SIZE,
    MAX_FRAME_SIZE_CEILING,
    PROTOCOL_VERSION,
)
from .wire import (
    check_bytes,
    check_federation,
    check_float,
    check_keys,
    check_optional_bytes,
    check_str,
    check_uint,
)

__all__ = [
    "MESSAGE_TYPES",
    "Ack",
    "ErrorMessage",
    "Hello",
    "Kind",
    "Message",
    "NeedBase",
    "TensorMessage",
    "TrainRequest",
    "TrainResult",
    "Update",
]

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


@dataclass(frozen=True, kw_only=True)
class Hello(Message):
    """First message each way on an exchange stream.

    Attributes:
        agent: Software name/version.
        model: Model/task identifier both sides must share ("" if unknown).
        state_digest: The state digest of the base the sender holds *from the
            recipient* (the last state it accepted from it), None if none.
        codecs: Codecs the sender can decode.
        max_frame_size: Largest frame the sender accepts.
    """

    kind: ClassVar[Kind] = Kind.HELLO
    BODY_KEYS: ClassVar[tuple[str, ...]] = (
        "agent",
        "model",
        "state_digest",
        "codecs",
        "max_frame_size",
    )

    agent: str = "silomesh/0.1"
    model: str = ""
    state_digest: bytes | None = None
    codecs: tuple[str, ...] = ("float32", "float16", "int8")
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE

    def __post_init__(self) -> None:
        super().__post_init__()
        check_str("agent", self.agent, MAX_LABEL)
        check_str("model", self.model, MAX_LABEL)
        check_optional_bytes("state_digest", self.state_digest, DIGEST_SIZE)
        if type(self.codecs) is not tuple or not 1 <= len(self.codecs) <= 8:
            raise LocalProtocolError(ErrorCode.BAD_TYPE, "codecs must be a tuple of 1-8 codecs")
        for c in self.codecs:
            if not isinstance(c, str) or c not in (Codec.FLOAT32, Codec.FLOAT16, Codec.INT8):
                raise LocalProtocolError(ErrorCode.BAD_TYPE, f"unknown codec {c!r}")
        object.__setattr__(self, "codecs", tuple(str(Codec(c).value) for c in self.codecs))
        check_uint("max_frame_size", self.max_frame_size, MAX_FRAME_SIZE_CEILING)

    def body(self) -> dict[str, Any]:
        return {
            "agent": self.agent,
            "model": self.model,
            "state_digest": self.state_digest,
            "codecs": list(self.codecs),
            "max_frame_size": self.max_frame_size,
        }

    @classmethod
    def _body_kwargs(cls, body: Mapping[str, Any]) -> dict[str, Any]:
        kwargs = dict(body)
        if type(kwargs["codecs"]) is not list:
            raise LocalProtocolError(ErrorCode.BAD_TYPE, "codecs must be an array")
        kwargs["codecs"] = tuple(kwargs["codecs"])
        return kwargs


@dataclass(frozen=True, kw_only=True, eq=False)
class TensorMessage(Message):
    """A message carrying a state dict (full snapshot or delta).

    Attributes:
        tensors: name -> numpy array. A delta if ``base_digest`` is set, else a
            full snapshot (keyframe).
        base_digest: :func:`~.state.state_digest` of the base the delta applies to.
        codec: How floating tensors are encoded (float32, float16, int8).
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


@dataclass(frozen=True, kw_only=True, eq=False)
class Update(TensorMessage):
    """A model update: a delta against ``base_digest`` or a full snapshot.

    Attributes:
        n_samples: Training samples behind this model (weight for averaging).
        state_digest: Digest of the full state this update produces at the receiver
            (the snapshot as decoded, or base + decoded delta); required, the receiver
            checks it (``STATE_MISMATCH``).
        metrics: name -> finite float (at most 64 entries), e.g. ``loss`` (FedMix
            weighting) or ``degree`` (Metropolis averaging).
    """

    kind: ClassVar[Kind] = Kind.UPDATE
    BODY_KEYS: ClassVar[tuple[str, ...]] = ("n_samples", "state_digest", "metrics")

    state_digest: bytes
    n_samples: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_uint("n_samples", self.n_samples)
        check_bytes("state_digest", self.state_digest, DIGEST_SIZE)
        object.__setattr__(self, "metrics", _check_metrics(self.metrics))

    def body(self) -> dict[str, Any]:
        return {
            "n_samples": self.n_samples,
            "state_digest": self.state_digest,
            "metrics": dict(self.metrics),
        }

    @classmethod
    def _body_kwargs(cls, body: Mapping[str, Any]) -> dict[str, Any]:
        return {**body, "metrics": _check_metrics(body["metrics"], decoded=True)}


@dataclass(frozen=True, kw_only=True, eq=False)
class TrainRequest(TensorMessage):
    """FedEFM: "here is my model, train it on your data".

    Attributes:
        epochs: Local epochs requested (1-10000).
        deadline_ms: Unix time (ms) after which the result is useless; 0 = none.
    """

    kind: ClassVar[Kind] = Kind.TRAIN_REQUEST
    BODY_KEYS: ClassVar[tuple[str, ...]] = ("epochs", "deadline_ms")

    epochs: int = 1
    deadline_ms: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_uint("epochs", self.epochs, 10_000)
        if self.epochs < 1:
            raise LocalProtocolError(ErrorCode.BAD_TYPE, "epochs must be >= 1")
        check_uint("deadline_ms", self.deadline_ms)

    def body(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "deadline_ms": self.deadline_ms}


@dataclass(frozen=True, kw_only=True, eq=False)
class TrainResult(TensorMessage):
    """FedEFM: the copy trained on the recipient's data, returned to its owner.

    Attributes:
        request_sequence: ``sequence`` of the train-request this answers.
        n_samples: Samples it was trained on.
        metrics: name -> finite float (at most 64 entries).
    """

    kind: ClassVar[Kind] = Kind.TRAIN_RESULT
    BODY_KEYS: ClassVar[tuple[str, ...]] = ("request_sequence", "n_samples", "metrics")

    request_sequence: int
    n_samples: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_uint("request_sequence", self.request_sequence)
        check_uint("n_samples", self.n_samples)
        object.__setattr__(self, "metrics", _check_metrics(self.metrics))

    def body(self) -> dict[str, Any]:
        return {
            "request_sequence": self.request_sequence,
            "n_samples": self.n_samples,
            "metrics": dict(self.metrics),
        }

    @classmethod
    def _body_kwargs(cls, body: Mapping[str, Any]) -> dict[str, Any]:
        return {**body, "metrics": _check_metrics(body["metrics"], decoded=True)}


@dataclass(frozen=True, kw_only=True)
class NeedBase(Message):
    """Ask for a full snapshot (keyframe) because a base digest is unknown.

    Attributes:
        unknown_base: The base digest the sender lacks (None: just send your model).
        reply_to: ``sequence`` of the delta that could not be applied, if any.
    """

    kind: ClassVar[Kind] = Kind.NEED_BASE
    BODY_KEYS: ClassVar[tuple[str, ...]] = ("unknown_base", "reply_to")

    unknown_base: bytes | None = None
    reply_to: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_optional_bytes("unknown_base", self.unknown_base, DIGEST_SIZE)
        _check_reply_to(self.reply_to)

    def body(self) -> dict[str, Any]:
        return {"unknown_base": self.unknown_base, "reply_to": self.reply_to}


@dataclass(frozen=True, kw_only=True)
class Ack(Message):
    """Positive acknowledgement of the message with sequence ``reply_to``."""

    kind: ClassVar[Kind] = Kind.ACK
    BODY_KEYS: ClassVar[tuple[str, ...]] = ("reply_to", "note")

    reply_to: int
    note: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_uint("reply_to", self.reply_to)
        check_str("note", self.note, MAX_TEXT)

    def body(self) -> dict[str, Any]:
        return {"reply_to": self.reply_to, "note": self.note}


@dataclass(frozen=True, kw_only=True)
class ErrorMessage(Message):
    """Refusal of a message, with a reason code (kind ``error``).

    Attributes:
        code: Why, as an :class:`ErrorCode`.
        message: Human-readable detail (<= 1024 UTF-8 bytes).
        reply_to: ``sequence`` of the refused message, if known.
    """

    kind: ClassVar[Kind] = Kind.ERROR
    BODY_KEYS: ClassVar[tuple[str, ...]] = ("code", "message", "reply_to")

    code: ErrorCode
    message: str = ""
    reply_to: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            code = ErrorCode(self.code)
        except ValueError:
            raise LocalProtocolError(
                ErrorCode.BAD_TYPE, f"unknown error code {self.code!r}"
            ) from None
        object.__setattr__(self, "code", code)
        check_str("message", self.message, MAX_TEXT)
        _check_reply_to(self.reply_to)

    def body(self) -> dict[str, Any]:
        return {"code": self.code.value, "message": self.message, "reply_to": self.reply_to}

    @classmethod
    def _body_kwargs(cls, body: Mapping[str, Any]) -> dict[str, Any]:
        if type(body["code"]) is not str:
            raise LocalProtocolError(ErrorCode.BAD_TYPE, "code must be a str")
        return dict(body)


MESSAGE_TYPES: dict[Kind, type[Message]] = {
    cls.kind: cls for cls in (Hello, Update, TrainRequest, TrainResult, NeedBase, Ack, ErrorMessage)
}
"""Envelope message kinds -> class (announces travel separately, see :mod:`.announce`)."""
