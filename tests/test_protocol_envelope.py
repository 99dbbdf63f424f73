"""Envelopes: seal/open round trips, every refusal reason, and fuzzing."""

from __future__ import annotations

import hashlib
import itertools
import struct
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.public import Box, PublicKey
from nacl.signing import VerifyKey

from silomesh.protocol import (
    ENVELOPE_SIGNING_DOMAIN,
    MAX_MSGPACK_DEPTH,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Ack,
    EnvelopeHeader,
    ErrorCode,
    ErrorMessage,
    Hello,
    Identity,
    Kind,
    Limits,
    LocalProtocolError,
    Message,
    NeedBase,
    OpenedEnvelope,
    RemoteProtocolError,
    ReplayGuard,
    TrainRequest,
    TrainResult,
    Update,
    authenticate_envelope,
    open_authenticated,
    open_envelope,
    read_header,
    seal_envelope,
    x25519_public_key,
)
from silomesh.protocol.codec import keep_largest

PROPERTY = settings(max_examples=250, deadline=None, derandomize=True, database=None)

ALICE = Identity.from_seed(b"\x01" * 32)
BOB = Identity.from_seed(b"\x02" * 32)
CAROL = Identity.from_seed(b"\x03" * 32)
FED = "hospitals"
DIGEST = bytes(range(32))
STATE: dict[str, np.ndarray] = {
    "conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2) / 8,
    "conv.bias": np.array([0.5, -1.0], np.float32),
    "bn.num_batches_tracked": np.array(3, np.int64),
}
_nonces = itertools.count()


def routing(sender: Identity = ALICE, recipient: Identity = BOB, **kw: Any) -> dict[str, Any]:
    base = {
        "federation": FED,
        "sender": sender.public_key,
        "recipient": recipient.public_key,
        "round": 3,
        "sequence": 1,
    }
    base.update(kw)
    return base


def open_(data: bytes | bytearray, **kw: Any) -> OpenedEnvelope:
    args: dict[str, Any] = {"identity": BOB, "federation": FED, "trusted": {ALICE.public_key}}
    args.update(kw)
    return open_envelope(data, **args)


def refusal(data: bytes | bytearray, **kw: Any) -> str:
    with pytest.raises(RemoteProtocolError) as info:
        open_(data, **kw)
    return info.value.code.value


def split(env: bytes) -> tuple[dict[str, Any], bytes, bytes]:
    n = int.from_bytes(env[:2], "big")
    header = msgpack.unpackb(env[2 : 2 + n], raw=False)
    return header, env[2 + n : 2 + n + 64], env[2 + n + 64 :]


def forge(header: bytes | dict[str, Any], ciphertext: bytes, signer: Identity | None = ALICE) -> bytes:
    """Assemble an envelope from parts, signing the header with ``signer``."""
    hb = header if isinstance(header, bytes) else msgpack.packb(header, use_bin_type=True)
    sig = signer.sign(ENVELOPE_SIGNING_DOMAIN + hb) if signer else bytes(64)
    return len(hb).to_bytes(2, "big") + hb + sig + ciphertext


def raw_envelope(
    body: object,
    blob: bytes = b"",
    *,
    kind: str = "ack",
    codec: str = "none",
    base: bytes | None = None,
    encrypt_to: Identity = BOB,
    body_bytes: bytes | None = None,
    **header_updates: Any,
) -> bytes:
    """Seal with only PyNaCl's public Box, hashlib and msgpack: an independent encoder."""
    packed = body_bytes if body_bytes is not None else msgpack.packb(body, use_bin_type=True)
    payload = struct.pack(">I", len(packed)) + packed + blob
    nonce = next(_nonces).to_bytes(24, "big")
    box = Box(ALICE.box_private_key, PublicKey(x25519_public_key(encrypt_to.public_key)))
    ct = box.encrypt(payload, nonce).ciphertext
    header = {
        "version": PROTOCOL_VERSION,
        "kind": kind,
        "federation": FED,
        "sender": ALICE.public_key,
        "recipient": BOB.public_key,
        "round": 3,
        "sequence": 1,
        "timestamp": 1,
        "base_digest": base,
        "payload_digest": hashlib.blake2b(ct, digest_size=32).digest(),
        "codec": codec,
        "nonce": nonce,
    }
    header.update(header_updates)
    return forge(header, ct)


def ack_bytes(**kw: Any) -> bytes:
    return seal_envelope(Ack(**routing(**kw), reply_to=1), ALICE).to_bytes()


def update_bytes(**kw: Any) -> bytes:
    kw.setdefault("state_digest", DIGEST)
    return seal_envelope(Update(**routing(), tensors=STATE, **kw), ALICE).to_bytes()


ALL_MESSAGES: list[Message] = [
    Hello(**routing()),
    Hello(**routing(), model="unet-2d", state_digest=DIGEST, codecs=("int8",), max_frame_size=4096),
    Update(**routing(), tensors=STATE, n_samples=5, state_digest=DIGEST),
    Update(**routing(), tensors=STATE, base_digest=DIGEST, state_digest=DIGEST),
    Update(**routing(), tensors=STATE, n_samples=7, state_digest=DIGEST, metrics={"loss": 0.25, "degree": 3.0}),
    TrainRequest(**routing(), tensors=STATE, epochs=2, deadline_ms=1_700_000_000_000),
    TrainResult(
        **routing(),
        tensors=STATE,
        request_sequence=9,
        n_samples=50,
        metrics={"dice": 0.75, "loss": 0.1},
    ),
    NeedBase(**routing(), unknown_base=DIGEST, reply_to=4),
    NeedBase(**routing()),
    Ack(**routing(), reply_to=1, note="stored"),
    ErrorMessage(**routing(), code=ErrorCode.NON_FINITE, message="NaN in conv", reply_to=2),
]


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("message", ALL_MESSAGES, ids=lambda m: m.kind.value)
def test_every_message_kind_round_trips(message: Message) -> None:
    opened = open_(seal_envelope(message, ALICE).to_bytes())
    assert opened.message == message
    assert opened.header.kind is message.kind


@pytest.mark.parametrize(("codec", "atol"), [("float16", 0.02), ("int8", 0.02), ("int4", 0.5)])
def test_lossy_codecs_round_trip_within_tolerance(codec: str, atol: float) -> None:
    message = Update(**routing(), tensors=STATE, codec=codec, state_digest=DIGEST)
    got = open_(seal_envelope(message, ALICE).to_bytes()).message
    assert got.codec == codec
    for name, arr in STATE.items():
        # int4: within half a step, max|x| / 14
        np.testing.assert_allclose(got.tensors[name], arr, atol=atol if codec != "int4" else
                                   float(np.abs(arr).max()) / 14 + 1e-6)


def test_topk_carries_a_sparse_update_exactly() -> None:
    sparse = keep_largest(STATE, 0.3)
    got = open_(seal_envelope(Update(**routing(), tensors=sparse, codec="topk", state_digest=DIGEST),
                              ALICE).to_bytes()).message
    assert got.codec == "topk"
    for name, arr in sparse.items():
        np.testing.assert_array_equal(got.tensors[name], arr)


def test_topk_is_refused_for_a_kind_without_a_model() -> None:
    """secagg-masked carries a ring vector: a topk entry there would decode to far more
    than it takes on the wire, before its class checks it."""
    header, _, ct = split(ack_bytes())
    assert EnvelopeHeader(**(header | {"kind": "update", "codec": "topk"})).codec == "topk"
    header |= {"kind": Kind.SECAGG_MASKED.value, "codec": "topk"}
    with pytest.raises(LocalProtocolError) as info:
        EnvelopeHeader(**header)
    assert info.value.code is ErrorCode.BAD_TYPE
    assert refusal(forge(header, ct)) == "BAD_TYPE"


def test_open_returns_the_signed_header_bytes_and_signature() -> None:
    sealed = seal_envelope(ALL_MESSAGES[2], ALICE)
    opened = open_(sealed.to_bytes())
    assert opened.header_bytes == sealed.header_bytes and opened.signature == sealed.signature
    assert VerifyKey(ALICE.public_key).verify(
        ENVELOPE_SIGNING_DOMAIN + opened.header_bytes, opened.signature
    )
    assert opened.size == sealed.size == len(sealed.to_bytes())


def test_frame_parts_are_prefix_head_and_ciphertext() -> None:
    sealed = seal_envelope(ALL_MESSAGES[2], ALICE)
    head, ciphertext = sealed.frame_parts()
    assert head[:4] == sealed.size.to_bytes(4, "big")
    assert head[4:] + ciphertext == sealed.to_bytes()
    assert sealed.to_frame() == head + ciphertext


def test_independent_decoder_using_public_pynacl_and_hashlib_reads_an_envelope() -> None:
    env = seal_envelope(ALL_MESSAGES[2], ALICE, timestamp_ms=42).to_bytes()
    header, sig, ct = split(env)
    hb = env[2 : 2 + int.from_bytes(env[:2], "big")]
    VerifyKey(header["sender"]).verify(ENVELOPE_SIGNING_DOMAIN + hb, sig)
    assert hashlib.blake2b(ct, digest_size=32).digest() == header["payload_digest"]
    sender_x = PublicKey(x25519_public_key(header["sender"]))
    payload = Box(BOB.box_private_key, sender_x).decrypt(ct, header["nonce"])
    (body_len,) = struct.unpack(">I", payload[:4])
    body = msgpack.unpackb(payload[4 : 4 + body_len], raw=False)
    blob = payload[4 + body_len :]
    assert header["timestamp"] == 42 and header["codec"] == "float32"
    assert body["n_samples"] == 5
    name, dtype, shape, offset, scale = body["tensors"][1]
    assert (name, dtype, shape, scale) == ("conv.bias", "float32", [2], None)
    assert np.frombuffer(blob, "<f4", count=2, offset=offset).tolist() == [0.5, -1.0]


def test_independent_encoder_output_is_accepted() -> None:
    opened = open_(raw_envelope({"reply_to": 7, "note": "hi"}))
    assert opened.message == Ack(**routing(), reply_to=7, note="hi")


def test_open_in_place_decrypts_inside_the_buffer_and_copy_mode_leaves_it_intact() -> None:
    env = update_bytes()
    buf = bytearray(env)
    open_(buf)
    assert buf == env
    opened = open_(buf, in_place=True)
    assert buf != env
    arr = opened.message.tensors["conv.weight"]
    assert np.shares_memory(arr, np.frombuffer(buf, np.uint8))


def test_read_header_parses_without_verifying() -> None:
    header, _, ct = split(ack_bytes())
    forged = forge(header, ct, signer=None)
    assert read_header(forged).sender == ALICE.public_key


# ---------------------------------------------------------------- local refusals


def test_seal_refuses_a_message_from_another_identity() -> None:
    with pytest.raises(LocalProtocolError) as info:
        seal_envelope(Ack(**routing(), reply_to=1), BOB)
    assert info.value.code is ErrorCode.SENDER_MISMATCH


def test_seal_refuses_non_finite_tensors() -> None:
    bad = {"w": np.array([1.0, np.nan], np.float32)}
    with pytest.raises(LocalProtocolError) as info:
        seal_envelope(Update(**routing(), tensors=bad, state_digest=DIGEST), ALICE)
    assert info.value.code is ErrorCode.NON_FINITE


def test_seal_refuses_an_envelope_above_the_frame_limit() -> None:
    big = {"w": np.zeros(1000, np.float32)}
    with pytest.raises(LocalProtocolError) as info:
        seal_envelope(
            Update(**routing(), tensors=big, state_digest=DIGEST), ALICE, limits=Limits(max_frame_size=1024)
        )
    assert info.value.code is ErrorCode.TOO_LARGE


# ---------------------------------------------------------------- remote refusals: framing/header


def test_truncated_envelope_is_a_bad_frame() -> None:
    assert refusal(ack_bytes()[:60]) == "BAD_FRAME"


def test_header_length_beyond_the_envelope_is_a_bad_frame() -> None:
    env = ack_bytes()
    assert refusal((len(env)).to_bytes(2, "big") + env[2:]) == "BAD_FRAME"


def test_header_length_above_the_limit_is_too_large() -> None:
    env = ack_bytes()
    assert refusal(b"\xff\xff" + env[2:]) == "TOO_LARGE"


def test_envelope_above_the_frame_limit_is_too_large() -> None:
    assert refusal(update_bytes(), limits=Limits(max_frame_size=200)) == "TOO_LARGE"


def test_garbage_header_is_bad_msgpack() -> None:
    _, _, ct = split(ack_bytes())
    assert refusal(forge(b"\xc1" * 40, ct)) == "BAD_MSGPACK"


def test_header_with_a_duplicate_key_is_bad_msgpack() -> None:
    header, _, ct = split(ack_bytes())
    packed = msgpack.packb(header, use_bin_type=True)
    dup = bytes([packed[0] + 1]) + packed[1:] + msgpack.packb("round") + msgpack.packb(3)
    assert refusal(forge(dup, ct)) == "BAD_MSGPACK"


def test_header_that_is_not_a_map_is_bad_type() -> None:
    _, _, ct = split(ack_bytes())
    assert refusal(forge([1, 2, 3], ct)) == "BAD_TYPE"


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("version", 1, "UNKNOWN_VERSION"),
        ("version", 3, "UNKNOWN_VERSION"),
        ("version", -1, "UNKNOWN_VERSION"),
        ("version", None, "BAD_TYPE"),
        ("version", "1", "BAD_TYPE"),
        ("kind", "gossip", "UNKNOWN_KIND"),
        ("kind", "announce", "UNKNOWN_KIND"),
        ("kind", 7, "BAD_TYPE"),
        ("round", "3", "BAD_TYPE"),
        ("round", -1, "BAD_TYPE"),
        ("round", True, "BAD_TYPE"),
        ("round", -(2**63), "BAD_TYPE"),
        ("sequence", 1.0, "BAD_TYPE"),
        ("sender", b"\x01" * 31, "BAD_TYPE"),
        ("recipient", "bob", "BAD_TYPE"),
        ("federation", "a b", "BAD_TYPE"),
        ("nonce", b"\x00" * 23, "BAD_TYPE"),
        ("payload_digest", None, "BAD_TYPE"),
        ("codec", "float32", "BAD_TYPE"),
        ("codec", "zstd", "BAD_TYPE"),
        ("base_digest", DIGEST, "BAD_TYPE"),
        ("timestamp", -5, "BAD_TYPE"),
    ],
)
def test_bad_header_fields_are_refused(field: str, value: object, code: str) -> None:
    header, _, ct = split(ack_bytes())
    header[field] = value
    assert refusal(forge(header, ct)) == code


def test_a_version_1_header_is_refused_on_the_wire_but_parses_as_a_recorded_header() -> None:
    header, _, ct = split(ack_bytes())
    header["version"] = 1
    assert refusal(forge(header, ct)) == "UNKNOWN_VERSION"
    recorded = EnvelopeHeader(**header)  # e.g. an audit log written before the upgrade
    assert recorded.version == 1 and recorded.kind is Kind.ACK
    with pytest.raises(LocalProtocolError) as info:
        EnvelopeHeader(**(header | {"version": 3}))
    assert info.value.code is ErrorCode.UNKNOWN_VERSION


def test_header_with_a_missing_key_is_bad_type() -> None:
    header, _, ct = split(ack_bytes())
    del header["nonce"]
    assert refusal(forge(header, ct)) == "BAD_TYPE"


def test_header_with_an_extra_key_is_bad_type() -> None:
    header, _, ct = split(ack_bytes())
    header["priority"] = 1
    assert refusal(forge(header, ct)) == "BAD_TYPE"


def test_tensor_message_without_a_tensor_codec_is_bad_type() -> None:
    header, _, ct = split(update_bytes())
    header["codec"] = "none"
    assert refusal(forge(header, ct)) == "BAD_TYPE"


# ---------------------------------------------------------------- remote refusals: authenticity


def test_flipped_signature_bit_is_a_bad_signature() -> None:
    env = bytearray(ack_bytes())
    n = int.from_bytes(env[:2], "big")
    env[2 + n + 5] ^= 0x01
    assert refusal(env) == "BAD_SIGNATURE"


def test_header_changed_after_signing_is_a_bad_signature() -> None:
    env = ack_bytes()
    header, sig, ct = split(env)
    header["round"] = 4
    hb = msgpack.packb(header, use_bin_type=True)
    assert refusal(len(hb).to_bytes(2, "big") + hb + sig + ct) == "BAD_SIGNATURE"


def test_header_signed_by_someone_else_than_the_sender_is_a_bad_signature() -> None:
    header, _, ct = split(ack_bytes())
    assert refusal(forge(header, ct, signer=CAROL)) == "BAD_SIGNATURE"


def test_sender_outside_the_allowlist_is_untrusted() -> None:
    assert refusal(ack_bytes(), trusted={CAROL.public_key}) == "UNTRUSTED_SENDER"


def test_sender_other_than_the_stream_peer_is_a_sender_mismatch() -> None:
    assert refusal(ack_bytes(), expected_sender=CAROL.public_key) == "SENDER_MISMATCH"


def test_envelope_for_another_peer_is_the_wrong_recipient() -> None:
    env = seal_envelope(Ack(**routing(recipient=CAROL), reply_to=1), ALICE).to_bytes()
    assert refusal(env) == "WRONG_RECIPIENT"


def test_envelope_of_another_federation_is_refused() -> None:
    assert refusal(ack_bytes(federation="other-fed")) == "WRONG_FEDERATION"


def test_timestamp_outside_the_allowed_skew_is_stale() -> None:
    env = seal_envelope(Ack(**routing(), reply_to=1), ALICE, timestamp_ms=1_000_000).to_bytes()
    assert refusal(env, now_ms=1_000_000 + 60_001, max_skew_ms=60_000) == "STALE"
    assert open_(env, now_ms=1_000_000 + 60_000, max_skew_ms=60_000).header.timestamp == 1_000_000


def test_modified_ciphertext_is_a_digest_mismatch() -> None:
    env = bytearray(update_bytes())
    env[-1] ^= 0x80
    assert refusal(env) == "DIGEST_MISMATCH"


def test_ciphertext_for_another_key_fails_to_decrypt() -> None:
    assert refusal(raw_envelope({"reply_to": 1, "note": ""}, encrypt_to=CAROL)) == "DECRYPT_FAILED"


def test_second_delivery_of_an_envelope_is_a_replay() -> None:
    guard = ReplayGuard()
    env = ack_bytes()
    open_(env, replay=guard)
    assert refusal(env, replay=guard) == "REPLAY"


def test_forged_envelope_does_not_consume_the_replay_slot() -> None:
    guard = ReplayGuard()
    env = ack_bytes()
    header, _, ct = split(env)
    assert refusal(forge(header, ct, signer=CAROL), replay=guard) == "BAD_SIGNATURE"
    assert open_(env, replay=guard).message.sequence == 1


# ---------------------------------------------------------------- remote refusals: payload


def test_garbage_body_is_bad_msgpack() -> None:
    assert refusal(raw_envelope(None, body_bytes=b"\xc1\xc1")) == "BAD_MSGPACK"


def test_body_length_beyond_the_payload_is_a_bad_frame() -> None:
    packed = msgpack.packb({"reply_to": 1, "note": ""})
    env = raw_envelope(None, body_bytes=packed)
    header, _, _ = split(env)
    payload = struct.pack(">I", len(packed) + 10) + packed
    nonce = header["nonce"]
    ct = Box(ALICE.box_private_key, BOB.box_public_key).encrypt(payload, nonce).ciphertext
    header["payload_digest"] = hashlib.blake2b(ct, digest_size=32).digest()
    assert refusal(forge(header, ct)) == "BAD_FRAME"


def test_body_above_the_body_limit_is_too_large() -> None:
    env = raw_envelope({"reply_to": 1, "note": "x" * 500})
    assert refusal(env, limits=Limits(max_body_size=100)) == "TOO_LARGE"


def test_trailing_bytes_after_a_small_message_body_are_a_bad_frame() -> None:
    assert refusal(raw_envelope({"reply_to": 1, "note": ""}, b"extra")) == "BAD_FRAME"


@pytest.mark.parametrize(
    "body",
    [
        {"reply_to": 1},
        {"reply_to": 1, "note": "", "extra": 0},
        {"reply_to": "1", "note": ""},
        {"reply_to": 1, "note": "x" * 2000},
        [1, ""],
    ],
    ids=["missing", "extra", "wrong-type", "too-long", "not-a-map"],
)
def test_malformed_bodies_are_refused(body: object) -> None:
    assert refusal(raw_envelope(body)) in ("BAD_TYPE", "TOO_LARGE")


def test_error_message_with_an_unknown_code_is_bad_type() -> None:
    env = raw_envelope({"code": "FROBNICATED", "message": "", "reply_to": None}, kind="error")
    assert refusal(env) == "BAD_TYPE"


def test_update_without_a_tensor_table_is_bad_type() -> None:
    body: dict[str, Any] = {"n_samples": 1, "state_digest": DIGEST, "metrics": {}}
    env = raw_envelope(body, kind="update", codec="float32")
    assert refusal(env) == "BAD_TYPE"


def _update_raw(
    table: list[Any], blob: bytes, metrics: object = None, *, drop: str | None = None, **kw: Any
) -> bytes:
    body = {"n_samples": 1, "state_digest": DIGEST, "metrics": metrics or {}, "tensors": table}
    if drop is not None:
        del body[drop]
    return raw_envelope(body, blob, kind="update", codec="float32", **kw)


_W = ([["w", "float32", [2], 0, None]], np.array([1.0, 2.0], "<f4").tobytes())


def test_received_update_metrics_decode_to_a_read_only_float_map() -> None:
    opened = open_(_update_raw(*_W, {"loss": 0.5, "degree": 4.0}))
    assert dict(opened.message.metrics) == {"loss": 0.5, "degree": 4.0}
    with pytest.raises(TypeError):
        opened.message.metrics["loss"] = 0.0


def test_received_update_with_float32_metrics_is_accepted() -> None:
    body = msgpack.packb(
        {"n_samples": 1, "state_digest": DIGEST, "metrics": {"loss": 0.5}, "tensors": _W[0]},
        use_bin_type=True,
        use_single_float=True,
    )
    opened = open_(raw_envelope(None, _W[1], kind="update", codec="float32", body_bytes=body))
    assert opened.message.metrics == {"loss": 0.5}


def test_received_update_without_a_metrics_map_is_bad_type() -> None:
    assert refusal(_update_raw(*_W, drop="metrics")) == "BAD_TYPE"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_received_update_with_a_non_finite_metric_is_bad_type(value: float) -> None:
    assert refusal(_update_raw(*_W, {"loss": value})) == "BAD_TYPE"


def test_received_update_with_more_than_64_metrics_is_bad_type() -> None:
    metrics = {f"m{i}": 0.0 for i in range(65)}
    assert refusal(_update_raw(*_W, metrics)) == "BAD_TYPE"


def test_received_update_with_exactly_64_metrics_is_accepted() -> None:
    metrics = {f"m{i}": float(i) for i in range(64)}
    assert open_(_update_raw(*_W, metrics)).message.metrics == metrics


@pytest.mark.parametrize(
    "metrics",
    [
        {"degree": 3},
        {"loss": True},
        {"loss": "0.5"},
        {"loss": None},
        {"loss": [0.5]},
        [["loss", 0.5]],
        "loss",
    ],
    ids=["int", "bool", "str", "nil", "array", "array-not-map", "str-not-map"],
)
def test_received_update_with_wrongly_typed_metrics_is_bad_type(metrics: object) -> None:
    assert refusal(_update_raw(*_W, metrics)) == "BAD_TYPE"


def test_received_update_with_an_overlong_metric_name_is_too_large() -> None:
    assert refusal(_update_raw(*_W, {"m" * 129: 0.5})) == "TOO_LARGE"


def test_update_with_a_nan_tensor_is_non_finite() -> None:
    blob = np.array([1.0, np.nan], "<f4").tobytes()
    assert refusal(_update_raw([["w", "float32", [2], 0, None]], blob)) == "NON_FINITE"


def test_update_with_overlapping_tensors_is_a_bad_table() -> None:
    table = [["a", "float32", [2], 0, None], ["b", "float32", [2], 4, None]]
    assert refusal(_update_raw(table, bytes(12))) == "BAD_TABLE"


def test_update_with_a_tensor_overrunning_the_blob_is_a_bad_table() -> None:
    assert refusal(_update_raw([["a", "float32", [4], 0, None]], bytes(12))) == "BAD_TABLE"


def test_update_with_a_disallowed_dtype_is_a_bad_dtype() -> None:
    assert refusal(_update_raw([["a", "float64", [1], 0, None]], bytes(8))) == "BAD_DTYPE"


def test_update_whose_shapes_differ_from_the_model_is_a_bad_shape() -> None:
    shapes = {name: arr.shape for name, arr in STATE.items()} | {"conv.bias": (3,)}
    assert refusal(update_bytes(), expected_shapes=shapes) == "BAD_SHAPE"


def test_update_matching_the_model_shapes_is_accepted() -> None:
    shapes = {name: arr.shape for name, arr in STATE.items()}
    opened = open_(update_bytes(), expected_shapes=shapes, complete=True)
    assert set(opened.message.tensors) == set(STATE)


def test_update_without_a_state_digest_is_bad_type() -> None:
    body = {"n_samples": 1, "state_digest": None, "metrics": {}, "tensors": _W[0]}
    assert refusal(raw_envelope(body, _W[1], kind="update", codec="float32")) == "BAD_TYPE"


def test_update_tensors_may_be_required_to_fit_the_model_dtypes() -> None:
    dtypes = {name: str(arr.dtype) for name, arr in STATE.items()}
    assert set(open_(update_bytes(), expected_dtypes=dtypes).message.tensors) == set(STATE)
    assert refusal(update_bytes(), expected_dtypes=dtypes | {"bn.num_batches_tracked": "int32"}) == "BAD_DTYPE"
    assert refusal(update_bytes(), expected_dtypes=dtypes | {"conv.bias": "int64"}) == "BAD_DTYPE"


# ---------------------------------------------------------------- strict msgpack


def _ack_header_with(extra_bytes: bytes, key: str = "zz") -> bytes:
    """The ack's header map with one more entry whose value is ``extra_bytes`` (raw msgpack)."""
    header, _, _ = split(ack_bytes())
    packed = msgpack.packb(header, use_bin_type=True)
    return bytes([packed[0] + 1]) + packed[1:] + msgpack.packb(key) + extra_bytes


@pytest.mark.parametrize(
    "value",
    [b"\xd6\xff\x00\x00\x00\x01", b"\xd4\x05\x00", b"\xc7\x00\x07"],
    ids=["timestamp-extension", "fixext-5", "ext8-empty"],
)
def test_extension_types_in_the_header_are_bad_msgpack(value: bytes) -> None:
    _, _, ct = split(ack_bytes())
    assert refusal(forge(_ack_header_with(value), ct)) == "BAD_MSGPACK"


def test_extension_type_in_a_body_is_bad_msgpack() -> None:
    body = msgpack.packb({"reply_to": 1}, use_bin_type=True)
    body = bytes([body[0] + 1]) + body[1:] + msgpack.packb("note") + b"\xd6\xff\x00\x00\x00\x01"
    assert refusal(raw_envelope(None, body_bytes=body)) == "BAD_MSGPACK"


def test_bytes_after_the_header_map_inside_header_len_are_bad_msgpack() -> None:
    header, _, ct = split(ack_bytes())
    assert refusal(forge(msgpack.packb(header, use_bin_type=True) + b"\xc0", ct)) == "BAD_MSGPACK"


def test_bytes_after_the_body_map_inside_body_len_are_bad_msgpack() -> None:
    body = msgpack.packb({"reply_to": 1, "note": ""}, use_bin_type=True) + b"\x00"
    assert refusal(raw_envelope(None, body_bytes=body)) == "BAD_MSGPACK"


def test_a_binary_map_key_is_bad_msgpack() -> None:
    assert refusal(_update_raw(*_W, {b"loss": 0.5})) == "BAD_MSGPACK"


def test_nesting_deeper_than_the_limit_is_bad_msgpack_and_at_the_limit_a_field_error() -> None:
    _, _, ct = split(ack_bytes())
    too_deep = b"\x91" * MAX_MSGPACK_DEPTH + b"\x00"  # header map + 8 arrays = depth 9
    at_limit = b"\x91" * (MAX_MSGPACK_DEPTH - 1) + b"\x00"
    assert refusal(forge(_ack_header_with(too_deep), ct)) == "BAD_MSGPACK"
    assert refusal(forge(_ack_header_with(at_limit), ct)) == "BAD_TYPE"  # an extra key


def test_extreme_nesting_is_bad_msgpack_not_a_crash() -> None:
    _, _, ct = split(ack_bytes())
    deep = _ack_header_with(b"\x91" * 3000 + b"\x00")
    assert len(deep) <= 4096
    assert refusal(forge(deep, ct)) == "BAD_MSGPACK"


def test_encoder_writes_metrics_as_float64_even_when_integral() -> None:
    message = Update(**routing(), tensors={}, state_digest=DIGEST, metrics={"degree": 3, "loss": np.float32(0.5)})
    sealed = seal_envelope(message, ALICE)
    payload = Box(BOB.box_private_key, ALICE.box_public_key).decrypt(bytes(sealed.ciphertext), sealed.header.nonce)
    body = payload[4 : 4 + int.from_bytes(payload[:4], "big")]
    assert b"\xa6degree\xcb" + struct.pack(">d", 3.0) in body
    assert b"\xa4loss\xcb" + struct.pack(">d", 0.5) in body


# ---------------------------------------------------------------- the order of the checks (section 10)


def test_version_is_checked_before_the_key_set() -> None:
    header, _, ct = split(ack_bytes())
    header["version"] = 1
    header["priority"] = 1
    assert refusal(forge(header, ct)) == "UNKNOWN_VERSION"


def test_kind_is_checked_before_the_key_set() -> None:
    header, _, ct = split(ack_bytes())
    header["kind"] = "gossip"
    del header["nonce"]
    assert refusal(forge(header, ct)) == "UNKNOWN_KIND"


def test_trust_is_checked_before_the_signature() -> None:
    header, _, ct = split(ack_bytes())
    assert refusal(forge(header, ct, signer=CAROL), trusted={CAROL.public_key}) == "UNTRUSTED_SENDER"


def test_recipient_is_checked_before_the_timestamp() -> None:
    env = seal_envelope(Ack(**routing(recipient=CAROL), reply_to=1), ALICE, timestamp_ms=1).to_bytes()
    assert refusal(env, now_ms=10**12, max_skew_ms=1000) == "WRONG_RECIPIENT"


def test_the_digest_is_checked_before_the_replay_guard() -> None:
    guard = ReplayGuard()
    env = bytearray(update_bytes())
    open_(bytes(env), replay=guard)
    env[-1] ^= 0x80
    assert refusal(env, replay=guard) == "DIGEST_MISMATCH"


def test_body_key_set_is_checked_before_the_tensor_table() -> None:
    body = {"n_samples": 1, "state_digest": DIGEST, "tensors": [["a", "float64", [1], 0, None]]}
    assert refusal(raw_envelope(body, bytes(8), kind="update", codec="float32")) == "BAD_TYPE"


def test_body_key_set_is_checked_before_trailing_blob_bytes() -> None:
    assert refusal(raw_envelope({"reply_to": 1}, b"extra")) == "BAD_TYPE"


def test_the_tensor_table_is_checked_before_the_other_body_fields() -> None:
    body = {"n_samples": -1, "state_digest": DIGEST, "metrics": {}, "tensors": [["a", "float64", [1], 0, None]]}
    assert refusal(raw_envelope(body, bytes(8), kind="update", codec="float32")) == "BAD_DTYPE"


def test_authenticate_then_open_is_open_envelope() -> None:
    env = update_bytes()
    authenticated = authenticate_envelope(env, trusted={ALICE.public_key}, expected_sender=ALICE.public_key)
    assert authenticated.header.kind == "update" and authenticated.size == len(env)
    opened = open_authenticated(authenticated, identity=BOB, federation=FED)
    assert opened.message == open_(env).message


def test_authenticate_stops_at_the_signature_and_leaves_the_rest_unchecked() -> None:
    env = bytearray(seal_envelope(Ack(**routing(federation="other-fed"), reply_to=1), ALICE).to_bytes())
    env[-1] ^= 0x80  # digest mismatch too, but that is a later step
    authenticated = authenticate_envelope(env, trusted=None)
    with pytest.raises(RemoteProtocolError) as info:
        open_authenticated(authenticated, identity=BOB, federation=FED)
    assert info.value.code is ErrorCode.WRONG_FEDERATION


# ---------------------------------------------------------------- properties

_reply = st.integers(0, 2**64 - 1)
_text = st.text(max_size=40)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    r = routing(round=draw(st.integers(0, 2**64 - 1)), sequence=draw(st.integers(0, 2**64 - 1)))
    kind = draw(st.sampled_from(["ack", "error", "need-base", "hello", "update"]))
    if kind == "ack":
        return Ack(**r, reply_to=draw(_reply), note=draw(_text))
    if kind == "error":
        return ErrorMessage(
            **r,
            code=draw(st.sampled_from(list(ErrorCode))),
            message=draw(_text),
            reply_to=draw(st.none() | _reply),
        )
    if kind == "need-base":
        return NeedBase(
            **r,
            unknown_base=draw(st.none() | st.binary(min_size=32, max_size=32)),
            reply_to=draw(st.none() | _reply),
        )
    if kind == "hello":
        return Hello(
            **r,
            agent=draw(_text),
            model=draw(_text),
            codecs=tuple(
                draw(
                    st.lists(
                        st.sampled_from(["float32", "float16", "int8"]), min_size=1, max_size=3
                    )
                )
            ),
        )
    n = draw(st.integers(0, 6))
    values = draw(st.lists(st.floats(-1e3, 1e3, width=32), min_size=n, max_size=n))
    tensors = {"w": np.array(values, np.float32), "n": np.array([n], np.int64)}
    return Update(
        **r,
        tensors=tensors,
        state_digest=draw(st.binary(min_size=32, max_size=32)),
        n_samples=draw(st.integers(0, 10**6)),
        base_digest=draw(st.none() | st.just(DIGEST)),
        metrics=draw(
            st.dictionaries(
                st.text(max_size=8), st.floats(allow_nan=False, allow_infinity=False), max_size=4
            )
        ),
    )


@PROPERTY
@given(message=messages())
def test_any_valid_message_round_trips(message: Message) -> None:
    assert open_(seal_envelope(message, ALICE).to_bytes()).message == message


_VALID = update_bytes(n_samples=3)


@PROPERTY
@given(position=st.integers(0, len(_VALID) - 1), xor=st.integers(1, 255))
def test_any_single_byte_change_is_refused_with_a_remote_error(position: int, xor: int) -> None:
    env = bytearray(_VALID)
    env[position] ^= xor
    with pytest.raises(RemoteProtocolError):
        open_(env)


@PROPERTY
@given(cut=st.integers(0, len(_VALID) - 1))
def test_any_truncation_is_refused_with_a_remote_error(cut: int) -> None:
    with pytest.raises(RemoteProtocolError):
        open_(_VALID[:cut])


@PROPERTY
@given(data=st.binary(max_size=400))
def test_random_bytes_are_refused_with_a_remote_error(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        open_(data)


_HEADER, _, _CT = split(ack_bytes())
_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=40),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@PROPERTY
@given(changes=st.dictionaries(st.sampled_from([*_HEADER, "zz"]), _values, min_size=1, max_size=4))
def test_randomly_retyped_header_fields_are_refused_with_a_remote_error(
    changes: dict[str, Any],
) -> None:
    header = dict(_HEADER) | changes
    try:
        env = forge(header, _CT)
    except (OverflowError, ValueError, TypeError):
        return  # msgpack cannot encode it; nothing to send
    if header == _HEADER:
        return
    try:
        open_(env)
    except RemoteProtocolError:
        return
    # Accepted: only right when no field was retyped or added, i.e. every change is another
    # value of the field's own type (e.g. round 0 for round 3), re-signed by forge().
    retyped = {k: v for k, v in changes.items() if k not in _HEADER or type(v) is not type(_HEADER[k])}
    assert not retyped, f"accepted a header with retyped or unknown fields: {retyped}"


_body_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 2**64 - 1),
    st.floats(),
    st.text(max_size=5),
    st.binary(max_size=33),
    st.lists(st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(max_size=8)), max_size=3),
    st.dictionaries(
        st.text(max_size=3),
        st.one_of(st.floats(), st.integers(-(2**63), 2**64 - 1), st.none()),
        max_size=3,
    ),
)
_TENSOR_KINDS = {"update", "train-request", "train-result", "secagg-masked"}
_small_uint = st.integers(1, 10)
_key32 = st.binary(min_size=32, max_size=32)


def _pairs(size: int) -> st.SearchStrategy[list[list[bytes]]]:
    """Sorted ``[key, bytes]`` pairs, as secure-aggregation bodies carry them."""
    return st.dictionaries(_key32, st.binary(max_size=size), max_size=2).map(lambda d: sorted(map(list, d.items())))


_digest = st.none() | st.binary(min_size=32, max_size=32)
_PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "n_samples": _small_uint,
    "epochs": _small_uint,
    "request_sequence": _small_uint,
    "deadline_ms": _small_uint,
    "reply_to": _small_uint,
    "max_frame_size": _small_uint,
    "state_digest": _digest,
    "unknown_base": _digest,
    "note": _text,
    "message": _text,
    "agent": _text,
    "model": _text,
    "codecs": st.just(["float32"]),
    "code": st.sampled_from(["REPLAY", "REFUSED"]),
    "metrics": st.dictionaries(st.text(max_size=4), st.floats(-1, 1), max_size=2),
    "tensors": st.just([]),
    "extra": st.none(),
    # secure aggregation (sorted key lists and [key, bytes] pairs)
    "members": st.lists(_key32, max_size=3, unique=True).map(sorted),
    "dealers": st.lists(_key32, max_size=3, unique=True).map(sorted),
    "survivors": st.lists(_key32, max_size=3, unique=True).map(sorted),
    "length": _small_uint,
    "bits": st.sampled_from([32, 64]),
    "scale": st.sampled_from([1.0, 2.0**20]),
    "clip": st.floats(0.5, 8.0),
    "max_members": _small_uint,
    "threshold": _small_uint,
    "weight_cap": st.integers(0, 64),
    "signature": st.binary(min_size=64, max_size=64),
    "group_digest": st.binary(min_size=32, max_size=32),
    "self_digest": st.binary(min_size=32, max_size=32),
    "pair_digest": st.binary(min_size=32, max_size=32),
    "sealed": _pairs(80),
    "self_parts": _pairs(64),
    "pair_parts": _pairs(64),
}


@PROPERTY
@given(kind=st.sampled_from([k.value for k in MESSAGE_TYPES]), data=st.data())
def test_random_bodies_of_every_kind_decode_or_raise_remote_errors_only(
    kind: str, data: st.DataObject
) -> None:
    keys = list(MESSAGE_TYPES[kind].BODY_KEYS)
    if kind in _TENSOR_KINDS:
        keys.append("tensors")
    keys = keys[: data.draw(st.integers(len(keys) - 1, len(keys)))] + data.draw(
        st.lists(st.sampled_from(["extra", "tensors"]), max_size=1)
    )
    corrupt = data.draw(st.sampled_from([None, *keys]))
    body = {key: data.draw(_body_values if key == corrupt else _PLAUSIBLE[key]) for key in keys}
    env = raw_envelope(body, kind=kind, codec="float32" if kind in _TENSOR_KINDS else "none")
    try:
        opened = open_(env)
    except RemoteProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
    else:
        assert opened.message.kind == kind
