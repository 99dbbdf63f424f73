"""Envelopes: a signed msgpack header plus an encrypted payload.

Wire layout of one envelope (the body of one frame)::

    u16be header_len || header (msgpack map) || signature (64) || ciphertext

* ``signature`` = Ed25519(sender, ``ENVELOPE_SIGNING_DOMAIN || header``) over the exact
  header bytes received.
* ``ciphertext`` = ``crypto_box_easy(payload, nonce, recipient_x25519_pk,
  sender_x25519_sk)`` = ``tag (16) || encrypted payload``; the 24-byte nonce travels in
  the header.
* ``header.payload_digest`` = BLAKE2b-256(ciphertext), so the signature covers it.
* ``payload`` = ``u32be body_len || body (msgpack map) || tensor blob``.

Sealing writes the payload straight into the buffer that is then encrypted in place.
Opening, in :mod:`silomesh.protocol.opening`, hashes and decrypts the received buffer in
place when allowed, and tensors are decoded as views of it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import nacl.bindings

from .codec import Codec, EncodedTensors, encode_tensors
from .crypto import MAC_SIZE, blake2b256, encrypt_in_place
from .errors import ErrorCode, LocalProtocolError
from .frames import frame_prefix
from .identity import Identity
from .limits import (
    DEFAULT_LIMITS,
    DIGEST_SIZE,
    KEY_SIZE,
    MAX_HEADER_SIZE,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    SIGNATURE_SIZE,
    Limits,
)
from .messages import MESSAGE_TYPES, Kind, Message, TensorMessage
from .wire import (
    check_bytes,
    check_federation,
    check_optional_bytes,
    check_uint,
    packb,
)

__all__ = [
    "ENVELOPE_SIGNING_DOMAIN",
    "HEADER_KEYS",
    "HEADER_LAYOUT_VERSIONS",
    "HEADER_LEN_SIZE",
    "MIN_ENVELOPE_SIZE",
    "MODEL_KINDS",
    "PAYLOAD_LEN_SIZE",
    "TENSOR_KINDS",
    "EncodedPayload",
    "EnvelopeHeader",
    "OpenedEnvelope",
    "SealedEnvelope",
    "SealedHeader",
    "encode_payload",
    "seal_envelope",
]

logger = logging.getLogger(__name__)

ENVELOPE_SIGNING_DOMAIN = b"silomesh/envelope/v1\x00"
"""Prefix of the bytes an envelope signature covers."""

HEADER_KEYS = (
    "version",
    "kind",
    "federation",
    "sender",
    "recipient",
    "round",
    "sequence",
    "timestamp",
    "base_digest",
    "payload_digest",
    "codec",
    "nonce",
)
"""Header map keys, in the order the encoder writes them."""

HEADER_LAYOUT_VERSIONS = frozenset({1, PROTOCOL_VERSION})
"""Versions whose header has the layout of :class:`EnvelopeHeader` (1 and 2 share it).

An :class:`EnvelopeHeader` may hold either, so that headers recorded before an upgrade
(audit logs) still parse; the wire decoder accepts only :data:`PROTOCOL_VERSION`, and
messages are only ever sealed with it.
"""

TENSOR_KINDS = frozenset({Kind.UPDATE, Kind.TRAIN_REQUEST, Kind.TRAIN_RESULT, Kind.SECAGG_MASKED})
"""Kinds whose payload carries a tensor table and blob."""

MODEL_KINDS = frozenset({Kind.UPDATE, Kind.TRAIN_REQUEST, Kind.TRAIN_RESULT})
"""Tensor kinds that carry the model (its shapes and dtypes are enforced); ``secagg-masked``
carries one ring vector instead, checked by its message class and by the aggregator."""

HEADER_LEN_SIZE = 2
"""Bytes of the header length prefix."""
PAYLOAD_LEN_SIZE = 4
"""Bytes of the body length prefix inside the payload."""
MIN_ENVELOPE_SIZE = HEADER_LEN_SIZE + 1 + SIGNATURE_SIZE + MAC_SIZE + PAYLOAD_LEN_SIZE


@dataclass(frozen=True, kw_only=True)
class EnvelopeHeader:
    """The signed routing header (all fields travel in clear).

    ``version`` may be any of :data:`HEADER_LAYOUT_VERSIONS`; receiving an envelope
    requires :data:`~.limits.PROTOCOL_VERSION` (``UNKNOWN_VERSION`` otherwise).
    """

    version: int
    kind: Kind
    federation: str
    sender: bytes
    recipient: bytes
    round: int
    sequence: int
    timestamp: int
    base_digest: bytes | None
    payload_digest: bytes
    codec: Codec
    nonce: bytes

    def __post_init__(self) -> None:
        # the order of PROTOCOL.md section 10 step 2: version, kind, then each field in
        # table order, then the rules that tie codec and base_digest to the kind
        if type(self.version) is not int:
            raise LocalProtocolError(ErrorCode.BAD_TYPE, "version must be an integer")
        if self.version not in HEADER_LAYOUT_VERSIONS:
            raise LocalProtocolError(ErrorCode.UNKNOWN_VERSION, f"version {self.version!r}")
        if type(self.kind) is not str and not isinstance(self.kind, Kind):
            raise LocalProtocolError(ErrorCode.BAD_TYPE, "kind must be a str")
        try:
            kind = Kind(self.kind)
        except ValueError:
            raise LocalProtocolError(ErrorCode.UNKNOWN_KIND, f"kind {self.kind[:32]!r}") from None
        if kind is Kind.ANNOUNCE:
            raise LocalProtocolError(ErrorCode.UNKNOWN_KIND, "announces do not travel in envelopes")
        object.__setattr__(self, "kind", kind)
        check_federation(self.federation)
        check_bytes("sender", self.sender, KEY_SIZE)
        check_bytes("recipient", self.recipient, KEY_SIZE)
        check_uint("round", self.round)
        check_uint("sequence", self.sequence)
        check_uint("timestamp", self.timestamp)
        check_optional_bytes("base_digest", self.base_digest, DIGEST_SIZE)
        check_bytes("payload_digest", self.payload_digest, DIGEST_SIZE)
        try:
            codec = Codec(self.codec) if isinstance(self.codec, str) else None
        except ValueError:
            codec = None
        if codec is None:
            raise LocalProtocolError(ErrorCode.BAD_TYPE, f"unknown codec {self.codec!r}")
        object.__setattr__(self, "codec", codec)
        check_bytes("nonce", self.nonce, NONCE_SIZE)
        if (kind in TENSOR_KINDS) != (codec is not Codec.NONE):
            raise LocalProtocolError(
                ErrorCode.BAD_TYPE, f"codec {codec.value} invalid for {kind.value}"
            )
        if codec is Codec.TOPK and kind not in MODEL_KINDS:
            # a topk entry decodes to far more bytes than it takes: only for model tensors,
            # whose names and shapes the receiver checks against its model first
            raise LocalProtocolError(ErrorCode.BAD_TYPE, f"codec topk invalid for {kind.value}")
        if kind not in TENSOR_KINDS and self.base_digest is not None:
            raise LocalProtocolError(ErrorCode.BAD_TYPE, f"{kind.value} has no base digest")

    def to_map(self) -> dict[str, Any]:
        """The msgpack-ready map, keys in :data:`HEADER_KEYS` order."""
        return {
            "version": self.version,
            "kind": self.kind.value,
            "federation": self.federation,
            "sender": self.sender,
            "recipient": self.recipient,
            "round": self.round,
            "sequence": self.sequence,
            "timestamp": self.timestamp,
            "base_digest": self.base_digest,
            "payload_digest": self.payload_digest,
            "codec": self.codec.value,
            "nonce": self.nonce,
        }


@dataclass(frozen=True, eq=False)
class SealedEnvelope:
    """An envelope ready to send, kept in two parts to avoid copying the ciphertext.

    Attributes:
        header: The signed header.
        header_bytes: Its exact msgpack encoding (what the signature covers, after the
            domain prefix).
        signature: The 64-byte Ed25519 signature.
        ciphertext: ``tag || encrypted payload``.
    """

    header: EnvelopeHeader
    header_bytes: bytes
    signature: bytes
    ciphertext: bytearray

    @property
    def head(self) -> bytes:
        """``u16be header_len || header || signature``: everything before the ciphertext."""
        return _head(self.header_bytes, self.signature)

    @property
    def size(self) -> int:
        """Length of the whole envelope (the frame body)."""
        return HEADER_LEN_SIZE + len(self.header_bytes) + SIGNATURE_SIZE + len(self.ciphertext)

    def frame_parts(self, max_frame_size: int | None = None) -> tuple[bytes, bytearray]:
        """``(frame prefix || head, ciphertext)``: write both, in order, to the stream."""
        limit = max_frame_size if max_frame_size is not None else DEFAULT_LIMITS.max_frame_size
        return frame_prefix(self.size, limit) + self.head, self.ciphertext

    def to_bytes(self) -> bytes:
        """The envelope as one ``bytes`` object (copies the ciphertext)."""
        return b"".join((self.head, self.ciphertext))

    def to_frame(self, max_frame_size: int | None = None) -> bytes:
        """The framed envelope as one ``bytes`` object (copies the ciphertext)."""
        return b"".join(self.frame_parts(max_frame_size))


@dataclass(frozen=True, eq=False)
class SealedHeader:
    """The signed header of a streamed envelope (PROTOCOL.md section 4.2), what is audited of it.

    Attributes:
        header: The signed header.
        header_bytes: Its exact msgpack encoding.
        signature: The 64-byte Ed25519 signature.
        size: The envelope's size (its chunks and the trailer).
    """

    header: EnvelopeHeader
    header_bytes: bytes
    signature: bytes
    size: int

    @property
    def head(self) -> bytes:
        """``u16be header_len || header || signature``: the streamed envelope's trailer."""
        return _head(self.header_bytes, self.signature)


def _head(header_bytes: bytes, signature: bytes) -> bytes:
    return b"".join((len(header_bytes).to_bytes(HEADER_LEN_SIZE, "big"), header_bytes, signature))


@dataclass(frozen=True, eq=False)
class OpenedEnvelope:
    """A verified, decrypted, decoded envelope.

    Attributes:
        header: The verified header.
        header_bytes: The exact signed header bytes (with ``signature``, enough for an
            auditor to re-verify the sender's signature offline).
        signature: The sender's 64-byte signature.
        message: The decoded message.
        size: Envelope size in bytes.
    """

    header: EnvelopeHeader
    header_bytes: bytes
    signature: bytes
    message: Message
    size: int


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, eq=False)
class EncodedPayload:
    """A message's payload (``u32be body_len || body || blob``), laid out but not yet copied.

    Attributes:
        body: The body's msgpack bytes (with the tensor table for tensor kinds).
        tensors: The tensors, for tensor kinds.
        base_digest: The header's ``base_digest``.
        codec: The header's ``codec``.
    """

    body: bytes
    tensors: EncodedTensors | None
    base_digest: bytes | None
    codec: Codec

    @property
    def size(self) -> int:
        """The payload's length in bytes."""
        return PAYLOAD_LEN_SIZE + len(self.body) + (self.tensors.nbytes if self.tensors is not None else 0)

    def pieces(self) -> Iterator[bytes | memoryview]:
        """The payload as consecutive pieces (the tensors as views where they can be)."""
        yield len(self.body).to_bytes(PAYLOAD_LEN_SIZE, "big")
        yield self.body
        if self.tensors is not None:
            yield from self.tensors.pieces()

    def header(self, message: Message, *, timestamp: int, payload_digest: bytes, nonce: bytes) -> EnvelopeHeader:
        """The header of ``message`` sealed with this payload."""
        return EnvelopeHeader(
            version=message.version,
            kind=message.kind,
            federation=message.federation,
            sender=message.sender,
            recipient=message.recipient,
            round=message.round,
            sequence=message.sequence,
            timestamp=timestamp,
            base_digest=self.base_digest,
            payload_digest=payload_digest,
            codec=self.codec,
            nonce=nonce,
        )

    def write_into(self, out: memoryview) -> None:
        """Write the payload into ``out`` (exactly :attr:`size` writable bytes)."""
        start = PAYLOAD_LEN_SIZE + len(self.body)
        out[:PAYLOAD_LEN_SIZE] = len(self.body).to_bytes(PAYLOAD_LEN_SIZE, "big")
        out[PAYLOAD_LEN_SIZE:start] = self.body
        if self.tensors is not None:
            self.tensors.write_into(out[start:])


def encode_payload(message: Message, identity: Identity, limits: Limits = DEFAULT_LIMITS) -> EncodedPayload:
    """Check ``message`` for sending and lay out its payload (nothing large is copied).

    Raises:
        LocalProtocolError: SENDER_MISMATCH, UNKNOWN_KIND, TOO_LARGE (the body), NON_FINITE,
            BAD_DTYPE, ... for anything this side should not send.
    """
    if message.sender != identity.public_key:
        raise LocalProtocolError(ErrorCode.SENDER_MISMATCH, "message.sender is not this identity")
    if message.kind not in MESSAGE_TYPES:
        raise LocalProtocolError(ErrorCode.UNKNOWN_KIND, f"{message.kind} cannot be sealed")
    body = message.body()
    encoded: EncodedTensors | None = None
    base_digest: bytes | None = None
    codec = Codec.NONE
    if isinstance(message, TensorMessage):
        encoded = encode_tensors(message.tensors, message.codec, limits=limits)
        body["tensors"] = encoded.table
        base_digest = message.base_digest
        codec = message.codec
    body_bytes = packb(body)
    if len(body_bytes) > limits.max_body_size:
        raise LocalProtocolError(ErrorCode.TOO_LARGE, f"body is {len(body_bytes)} bytes")
    return EncodedPayload(body_bytes, encoded, base_digest, codec)


def seal_envelope(
    message: Message,
    identity: Identity,
    *,
    limits: Limits = DEFAULT_LIMITS,
    timestamp_ms: int | None = None,
    nonce: bytes | None = None,
) -> SealedEnvelope:
    """Encode, encrypt to ``message.recipient`` and sign ``message``.

    Args:
        message: Any exchange message; ``message.sender`` must be ``identity``.
        identity: Our keys.
        limits: Sizes to respect (the envelope must fit ``limits.max_frame_size``).
        timestamp_ms: Header timestamp; defaults to the current Unix time in ms.
        nonce: 24-byte Box nonce; random by default (pass one only for test vectors).

    Raises:
        LocalProtocolError: SENDER_MISMATCH, TOO_LARGE, NON_FINITE, BAD_DTYPE, ... for
            anything this side should not send.
    """
    payload = encode_payload(message, identity, limits)
    if HEADER_LEN_SIZE + SIGNATURE_SIZE + MAC_SIZE + payload.size > limits.max_frame_size:
        raise LocalProtocolError(
            ErrorCode.TOO_LARGE, f"payload of {payload.size} bytes > frame limit"
        )
    buf = bytearray(MAC_SIZE + payload.size)
    payload.write_into(memoryview(buf)[MAC_SIZE:])
    if nonce is None:
        nonce = nacl.bindings.randombytes(NONCE_SIZE)
    encrypt_in_place(buf, identity.shared_key(message.recipient), nonce)

    header = payload.header(
        message,
        timestamp=_now_ms() if timestamp_ms is None else timestamp_ms,
        payload_digest=blake2b256(buf),
        nonce=nonce,
    )
    header_bytes = packb(header.to_map())
    if len(header_bytes) > MAX_HEADER_SIZE:  # pragma: no cover - fields are bounded
        raise LocalProtocolError(ErrorCode.TOO_LARGE, "header too large")
    sealed = SealedEnvelope(
        header=header,
        header_bytes=header_bytes,
        signature=identity.sign(ENVELOPE_SIGNING_DOMAIN + header_bytes),
        ciphertext=buf,
    )
    if sealed.size > limits.max_frame_size:
        raise LocalProtocolError(
            ErrorCode.TOO_LARGE, f"envelope of {sealed.size} bytes > frame limit"
        )
    logger.debug(
        "sealed %s seq=%d round=%d to %s: %d bytes",
        header.kind.value,
        header.sequence,
        header.round,
        header.recipient.hex()[:16],
        sealed.size,
    )
    return sealed
