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

Sealing writes the payload straight into the buffer that is then encrypted in place;
opening hashes and decrypts the received buffer in place when allowed, and tensors
are decoded as views of it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Container, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import nacl.bindings
import numpy as np

from .codec import Codec, EncodedTensors, decode_tensors, encode_tensors
from .crypto import MAC_SIZE, DecryptError, blake2b256, decrypt_in_place, encrypt_in_place
from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError, as_remote
from .frames import frame_prefix
from .identity import Identity, verify_signature
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
from .replay import ReplayGuard
from .wire import (
    check_bytes,
    check_federation,
    check_keys,
    check_optional_bytes,
    check_uint,
    packb,
    unpack_map,
)

__all__ = [
    "ENVELOPE_SIGNING_DOMAIN",
    "HEADER_KEYS",
    "HEADER_LAYOUT_VERSIONS",
    "MODEL_KINDS",
    "TENSOR_KINDS",
    "AuthenticatedEnvelope",
    "EncodedPayload",
    "EnvelopeHeader",
    "OpenedEnvelope",
    "SealedEnvelope",
    "SealedHeader",
    "StreamedPayload",
    "authenticate_envelope",
    "authenticate_trailer",
    "encode_payload",
    "open_authenticated",
    "open_envelope",
    "read_header",
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

_LEN = 2  # header length prefix
_PAYLOAD_LEN = 4  # body length prefix inside the payload
_MIN_ENVELOPE = _LEN + 1 + SIGNATURE_SIZE + MAC_SIZE + _PAYLOAD_LEN


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
        return _LEN + len(self.header_bytes) + SIGNATURE_SIZE + len(self.ciphertext)

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
    return b"".join((len(header_bytes).to_bytes(_LEN, "big"), header_bytes, signature))


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
        return _PAYLOAD_LEN + len(self.body) + (self.tensors.nbytes if self.tensors is not None else 0)

    def pieces(self) -> Iterator[bytes | memoryview]:
        """The payload as consecutive pieces (the tensors as views where they can be)."""
        yield len(self.body).to_bytes(_PAYLOAD_LEN, "big")
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
        start = _PAYLOAD_LEN + len(self.body)
        out[:_PAYLOAD_LEN] = len(self.body).to_bytes(_PAYLOAD_LEN, "big")
        out[_PAYLOAD_LEN:start] = self.body
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
    if _LEN + SIGNATURE_SIZE + MAC_SIZE + payload.size > limits.max_frame_size:
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


def _split(data: bytes | bytearray | memoryview, limits: Limits) -> tuple[memoryview, int]:
    """Step 1 of PROTOCOL.md section 10: the envelope's lengths, in order."""
    view = memoryview(data).cast("B")
    if len(view) > limits.max_frame_size:
        raise RemoteProtocolError(ErrorCode.TOO_LARGE, f"envelope of {len(view)} bytes")
    if len(view) < _MIN_ENVELOPE:
        raise RemoteProtocolError(
            ErrorCode.BAD_FRAME, f"envelope of {len(view)} bytes is truncated"
        )
    header_len = int.from_bytes(view[:_LEN], "big")
    if header_len > MAX_HEADER_SIZE:
        raise RemoteProtocolError(ErrorCode.TOO_LARGE, f"header of {header_len} bytes")
    if _LEN + header_len + SIGNATURE_SIZE + MAC_SIZE + _PAYLOAD_LEN > len(view):
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, "envelope shorter than its header says")
    return view, header_len


def _parse_header(raw: bytes) -> EnvelopeHeader:
    """Step 2 of PROTOCOL.md section 10: strict msgpack, version, kind, key set, fields."""
    obj = unpack_map(raw, what="header", max_size=MAX_HEADER_SIZE)
    version = obj.get("version")
    if type(version) is not int:
        raise RemoteProtocolError(ErrorCode.BAD_TYPE, "header.version must be an integer")
    if version != PROTOCOL_VERSION:
        raise RemoteProtocolError(ErrorCode.UNKNOWN_VERSION, f"version {version}")
    kind = obj.get("kind")
    if type(kind) is not str:
        raise RemoteProtocolError(ErrorCode.BAD_TYPE, "header.kind must be a str")
    if kind not in MESSAGE_TYPES:  # StrEnum members hash like their values
        raise RemoteProtocolError(ErrorCode.UNKNOWN_KIND, f"kind {kind[:32]!r}")
    with as_remote():
        check_keys("header", obj, HEADER_KEYS)
        return EnvelopeHeader(**obj)


def read_header(
    data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS
) -> EnvelopeHeader:
    """Parse an envelope's header WITHOUT verifying anything (for logging refusals).

    Raises:
        RemoteProtocolError: If the envelope or its header is malformed.
    """
    view, header_len = _split(data, limits)
    return _parse_header(bytes(view[_LEN : _LEN + header_len]))


@dataclass(frozen=True, eq=False)
class AuthenticatedEnvelope:
    """An envelope whose header parsed and whose signature verified (steps 1-4).

    Nothing after the signature is checked yet: the recipient, federation, timestamp,
    payload digest, replay guard, decryption and payload come in
    :func:`open_authenticated`. A refusal from there on can be answered with a signed
    ``error`` (the sender is known); a refusal before cannot.

    Attributes:
        header: The signed header.
        header_bytes: Its exact bytes.
        signature: The sender's signature.
        ciphertext: ``tag || encrypted payload`` (a view of the received buffer).
        size: Envelope size in bytes.
    """

    header: EnvelopeHeader
    header_bytes: bytes
    signature: bytes
    ciphertext: memoryview
    size: int
    stream: StreamedPayload | None = None


@dataclass(frozen=True, eq=False)
class StreamedPayload:
    """What a streamed frame (PROTOCOL.md section 4.2) delivered before its header.

    Attributes:
        digest: BLAKE2b-256 of every chunk's ciphertext, in order (the header's
            ``payload_digest`` must equal it).
        nonce: The stream header from the prelude (the header's ``nonce`` must equal it).
        plaintext: The decrypted payload.
    """

    digest: bytes
    nonce: bytes
    plaintext: memoryview


def _authenticate(
    header_bytes: bytes,
    signature: bytes,
    trusted: Container[bytes] | None,
    expected_sender: bytes | None,
) -> EnvelopeHeader:
    """Steps 2-4 of PROTOCOL.md section 10: header, trust, signature."""
    header = _parse_header(header_bytes)
    if trusted is not None and header.sender not in trusted:
        raise RemoteProtocolError(ErrorCode.UNTRUSTED_SENDER, f"sender {header.sender.hex()[:16]}")
    if expected_sender is not None and header.sender != expected_sender:
        raise RemoteProtocolError(ErrorCode.SENDER_MISMATCH, "sender is not the stream's peer")
    if not verify_signature(header.sender, ENVELOPE_SIGNING_DOMAIN + header_bytes, signature):
        raise RemoteProtocolError(ErrorCode.BAD_SIGNATURE, "envelope signature does not verify")
    return header


def authenticate_trailer(
    trailer: bytes,
    stream: StreamedPayload,
    *,
    size: int,
    trusted: Container[bytes] | None,
    expected_sender: bytes | None = None,
) -> AuthenticatedEnvelope:
    """Steps 2-4 of PROTOCOL.md section 10 for a streamed frame's trailer
    (``u16be header_len || header || signature``, section 4.2).

    Args:
        trailer: The trailer's bytes exactly (the frame decoder checked ``header_len``).
        stream: What the frame's chunks delivered.
        size: The envelope's size (ciphertext chunks and trailer).
        trusted: Public keys we accept messages from; ``None`` accepts any signer.
        expected_sender: The authenticated remote peer of this stream, if known.

    Raises:
        RemoteProtocolError: BAD_FRAME, BAD_MSGPACK, BAD_TYPE, UNKNOWN_VERSION,
            UNKNOWN_KIND, UNTRUSTED_SENDER, SENDER_MISMATCH, BAD_SIGNATURE.
    """
    header_len = int.from_bytes(trailer[:_LEN], "big")
    if len(trailer) != _LEN + header_len + SIGNATURE_SIZE:
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, "trailer length does not match its header length")
    header_bytes = bytes(trailer[_LEN : _LEN + header_len])
    signature = bytes(trailer[_LEN + header_len :])
    header = _authenticate(header_bytes, signature, trusted, expected_sender)
    return AuthenticatedEnvelope(
        header=header,
        header_bytes=header_bytes,
        signature=signature,
        ciphertext=memoryview(b""),
        size=size,
        stream=stream,
    )


def authenticate_envelope(
    data: bytes | bytearray | memoryview,
    *,
    trusted: Container[bytes] | None,
    expected_sender: bytes | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> AuthenticatedEnvelope:
    """Steps 1-4 of PROTOCOL.md section 10: lengths, header, trust, signature.

    Args:
        data: The envelope bytes (a frame body); not copied.
        trusted: Public keys we accept messages from; ``None`` accepts any signer.
        expected_sender: The authenticated remote peer of this stream, if known.
        limits: Size limits.

    Raises:
        RemoteProtocolError: TOO_LARGE, BAD_FRAME, BAD_MSGPACK, BAD_TYPE,
            UNKNOWN_VERSION, UNKNOWN_KIND, UNTRUSTED_SENDER, SENDER_MISMATCH,
            BAD_SIGNATURE: the first failed check.
    """
    view, header_len = _split(data, limits)
    header_bytes = bytes(view[_LEN : _LEN + header_len])
    sig_end = _LEN + header_len + SIGNATURE_SIZE
    signature = bytes(view[_LEN + header_len : sig_end])
    header = _authenticate(header_bytes, signature, trusted, expected_sender)
    return AuthenticatedEnvelope(
        header=header,
        header_bytes=header_bytes,
        signature=signature,
        ciphertext=view[sig_end:],
        size=len(view),
    )


def open_authenticated(
    envelope: AuthenticatedEnvelope,
    *,
    identity: Identity,
    federation: str,
    replay: ReplayGuard | None = None,
    limits: Limits = DEFAULT_LIMITS,
    expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
    expected_dtypes: Mapping[str, str] | None = None,
    complete: bool = False,
    now_ms: int | None = None,
    max_skew_ms: int | None = None,
    in_place: bool = False,
) -> OpenedEnvelope:
    """Steps 6-11 of PROTOCOL.md section 10 on an authenticated envelope.

    Recipient, federation, timestamp skew, payload digest, replay (the triple is
    recorded here, so it stays spent even if a later step fails), decryption, then the
    payload. Step 5, the session state, is the session's (see :class:`~.session.Session`).

    Args: as for :func:`open_envelope`.

    Raises:
        RemoteProtocolError: With the reason code of the first failed check.
    """
    header = envelope.header
    if header.recipient != identity.public_key:
        raise RemoteProtocolError(ErrorCode.WRONG_RECIPIENT, f"to {header.recipient.hex()[:16]}")
    if header.federation != federation:
        raise RemoteProtocolError(ErrorCode.WRONG_FEDERATION, f"federation {header.federation!r}")
    if (
        now_ms is not None
        and max_skew_ms is not None
        and abs(header.timestamp - now_ms) > max_skew_ms
    ):
        raise RemoteProtocolError(ErrorCode.STALE, f"timestamp {header.timestamp} vs now {now_ms}")
    ciphertext = envelope.ciphertext
    stream = envelope.stream
    digest = stream.digest if stream is not None else blake2b256(ciphertext)
    if digest != header.payload_digest:
        raise RemoteProtocolError(ErrorCode.DIGEST_MISMATCH, "payload digest does not match")
    if stream is not None and stream.nonce != header.nonce:
        raise RemoteProtocolError(ErrorCode.DIGEST_MISMATCH, "header nonce is not the stream's header")
    if replay is not None:
        replay.accept(header.sender, header.round, header.sequence)

    if stream is not None:  # its chunks were authenticated and decrypted as they arrived
        payload = stream.plaintext
    else:
        with as_remote():
            key = identity.shared_key(header.sender)
        target: bytearray | memoryview = (
            ciphertext if in_place and not ciphertext.readonly else bytearray(ciphertext)
        )
        try:
            payload = decrypt_in_place(target, key, header.nonce)
        except DecryptError:
            raise RemoteProtocolError(ErrorCode.DECRYPT_FAILED, "payload does not decrypt") from None
    message = _decode_payload(payload, header, limits, expected_shapes, expected_dtypes, complete)
    logger.debug(
        "opened %s seq=%d round=%d from %s: %d bytes",
        header.kind.value,
        header.sequence,
        header.round,
        header.sender.hex()[:16],
        envelope.size,
    )
    return OpenedEnvelope(
        header=header,
        header_bytes=envelope.header_bytes,
        signature=envelope.signature,
        message=message,
        size=envelope.size,
    )


def open_envelope(
    data: bytes | bytearray | memoryview,
    *,
    identity: Identity,
    federation: str,
    trusted: Container[bytes] | None,
    expected_sender: bytes | None = None,
    replay: ReplayGuard | None = None,
    limits: Limits = DEFAULT_LIMITS,
    expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
    expected_dtypes: Mapping[str, str] | None = None,
    complete: bool = False,
    now_ms: int | None = None,
    max_skew_ms: int | None = None,
    in_place: bool = False,
) -> OpenedEnvelope:
    """Verify, decrypt and decode one envelope (a frame body) outside a session.

    The checks of PROTOCOL.md section 10 in its order, but for step 5 (the session
    state): lengths, header, trust (``trusted``, ``expected_sender``), signature,
    recipient, federation, timestamp skew, payload digest, replay (the triple is
    recorded once the envelope is authentic), decryption, then the payload.

    Args:
        data: The envelope bytes.
        identity: Our keys (we must be the recipient).
        federation: Our federation id.
        trusted: Public keys we accept messages from; ``None`` accepts any signer.
        expected_sender: The authenticated remote peer of this stream, if known.
        replay: Replay guard shared by the peer's sessions, if any.
        limits: Size limits.
        expected_shapes: Model tensor shapes to enforce on tensor messages.
        expected_dtypes: Model tensor dtypes (numpy names) to enforce on tensor messages.
        complete: With ``expected_shapes``, require every model tensor.
        now_ms: Current Unix time in ms, for the skew check.
        max_skew_ms: Largest accepted ``|timestamp - now_ms|`` (needs ``now_ms``).
        in_place: Decrypt inside ``data`` if it is writable (it is then overwritten
            and decoded tensors alias it); otherwise the ciphertext is copied first.

    Raises:
        RemoteProtocolError: With the reason code of the first failed check.
    """
    envelope = authenticate_envelope(
        data, trusted=trusted, expected_sender=expected_sender, limits=limits
    )
    return open_authenticated(
        envelope,
        identity=identity,
        federation=federation,
        replay=replay,
        limits=limits,
        expected_shapes=expected_shapes,
        expected_dtypes=expected_dtypes,
        complete=complete,
        now_ms=now_ms,
        max_skew_ms=max_skew_ms,
        in_place=in_place,
    )


def _decode_payload(
    payload: memoryview,
    header: EnvelopeHeader,
    limits: Limits,
    expected_shapes: Mapping[str, tuple[int, ...]] | None,
    expected_dtypes: Mapping[str, str] | None,
    complete: bool,
) -> Message:
    """Step 11 of PROTOCOL.md section 10: lengths, body msgpack, key set, tensors, fields."""
    if len(payload) < _PAYLOAD_LEN:  # pragma: no cover - _MIN_ENVELOPE leaves room for it
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, "payload shorter than its length prefix")
    body_len = int.from_bytes(payload[:_PAYLOAD_LEN], "big")
    if body_len > limits.max_body_size:
        raise RemoteProtocolError(ErrorCode.TOO_LARGE, f"body of {body_len} bytes")
    if _PAYLOAD_LEN + body_len > len(payload):
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, "payload shorter than its body length")
    body = unpack_map(
        payload[_PAYLOAD_LEN : _PAYLOAD_LEN + body_len], what="body", max_size=limits.max_body_size
    )
    cls = MESSAGE_TYPES[header.kind]
    tensor_kind = header.kind in TENSOR_KINDS
    with as_remote():
        check_keys(header.kind.value, body, (*cls.BODY_KEYS, "tensors") if tensor_kind else cls.BODY_KEYS)
    blob = payload[_PAYLOAD_LEN + body_len :]
    routing: dict[str, Any] = {
        "version": header.version,
        "federation": header.federation,
        "sender": header.sender,
        "recipient": header.recipient,
        "round": header.round,
        "sequence": header.sequence,
    }
    if tensor_kind:
        model_kind = header.kind in MODEL_KINDS
        tensors: dict[str, np.ndarray] = decode_tensors(
            body.pop("tensors"),
            blob,
            codec=header.codec,
            limits=limits,
            expected_shapes=expected_shapes if model_kind else None,
            expected_dtypes=expected_dtypes if model_kind else None,
            complete=complete and model_kind,
        )
        routing.update(tensors=tensors, base_digest=header.base_digest, codec=header.codec)
    elif len(blob):
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, f"{len(blob)} trailing payload bytes")
    with as_remote():
        return cls.from_body(routing, body)
