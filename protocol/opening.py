"""Opening an envelope: the checks of PROTOCOL.md section 10, in their order.

:func:`open_envelope` runs them all on a whole envelope; the session splits them at the
signature (:func:`authenticate_envelope`, then :func:`open_authenticated`), so that a
refusal after it can be answered with a signed ``error``. A streamed envelope (section
4.2) is authenticated from its trailer (:func:`authenticate_trailer`) with what its chunks
delivered (:class:`StreamedPayload`). The received buffer is hashed and decrypted in place
when allowed, and tensors are decoded as views of it.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .codec import decode_tensors
from .crypto import MAC_SIZE, DecryptError, blake2b256, decrypt_in_place
from .envelope import (
    ENVELOPE_SIGNING_DOMAIN,
    HEADER_KEYS,
    HEADER_LEN_SIZE,
    MIN_ENVELOPE_SIZE,
    MODEL_KINDS,
    PAYLOAD_LEN_SIZE,
    TENSOR_KINDS,
    EnvelopeHeader,
    OpenedEnvelope,
)
from .errors import ErrorCode, RemoteProtocolError, as_remote
from .identity import Identity, verify_signature
from .limits import DEFAULT_LIMITS, MAX_HEADER_SIZE, PROTOCOL_VERSION, SIGNATURE_SIZE, Limits
from .messages import MESSAGE_TYPES, Message
from .replay import ReplayGuard
from .wire import check_keys, unpack_map

__all__ = [
    "AuthenticatedEnvelope",
    "StreamedPayload",
    "authenticate_envelope",
    "authenticate_trailer",
    "open_authenticated",
    "open_envelope",
    "read_header",
]

logger = logging.getLogger(__name__)


def _split(data: bytes | bytearray | memoryview, limits: Limits) -> tuple[memoryview, int]:
    """Step 1 of PROTOCOL.md section 10: the envelope's lengths, in order."""
    view = memoryview(data).cast("B")
    if len(view) > limits.max_frame_size:
        raise RemoteProtocolError(ErrorCode.TOO_LARGE, f"envelope of {len(view)} bytes")
    if len(view) < MIN_ENVELOPE_SIZE:
        raise RemoteProtocolError(
            ErrorCode.BAD_FRAME, f"envelope of {len(view)} bytes is truncated"
        )
    header_len = int.from_bytes(view[:HEADER_LEN_SIZE], "big")
    if header_len > MAX_HEADER_SIZE:
        raise RemoteProtocolError(ErrorCode.TOO_LARGE, f"header of {header_len} bytes")
    if HEADER_LEN_SIZE + header_len + SIGNATURE_SIZE + MAC_SIZE + PAYLOAD_LEN_SIZE > len(view):
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
    return _parse_header(bytes(view[HEADER_LEN_SIZE : HEADER_LEN_SIZE + header_len]))


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
    header_len = int.from_bytes(trailer[:HEADER_LEN_SIZE], "big")
    if len(trailer) != HEADER_LEN_SIZE + header_len + SIGNATURE_SIZE:
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, "trailer length does not match its header length")
    header_bytes = bytes(trailer[HEADER_LEN_SIZE : HEADER_LEN_SIZE + header_len])
    signature = bytes(trailer[HEADER_LEN_SIZE + header_len :])
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
    header_bytes = bytes(view[HEADER_LEN_SIZE : HEADER_LEN_SIZE + header_len])
    sig_end = HEADER_LEN_SIZE + header_len + SIGNATURE_SIZE
    signature = bytes(view[HEADER_LEN_SIZE + header_len : sig_end])
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
    if len(payload) < PAYLOAD_LEN_SIZE:  # pragma: no cover - MIN_ENVELOPE_SIZE leaves room for it
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, "payload shorter than its length prefix")
    body_len = int.from_bytes(payload[:PAYLOAD_LEN_SIZE], "big")
    if body_len > limits.max_body_size:
        raise RemoteProtocolError(ErrorCode.TOO_LARGE, f"body of {body_len} bytes")
    if PAYLOAD_LEN_SIZE + body_len > len(payload):
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, "payload shorter than its body length")
    body = unpack_map(
        payload[PAYLOAD_LEN_SIZE : PAYLOAD_LEN_SIZE + body_len], what="body", max_size=limits.max_body_size
    )
    cls = MESSAGE_TYPES[header.kind]
    tensor_kind = header.kind in TENSOR_KINDS
    with as_remote():
        check_keys(header.kind.value, body, (*cls.BODY_KEYS, "tensors") if tensor_kind else cls.BODY_KEYS)
    blob = payload[PAYLOAD_LEN_SIZE + body_len :]
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
