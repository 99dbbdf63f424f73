"""Announces: small signed GossipSub notices."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from silomesh.protocol import (
    ANNOUNCE_SIGNING_DOMAIN,
    MAX_ANNOUNCE_SIZE,
    Announce,
    ErrorCode,
    Identity,
    Leaving,
    LocalProtocolError,
    NewData,
    ReceivedAnnounce,
    RemoteProtocolError,
    ReplayGuard,
    UpdateAvailable,
    announce_topic,
    decode_announce,
    encode_announce,
)

PROPERTY = settings(max_examples=250, deadline=None, derandomize=True, database=None)
ALICE = Identity.from_seed(b"\x01" * 32)
BOB = Identity.from_seed(b"\x02" * 32)
CAROL = Identity.from_seed(b"\x03" * 32)
DIGEST = bytes(range(32))


def common(**kw: Any) -> dict[str, Any]:
    base = {"federation": "fed", "sender": ALICE.public_key, "round": 4, "sequence": 10}
    base.update(kw)
    return base


ANNOUNCES: list[Announce] = [
    UpdateAvailable(**common(), digest=DIGEST, size=8_000_000),
    NewData(**common(), n_samples=120, manifest_digest=DIGEST),
    Leaving(**common(), reason="maintenance"),
    Leaving(**common(recipient=BOB.public_key)),
]


def decode(data: bytes, **kw: Any) -> ReceivedAnnounce:
    args: dict[str, Any] = {"federation": "fed", "trusted": {ALICE.public_key}}
    args.update(kw)
    return decode_announce(data, **args)


def refusal(data: bytes, **kw: Any) -> str:
    with pytest.raises(RemoteProtocolError) as info:
        decode(data, **kw)
    return info.value.code.value


def resign(body: object, signer: Identity = ALICE) -> bytes:
    raw = msgpack.packb(body, use_bin_type=True)
    return signer.sign(ANNOUNCE_SIGNING_DOMAIN + raw) + raw


GOOD = encode_announce(ANNOUNCES[0], ALICE, timestamp_ms=5_000)
GOOD_BODY = msgpack.unpackb(GOOD[64:], raw=False)


@pytest.mark.parametrize("announce", ANNOUNCES, ids=lambda a: a.event.value)
def test_every_announce_event_round_trips(announce: Announce) -> None:
    received = decode(encode_announce(announce, ALICE, timestamp_ms=123))
    assert received.announce == announce and received.timestamp == 123


def test_announce_is_small() -> None:
    assert max(len(encode_announce(a, ALICE)) for a in ANNOUNCES) < 400


def test_announce_topic_names_the_federation() -> None:
    assert announce_topic("fed") == "silomesh/fed/announce"


def test_announce_body_is_a_msgpack_map_with_the_documented_keys() -> None:
    assert list(GOOD_BODY) == [
        "version",
        "kind",
        "event",
        "federation",
        "sender",
        "recipient",
        "round",
        "sequence",
        "timestamp",
        "digest",
        "size",
    ]
    assert GOOD_BODY["kind"] == "announce" and GOOD_BODY["recipient"] is None


def test_encode_refuses_an_announce_from_another_identity() -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode_announce(ANNOUNCES[0], BOB)
    assert info.value.code is ErrorCode.SENDER_MISMATCH


def test_announce_above_64_kib_is_too_large() -> None:
    assert refusal(GOOD + b"\x00" * MAX_ANNOUNCE_SIZE) == "TOO_LARGE"


def test_truncated_announce_is_a_bad_frame() -> None:
    assert refusal(GOOD[:64]) == "BAD_FRAME"


def test_garbage_announce_body_is_bad_msgpack() -> None:
    assert refusal(GOOD[:64] + b"\xc1") == "BAD_MSGPACK"


def test_announce_signature_flip_is_a_bad_signature() -> None:
    assert refusal(bytes([GOOD[0] ^ 1]) + GOOD[1:]) == "BAD_SIGNATURE"


def test_announce_signed_by_another_key_is_a_bad_signature() -> None:
    assert refusal(resign(GOOD_BODY, signer=CAROL)) == "BAD_SIGNATURE"


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"version": 9}, "UNKNOWN_VERSION"),
        ({"version": None}, "BAD_TYPE"),
        ({"kind": "update"}, "UNKNOWN_KIND"),
        ({"event": "reboot"}, "UNKNOWN_KIND"),
        ({"event": None}, "BAD_TYPE"),
        ({"kind": None}, "BAD_TYPE"),
        ({"version": 1}, "UNKNOWN_VERSION"),
        ({"size": -1}, "BAD_TYPE"),
        ({"digest": b"short"}, "BAD_TYPE"),
        ({"timestamp": "now"}, "BAD_TYPE"),
        ({"n_samples": 3}, "BAD_TYPE"),
        ({"federation": "other"}, "WRONG_FEDERATION"),
        ({"recipient": CAROL.public_key}, "WRONG_RECIPIENT"),
    ],
)
def test_bad_announce_fields_are_refused(changes: dict[str, Any], code: str) -> None:
    assert refusal(resign(GOOD_BODY | changes), me=BOB.public_key) == code


def test_recipient_is_checked_before_the_federation_as_in_envelopes() -> None:
    changes = {"federation": "other", "recipient": CAROL.public_key}
    assert refusal(resign(GOOD_BODY | changes), me=BOB.public_key) == "WRONG_RECIPIENT"


def test_the_version_is_checked_before_the_kind_and_the_kind_before_the_event() -> None:
    assert refusal(resign(GOOD_BODY | {"version": 1, "kind": "update"})) == "UNKNOWN_VERSION"
    assert refusal(resign(GOOD_BODY | {"kind": "update", "event": "reboot"})) == "UNKNOWN_KIND"


def test_trust_is_checked_before_the_signature() -> None:
    assert refusal(resign(GOOD_BODY, signer=CAROL), trusted={BOB.public_key}) == "UNTRUSTED_SENDER"


def test_the_signature_is_checked_before_the_federation() -> None:
    assert refusal(resign(GOOD_BODY | {"federation": "other"}, signer=CAROL)) == "BAD_SIGNATURE"


def test_announce_with_a_timestamp_extension_is_bad_msgpack() -> None:
    raw = msgpack.packb(GOOD_BODY, use_bin_type=True)
    raw = bytes([raw[0] + 1]) + raw[1:] + msgpack.packb("at") + b"\xd6\xff\x00\x00\x00\x01"
    assert refusal(ALICE.sign(ANNOUNCE_SIGNING_DOMAIN + raw) + raw) == "BAD_MSGPACK"


def test_announce_with_a_missing_field_is_bad_type() -> None:
    body = dict(GOOD_BODY)
    del body["size"]
    assert refusal(resign(body)) == "BAD_TYPE"


def test_announce_from_an_untrusted_sender_is_refused() -> None:
    assert refusal(GOOD, trusted={BOB.public_key}) == "UNTRUSTED_SENDER"


def test_announce_from_another_source_peer_is_a_sender_mismatch() -> None:
    assert refusal(GOOD, expected_sender=CAROL.public_key) == "SENDER_MISMATCH"


def test_announce_outside_the_clock_skew_is_stale() -> None:
    assert refusal(GOOD, now_ms=5_000 + 30_001, max_skew_ms=30_000) == "STALE"


def test_second_delivery_of_an_announce_is_a_replay() -> None:
    guard = ReplayGuard()
    decode(GOOD, replay=guard)
    assert refusal(GOOD, replay=guard) == "REPLAY"


@PROPERTY
@given(position=st.integers(0, len(GOOD) - 1), xor=st.integers(1, 255))
def test_any_single_byte_change_to_an_announce_is_refused(position: int, xor: int) -> None:
    data = bytearray(GOOD)
    data[position] ^= xor
    with pytest.raises(RemoteProtocolError):
        decode(bytes(data))


@PROPERTY
@given(data=st.binary(max_size=300))
def test_random_bytes_are_refused_as_announces(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode(data)
