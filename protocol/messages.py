"""Exchange messages: frozen dataclasses that validate themselves.

Every message carries the routing fields (version, federation, sender, recipient,
round, sequence); the envelope copies them into its signed header. Kind-specific
fields travel in the encrypted payload's msgpack *body*; tensor-carrying messages
(update, train-request, train-result, secagg-masked) also carry a tensor table and blob
(see :mod:`.codec`). The base classes are in :mod:`.message_base`; the secure-aggregation
messages in :mod:`.secagg_messages`.

Constructing an invalid message raises :class:`LocalProtocolError`; decoding one from
the wire raises :class:`RemoteProtocolError` with the same code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .codec import Codec
from .errors import ErrorCode, LocalProtocolError
from .limits import DEFAULT_MAX_FRAME_SIZE, DIGEST_SIZE, MAX_FRAME_SIZE_CEILING
from .message_base import (
    MAX_LABEL,
    MAX_METRICS,
    MAX_TEXT,
    Kind,
    Message,
    TensorMessage,
    _check_metrics,
    _check_reply_to,
)
from .secagg_messages import SECAGG_MESSAGES
from .wire import check_bytes, check_optional_bytes, check_str, check_uint

__all__ = [
    "MAX_LABEL",
    "MAX_METRICS",
    "MAX_TEXT",
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
            if not isinstance(c, str) or c not in (Codec.FLOAT32, Codec.FLOAT16, Codec.INT8, Codec.INT4, Codec.TOPK):
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
MESSAGE_TYPES.update({cls.kind: cls for cls in SECAGG_MESSAGES})
