"""Protocol error types and reason codes.

As in h11 there are two error types: :class:`LocalProtocolError` means *we* tried to
do something invalid (a bug or misuse on this side), :class:`RemoteProtocolError`
means the other side sent something invalid. Every decoder in this package raises
only :class:`RemoteProtocolError` on bad input. Both carry an :class:`ErrorCode`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = [
    "ErrorCode",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "as_remote",
]


class ErrorCode(enum.StrEnum):
    """Why a message was refused. The string value travels in ``error`` messages."""

    BAD_FRAME = "BAD_FRAME"
    """Framing is broken: truncated frame or envelope, bad lengths."""
    TOO_LARGE = "TOO_LARGE"
    """A length or count exceeds a configured limit."""
    BAD_MSGPACK = "BAD_MSGPACK"
    """Bytes that should be msgpack are not valid (strict) msgpack."""
    BAD_TYPE = "BAD_TYPE"
    """A field is missing, unexpected, or of the wrong type or range."""
    UNKNOWN_VERSION = "UNKNOWN_VERSION"
    """The protocol version is not one we speak."""
    UNKNOWN_KIND = "UNKNOWN_KIND"
    """The message kind (or announce event) is unknown."""
    BAD_SIGNATURE = "BAD_SIGNATURE"
    """The Ed25519 signature does not verify."""
    UNTRUSTED_SENDER = "UNTRUSTED_SENDER"
    """The sender is not in the trusted allowlist."""
    SENDER_MISMATCH = "SENDER_MISMATCH"
    """The sender differs from the authenticated peer of this stream."""
    WRONG_RECIPIENT = "WRONG_RECIPIENT"
    """The message is addressed to someone else."""
    WRONG_FEDERATION = "WRONG_FEDERATION"
    """The message belongs to another federation."""
    DIGEST_MISMATCH = "DIGEST_MISMATCH"
    """The payload digest in the header does not match the ciphertext."""
    DECRYPT_FAILED = "DECRYPT_FAILED"
    """The ciphertext does not authenticate or decrypt."""
    REPLAY = "REPLAY"
    """This (sender, round, sequence) was already accepted or is too old."""
    STALE = "STALE"
    """The timestamp is outside the allowed clock skew."""
    NON_FINITE = "NON_FINITE"
    """A tensor holds NaN or infinity."""
    BAD_SHAPE = "BAD_SHAPE"
    """A tensor's shape is invalid or does not match the model."""
    BAD_DTYPE = "BAD_DTYPE"
    """A tensor's dtype is not allowed (or does not fit the codec)."""
    BAD_TABLE = "BAD_TABLE"
    """A tensor table is inconsistent: overlaps, gaps, overruns, bad names."""
    UNEXPECTED_MESSAGE = "UNEXPECTED_MESSAGE"
    """The message kind is not allowed in the current session state."""
    UNEXPECTED_EOF = "UNEXPECTED_EOF"
    """The stream ended where the session state does not allow it."""
    STATE_MISMATCH = "STATE_MISMATCH"
    """A tensor message's ``state_digest`` is not the digest of the state it produces."""
    BAD_ROUND = "BAD_ROUND"
    """The round is outside the window the receiver accepts (peer-level use)."""
    UNKNOWN_BASE = "UNKNOWN_BASE"
    """A delta names a base state the receiver does not have (peer-level use)."""
    REFUSED = "REFUSED"
    """The receiver declines (policy, consent, busy); peer-level use."""
    INTERNAL = "INTERNAL"
    """The receiver failed for its own reasons; peer-level use."""


class ProtocolError(Exception):
    """Base class of both protocol errors.

    Attributes:
        code: The :class:`ErrorCode` naming the reason.
        message: Human-readable detail (never contains secrets).
    """

    def __init__(self, code: ErrorCode, message: str = "") -> None:
        super().__init__(f"{code.value}: {message}" if message else code.value)
        self.code = code
        self.message = message


class LocalProtocolError(ProtocolError):
    """We attempted something the protocol forbids (our bug or misuse)."""


class RemoteProtocolError(ProtocolError):
    """The remote peer sent something invalid; refuse it, log it, maybe distrust."""


@contextmanager
def as_remote() -> Iterator[None]:
    """Re-raise :class:`LocalProtocolError` as :class:`RemoteProtocolError`.

    Used when validation code shared with the sending side runs on received data.
    """
    try:
        yield
    except LocalProtocolError as exc:
        raise RemoteProtocolError(exc.code, exc.message) from None
