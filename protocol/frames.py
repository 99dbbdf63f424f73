"""Length-prefixed framing, sans-I/O.

A frame is a 4-byte big-endian unsigned length ``n`` followed by ``n`` body bytes.
:class:`FrameDecoder` turns a byte stream fed with :meth:`FrameDecoder.receive_data`
into frames pulled with :meth:`FrameDecoder.next_frame`. A length prefix above the
configured maximum is refused as soon as its 4 bytes arrive, before any body byte is
buffered, and the body buffer only grows as bytes actually arrive.
"""

from __future__ import annotations

import enum
import logging
from collections import deque

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .limits import DEFAULT_MAX_FRAME_SIZE, FRAME_PREFIX_SIZE, MAX_FRAME_SIZE_CEILING

__all__ = ["CLOSED", "NEED_DATA", "FrameDecoder", "Signal", "encode_frame", "frame_prefix"]

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

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        """Create a decoder refusing bodies larger than ``max_frame_size`` bytes."""
        self._max = _check_max(max_frame_size)
        self._prefix = bytearray()
        self._length: int | None = None
        self._body = bytearray()
        self._filled = 0
        self._frames: deque[bytearray] = deque()
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
        return len(self._prefix) + self._filled + self._queued

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
            if self._length is None:
                take = min(FRAME_PREFIX_SIZE - len(self._prefix), len(view))
                self._prefix += view[:take]
                view = view[take:]
                if len(self._prefix) < FRAME_PREFIX_SIZE:
                    break
                length = int.from_bytes(self._prefix, "big")
                if length > self._max:
                    logger.debug("refusing frame length %d > %d", length, self._max)
                    self._error = RemoteProtocolError(
                        ErrorCode.TOO_LARGE, f"frame length {length} > max {self._max}"
                    )
                    break
                self._length = length
                self._body = bytearray(min(length, _INITIAL_BODY))
                self._filled = 0
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
            if self._length is not None and self._filled == self._length:
                self._queue(self._body)
                self._prefix = bytearray()
                self._body = bytearray()
                self._filled = 0
                self._length = None

    def _queue(self, frame: bytearray) -> None:
        self._frames.append(frame)
        self._queued += len(frame)

    def next_frame(self) -> bytearray | Signal:
        """Return the next complete frame body, :data:`NEED_DATA` or :data:`CLOSED`.

        The returned ``bytearray`` belongs to the caller (the decoder keeps no
        reference), so it may be decrypted in place.

        Raises:
            RemoteProtocolError: TOO_LARGE for an oversize length prefix, BAD_FRAME if
                the stream ended inside a frame. The error repeats on later calls.
        """
        if self._frames:
            frame = self._frames.popleft()
            self._queued -= len(frame)
            return frame
        if self._error is not None:
            raise self._error
        if self._eof:
            if self._prefix:
                self._error = RemoteProtocolError(
                    ErrorCode.BAD_FRAME,
                    f"stream ended inside a frame ({len(self._prefix)} prefix bytes, "
                    f"{self._filled} of {self._length} body bytes)",
                )
                raise self._error
            return CLOSED
        return NEED_DATA
