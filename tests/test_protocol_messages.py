"""Message dataclasses validate themselves; Identity derives every key from one seed."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from nacl.public import Box, PrivateKey
from nacl.signing import SigningKey

from silomesh.protocol import (
    Ack,
    ErrorCode,
    ErrorMessage,
    Hello,
    Identity,
    LocalProtocolError,
    NeedBase,
    TrainRequest,
    TrainResult,
    Update,
    verify_signature,
    x25519_public_key,
)

ALICE = Identity.from_seed(b"\x01" * 32)
BOB = Identity.from_seed(b"\x02" * 32)
SD = bytes(range(32))  # a state digest


def routing(**kw: Any) -> dict[str, Any]:
    base = {
        "federation": "fed",
        "sender": ALICE.public_key,
        "recipient": BOB.public_key,
        "round": 0,
        "sequence": 0,
    }
    base.update(kw)
    return base


def code_of(cls: type, **kw: Any) -> ErrorCode:
    with pytest.raises(LocalProtocolError) as info:
        cls(**kw)
    return info.value.code


# ---------------------------------------------------------------- identity


def test_identity_from_seed_is_deterministic() -> None:
    again = Identity.from_seed(b"\x01" * 32)
    assert again.public_key == ALICE.public_key
    assert bytes(again.box_public_key) == bytes(ALICE.box_public_key)


def test_identity_keys_match_pynacl_conversions() -> None:
    signing = SigningKey(b"\x01" * 32)
    assert ALICE.public_key == bytes(signing.verify_key)
    assert bytes(ALICE.box_private_key) == bytes(signing.to_curve25519_private_key())
    assert x25519_public_key(ALICE.public_key) == bytes(ALICE.box_public_key)


def test_identity_shared_key_equals_pynacl_box_both_ways() -> None:
    box = Box(PrivateKey(bytes(ALICE.box_private_key)), BOB.box_public_key)
    assert ALICE.shared_key(BOB.public_key) == box.shared_key()
    assert BOB.shared_key(ALICE.public_key) == box.shared_key()


def test_identity_signature_verifies_and_fails_on_other_data() -> None:
    sig = ALICE.sign(b"data")
    assert verify_signature(ALICE.public_key, b"data", sig)
    assert not verify_signature(ALICE.public_key, b"datA", sig)
    assert not verify_signature(BOB.public_key, b"data", sig)


def test_identity_refuses_a_seed_that_is_not_32_bytes() -> None:
    with pytest.raises(LocalProtocolError):
        Identity.from_seed(b"\x01" * 31)


def test_identity_repr_shows_no_secret() -> None:
    assert ALICE.seed.hex() not in repr(ALICE)
    assert ALICE.public_key.hex() in repr(ALICE)


def test_x25519_conversion_refuses_an_invalid_point() -> None:
    with pytest.raises(LocalProtocolError):
        x25519_public_key(b"\xff" * 32)


# ---------------------------------------------------------------- common fields


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("version", 1, ErrorCode.UNKNOWN_VERSION),
        ("version", 3, ErrorCode.UNKNOWN_VERSION),
        ("federation", "", ErrorCode.BAD_TYPE),
        ("federation", "fed/announce", ErrorCode.BAD_TYPE),
        ("federation", "x" * 65, ErrorCode.BAD_TYPE),
        ("sender", b"\x00" * 31, ErrorCode.BAD_TYPE),
        ("recipient", "bob", ErrorCode.BAD_TYPE),
        ("round", -1, ErrorCode.BAD_TYPE),
        ("round", True, ErrorCode.BAD_TYPE),
        ("sequence", 2**64, ErrorCode.BAD_TYPE),
        ("sequence", 1.0, ErrorCode.BAD_TYPE),
    ],
)
def test_common_fields_are_validated(field: str, value: object, code: ErrorCode) -> None:
    assert code_of(Ack, **routing(**{field: value}), reply_to=0) is code


def test_messages_are_frozen() -> None:
    ack = Ack(**routing(), reply_to=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ack.round = 2


# ---------------------------------------------------------------- kind-specific fields


def test_hello_refuses_an_unknown_codec() -> None:
    assert code_of(Hello, **routing(), codecs=("zstd",)) is ErrorCode.BAD_TYPE


def test_hello_may_list_int4_and_topk() -> None:
    assert Hello(**routing(), codecs=("float32", "int8", "int4")).codecs == ("float32", "int8", "int4")
    assert Hello(**routing(), codecs=("float32", "topk")).codecs == ("float32", "topk")


def test_hello_refuses_a_frame_limit_above_four_gib() -> None:
    assert code_of(Hello, **routing(), max_frame_size=2**32) is ErrorCode.BAD_TYPE


def test_hello_refuses_an_overlong_agent() -> None:
    assert code_of(Hello, **routing(), agent="a" * 129) is ErrorCode.TOO_LARGE


def test_update_refuses_non_array_tensors() -> None:
    assert code_of(Update, **routing(), state_digest=SD, tensors={"w": [1.0]}) is ErrorCode.BAD_TYPE


def test_update_refuses_a_short_base_digest() -> None:
    assert code_of(Update, **routing(), state_digest=SD, tensors={}, base_digest=b"\x00") is ErrorCode.BAD_TYPE


def test_update_refuses_codec_none() -> None:
    assert code_of(Update, **routing(), state_digest=SD, tensors={}, codec="none") is ErrorCode.BAD_TYPE


def test_update_requires_a_state_digest() -> None:
    with pytest.raises(TypeError):
        Update(**routing(), tensors={})  # type: ignore[call-arg]
    assert code_of(Update, **routing(), tensors={}, state_digest=None) is ErrorCode.BAD_TYPE
    assert code_of(Update, **routing(), tensors={}, state_digest=b"\x00" * 31) is ErrorCode.BAD_TYPE


def test_sequence_and_round_are_uint64() -> None:
    assert Ack(**routing(round=2**64 - 1, sequence=2**64 - 1), reply_to=2**64 - 1).sequence == 2**64 - 1
    assert code_of(Ack, **routing(sequence=2**64), reply_to=0) is ErrorCode.BAD_TYPE
    assert code_of(Ack, **routing(round=2**64), reply_to=0) is ErrorCode.BAD_TYPE


def test_need_base_may_leave_the_base_unnamed_to_ask_for_the_current_model() -> None:
    ask = NeedBase(**routing(), unknown_base=None, reply_to=None)
    assert ask.body() == {"unknown_base": None, "reply_to": None}


def test_update_is_a_delta_exactly_when_it_names_a_base() -> None:
    assert Update(**routing(), state_digest=SD, tensors={}, base_digest=b"\x00" * 32).is_delta
    assert not Update(**routing(), state_digest=SD, tensors={}).is_delta


def test_update_tensors_cannot_be_replaced_after_construction() -> None:
    update = Update(**routing(), state_digest=SD, tensors={"w": np.ones(2, np.float32)})
    with pytest.raises(TypeError):
        update.tensors["w"] = np.zeros(2, np.float32)


def test_tensor_messages_compare_equal_only_with_identical_tensors() -> None:
    first = Update(**routing(), state_digest=SD, tensors={"w": np.ones(2, np.float32)})
    same = Update(**routing(), state_digest=SD, tensors={"w": np.ones(2, np.float32)})
    other = Update(**routing(), state_digest=SD, tensors={"w": np.zeros(2, np.float32)})
    wider = Update(**routing(), state_digest=SD, tensors={"w": np.ones(2, np.float64)})
    assert first == same and first != other and first != wider


def test_update_metrics_default_to_an_empty_map() -> None:
    assert dict(Update(**routing(), state_digest=SD, tensors={}).metrics) == {}


def test_update_keeps_loss_and_degree_metrics_as_floats() -> None:
    update = Update(**routing(), state_digest=SD, tensors={}, metrics={"loss": np.float32(0.5), "degree": 3})
    assert update.metrics == {"loss": 0.5, "degree": 3.0}
    assert all(type(v) is float for v in update.metrics.values())


def test_update_metrics_cannot_be_changed_after_construction() -> None:
    metrics = {"loss": 0.5}
    update = Update(**routing(), state_digest=SD, tensors={}, metrics=metrics)
    metrics["loss"] = 9.0
    assert update.metrics["loss"] == 0.5
    with pytest.raises(TypeError):
        update.metrics["loss"] = 1.0


@pytest.mark.parametrize("value", [float("nan"), float("-inf"), "0.5", True, None])
def test_update_refuses_bad_metric_values(value: object) -> None:
    assert code_of(Update, **routing(), state_digest=SD, tensors={}, metrics={"m": value}) is ErrorCode.BAD_TYPE


def test_update_refuses_more_than_64_metrics() -> None:
    metrics = {f"m{i}": 0.0 for i in range(65)}
    assert code_of(Update, **routing(), state_digest=SD, tensors={}, metrics=metrics) is ErrorCode.BAD_TYPE


def test_update_refuses_a_non_string_or_overlong_metric_name() -> None:
    assert code_of(Update, **routing(), state_digest=SD, tensors={}, metrics={1: 0.5}) is ErrorCode.BAD_TYPE
    assert code_of(Update, **routing(), state_digest=SD, tensors={}, metrics={"m" * 129: 0.5}) is ErrorCode.TOO_LARGE


def test_update_refuses_metrics_that_are_not_a_map() -> None:
    assert code_of(Update, **routing(), state_digest=SD, tensors={}, metrics=[("m", 0.5)]) is ErrorCode.BAD_TYPE


def test_update_metrics_take_part_in_equality() -> None:
    first = Update(**routing(), state_digest=SD, tensors={}, metrics={"loss": 0.5})
    assert first == Update(**routing(), state_digest=SD, tensors={}, metrics={"loss": 0.5})
    assert first != Update(**routing(), state_digest=SD, tensors={}, metrics={"loss": 0.25})
    assert first != Update(**routing(), state_digest=SD, tensors={})


def test_train_request_refuses_zero_epochs() -> None:
    assert code_of(TrainRequest, **routing(), tensors={}, epochs=0) is ErrorCode.BAD_TYPE


def test_train_result_requires_the_request_sequence() -> None:
    with pytest.raises(TypeError):
        TrainResult(**routing(), tensors={})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "0.5", True])
def test_train_result_refuses_bad_metric_values(value: object) -> None:
    code = code_of(TrainResult, **routing(), tensors={}, request_sequence=1, metrics={"m": value})
    assert code is ErrorCode.BAD_TYPE


def test_train_result_normalises_numpy_metrics_to_float() -> None:
    result = TrainResult(
        **routing(), tensors={}, request_sequence=1, metrics={"dice": np.float32(0.5)}
    )
    assert type(result.metrics["dice"]) is float


def test_train_result_refuses_more_than_64_metrics() -> None:
    metrics = {f"m{i}": 0.0 for i in range(65)}
    code = code_of(TrainResult, **routing(), tensors={}, request_sequence=1, metrics=metrics)
    assert code is ErrorCode.BAD_TYPE


def test_need_base_refuses_a_short_digest() -> None:
    assert code_of(NeedBase, **routing(), unknown_base=b"\x00" * 16) is ErrorCode.BAD_TYPE


def test_ack_refuses_an_overlong_note() -> None:
    assert code_of(Ack, **routing(), reply_to=1, note="n" * 1025) is ErrorCode.TOO_LARGE


def test_error_message_accepts_a_code_string_and_stores_the_enum() -> None:
    err = ErrorMessage(**routing(), code="REPLAY")
    assert err.code is ErrorCode.REPLAY


def test_error_message_refuses_an_unknown_code() -> None:
    assert code_of(ErrorMessage, **routing(), code="OOPS") is ErrorCode.BAD_TYPE
