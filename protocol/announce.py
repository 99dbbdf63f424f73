"""Announces: small signed notices broadcast on GossipSub.

Topic ``silomesh/<federation>/announce``. Wire layout::

    signature (64) || body (msgpack map)

with ``signature`` = Ed25519(sender, ``ANNOUNCE_SIGNING_DOMAIN || body``). The whole
message must stay under :data:`~.limits.MAX_ANNOUNCE_SIZE` (64 KiB); GossipSub silently
drops messages near 1 MiB, so payloads never travel here. Announces are signed, not
encrypted (they are broadcast).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError, as_remote
from .identity import Identity, verify_signature
from .limits import DIGEST_SIZE, KEY_SIZE, MAX_ANNOUNCE_SIZE, PROTOCOL_VERSION, SIGNATURE_SIZE
from .messages import MAX_TEXT, Kind
from .replay import ReplayGuard
from .wire import (
    check_bytes,
    check_federation,
    check_keys,
    check_optional_bytes,
    check_str,
    check_uint,
    packb,
    unpack_map,
)

__all__ = [
    "ANNOUNCE_SIGNING_DOMAIN",
    "Announce",
    "AnnounceEvent",
    "Leaving",
    "NewData",
    "ReceivedAnnounce",
    "UpdateAvailable",
    "announce_topic",
    "decode_announce",
    "encode_announce",
]

ANNOUNCE_SIGNING_DOMAIN = b"silomesh/announce/v1\x00"
"""Prefix of the bytes an announce signature covers."""

COMMON_KEYS = (
    "version",
    "kind",
    "event",
    "federation",
    "sender",
    "recipient",
    "round",
    "sequence",
    "timestamp",
)
"""Body keys every announce has, in encoder order; event fields follow."""


class AnnounceEvent(enum.StrEnum):
    """What an announce says."""

    UPDATE_AVAILABLE = "update-available"
    NEW_DATA = "new-data"
    LEAVING = "leaving"


def announce_topic(federation: str) -> str:
    """The GossipSub topic of a federation's announces."""
    return f"silomesh/{check_federation(federation)}/announce"


@dataclass(frozen=True, kw_only=True)
class Announce:
    """Fields common to all announces.

    Attributes:
        federation: Federation id.
        sender: Sender's raw 32-byte Ed25519 public key.
        round: Sender's round.
        sequence: Sender's message counter (shared with its envelopes).
        recipient: ``None`` for a broadcast (the usual case), else one peer's key.
        version: Protocol version.
    """

    event: ClassVar[AnnounceEvent]
    EVENT_KEYS: ClassVar[tuple[str, ...]] = ()

    federation: str
    sender: bytes
    round: int
    sequence: int
    recipient: bytes | None = None
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if type(self.version) is not int or self.version != PROTOCOL_VERSION:
            raise LocalProtocolError(ErrorCode.UNKNOWN_VERSION, f"version {self.version!r}")
        check_federation(self.federation)
        check_bytes("sender", self.sender, KEY_SIZE)
        check_optional_bytes("recipient", self.recipient, KEY_SIZE)
        check_uint("round", self.round)
        check_uint("sequence", self.sequence)

    def event_fields(self) -> dict[str, Any]:
        """The event-specific fields as a msgpack-ready map."""
        return {key: getattr(self, key) for key in self.EVENT_KEYS}


@dataclass(frozen=True, kw_only=True)
class UpdateAvailable(Announce):
    """ "I have a new state for ``round``; dial me for it".

    Attributes:
        digest: The state digest of the announced state.
        size: Total bytes of that state's tensors as the sender holds them
            (informational: what a full snapshot costs before the codec).

    A peer that wants the state dials the sender and sends ``need-base`` with
    ``unknown_base = digest``; the sender answers with its current full snapshot.
    """

    event: ClassVar[AnnounceEvent] = AnnounceEvent.UPDATE_AVAILABLE
    EVENT_KEYS: ClassVar[tuple[str, ...]] = ("digest", "size")

    digest: bytes
    size: int

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bytes("digest", self.digest, DIGEST_SIZE)
        check_uint("size", self.size)


@dataclass(frozen=True, kw_only=True)
class NewData(Announce):
    """ "I registered new data": sample count and the dataset manifest's digest."""

    event: ClassVar[AnnounceEvent] = AnnounceEvent.NEW_DATA
    EVENT_KEYS: ClassVar[tuple[str, ...]] = ("n_samples", "manifest_digest")

    n_samples: int
    manifest_digest: bytes

    def __post_init__(self) -> None:
        super().__post_init__()
        check_uint("n_samples", self.n_samples)
        check_bytes("manifest_digest", self.manifest_digest, DIGEST_SIZE)


@dataclass(frozen=True, kw_only=True)
class Leaving(Announce):
    """ "I am leaving the federation" with an optional reason."""

    event: ClassVar[AnnounceEvent] = AnnounceEvent.LEAVING
    EVENT_KEYS: ClassVar[tuple[str, ...]] = ("reason",)

    reason: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_str("reason", self.reason, MAX_TEXT)


ANNOUNCE_TYPES: dict[AnnounceEvent, type[Announce]] = {
    cls.event: cls for cls in (UpdateAvailable, NewData, Leaving)
}


@dataclass(frozen=True, eq=False)
class ReceivedAnnounce:
    """A verified announce.

    Attributes:
        announce: The decoded announce.
        timestamp: Sender's Unix time in ms.
        body: The exact signed body bytes.
        signature: The sender's signature over ``ANNOUNCE_SIGNING_DOMAIN || body``.
    """

    announce: Announce
    timestamp: int
    body: bytes
    signature: bytes


def encode_announce(
    announce: Announce, identity: Identity, *, timestamp_ms: int | None = None
) -> bytes:
    """Sign ``announce`` and return its wire bytes (``signature || body``).

    Raises:
        LocalProtocolError: SENDER_MISMATCH, or TOO_LARGE above 64 KiB.
    """
    if announce.sender != identity.public_key:
        raise LocalProtocolError(ErrorCode.SENDER_MISMATCH, "announce.sender is not this identity")
    timestamp = time.time_ns() // 1_000_000 if timestamp_ms is None else timestamp_ms
    check_uint("timestamp", timestamp)
    body_map: dict[str, Any] = {
        "version": announce.version,
        "kind": Kind.ANNOUNCE.value,
        "event": announce.event.value,
        "federation": announce.federation,
        "sender": announce.sender,
        "recipient": announce.recipient,
        "round": announce.round,
        "sequence": announce.sequence,
        "timestamp": timestamp,
    }
    body_map.update(announce.event_fields())
    body = packb(body_map)
    if SIGNATURE_SIZE + len(body) > MAX_ANNOUNCE_SIZE:
        raise LocalProtocolError(ErrorCode.TOO_LARGE, "announce larger than 64 KiB")
    return identity.sign(ANNOUNCE_SIGNING_DOMAIN + body) + body


def decode_announce(
    data: bytes | bytearray | memoryview,
    *,
    federation: str,
    trusted: Container[bytes] | None,
    me: bytes | None = None,
    expected_sender: bytes | None = None,
    replay: ReplayGuard | None = None,
    now_ms: int | None = None,
    max_skew_ms: int | None = None,
) -> ReceivedAnnounce:
    """Verify and decode an announce received from GossipSub.

    Args:
        data: The pubsub message data.
        federation: Our federation id.
        trusted: Public keys we accept; ``None`` accepts any signer.
        me: Our public key; announces addressed to another peer are refused.
        expected_sender: The key behind the pubsub message's source peer, if known.
        replay: Replay guard, if any.
        now_ms: Current Unix time in ms, for the skew check.
        max_skew_ms: Largest accepted ``|timestamp - now_ms|``.

    Raises:
        RemoteProtocolError: With the reason code of the first failed check.
    """
    raw = bytes(data)
    if len(raw) > MAX_ANNOUNCE_SIZE:
        raise RemoteProtocolError(ErrorCode.TOO_LARGE, f"announce of {len(raw)} bytes")
    if len(raw) <= SIGNATURE_SIZE:
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, "announce is truncated")
    signature, body = raw[:SIGNATURE_SIZE], raw[SIGNATURE_SIZE:]
    obj = unpack_map(body, what="announce", max_size=MAX_ANNOUNCE_SIZE)
    version = obj.get("version")
    if type(version) is not int:
        raise RemoteProtocolError(ErrorCode.BAD_TYPE, "announce.version must be an integer")
    if version != PROTOCOL_VERSION:
        raise RemoteProtocolError(ErrorCode.UNKNOWN_VERSION, f"version {version}")
    kind = obj.get("kind")
    if type(kind) is not str:
        raise RemoteProtocolError(ErrorCode.BAD_TYPE, "announce.kind must be a str")
    if kind != Kind.ANNOUNCE.value:
        raise RemoteProtocolError(ErrorCode.UNKNOWN_KIND, f"kind {kind[:32]!r} is not an announce")
    event = obj.get("event")
    if type(event) is not str:
        raise RemoteProtocolError(ErrorCode.BAD_TYPE, "announce.event must be a str")
    cls = ANNOUNCE_TYPES.get(event)  # type: ignore[call-overload]
    if cls is None:
        raise RemoteProtocolError(ErrorCode.UNKNOWN_KIND, f"announce event {event[:32]!r}")
    with as_remote():
        check_keys("announce", obj, COMMON_KEYS + cls.EVENT_KEYS)
        # every common field's failure is BAD_TYPE, so checking timestamp first gives the
        # same code as the table order; only an event field can be TOO_LARGE (``reason``)
        timestamp = check_uint("timestamp", obj["timestamp"])
        fields: Mapping[str, Any] = {
            k: v for k, v in obj.items() if k not in ("kind", "event", "timestamp")
        }
        announce = cls(**fields)
    if trusted is not None and announce.sender not in trusted:
        raise RemoteProtocolError(
            ErrorCode.UNTRUSTED_SENDER, f"sender {announce.sender.hex()[:16]}"
        )
    if expected_sender is not None and announce.sender != expected_sender:
        raise RemoteProtocolError(ErrorCode.SENDER_MISMATCH, "announce sender is not the source")
    if not verify_signature(announce.sender, ANNOUNCE_SIGNING_DOMAIN + body, signature):
        raise RemoteProtocolError(ErrorCode.BAD_SIGNATURE, "announce signature does not verify")
    if announce.recipient is not None and me is not None and announce.recipient != me:
        raise RemoteProtocolError(ErrorCode.WRONG_RECIPIENT, "announce addressed to another peer")
    if announce.federation != federation:
        raise RemoteProtocolError(ErrorCode.WRONG_FEDERATION, f"federation {announce.federation!r}")
    if now_ms is not None and max_skew_ms is not None and abs(timestamp - now_ms) > max_skew_ms:
        raise RemoteProtocolError(ErrorCode.STALE, f"timestamp {timestamp} vs now {now_ms}")
    if replay is not None:
        replay.accept(announce.sender, announce.round, announce.sequence)
    return ReceivedAnnounce(announce=announce, timestamp=timestamp, body=body, signature=signature)
