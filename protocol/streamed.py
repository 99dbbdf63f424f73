"""Streamed envelopes: sealed and opened in chunks while the bytes travel (PROTOCOL.md section 4.2).

A whole envelope (section 5) is sealed as one piece, because its header, written first,
carries the digest of the whole ciphertext: a sender holds a sealed copy of the model as
large as the model. On ``/silomesh/exchange/1.2.0`` a large envelope may instead be
*streamed*::

    prelude  := 0xFFFFFFFE (u32be) || payload_len (u32be) || stream_header (24)
    answer   := have (u32be)                          receiver -> sender: chunks kept from a broken stream
    then        chunk_have || ... || chunk_{n-1}      n = max(1, ceil(payload_len / 2^16))
                || header_len (u16be) || header || signature (64)                  trailer
    chunk_i  := crypto_secretstream_xchacha20poly1305_push(payload[i*2^16 : (i+1)*2^16],
                                                           tag = FINAL for the last, MESSAGE otherwise)

The chunks are the payload of section 5.4 encrypted with libsodium's secretstream under a
key derived from the Box key of section 3 (:func:`stream_key`); the trailer is a header
and signature exactly as in section 5, with ``nonce`` = the stream header and
``payload_digest`` = BLAKE2b-256 of the chunks' bytes in order. So the sender encrypts a
chunk, writes it and forgets it (:class:`StreamSealer`: it never holds more than one
chunk of ciphertext), and the receiver authenticates and decrypts each chunk as it
arrives, into the buffer the payload is then decoded from (:class:`StreamOpener`). The
signed header comes last, and what was received is used only once it verified. A stream
that breaks leaves the receiver its whole chunks (:class:`PartialStream`); the sender
sends the same envelope again from the first chunk the receiver lacks
(:meth:`StreamSealer.chunks` with ``start``).

No cryptography is implemented here: libsodium (through PyNaCl's cffi handle) does it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import nacl.bindings
from nacl._sodium import ffi, lib

from .crypto import Blake2b256
from .envelope import (
    ENVELOPE_SIGNING_DOMAIN,
    EncodedPayload,
    EnvelopeHeader,
    SealedHeader,
    encode_payload,
)
from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .frames import (
    PRELUDE_SIZE,
    STREAM_CHUNK_SIZE,
    STREAM_HEADER_SIZE,
    STREAM_MARKER,
    STREAM_TAG_SIZE,
    stream_chunks,
    stream_ciphertext_size,
)
from .identity import Identity
from .limits import DEFAULT_LIMITS, DIGEST_SIZE, FRAME_PREFIX_SIZE, KEY_SIZE, MAX_HEADER_SIZE, SIGNATURE_SIZE, Limits
from .messages import Message
from .opening import StreamedPayload
from .wire import packb

__all__ = [
    "CHUNK_SIZE",
    "PRELUDE_SIZE",
    "STREAM_HEADER_SIZE",
    "STREAM_MARKER",
    "STREAM_TAG_SIZE",
    "PartialStream",
    "StreamOpener",
    "StreamSealer",
    "seal_streamed",
    "stream_key",
    "streamed_size",
]

CHUNK_SIZE = STREAM_CHUNK_SIZE
"""Payload bytes per chunk (the last chunk holds the rest)."""

STREAM_KEY_DOMAIN = b"silomesh/stream/v1"
"""What the Box key is hashed with to give the stream key (never the same key for two ciphers)."""

_LEN = 2  # the trailer's header length prefix, as an envelope's
_TAG_MESSAGE = 0
_TAG_FINAL = 3
_STATE_BYTES = 52
_MIN_PAYLOAD = 4

assert lib.crypto_secretstream_xchacha20poly1305_headerbytes() == STREAM_HEADER_SIZE
assert lib.crypto_secretstream_xchacha20poly1305_abytes() == STREAM_TAG_SIZE
assert lib.crypto_secretstream_xchacha20poly1305_statebytes() == _STATE_BYTES
assert lib.crypto_secretstream_xchacha20poly1305_tag_final() == _TAG_FINAL


def stream_key(box_key: bytes) -> bytes:
    """The secretstream key between two peers: keyed BLAKE2b-256(key = Box key, ``silomesh/stream/v1``)."""
    if len(box_key) != KEY_SIZE:
        raise ValueError("the Box key is 32 bytes")
    return nacl.bindings.crypto_generichash_blake2b_salt_personal(STREAM_KEY_DOMAIN, digest_size=KEY_SIZE, key=box_key)


def streamed_size(payload_len: int, header_len: int) -> int:
    """The envelope's size (chunks and trailer; the prelude excluded), as audited."""
    return stream_ciphertext_size(payload_len) + _LEN + header_len + SIGNATURE_SIZE


class StreamSealer:
    """One streamed envelope being sealed: :attr:`prelude`, then :meth:`chunks`, then :attr:`trailer`.

    Made by :func:`seal_streamed`. Each chunk is encrypted when asked for and handed out
    as a fresh ``bytearray`` that the sealer keeps no reference to; the sealer itself
    holds one chunk of plaintext. The tensors of the message must not change until the
    last chunk is out.
    """

    def __init__(
        self, message: Message, identity: Identity, payload: EncodedPayload, timestamp_ms: int, limits: Limits
    ) -> None:
        self._payload = payload
        self._identity = identity
        self._state = ffi.new("unsigned char[]", _STATE_BYTES)
        stream_header = ffi.new("unsigned char[]", STREAM_HEADER_SIZE)
        key = stream_key(identity.shared_key(message.recipient))
        if lib.crypto_secretstream_xchacha20poly1305_init_push(self._state, stream_header, key) != 0:
            raise RuntimeError("crypto_secretstream init_push failed")  # pragma: no cover
        self._initial_state = bytes(ffi.buffer(self._state))
        self.stream_header = bytes(ffi.buffer(stream_header, STREAM_HEADER_SIZE))
        self.chunk_count = stream_chunks(payload.size)
        self.payload_len = payload.size
        # the real digest is known after the last chunk; it has the same length
        self._unsigned = payload.header(
            message, timestamp=timestamp_ms, payload_digest=bytes(DIGEST_SIZE), nonce=self.stream_header
        )
        header_len = len(packb(self._unsigned.to_map()))
        if header_len > MAX_HEADER_SIZE:  # pragma: no cover - fields are bounded
            raise LocalProtocolError(ErrorCode.TOO_LARGE, "header too large")
        self.size = streamed_size(self.payload_len, header_len)
        if self.payload_len > limits.max_frame_size or self.size > limits.max_frame_size:
            raise LocalProtocolError(ErrorCode.TOO_LARGE, f"envelope of {self.size} bytes > frame limit")
        self._hash = Blake2b256()
        self._sealed: SealedHeader | None = None
        #: the digest state after each chunk handed out so far: a resumed sending checks that
        #: the chunks it skips are the ones the receiver holds
        self._hash_states: list[bytes] = []

    @property
    def header(self) -> EnvelopeHeader:
        """The header's routing fields (its ``payload_digest`` is known once the chunks are out)."""
        return self._sealed.header if self._sealed is not None else self._unsigned

    @property
    def prelude(self) -> bytes:
        """``0xFFFFFFFE || payload_len || stream header``: write it first."""
        return b"".join(
            (STREAM_MARKER.to_bytes(FRAME_PREFIX_SIZE, "big"), self.payload_len.to_bytes(4, "big"), self.stream_header)
        )

    def chunks(self, start: int = 0) -> Iterator[bytearray]:
        """Encrypt and hand out the chunks in order, from chunk ``start`` on.

        May be called again to send the envelope again, from the chunk a receiver asks for
        (PROTOCOL.md section 4.2, resuming): the chunks before ``start`` are encrypted again
        (the same key, stream header and plaintext give the same bytes) but not handed out,
        and the digest state they leave must be the one the first sending left there.

        Raises:
            LocalProtocolError: BAD_FRAME if ``start`` is not a chunk index, or if the skipped
                chunks differ from the ones sent before (the message's tensors changed).
        """
        if not 0 <= start < self.chunk_count:
            raise LocalProtocolError(ErrorCode.BAD_FRAME, f"no chunk {start} in {self.chunk_count}")
        if start and len(self._hash_states) < start:
            raise LocalProtocolError(ErrorCode.BAD_FRAME, f"chunk {start} was never sent")
        ffi.memmove(self._state, self._initial_state, _STATE_BYTES)
        self._hash = Blake2b256()
        plain = bytearray(min(CHUNK_SIZE, self.payload_len))
        view = memoryview(plain)
        filled = 0
        left = self.payload_len
        index = 0
        for piece in self._payload.pieces():
            src = memoryview(piece).cast("B")
            while len(src):
                take = min(len(src), len(plain) - filled)
                view[filled : filled + take] = src[:take]
                filled += take
                src = src[take:]
                if filled == len(plain) or filled == left:
                    left -= filled
                    chunk = self._push(view[:filled], final=left == 0)
                    filled = 0
                    state = self._hash.state()
                    if index < len(self._hash_states):
                        if index < start and state != self._hash_states[index]:
                            raise LocalProtocolError(
                                ErrorCode.BAD_FRAME, "the message changed since its chunks were first sent"
                            )
                        self._hash_states[index] = state
                    else:
                        self._hash_states.append(state)
                    index += 1
                    if index > start:
                        yield chunk
        if left:  # pragma: no cover - the payload's pieces add up to its size
            raise LocalProtocolError(ErrorCode.BAD_FRAME, "payload shorter than its size")
        header = replace(self._unsigned, payload_digest=self._hash.digest())
        header_bytes = packb(header.to_map())
        self._sealed = SealedHeader(
            header=header,
            header_bytes=header_bytes,
            signature=self._identity.sign(ENVELOPE_SIGNING_DOMAIN + header_bytes),
            size=self.size,
        )

    def _push(self, plain: memoryview, *, final: bool) -> bytearray:
        out = bytearray(len(plain) + STREAM_TAG_SIZE)
        rc = lib.crypto_secretstream_xchacha20poly1305_push(
            self._state,
            ffi.from_buffer("unsigned char[]", out, require_writable=True),
            ffi.NULL,
            ffi.from_buffer("unsigned char[]", plain),
            len(plain),
            ffi.NULL,
            0,
            _TAG_FINAL if final else _TAG_MESSAGE,
        )
        if rc != 0:  # pragma: no cover - only on parameter errors
            raise RuntimeError("crypto_secretstream push failed")
        self._hash.update(out)
        return out

    @property
    def sealed(self) -> SealedHeader:
        """The signed header, once every chunk was handed out.

        Raises:
            LocalProtocolError: BAD_FRAME before the last chunk.
        """
        if self._sealed is None:
            raise LocalProtocolError(ErrorCode.BAD_FRAME, "the header is signed after the last chunk")
        return self._sealed

    @property
    def trailer(self) -> bytes:
        """``header_len || header || signature``: write it after the last chunk."""
        return self.sealed.head


def seal_streamed(
    message: Message, identity: Identity, *, limits: Limits = DEFAULT_LIMITS, timestamp_ms: int | None = None
) -> StreamSealer:
    """Check ``message`` and start sealing it as a streamed envelope (nothing is encrypted yet).

    Raises:
        LocalProtocolError: as :func:`~.envelope.seal_envelope`.
    """
    payload = encode_payload(message, identity, limits)
    now = time.time_ns() // 1_000_000 if timestamp_ms is None else timestamp_ms
    return StreamSealer(message, identity, payload, now, limits)


@dataclass(frozen=True, eq=False)
class PartialStream:
    """What arrived of a streamed envelope whose stream broke: enough to go on from its next chunk.

    Attributes:
        stream_header: The envelope's stream header (it names the envelope, with ``payload_len``).
        payload_len: Its payload's size.
        opened: Chunks authenticated and decrypted.
        ciphertext_bytes: Their size on the wire.
        plaintext: Their plaintext (the payload's first bytes).
        pull_state: The secretstream state after them.
        hash_state: The digest state after them.
    """

    stream_header: bytes
    payload_len: int
    opened: int
    ciphertext_bytes: int
    plaintext: bytearray
    pull_state: bytes
    hash_state: bytes


class StreamOpener:
    """The receiving end of one streamed envelope: authenticates and decrypts chunk by chunk.

    The payload buffer grows as chunks decrypt (a prelude alone cannot make us allocate
    much), and the digest of the chunks' bytes is computed on the way.
    """

    def __init__(
        self, box_key: bytes, stream_header: bytes, payload_len: int, kept: PartialStream | None = None
    ) -> None:
        """Start opening a stream whose prelude announced ``payload_len`` and ``stream_header``,
        or go on from ``kept`` (the same envelope's first chunks, from a stream that broke).

        Raises:
            RemoteProtocolError: BAD_FRAME for a payload shorter than its length prefix;
                DECRYPT_FAILED if libsodium refuses the stream header.
            ValueError: ``kept`` is of another envelope.
        """
        if payload_len < _MIN_PAYLOAD:
            raise RemoteProtocolError(ErrorCode.BAD_FRAME, f"a streamed payload of {payload_len} bytes")
        self.payload_len = payload_len
        self.stream_header = bytes(stream_header)
        self.chunks = stream_chunks(payload_len)
        self._state = ffi.new("unsigned char[]", _STATE_BYTES)
        self._scratch = bytearray(min(payload_len, CHUNK_SIZE))
        if kept is not None:
            same = (kept.stream_header, kept.payload_len) == (self.stream_header, payload_len)
            if not same or kept.opened >= self.chunks:
                raise ValueError("the kept chunks are of another envelope")
            ffi.memmove(self._state, kept.pull_state, _STATE_BYTES)
            self._hash = Blake2b256.restore(kept.hash_state)
            self.plaintext = kept.plaintext
            self.filled = len(kept.plaintext)
            self.opened = kept.opened
            self.ciphertext_bytes = kept.ciphertext_bytes
            return
        key = stream_key(box_key)
        if lib.crypto_secretstream_xchacha20poly1305_init_pull(self._state, self.stream_header, key) != 0:
            raise RemoteProtocolError(ErrorCode.DECRYPT_FAILED, "bad stream header")  # pragma: no cover
        self._hash = Blake2b256()
        self.plaintext = bytearray()
        self.filled = 0
        self.opened = 0
        self.ciphertext_bytes = 0

    def keep(self) -> PartialStream | None:
        """What arrived, to go on from on a new stream (None: no whole chunk arrived, or all did).
        The opener must not be used afterwards (its buffer is handed over)."""
        if not 0 < self.opened < self.chunks:
            return None
        del self.plaintext[self.filled :]
        return PartialStream(
            self.stream_header,
            self.payload_len,
            self.opened,
            self.ciphertext_bytes,
            self.plaintext,
            bytes(ffi.buffer(self._state)),
            self._hash.state(),
        )

    def next_chunk_size(self) -> int:
        """The ciphertext size of the next chunk (0: every chunk arrived)."""
        if self.opened == self.chunks:
            return 0
        return min(CHUNK_SIZE, self.payload_len - self.filled) + STREAM_TAG_SIZE

    def open_chunk(self, chunk: bytes | bytearray | memoryview) -> None:
        """Authenticate and decrypt the next chunk (exactly :meth:`next_chunk_size` bytes).

        Raises:
            RemoteProtocolError: DECRYPT_FAILED if it does not authenticate; BAD_FRAME if
                its tag is FINAL before the last chunk, or not FINAL on the last.
        """
        view = memoryview(chunk).cast("B")
        size = self.next_chunk_size()
        if len(view) != size or size == 0:
            raise LocalProtocolError(ErrorCode.BAD_FRAME, f"a chunk of {len(view)} bytes, expected {size}")
        n = size - STREAM_TAG_SIZE
        tag = ffi.new("unsigned char *")
        # into one chunk's scratch, then appended: the payload grows only by bytes that arrived
        # and authenticated (never from the prelude's length), without zero-filling it first
        out = ffi.from_buffer("unsigned char[]", self._scratch, require_writable=True)
        rc = lib.crypto_secretstream_xchacha20poly1305_pull(
            self._state, out, ffi.NULL, tag, ffi.from_buffer("unsigned char[]", view), size, ffi.NULL, 0
        )
        if rc != 0:
            raise RemoteProtocolError(ErrorCode.DECRYPT_FAILED, f"chunk {self.opened} does not authenticate")
        last = self.opened + 1 == self.chunks
        if (tag[0] == _TAG_FINAL) != last:
            raise RemoteProtocolError(
                ErrorCode.BAD_FRAME,
                f"chunk {self.opened} of {self.chunks} is {'' if tag[0] == _TAG_FINAL else 'not '}marked final",
            )
        self._hash.update(view)
        self.plaintext += memoryview(self._scratch)[:n]
        self.filled += n
        self.opened += 1
        self.ciphertext_bytes += size

    def result(self) -> StreamedPayload:
        """The digest, stream header and decrypted payload, once every chunk arrived."""
        if self.opened != self.chunks:
            raise LocalProtocolError(ErrorCode.BAD_FRAME, "the stream is not complete")
        return StreamedPayload(self._hash.digest(), self.stream_header, memoryview(self.plaintext))
