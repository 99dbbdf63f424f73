"""Length-prefixed framing, sans-I/O.

A frame is a 4-byte big-endian unsigned length ``n`` followed by ``n`` body bytes.
:class:`FrameDecoder` turns a byte stream fed with :meth:`FrameDecoder.receive_data`
into frames pulled with :meth:`FrameDecoder.next_frame`. A length prefix above the
configured maximum is refused as soon as its 4 bytes arrive, before any body byte is
buffered, and the body buffer only grows as bytes actually arrive.

**Resumable frames** (stream protocol ``/silomesh/exchange/1.1.0``, PROTOCOL.md section
4.1). A sender may *offer* a frame instead of writing it at once::

    offer  := 0xFFFFFFFF (u32be) || digest (32 bytes, BLAKE2b-256 of the body) || length (u32be)
    answer := have (u32be)          # written back by the receiver
    then      body[have:]           # the sender writes the rest of the body

The receiver answers with how many leading bytes of the body named by ``digest`` it
still holds from an earlier stream that broke (0 if none), so a frame cut off by a
dropped link is resumed, not sent again. The decoder reports the offer
(:class:`FrameOffer`), the I/O layer answers it with :meth:`FrameDecoder.answer_offer`,
and when the body is complete its digest is checked before the frame is handed out.
:meth:`FrameDecoder.partial` gives what arrived of an offered frame, to keep when the
stream breaks.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .crypto import Blake2b256
from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .limits import (
    DEFAULT_MAX_FRAME_SIZE,
    DIGEST_SIZE,
    FRAME_PREFIX_SIZE,
    MAX_FRAME_SIZE_CEILING,
    MAX_HEADER_SIZE,
    SIGNATURE_SIZE,
)

__all__ = [
    "ANSWER_SIZE",
    "CLOSED",
    "NEED_DATA",
    "OFFER_MARKER",
    "OFFER_SIZE",
    "PRELUDE_SIZE",
    "STREAM_CHUNK_SIZE",
    "STREAM_HEADER_SIZE",
    "STREAM_MARKER",
    "STREAM_TAG_SIZE",
    "ChunkSink",
    "FrameDecoder",
    "FrameOffer",
    "PartialFrame",
    "Signal",
    "StreamOffer",
    "StreamedFrame",
    "body_digest",
    "decode_answer",
    "encode_frame",
    "encode_offer",
    "frame_prefix",
    "stream_chunks",
    "stream_ciphertext_size",
]

logger = logging.getLogger(__name__)

_INITIAL_BODY = 1 << 16
"""First allocation for a frame body; it doubles as bytes arrive."""


class Signal(enum.Enum):
    """Non-frame results of :meth:`FrameDecoder.next_frame` (and the session)."""

    NEED_DATA = "NEED_DATA"
    """Feed more bytes with ``receive_data``."""
    CLOSED = "CLOSED"
    """The stream ended cleanly at a frame boundary."""


NEED_DATA = Signal.NEED_DATA
CLOSED = Signal.CLOSED

OFFER_MARKER = 0xFFFFFFFF
"""The length prefix that starts an offer on a resumable stream (no frame is that long there)."""

OFFER_SIZE = FRAME_PREFIX_SIZE + DIGEST_SIZE + FRAME_PREFIX_SIZE
"""marker || digest || length: 40 bytes."""

ANSWER_SIZE = FRAME_PREFIX_SIZE
"""The receiver's answer to an offer: the bytes it holds (u32be)."""


@dataclass(frozen=True)
class FrameOffer:
    """A resumable frame announced by the sender: answer it with the bytes already held."""

    digest: bytes
    length: int


@dataclass(frozen=True)
class PartialFrame:
    """The leading bytes of an offered frame whose stream broke before it was complete."""

    digest: bytes
    length: int
    data: bytes


STREAM_MARKER = 0xFFFFFFFE
"""The length prefix that starts a streamed envelope on ``/silomesh/exchange/1.2.0`` (section 4.2)."""

STREAM_HEADER_SIZE = 24
"""The secretstream header in a streamed envelope's prelude."""

STREAM_CHUNK_SIZE = 1 << 16
"""Payload bytes per chunk of a streamed envelope (the last chunk holds the rest)."""

STREAM_TAG_SIZE = 17
"""What secretstream adds to each chunk (``crypto_secretstream_xchacha20poly1305_ABYTES``)."""

PRELUDE_SIZE = FRAME_PREFIX_SIZE + 4 + STREAM_HEADER_SIZE
"""marker || payload_len (u32be) || stream header: 32 bytes."""

_TRAILER_LEN = 2
_MIN_STREAMED_PAYLOAD = 4  # body_len


class ChunkSink(Protocol):
    """What opens a streamed envelope's chunks (:class:`~.streamed.StreamOpener`)."""

    payload_len: int
    filled: int
    opened: int

    def next_chunk_size(self) -> int: ...

    def open_chunk(self, chunk: bytearray) -> None: ...

    def result(self) -> object: ...

    def keep(self) -> object: ...


@dataclass(frozen=True)
class StreamOffer:
    """A streamed envelope's prelude: answer it with the chunks already held (section 4.2)."""

    payload_len: int
    stream_header: bytes


@dataclass(frozen=True, eq=False)
class StreamedFrame:
    """A streamed envelope whose chunks all arrived, authenticated and decrypted, and its trailer.

    Attributes:
        payload: What the chunks delivered (a :class:`~.opening.StreamedPayload`).
        trailer: ``u16be header_len || header || signature``, exactly.
        size: The envelope's size (chunks and trailer).
        payload_len: The decrypted payload's size.
    """

    payload: Any
    trailer: bytes
    size: int
    payload_len: int


def stream_chunks(payload_len: int) -> int:
    """How many chunks carry a streamed payload of ``payload_len`` bytes (at least one)."""
    return max(1, -(-payload_len // STREAM_CHUNK_SIZE))


def stream_ciphertext_size(payload_len: int) -> int:
    """The bytes of all the chunks of a streamed payload of ``payload_len`` bytes."""
    return payload_len + STREAM_TAG_SIZE * stream_chunks(payload_len)


def body_digest(*parts: bytes | bytearray | memoryview) -> bytes:
    """BLAKE2b-256 of the concatenated ``parts``: the name of a frame body in an offer."""
    h = Blake2b256()
    for part in parts:
        h.update(part)
    return h.digest()


def encode_offer(digest: bytes, length: int, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """The 40-byte offer of a body of ``length`` bytes named by ``digest``.

    Raises:
        LocalProtocolError: TOO_LARGE if ``length`` exceeds ``max_frame_size`` (or is the
            marker value), BAD_FRAME if ``digest`` is not 32 bytes.
    """
    if len(digest) != DIGEST_SIZE:
        raise LocalProtocolError(ErrorCode.BAD_FRAME, "an offer names its body by a 32-byte digest")
    if length >= OFFER_MARKER:
        raise LocalProtocolError(ErrorCode.TOO_LARGE, f"frame body of {length} bytes cannot be offered")
    return OFFER_MARKER.to_bytes(FRAME_PREFIX_SIZE, "big") + digest + frame_prefix(length, max_frame_size)


def decode_answer(data: bytes | bytearray, length: int) -> int:
    """The ``have`` of a receiver's 4-byte answer to an offer of ``length`` bytes.

    Raises:
        RemoteProtocolError: BAD_FRAME if the answer is not 4 bytes or ``have >= length``
            (a receiver never holds a whole frame it was offered: it would have it).
    """
    if len(data) != ANSWER_SIZE:
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, f"an answer to an offer is 4 bytes, not {len(data)}")
    have = int.from_bytes(data, "big")
    if have >= max(length, 1):
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, f"answer claims {have} of {length} bytes")
    return have


def _check_max(max_frame_size: int) -> int:
    if type(max_frame_size) is not int or not 1 <= max_frame_size <= MAX_FRAME_SIZE_CEILING:
        raise LocalProtocolError(ErrorCode.TOO_LARGE, f"bad max_frame_size {max_frame_size!r}")
    return max_frame_size


def frame_prefix(length: int, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """The 4-byte prefix for a body of ``length`` bytes.

    Raises:
        LocalProtocolError: TOO_LARGE if ``length`` exceeds ``max_frame_size``.
    """
    if not 0 <= length <= _check_max(max_frame_size):
        raise LocalProtocolError(
            ErrorCode.TOO_LARGE, f"frame body of {length} bytes > max {max_frame_size}"
        )
    return length.to_bytes(FRAME_PREFIX_SIZE, "big")


def encode_frame(
    body: bytes | bytearray | memoryview, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
) -> bytes:
    """Return ``prefix || body`` as one bytes object (copies ``body``).

    For large bodies prefer writing ``frame_prefix(len(body))`` and ``body`` separately.
    """
    return b"".join((frame_prefix(len(body), max_frame_size), body))


class FrameDecoder:
    """Incremental frame decoder with bounded buffering.

    Memory held is at most one partial frame (never more than ``max_frame_size``) plus
    the complete frames not yet pulled, which come from the bytes the caller fed. Call
    :meth:`next_frame` until it returns :data:`NEED_DATA` after each
    :meth:`receive_data`; feeding more while over ``max_frame_size`` bytes of complete
    frames are waiting is refused.
    """

    def __init__(
        self,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        *,
        resumable: bool = False,
        streamed: Callable[[int, bytes, Any], ChunkSink] | None = None,
    ) -> None:
        """Create a decoder refusing bodies larger than ``max_frame_size`` bytes.

        Args:
            max_frame_size: The largest body accepted.
            resumable: Accept offers (the stream is ``/silomesh/exchange/1.1.0`` or later);
                without it a prefix of 0xFFFFFFFF is just a length.
            streamed: Accept streamed envelopes (``/silomesh/exchange/1.2.0``): called by
                :meth:`answer_stream` with the prelude's payload length and stream header and
                what is kept of the envelope (or None), it returns what opens the chunks.
                Without it a prefix of 0xFFFFFFFE is just a length.
        """
        self._max = _check_max(max_frame_size)
        self._resumable = resumable
        self._streamed = streamed
        self._opener: ChunkSink | None = None  # the streamed envelope in progress
        self._stream_offer: StreamOffer | None = None  # a prelude not answered yet
        self._chunk = bytearray()
        self._trailer = bytearray()
        self._trailer_need = _TRAILER_LEN
        self._prefix = bytearray()
        self._prefix_size = FRAME_PREFIX_SIZE
        self._length: int | None = None
        self._body = bytearray()
        self._filled = 0
        self._digest: bytes | None = None  # the offered digest of the frame in progress
        self._offer: FrameOffer | None = None  # an offer not answered yet
        self._offer_reported = False
        self._frames: deque[tuple[bytearray | StreamedFrame, bytes | None]] = deque()
        self._queued = 0
        self._eof = False
        self._error: RemoteProtocolError | None = None

    @property
    def max_frame_size(self) -> int:
        """Largest accepted body; changing it applies to prefixes not yet parsed."""
        return self._max

    @max_frame_size.setter
    def max_frame_size(self, value: int) -> None:
        self._max = _check_max(value)

    @property
    def complete_bytes(self) -> int:
        """Bytes of complete frames waiting for :meth:`next_frame`."""
        return self._queued

    @property
    def buffered(self) -> int:
        """Bytes currently held (partial frame plus queued frames)."""
        held = len(self._prefix) + self._filled + self._queued
        if self._opener is not None:
            held += self._opener.filled + len(self._chunk) + len(self._trailer)
        return held

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the stream; ``b""`` means the stream ended (EOF).

        Malformed input is reported by :meth:`next_frame`, after the frames that
        preceded it; bytes after a malformed prefix are discarded.

        Raises:
            LocalProtocolError: Data after EOF, or more than ``max_frame_size`` bytes of
                complete frames left unpulled from earlier calls.
        """
        if self._eof:
            raise LocalProtocolError(ErrorCode.BAD_FRAME, "receive_data after end of stream")
        if self._queued > self._max:
            raise LocalProtocolError(
                ErrorCode.TOO_LARGE,
                "complete frames left unpulled: call next_frame() until NEED_DATA",
            )
        view = memoryview(data).cast("B")
        if not view:
            self._eof = True
            return
        while view and self._error is None:
            if self._offer is not None or self._stream_offer is not None:
                self._error = RemoteProtocolError(
                    ErrorCode.BAD_FRAME, "bytes arrived before the offer was answered"
                )
                break
            if self._opener is not None:
                view = self._stream_data(view)
                continue
            if self._length is None:
                take = min(self._prefix_size - len(self._prefix), len(view))
                self._prefix += view[:take]
                view = view[take:]
                if len(self._prefix) < self._prefix_size:
                    continue
                if (
                    self._resumable
                    and self._prefix_size == FRAME_PREFIX_SIZE
                    and int.from_bytes(self._prefix, "big") == OFFER_MARKER
                ):
                    self._prefix_size = OFFER_SIZE  # an offer: its digest and length follow
                    continue
                if (
                    self._streamed is not None
                    and self._prefix_size == FRAME_PREFIX_SIZE
                    and int.from_bytes(self._prefix, "big") == STREAM_MARKER
                ):
                    self._prefix_size = PRELUDE_SIZE  # a streamed envelope: its length and header follow
                    continue
                if self._prefix_size == PRELUDE_SIZE:
                    self._start_stream()
                    continue
                length = int.from_bytes(self._prefix[-FRAME_PREFIX_SIZE:], "big")
                if length > self._max or (self._resumable and length == OFFER_MARKER):
                    logger.debug("refusing frame length %d > %d", length, self._max)
                    self._error = RemoteProtocolError(
                        ErrorCode.TOO_LARGE, f"frame length {length} > max {self._max}"
                    )
                    break
                if self._prefix_size == OFFER_SIZE:
                    digest = bytes(self._prefix[FRAME_PREFIX_SIZE : FRAME_PREFIX_SIZE + DIGEST_SIZE])
                    self._offer = FrameOffer(digest, length)
                    self._offer_reported = False
                    continue  # the next bytes must wait for answer_offer
                self._start(length, b"", None)
            else:
                take = min(self._length - self._filled, len(view))
                end = self._filled + take
                if end > len(self._body):
                    # Grow by doubling (few copies for a large frame) but never past the
                    # bytes that actually arrived times two, nor past the announced length:
                    # a length prefix alone cannot make us allocate much.
                    grown = min(self._length, max(2 * len(self._body), end))
                    self._body.extend(bytes(grown - len(self._body)))
                self._body[self._filled : end] = view[:take]
                self._filled = end
                view = view[take:]
            self._complete_if_full()

    def _start_stream(self) -> None:
        assert self._streamed is not None
        payload_len = int.from_bytes(self._prefix[FRAME_PREFIX_SIZE : 2 * FRAME_PREFIX_SIZE], "big")
        if stream_ciphertext_size(payload_len) > self._max:
            logger.debug("refusing a streamed payload of %d bytes > %d", payload_len, self._max)
            self._error = RemoteProtocolError(
                ErrorCode.TOO_LARGE, f"streamed payload of {payload_len} bytes > max {self._max}"
            )
            return
        if payload_len < _MIN_STREAMED_PAYLOAD:
            self._error = RemoteProtocolError(ErrorCode.BAD_FRAME, f"a streamed payload of {payload_len} bytes")
            return
        self._stream_offer = StreamOffer(payload_len, bytes(self._prefix[2 * FRAME_PREFIX_SIZE :]))
        self._offer_reported = False

    def answer_stream(self, kept: object = None) -> bytes:
        """Answer the pending streamed envelope's prelude: ``kept`` is what arrived of that
        envelope on an earlier stream of the same peer (the caller matched its stream header
        and length), or None.

        Returns:
            The 4-byte answer to write to the sender: the chunks held.

        Raises:
            LocalProtocolError: UNEXPECTED_MESSAGE if no prelude is pending.
        """
        offer = self._stream_offer
        if offer is None or self._streamed is None:
            raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "no streamed envelope to answer")
        self._stream_offer = None
        self._opener = self._streamed(offer.payload_len, offer.stream_header, kept)
        return self._opener.opened.to_bytes(ANSWER_SIZE, "big")

    def partial_stream(self) -> object:
        """What arrived of the streamed envelope in progress, to keep when the stream broke (None:
        none, or no whole chunk). The decoder must not be used afterwards."""
        if self._opener is None:
            return None
        return self._opener.keep()

    def _stream_data(self, view: memoryview) -> memoryview:
        """Feed a streamed envelope's chunks to its opener, then collect its trailer."""
        opener = self._opener
        assert opener is not None
        need = opener.next_chunk_size()
        if need:
            take = min(need - len(self._chunk), len(view))
            self._chunk += view[:take]
            if len(self._chunk) == need:
                try:
                    opener.open_chunk(self._chunk)
                except RemoteProtocolError as exc:
                    self._error = exc
                self._chunk = bytearray()
            return view[take:]
        take = min(self._trailer_need - len(self._trailer), len(view))
        self._trailer += view[:take]
        if len(self._trailer) == self._trailer_need == _TRAILER_LEN:
            header_len = int.from_bytes(self._trailer, "big")
            if header_len > MAX_HEADER_SIZE:
                self._error = RemoteProtocolError(ErrorCode.TOO_LARGE, f"header of {header_len} bytes")
                return view[take:]
            self._trailer_need = _TRAILER_LEN + header_len + SIGNATURE_SIZE
        elif len(self._trailer) == self._trailer_need:
            size = stream_ciphertext_size(opener.payload_len) + len(self._trailer)
            frame = StreamedFrame(opener.result(), bytes(self._trailer), size, opener.payload_len)
            self._frames.append((frame, None))
            self._queued += frame.payload_len
            self._opener = None
            self._trailer = bytearray()
            self._trailer_need = _TRAILER_LEN
            self._prefix = bytearray()
            self._prefix_size = FRAME_PREFIX_SIZE
        return view[take:]

    def _start(self, length: int, held: bytes | bytearray, digest: bytes | None) -> None:
        self._length = length
        self._body = bytearray(held)
        if len(self._body) < min(length, _INITIAL_BODY):
            self._body.extend(bytes(min(length, _INITIAL_BODY) - len(self._body)))
        self._filled = len(held)
        self._digest = digest

    def _complete_if_full(self) -> None:
        if self._length is not None and self._filled == self._length:
            del self._body[self._length :]
            self._frames.append((self._body, self._digest))
            self._queued += len(self._body)
            self._prefix = bytearray()
            self._prefix_size = FRAME_PREFIX_SIZE
            self._body = bytearray()
            self._filled = 0
            self._length = None
            self._digest = None

    def answer_offer(self, held: bytes | bytearray | None = None) -> bytes:
        """Answer the pending offer: ``held`` are the leading bytes of its body kept from an
        earlier stream (the caller matched the digest), None or empty for none.

        Returns:
            The 4-byte answer to write to the sender.

        Raises:
            LocalProtocolError: UNEXPECTED_MESSAGE if no offer is pending; BAD_FRAME if
                ``held`` is not shorter than the offered body.
        """
        offer = self._offer
        if offer is None:
            raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "no offer to answer")
        held = held or b""
        if len(held) and len(held) >= offer.length:
            raise LocalProtocolError(ErrorCode.BAD_FRAME, "held bytes must be fewer than the offered body")
        self._offer = None
        self._start(offer.length, held, offer.digest)
        self._complete_if_full()
        return len(held).to_bytes(ANSWER_SIZE, "big")

    def partial(self) -> PartialFrame | None:
        """What arrived of the offered frame in progress (None: no offered frame is in progress)."""
        if self._length is None or self._digest is None:
            return None
        return PartialFrame(self._digest, self._length, bytes(self._body[: self._filled]))

    def next_frame(self) -> bytearray | StreamedFrame | FrameOffer | StreamOffer | Signal:
        """Return the next complete frame body, an offer to answer, :data:`NEED_DATA` or :data:`CLOSED`.

        The returned ``bytearray`` belongs to the caller (the decoder keeps no
        reference), so it may be decrypted in place.

        Raises:
            RemoteProtocolError: TOO_LARGE for an oversize length prefix, BAD_FRAME if
                the stream ended inside a frame, if bytes came before an offer was
                answered, or if an offered frame does not match its digest. The error
                repeats on later calls.
        """
        if self._error is not None and not self._frames:
            raise self._error
        if self._frames:
            frame, digest = self._frames.popleft()
            if isinstance(frame, StreamedFrame):
                self._queued -= frame.payload_len
                return frame
            self._queued -= len(frame)
            if digest is not None and body_digest(frame) != digest:
                self._frames.clear()
                self._queued = 0
                self._error = RemoteProtocolError(
                    ErrorCode.BAD_FRAME, "the offered frame's bytes do not match its digest"
                )
                raise self._error
            return frame
        pending = self._offer if self._offer is not None else self._stream_offer
        if pending is not None:
            if not self._offer_reported:
                self._offer_reported = True
                return pending
            return NEED_DATA
        if self._eof:
            if self._opener is not None:
                self._error = RemoteProtocolError(
                    ErrorCode.BAD_FRAME,
                    f"stream ended inside a streamed envelope ({self._opener.filled} of "
                    f"{self._opener.payload_len} payload bytes, {len(self._trailer)} trailer bytes)",
                )
                raise self._error
            if self._prefix:
                self._error = RemoteProtocolError(
                    ErrorCode.BAD_FRAME,
                    f"stream ended inside a frame ({len(self._prefix)} prefix bytes, "
                    f"{self._filled} of {self._length} body bytes)",
                )
                raise self._error
            return CLOSED
        return NEED_DATA
