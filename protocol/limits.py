"""Protocol constants and configurable size limits.

Every length read from the wire is checked against one of these limits before any
memory is committed for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ErrorCode, LocalProtocolError

__all__ = [
    "ANNOUNCE_TOPIC_PREFIX",
    "DEFAULT_LIMITS",
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_MAX_SKEW_MS",
    "DIGEST_SIZE",
    "EXCHANGE_PROTOCOL_ID",
    "FRAME_PREFIX_SIZE",
    "KEY_SIZE",
    "MAX_ANNOUNCE_SIZE",
    "MAX_FRAME_SIZE_CEILING",
    "MAX_HEADER_SIZE",
    "MAX_MSGPACK_DEPTH",
    "NONCE_SIZE",
    "PROTOCOL_VERSION",
    "RESUMABLE_EXCHANGE_PROTOCOL_ID",
    "SIGNATURE_SIZE",
    "STREAMED_EXCHANGE_PROTOCOL_ID",
    "Limits",
]

PROTOCOL_VERSION = 2
"""The only wire version this package speaks (envelope headers and announces carry it)."""

EXCHANGE_PROTOCOL_ID = "/silomesh/exchange/1.0.0"
"""libp2p protocol id of the direct exchange stream (frames of section 4 only)."""

RESUMABLE_EXCHANGE_PROTOCOL_ID = "/silomesh/exchange/1.1.0"
"""The same exchange, where a sender may also offer a frame and resume it (section 4.1)."""

STREAMED_EXCHANGE_PROTOCOL_ID = "/silomesh/exchange/1.2.0"
"""1.1.0, where an envelope may also be streamed: sealed and opened in chunks (section 4.2)."""

ANNOUNCE_TOPIC_PREFIX = "silomesh/"
"""GossipSub topic is ``silomesh/<federation>/announce``."""

FRAME_PREFIX_SIZE = 4
"""Frames start with a 4-byte big-endian unsigned body length."""

MAX_FRAME_SIZE_CEILING = 2**32 - 1
"""The largest body a 4-byte length prefix can describe."""

DEFAULT_MAX_FRAME_SIZE = 512 * 1024 * 1024
"""512 MiB: room for a 100M-parameter float32 model (400 MB) plus its table."""

MAX_HEADER_SIZE = 4096
"""Upper bound on an envelope's msgpack header."""

MAX_ANNOUNCE_SIZE = 64 * 1024
"""Upper bound on a whole announce message (GossipSub drops ~1 MiB)."""

MAX_MSGPACK_DEPTH = 8
"""Deepest nesting of msgpack maps and arrays accepted (the top-level map is depth 1;
the deepest the protocol uses is 4: body -> tensors -> entry -> shape)."""

DEFAULT_MAX_SKEW_MS = 15 * 60 * 1000
"""The reference peer's default largest ``|timestamp - now|`` (15 minutes) before ``STALE``."""

KEY_SIZE = 32
"""Ed25519 public keys, X25519 keys and seeds are 32 bytes."""

DIGEST_SIZE = 32
"""BLAKE2b-256 digests."""

SIGNATURE_SIZE = 64
"""Ed25519 signatures."""

NONCE_SIZE = 24
"""XSalsa20-Poly1305 (crypto_box) nonces."""


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Size limits applied when decoding (and, for sanity, when encoding).

    Attributes:
        max_frame_size: Largest frame body accepted (bytes).
        max_body_size: Largest msgpack body inside a decrypted payload (bytes).
        max_tensors: Most tensors in one state dict.
        max_name_length: Longest tensor name (UTF-8 bytes).
        max_ndim: Most dimensions of one tensor.
        max_tensor_elements: Most elements in one tensor.
        max_total_elements: Most elements over all tensors of a message.
    """

    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    max_body_size: int = 4 * 1024 * 1024
    max_tensors: int = 10_000
    max_name_length: int = 256
    max_ndim: int = 8
    max_tensor_elements: int = 2**27
    max_total_elements: int = 2**27

    def __post_init__(self) -> None:
        if not 64 <= self.max_frame_size <= MAX_FRAME_SIZE_CEILING:
            raise LocalProtocolError(
                ErrorCode.TOO_LARGE,
                f"max_frame_size must be in [64, 2**32-1]: {self.max_frame_size}",
            )
        for name in (
            "max_body_size",
            "max_tensors",
            "max_name_length",
            "max_ndim",
            "max_tensor_elements",
            "max_total_elements",
        ):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise LocalProtocolError(ErrorCode.BAD_TYPE, f"{name} must be a positive int")


DEFAULT_LIMITS = Limits()
