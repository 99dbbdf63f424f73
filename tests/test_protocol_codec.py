"""Tensor codec (table + blob), state digests and deltas."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from silomesh.protocol import (
    Codec,
    ErrorCode,
    Limits,
    LocalProtocolError,
    RemoteProtocolError,
    apply_delta,
    decode_tensors,
    encode_tensors,
    make_delta,
    state_digest,
)
from silomesh.protocol.codec import int4_scale, int8_scale, keep_largest

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)


def _encode(state: dict[str, np.ndarray], codec: str = "float32") -> tuple[list[Any], bytes]:
    enc = encode_tensors(state, codec)
    return enc.table, enc.to_bytes()


def _decode(table: object, blob: bytes | bytearray, codec: str = "float32", **kw: Any) -> dict[str, np.ndarray]:
    return decode_tensors(table, blob, codec=codec, **kw)


def _remote_code(table: object, blob: bytes | bytearray, codec: str = "float32", **kw: Any) -> str:
    with pytest.raises(RemoteProtocolError) as info:
        _decode(table, blob, codec, **kw)
    return info.value.code.value


def _small_state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(4).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "mask": np.array([True, False, True]),
    }


# ---------------------------------------------------------------- layout


def test_table_lists_name_dtype_shape_offset_scale_sorted_by_name() -> None:
    table, blob = _encode(_small_state())
    assert [e[0] for e in table] == sorted(_small_state())
    assert table[0] == ["bn.num_batches_tracked", "int64", [], 0, None]
    assert table[1] == ["conv.bias", "float32", [4], 8, None]
    assert len(blob) == 8 + 16 + 4 * 27 * 4 + 3


def test_blob_is_little_endian_c_order() -> None:
    arr = np.arange(6, dtype=">f4").reshape(2, 3).T  # big-endian, not C-contiguous
    _, blob = _encode({"x": arr})
    assert blob == np.ascontiguousarray(arr, dtype="<f4").tobytes()


def test_float32_round_trip_is_exact() -> None:
    state = _small_state()
    table, blob = _encode(state)
    out = _decode(table, blob)
    assert set(out) == set(state)
    for name, arr in state.items():
        assert out[name].dtype == arr.dtype and np.array_equal(out[name], arr)


def test_float16_codec_halves_floats_and_keeps_integers() -> None:
    state = _small_state()
    table, blob = _encode(state, "float16")
    out = _decode(table, blob, "float16")
    assert out["conv.weight"].dtype == np.float16
    np.testing.assert_allclose(out["conv.weight"], state["conv.weight"], rtol=1e-3, atol=1e-3)
    assert out["bn.num_batches_tracked"].dtype == np.int64
    assert int(out["bn.num_batches_tracked"]) == 7


def test_int8_codec_error_is_at_most_half_a_step() -> None:
    x = np.linspace(-3.0, 2.0, 1001, dtype=np.float32)
    table, blob = _encode({"x": x}, "int8")
    scale = table[0][4]
    assert table[0][1] == "int8" and scale == pytest.approx(3.0 / 127, rel=1e-6)
    out = _decode(table, blob, "int8")["x"]
    assert out.dtype == np.float32
    assert float(np.max(np.abs(out - x))) <= scale / 2 + 1e-7


def test_int8_codec_encodes_an_all_zero_tensor_with_scale_zero() -> None:
    table, blob = _encode({"z": np.zeros(5, np.float32)}, "int8")
    assert table[0][4] == 0.0
    assert np.array_equal(_decode(table, blob, "int8")["z"], np.zeros(5, np.float32))


def test_int8_codec_encodes_scalars_and_decodes_them_to_float32_scalars() -> None:
    state = {"s": np.array(-2.5, np.float32), "t": np.array(0.0, np.float64)}
    table, blob = _encode(state, "int8")
    assert table == [["s", "int8", [], 0, float(np.float32(2.5) / np.float32(127))], ["t", "int8", [], 1, 0.0]]
    assert blob == b"\x81\x00"  # -127, 0
    out = _decode(table, blob, "int8")
    assert out["s"].shape == () and out["s"].dtype == np.float32 and not out["s"].flags.writeable
    assert float(out["s"]) == float(np.float32(-127) * np.float32(table[0][4]))
    assert out["t"].shape == () and float(out["t"]) == 0.0


def test_int8_scalar_received_from_a_peer_decodes_instead_of_crashing() -> None:
    out = _decode([["s", "int8", [], 0, 0.5]], b"\x05", "int8")
    assert out["s"].shape == () and float(out["s"]) == 2.5


def test_int8_scale_of_an_all_zero_tensor_is_zero_and_every_byte_is_zero() -> None:
    table, blob = _encode({"z": np.zeros((2, 2), np.float32), "s": np.array(-0.0, np.float32)}, "int8")
    assert [entry[4] for entry in table] == [0.0, 0.0] and blob == bytes(5)


def test_int8_scale_below_the_smallest_normal_float32_becomes_zero() -> None:
    # float32(1 / scale) would overflow to inf, and 0 * inf is NaN: such tensors travel as zeros
    tiny = np.array([1e-39, 0.0, -5e-40], np.float32)
    table, blob = _encode({"x": tiny}, "int8")
    assert table[0][4] == 0.0 and blob == bytes(3)
    assert int8_scale(float(np.finfo(np.float32).tiny) * 127) > 0.0


def test_int8_codec_sends_raw_int8_tensors_without_scale() -> None:
    table, blob = _encode({"q": np.array([-128, 5, 127], np.int8)}, "int8")
    assert table[0][4] is None
    assert _decode(table, blob, "int8")["q"].tolist() == [-128, 5, 127]


def test_decode_is_zero_copy_and_read_only() -> None:
    table, blob = _encode({"w": np.ones((100, 10), np.float32)})
    buf = bytearray(blob)
    out = _decode(table, buf)["w"]
    assert np.shares_memory(out, np.frombuffer(buf, np.uint8))
    assert not out.flags.writeable


@PROPERTY
@given(
    arrays=st.dictionaries(
        st.text(alphabet="abcxyz._0123456789", min_size=1, max_size=12),
        hnp.arrays(
            dtype=st.sampled_from([np.float32, np.float64]),
            shape=hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=5),
            elements=st.floats(-(2.0**100), 2.0**100, width=32) | st.floats(-(2.0**-122), 2.0**-122, width=32),
        )
        | hnp.arrays(
            dtype=np.float16,
            shape=hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=5),
            elements=st.floats(-60000, 60000, width=16),
        ),
        max_size=4,
    )
)
def test_int8_codec_round_trips_any_finite_state_within_half_a_step(arrays: dict[str, np.ndarray]) -> None:
    table, blob = _encode(arrays, "int8")
    out = _decode(table, blob, "int8")
    for (name, dtype, shape, _, scale), arr in zip(table, (arrays[n] for n in sorted(arrays)), strict=True):
        assert (name, dtype, shape) == (name, "int8", list(arr.shape))
        assert out[name].shape == arr.shape and out[name].dtype == np.float32
        q = np.frombuffer(blob, np.int8, count=arr.size, offset=table[sorted(arrays).index(name)][3])
        assert np.all(np.abs(q.astype(np.int16)) <= 127)
        if arr.size:
            x = arr.astype(np.float32).astype(np.float64)
            error = np.max(np.abs(out[name].astype(np.float64) - x))
            assert scale == int8_scale(float(np.max(np.abs(x))))
            assert error <= (scale * (0.5 + 1e-4) if scale else np.max(np.abs(x)))


def test_zero_size_and_scalar_tensors_round_trip() -> None:
    state = {"empty": np.zeros((0, 3), np.float32), "scalar": np.array(2.5, np.float32)}
    out = _decode(*_encode(state))
    assert out["empty"].shape == (0, 3) and out["scalar"].shape == ()
    assert float(out["scalar"]) == 2.5


@PROPERTY
@given(
    arrays=st.dictionaries(
        st.text(alphabet="abcxyz._0123456789", min_size=1, max_size=12),
        hnp.arrays(
            dtype=st.sampled_from([np.float32, np.float16, np.int8, np.int32, np.int64, np.bool_]),
            shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
            elements={"allow_nan": False, "allow_infinity": False},
        ),
        max_size=5,
    )
)
def test_float32_codec_round_trips_any_finite_state(arrays: dict[str, np.ndarray]) -> None:
    table, blob = _encode(arrays)
    out = _decode(table, blob)
    assert set(out) == set(arrays)
    for name, arr in arrays.items():
        expected = arr.astype(np.float32) if arr.dtype.kind == "f" else arr
        assert out[name].dtype == expected.dtype
        assert np.array_equal(out[name], expected)


# ---------------------------------------------------------------- local refusals


@pytest.mark.parametrize("dtype", [np.complex64, np.uint64, object])
def test_encode_refuses_dtypes_outside_the_allowlist(dtype: type) -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode_tensors({"x": np.zeros(2, dtype=dtype)})
    assert info.value.code is ErrorCode.BAD_DTYPE


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encode_refuses_non_finite_values(bad: float) -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode_tensors({"x": np.array([1.0, bad], np.float32)})
    assert info.value.code is ErrorCode.NON_FINITE


def test_encode_refuses_values_that_overflow_float16() -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode_tensors({"x": np.array([70000.0], np.float32)}, "float16")
    assert info.value.code is ErrorCode.NON_FINITE


def test_encode_refuses_more_tensors_than_the_limit() -> None:
    state = {f"t{i}": np.zeros(1, np.float32) for i in range(3)}
    with pytest.raises(LocalProtocolError) as info:
        encode_tensors(state, limits=Limits(max_tensors=2))
    assert info.value.code is ErrorCode.TOO_LARGE


def test_encode_refuses_non_string_names() -> None:
    with pytest.raises(LocalProtocolError):
        encode_tensors({1: np.zeros(1, np.float32)})


# ---------------------------------------------------------------- remote refusals

GOOD_TABLE = [["a", "float32", [2], 0, None], ["b", "float32", [2], 8, None]]
GOOD_BLOB = np.arange(4, dtype="<f4").tobytes()


def test_good_table_decodes() -> None:
    out = _decode(GOOD_TABLE, GOOD_BLOB)
    assert out["b"].tolist() == [2.0, 3.0]


@pytest.mark.parametrize(
    ("table", "blob_len", "code"),
    [
        ([["a", "float32", [2], 0, None], ["b", "float32", [2], 4, None]], 16, "BAD_TABLE"),
        ([["a", "float32", [2], 0, None], ["b", "float32", [2], 12, None]], 20, "BAD_TABLE"),
        ([["a", "float32", [2], 0, None], ["b", "float32", [3], 8, None]], 16, "BAD_TABLE"),
        (GOOD_TABLE, 17, "BAD_TABLE"),
        (GOOD_TABLE, 15, "BAD_TABLE"),
        ([["b", "float32", [2], 0, None], ["a", "float32", [2], 8, None]], 16, "BAD_TABLE"),
        ([["a", "float32", [2], 0, None], ["a", "float32", [2], 8, None]], 16, "BAD_TABLE"),
        ([["a", "float32", [2], 0.0, None], ["b", "float32", [2], 8, None]], 16, "BAD_TABLE"),
    ],
    ids=["overlap", "gap", "overrun", "trailing", "short", "unsorted", "duplicate", "float-offset"],
)
def test_inconsistent_tables_are_refused(table: list[Any], blob_len: int, code: str) -> None:
    assert _remote_code(table, bytes(blob_len)) == code


@pytest.mark.parametrize(
    ("entry", "codec", "code"),
    [
        (["a", "float64", [2], 0, None], "float32", "BAD_DTYPE"),
        (["a", "complex64", [1], 0, None], "float32", "BAD_DTYPE"),
        (["a", "object", [1], 0, None], "float32", "BAD_DTYPE"),
        (["a", 4, [2], 0, None], "float32", "BAD_DTYPE"),
        (["a", "float16", [4], 0, None], "float32", "BAD_DTYPE"),
        (["a", "float32", [2], 0, 1.0], "float32", "BAD_TABLE"),
        (["a", "int8", [8], 0, -1.0], "int8", "BAD_TABLE"),
        (["a", "int8", [8], 0, float("nan")], "int8", "BAD_TABLE"),
        (["a", "int8", [8], 0, 1], "int8", "BAD_TABLE"),
        (["a", "float32", [-2], 0, None], "float32", "BAD_SHAPE"),
        (["a", "float32", "2", 0, None], "float32", "BAD_SHAPE"),
        (["a", "float32", [True], 0, None], "float32", "BAD_SHAPE"),
        (["", "float32", [2], 0, None], "float32", "BAD_TABLE"),
        (["a\x00b", "float32", [2], 0, None], "float32", "BAD_TABLE"),
        ([b"a", "float32", [2], 0, None], "float32", "BAD_TABLE"),
        (["a", "float32", [2], 0], "float32", "BAD_TABLE"),
        ({"name": "a"}, "float32", "BAD_TABLE"),
    ],
)
def test_bad_table_entries_are_refused(entry: object, codec: str, code: str) -> None:
    assert _remote_code([entry], bytes(8), codec) == code


def test_table_that_is_not_an_array_is_refused() -> None:
    assert _remote_code({"a": 1}, b"") == "BAD_TABLE"


def test_unknown_codec_is_refused() -> None:
    assert _remote_code([], b"", "bfloat16") == "BAD_TYPE"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_non_finite_values_are_refused(bad: float, dtype: str) -> None:
    blob = np.array([0.0, bad], dtype=dtype).tobytes()
    assert _remote_code([["a", dtype, [2], 0, None]], blob, dtype) == "NON_FINITE"


def test_bool_bytes_other_than_zero_and_one_are_refused() -> None:
    assert _remote_code([["m", "bool", [2], 0, None]], b"\x01\x02") == "BAD_DTYPE"


def test_limits_on_tensor_count_name_length_ndim_and_elements() -> None:
    limits = Limits(
        max_tensors=1, max_name_length=3, max_ndim=2, max_tensor_elements=4, max_total_elements=6
    )
    blob4 = bytes(16)
    assert _remote_code(GOOD_TABLE, GOOD_BLOB, limits=limits) == "TOO_LARGE"
    assert _remote_code([["abcd", "float32", [1], 0, None]], bytes(4), limits=limits) == "TOO_LARGE"
    assert (
        _remote_code([["a", "float32", [1, 1, 1], 0, None]], bytes(4), limits=limits) == "BAD_SHAPE"
    )
    assert _remote_code([["a", "float32", [5], 0, None]], bytes(20), limits=limits) == "TOO_LARGE"
    limits2 = Limits(max_tensor_elements=4, max_total_elements=6)
    table = [["a", "float32", [4], 0, None], ["b", "float32", [4], 16, None]]
    assert _remote_code(table, blob4 * 2, limits=limits2) == "TOO_LARGE"


def test_shape_that_differs_from_the_model_is_refused() -> None:
    assert (
        _remote_code(GOOD_TABLE, GOOD_BLOB, expected_shapes={"a": (2,), "b": (1, 2)}) == "BAD_SHAPE"
    )


@pytest.mark.parametrize(
    ("model", "state", "codec", "ok"),
    [
        ("float32", np.ones(2, np.float32), "float32", True),
        ("float32", np.ones(2, np.float32), "float16", True),
        ("float32", np.ones(2, np.float32), "int8", True),
        ("float32", np.ones(2, np.float32), "int4", True),
        ("float16", np.ones(2, np.float32), "float32", True),
        ("float64", np.ones(2, np.float32), "int8", True),
        ("float32", np.ones(2, np.int8), "int8", False),  # a genuine int8 for a float tensor
        ("float32", np.ones(2, np.int64), "float32", False),
        ("int64", np.ones(2, np.int64), "int8", True),
        ("int64", np.ones(2, np.int32), "float32", False),
        ("int64", np.ones(2, np.float32), "float32", False),
        ("int8", np.ones(2, np.int8), "int8", True),
        ("int8", np.ones(2, np.float32), "int8", False),  # int8 with a scale is a float
        ("int8", np.ones(2, np.float32), "int4", False),  # so is int4
        ("int64", np.ones(2, np.int64), "int4", True),  # integers travel unchanged under int4 too
        ("bool", np.ones(2, np.bool_), "float16", True),
        ("bool", np.ones(2, np.uint8), "float32", False),
        ("uint16", np.ones(2, np.int16), "float32", False),  # no wire dtype fits it
    ],
)
def test_received_dtype_must_fit_the_model_dtype(model: str, state: np.ndarray, codec: str, ok: bool) -> None:
    table, blob = _encode({"w": state}, codec)
    if ok:
        assert _decode(table, blob, codec, expected_dtypes={"w": model})["w"].shape == (2,)
    else:
        assert _remote_code(table, blob, codec, expected_dtypes={"w": model}) == "BAD_DTYPE"


def test_model_dtype_is_checked_after_the_model_shape() -> None:
    table, blob = _encode({"w": np.ones(2, np.float32)})
    kw = {"expected_shapes": {"w": (3,)}, "expected_dtypes": {"w": "int64"}}
    assert _remote_code(table, blob, **kw) == "BAD_SHAPE"


def test_an_expected_dtype_that_is_no_numpy_dtype_is_a_local_error() -> None:
    table, blob = _encode({"w": np.ones(2, np.float32)})
    with pytest.raises(LocalProtocolError) as info:
        _decode(table, blob, expected_dtypes={"w": "f1oat"})
    assert info.value.code is ErrorCode.BAD_DTYPE


def test_tensor_unknown_to_the_model_is_refused() -> None:
    assert _remote_code(GOOD_TABLE, GOOD_BLOB, expected_shapes={"a": (2,)}) == "BAD_TABLE"


def test_missing_tensor_is_refused_only_when_complete_is_required() -> None:
    shapes = {"a": (2,), "b": (2,), "c": (3,)}
    assert set(_decode(GOOD_TABLE, GOOD_BLOB, expected_shapes=shapes)) == {"a", "b"}
    assert _remote_code(GOOD_TABLE, GOOD_BLOB, expected_shapes=shapes, complete=True) == "BAD_TABLE"


_entry = st.lists(
    st.one_of(
        st.none(),
        st.integers(-5, 40),
        st.floats(allow_nan=True),
        st.sampled_from(["a", "b", "float32", "int8", "bool", "float16", "int64", "\x00"]),
        st.lists(st.integers(-2, 6), max_size=4),
    ),
    min_size=0,
    max_size=6,
)


@PROPERTY
@given(
    table=st.lists(_entry, max_size=4),
    blob=st.binary(max_size=64),
    codec=st.sampled_from(["float32", "float16", "int8", "none"]),
)
def test_random_tables_decode_or_raise_remote_errors_only(
    table: list[Any], blob: bytes, codec: str
) -> None:
    try:
        out = _decode(table, blob, codec)
    except RemoteProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
    else:
        assert sum(a.nbytes for a in out.values()) <= len(blob) * 4


@PROPERTY
@given(
    dtype=st.sampled_from(["int8", "float32", "float16", "bool", "int64"]),
    scale=st.none() | st.floats() | st.integers(-1, 3),
    blob=st.binary(max_size=9),
    codec=st.sampled_from(["float32", "float16", "int8"]),
)
def test_random_scalar_entries_decode_or_raise_remote_errors_only(
    dtype: str, scale: object, blob: bytes, codec: str
) -> None:
    try:
        out = _decode([["s", dtype, [], 0, scale]], blob, codec)
    except RemoteProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
    else:
        assert out["s"].shape == () and not out["s"].flags.writeable


# ---------------------------------------------------------------- digests


def _reference_digest(state: dict[str, np.ndarray]) -> bytes:
    """Independent implementation of the documented canonical encoding."""
    names = {
        "float32": "<f4",
        "float16": "<f2",
        "float64": "<f8",
        "int8": "i1",
        "uint8": "u1",
        "int16": "<i2",
        "int32": "<i4",
        "int64": "<i8",
        "bool": "?",
    }
    h = hashlib.blake2b(digest_size=32)
    h.update(b"silomesh/state/v1\x00" + struct.pack(">I", len(state)))
    for name in sorted(state):
        arr = state[name]
        dname = next(
            k
            for k, v in names.items()
            if np.dtype(v) == arr.dtype.newbyteorder("<") or np.dtype(v) == arr.dtype
        )
        raw = np.ascontiguousarray(arr, dtype=names[dname]).tobytes()
        h.update(struct.pack(">H", len(name.encode())) + name.encode())
        h.update(bytes([len(dname)]) + dname.encode() + bytes([arr.ndim]))
        h.update(b"".join(struct.pack(">Q", d) for d in arr.shape) + struct.pack(">Q", len(raw)))
        h.update(raw)
    return h.digest()


def test_state_digest_matches_the_documented_canonical_encoding() -> None:
    state = _small_state()
    assert state_digest(state) == _reference_digest(state)


def test_state_digest_test_vector() -> None:
    state: dict[str, np.ndarray] = {
        "b": np.array([1, 2], np.int64),
        "a": np.arange(3, dtype=np.float32),
    }
    expected = "5131f16b2348343f3be898baa8b1e01eba72a1de7b7b37c2702204a806f03050"
    assert state_digest(state).hex() == expected
    assert _reference_digest(state).hex() == expected


def test_state_digest_ignores_insertion_order_and_memory_layout() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    first = state_digest({"x": a, "y": np.ones(2, np.float32)})
    second = state_digest({"y": np.ones(2, np.float32), "x": np.asfortranarray(a)})
    assert first == second


@pytest.mark.parametrize(
    "other",
    [
        {"x": np.array([1.0, 2.0], np.float16)},
        {"x": np.array([[1.0, 2.0]], np.float32)},
        {"z": np.array([1.0, 2.0], np.float32)},
        {"x": np.array([1.0, 2.5], np.float32)},
    ],
    ids=["dtype", "shape", "name", "value"],
)
def test_state_digest_changes_with_dtype_shape_name_or_value(other: dict) -> None:
    assert state_digest({"x": np.array([1.0, 2.0], np.float32)}) != state_digest(other)


def test_state_digest_refuses_unsupported_dtypes() -> None:
    with pytest.raises(LocalProtocolError):
        state_digest({"x": np.zeros(2, np.complex64)})


# ---------------------------------------------------------------- deltas


def test_delta_round_trip_restores_integers_and_bools_exactly() -> None:
    base = {"n": np.array([2**62, -5], np.int64), "m": np.array([True, False])}
    new = {"n": np.array([-(2**62), 7], np.int64), "m": np.array([False, False])}
    out = apply_delta(base, make_delta(new, base))
    assert np.array_equal(out["n"], new["n"]) and np.array_equal(out["m"], new["m"])


@PROPERTY
@given(
    pair=hnp.arrays(np.float32, (2, 6), elements=st.floats(-1e6, 1e6, width=32)),
)
def test_delta_round_trip_restores_floats_to_rounding(pair: np.ndarray) -> None:
    new, base = {"w": pair[0]}, {"w": pair[1]}
    out = apply_delta(base, make_delta(new, base))["w"]
    tol = 2 * np.finfo(np.float32).eps * (np.abs(pair[0]) + np.abs(pair[1])) + 1e-30
    assert np.all(np.abs(out - pair[0]) <= tol)


def test_apply_delta_keeps_tensors_absent_from_the_delta() -> None:
    base = {"a": np.ones(2, np.float32), "b": np.zeros(2, np.float32)}
    out = apply_delta(base, {"a": np.ones(2, np.float32)})
    assert out["a"].tolist() == [2.0, 2.0] and out["b"] is base["b"]


def test_apply_delta_keeps_the_base_dtype_for_a_float16_delta() -> None:
    out = apply_delta({"a": np.ones(2, np.float32)}, {"a": np.ones(2, np.float16)})
    assert out["a"].dtype == np.float32


def test_delta_through_the_int8_codec_lands_within_one_step() -> None:
    rng = np.random.default_rng(3)
    base = {"w": rng.standard_normal(500).astype(np.float32)}
    new = {"w": base["w"] + rng.standard_normal(500).astype(np.float32) * 0.01}
    table, blob = _encode(make_delta(new, base), "int8")
    out = apply_delta(base, _decode(table, blob, "int8"))
    assert float(np.max(np.abs(out["w"] - new["w"]))) <= table[0][4]


@pytest.mark.parametrize(
    ("delta", "code"),
    [
        ({"zz": np.ones(2, np.float32)}, ErrorCode.BAD_TABLE),
        ({"a": np.ones(3, np.float32)}, ErrorCode.BAD_SHAPE),
        ({"n": np.ones(2, np.float32)}, ErrorCode.BAD_DTYPE),
        ({"a": np.ones(2, np.int32)}, ErrorCode.BAD_DTYPE),
        ({"a": np.full(2, 3e38, np.float32)}, ErrorCode.NON_FINITE),
    ],
    ids=["unknown", "shape", "float-into-int", "int-into-float", "overflow"],
)
def test_apply_delta_refuses_mismatched_deltas(delta: dict, code: ErrorCode) -> None:
    base = {"a": np.full(2, 3e38, np.float32), "n": np.zeros(2, np.int64)}
    with pytest.raises(RemoteProtocolError) as info:
        apply_delta(base, delta)
    assert info.value.code is code


def test_make_delta_refuses_states_with_different_tensors() -> None:
    with pytest.raises(LocalProtocolError) as info:
        make_delta({"a": np.ones(2, np.float32)}, {"b": np.ones(2, np.float32)})
    assert info.value.code is ErrorCode.BAD_TABLE


def test_codec_enum_values_are_the_wire_names() -> None:
    assert [c.value for c in Codec] == ["none", "float32", "float16", "int8", "int4", "topk"]


# ---------------------------------------------------------------- int4


def _float_states(elements: st.SearchStrategy[float]) -> st.SearchStrategy[dict[str, np.ndarray]]:
    """Up to four floating tensors (float16/32/64, 0-2 dimensions) of these elements."""
    return st.dictionaries(
        st.text(alphabet="abcxyz._0123456789", min_size=1, max_size=12),
        hnp.arrays(
            dtype=st.sampled_from([np.float32, np.float64, np.float16]),
            shape=hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=5),
            elements=elements,
        ),
        max_size=4,
    )


@PROPERTY
@given(arrays=_float_states(st.floats(-60000, 60000, width=16) | st.floats(-(2.0**-122), 2.0**-122, width=32)))
def test_int4_codec_round_trips_any_finite_state_within_half_a_step(arrays: dict[str, np.ndarray]) -> None:
    table, blob = _encode(arrays, "int4")
    out = _decode(table, blob, "int4")
    for (name, dtype, shape, offset, scale), arr in zip(table, (arrays[n] for n in sorted(arrays)), strict=True):
        assert (dtype, shape) == ("int4", list(arr.shape))
        assert out[name].shape == arr.shape and out[name].dtype == np.float32
        packed = np.frombuffer(blob, np.uint8, count=(arr.size + 1) // 2, offset=offset)
        nibbles = np.stack([packed & 0x0F, packed >> 4], axis=1).reshape(-1)
        assert np.all((nibbles[: arr.size] >= 1) & (nibbles[: arr.size] <= 15))
        assert arr.size % 2 == 0 or nibbles[-1] == 0
        if arr.size:
            x = arr.astype(np.float32).astype(np.float64)
            assert scale == int4_scale(float(np.max(np.abs(x))))
            error = np.max(np.abs(out[name].astype(np.float64) - x))
            assert error <= (scale * (0.5 + 1e-4) if scale else np.max(np.abs(x)))


def test_int4_packs_two_values_a_byte_low_nibble_first() -> None:
    """The layout PROTOCOL.md section 6 gives: q + 8 in nibbles, element 0 in the low one."""
    table, blob = _encode({"v": np.array([-1.0, 0.0, 1.0], np.float32), "s": np.array(2.5, np.float32)}, "int4")
    assert table == [["s", "int4", [], 0, int4_scale(2.5)], ["v", "int4", [3], 1, int4_scale(1.0)]]
    # s: q = 7 -> nibble 15, high nibble unused; v: q = -7, 0, 7 -> nibbles 1, 8 | 15, unused
    assert blob == bytes([0x0F, 0x81, 0x0F])
    out = _decode(table, blob, "int4")
    assert float(out["s"]) == np.float32(7) * np.float32(int4_scale(2.5))
    assert out["v"].tolist() == [-1.0, 0.0, 1.0]
    assert out["v"].base is None and not out["v"].flags.writeable  # its own read-only array


def test_int4_all_zero_tensor_has_scale_zero_and_every_value_is_q_zero() -> None:
    table, blob = _encode({"z": np.zeros(4, np.float32)}, "int4")
    assert table[0][4] == 0.0 and blob == bytes([0x88, 0x88])
    assert _decode(table, blob, "int4")["z"].tolist() == [0.0] * 4


@pytest.mark.parametrize(
    ("entry", "blob", "codec", "code"),
    [
        (["a", "int4", [2], 0, 0.5], bytes([0x88]), "float32", "BAD_DTYPE"),  # only under codec int4
        (["a", "int4", [2], 0, 0.5], bytes([0x88]), "int8", "BAD_DTYPE"),
        (["a", "int4", [2], 0, None], bytes([0x88]), "int4", "BAD_TABLE"),  # a scale is required
        (["a", "int4", [2], 0, -0.5], bytes([0x88]), "int4", "BAD_TABLE"),
        (["a", "int4", [2], 0, float("inf")], bytes([0x88]), "int4", "BAD_TABLE"),
        (["a", "int4", [2], 0, 1], bytes([0x88]), "int4", "BAD_TABLE"),  # an integer scale
        (["a", "int8", [1], 0, 0.5], bytes([1]), "int4", "BAD_TABLE"),  # int8 scales only under int8
        (["a", "int4", [3], 0, 0.5], bytes([0x88]), "int4", "BAD_TABLE"),  # 3 values need 2 bytes
        (["a", "int4", [2], 0, 0.5], bytes([0x80]), "int4", "BAD_DTYPE"),  # nibble 0 is not a value
        (["a", "int4", [1], 0, 0.5], bytes([0x18]), "int4", "BAD_DTYPE"),  # the unused nibble must be 0
    ],
)
def test_bad_int4_entries_are_refused(entry: list[Any], blob: bytes, codec: str, code: str) -> None:
    assert _remote_code([entry], blob, codec) == code


def test_int4_scale_below_the_smallest_normal_float32_becomes_zero() -> None:
    assert int4_scale(1e-40) == 0.0 and int4_scale(7.0) == 1.0


@PROPERTY
@given(
    count=st.integers(0, 9),
    blob=st.binary(max_size=6),
    scale=st.floats(allow_nan=True, allow_infinity=True) | st.none() | st.integers(-2, 2),
    codec=st.sampled_from(["int4", "int8", "float32"]),
)
def test_any_int4_entry_decodes_or_is_refused_with_a_code(count: int, blob: bytes, scale: object, codec: str) -> None:
    """Fuzzed int4 entries: decoded to float32 values of q in -7..7 times the scale, or
    refused with a protocol error code, never a crash."""
    table = [["w", "int4", [count], 0, scale]]
    try:
        out = _decode(table, blob, codec)
    except RemoteProtocolError:
        return
    assert codec == "int4" and isinstance(scale, float) and len(blob) == (count + 1) // 2
    assert out["w"].dtype == np.float32 and out["w"].shape == (count,)
    assert np.all(np.abs(out["w"].astype(np.float64)) <= 7 * float(np.float32(scale)) * (1 + 1e-6))


# ---------------------------------------------------------------- topk

_TOPK_VALUES = st.floats(-1e6, 1e6, width=32) | st.just(0.0) | st.just(-0.0)


@PROPERTY
@given(arrays=_float_states(st.floats(-60000, 60000, width=16) | st.just(0.0)))
def test_topk_codec_carries_the_non_zero_values_exactly(arrays: dict[str, np.ndarray]) -> None:
    table, blob = _encode(arrays, "topk")
    out = _decode(table, blob, "topk")
    for (name, dtype, shape, offset, kept), arr in zip(table, (arrays[n] for n in sorted(arrays)), strict=True):
        x = arr.astype(np.float32).reshape(-1)
        nonzero = np.flatnonzero(x)
        assert (dtype, shape, kept) == ("topk", list(arr.shape), nonzero.size)
        words = np.frombuffer(blob, "<u4", count=2 * kept, offset=offset)
        assert words[:kept].tolist() == nonzero.tolist()
        assert words[kept:].view("<f4").tolist() == x[nonzero].tolist()
        assert out[name].dtype == np.float32 and out[name].shape == arr.shape
        assert out[name].tolist() == arr.astype(np.float32).tolist()  # -0.0 == 0.0
        assert not out[name].flags.writeable


def test_topk_layout_is_indices_then_values() -> None:
    """The layout PROTOCOL.md section 6 gives: k uint32 indices (C order), then k float32."""
    state = {"v": np.array([[0.0, -1.5], [0.0, 2.0]], np.float32), "s": np.array(0.0, np.float32),
             "i": np.array([3, 0], np.int16)}
    table, blob = _encode(state, "topk")
    assert table == [["i", "int16", [2], 0, None], ["s", "topk", [], 4, 0], ["v", "topk", [2, 2], 4, 2]]
    assert blob == struct.pack("<2h", 3, 0) + struct.pack("<2I2f", 1, 3, -1.5, 2.0)
    out = _decode(table, blob, "topk")
    assert out["v"].tolist() == [[0.0, -1.5], [0.0, 2.0]] and out["s"].shape == () and float(out["s"]) == 0.0
    assert out["i"].dtype == np.int16  # integer tensors travel unchanged


def test_topk_pieces_make_the_same_blob() -> None:
    rng = np.random.default_rng(3)
    state = keep_largest({"a": rng.normal(size=(40, 3)).astype(np.float32), "b": rng.normal(size=7)}, 0.2)
    encoded = encode_tensors(state, "topk")
    assert b"".join(bytes(p) for p in encoded.pieces()) == encoded.to_bytes()
    assert [e[4] for e in encoded.table] == [24, 2]


def test_keep_largest_keeps_the_largest_magnitudes_of_each_floating_tensor() -> None:
    state = {"w": np.array([0.1, -3.0, 2.0, 0.5, -0.2], np.float32), "n": np.arange(4), "one": np.array(7.0)}
    out = keep_largest(state, 0.4)
    assert out["w"].tolist() == [0.0, -3.0, 2.0, 0.0, 0.0]  # ceil(0.4 * 5) = 2 values
    assert out["n"] is state["n"]  # integer tensors unchanged
    assert out["one"].tolist() == 7.0 and out["one"].dtype == np.float32  # ceil(0.4 * 1) = 1
    assert keep_largest(state, 1.0)["w"].tolist() == state["w"].tolist()
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            keep_largest(state, bad)


def test_topk_sends_no_values_that_are_zero_in_float32() -> None:
    """A float64 value below float32's range is 0 on the wire: not written as an explicit 0."""
    table, blob = _encode({"a": np.array([1e-50, 2.0, -1e-300, -0.0])}, "topk")
    assert table == [["a", "topk", [4], 0, 1]] and blob == struct.pack("<If", 1, 2.0)


def test_topk_refuses_values_beyond_float32() -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode_tensors({"a": np.array([1e39, 0.0])}, "topk")
    assert info.value.code is ErrorCode.NON_FINITE


_ONE = struct.pack("<If", 1, 0.5)  # index 1, value 0.5


@pytest.mark.parametrize(
    ("entry", "blob", "codec", "code"),
    [
        (["a", "topk", [2], 0, 1], _ONE, "float32", "BAD_DTYPE"),  # only under codec topk
        (["a", "topk", [2], 0, 1], _ONE, "int8", "BAD_DTYPE"),
        (["a", "float32", [2], 0, None], bytes(8), "topk", "BAD_DTYPE"),  # floats travel as topk
        (["a", "topk", [2], 0, None], _ONE, "topk", "BAD_TABLE"),  # k is required
        (["a", "topk", [2], 0, 1.0], _ONE, "topk", "BAD_TABLE"),  # a float k
        (["a", "topk", [2], 0, -1], _ONE, "topk", "BAD_TABLE"),
        (["a", "topk", [2], 0, True], _ONE, "topk", "BAD_TABLE"),
        (["a", "topk", [2], 0, 3], _ONE * 3, "topk", "BAD_TABLE"),  # more values than the tensor has
        (["a", "topk", [2], 0, 2], _ONE, "topk", "BAD_TABLE"),  # runs past the blob
        (["a", "topk", [2], 0, 1], struct.pack("<If", 2, 0.5), "topk", "BAD_TABLE"),  # index out of range
        (["a", "topk", [3], 0, 2], struct.pack("<2I2f", 1, 1, 0.5, 0.5), "topk", "BAD_TABLE"),  # repeated
        (["a", "topk", [3], 0, 2], struct.pack("<2I2f", 2, 1, 0.5, 0.5), "topk", "BAD_TABLE"),  # decreasing
        (["a", "topk", [2], 0, 1], struct.pack("<If", 1, float("nan")), "topk", "NON_FINITE"),
        (["a", "topk", [2], 0, 1], struct.pack("<If", 0, float("-inf")), "topk", "NON_FINITE"),
        (["a", "int8", [1], 0, 0.5], bytes([1]), "topk", "BAD_TABLE"),  # int8 scales only under int8
    ],
)
def test_bad_topk_entries_are_refused(entry: list[Any], blob: bytes, codec: str, code: str) -> None:
    assert _remote_code([entry], blob, codec) == code


def test_topk_entries_fit_float_model_tensors_only() -> None:
    entry = [["a", "topk", [2], 0, 1]]
    assert _decode(entry, _ONE, "topk", expected_dtypes={"a": "float16"})["a"].tolist() == [0.0, 0.5]
    assert _remote_code(entry, _ONE, "topk", expected_dtypes={"a": "int32"}) == "BAD_DTYPE"


def test_a_topk_entry_of_a_shape_the_model_lacks_is_refused_before_it_is_expanded() -> None:
    """A topk entry keeping no value decodes to ``count`` zeros from no bytes: a shape the
    model does not have is refused (step 11) before any array is made."""
    entry = [["a", "topk", [1 << 26], 0, 0]]
    assert _remote_code(entry, b"", "topk", expected_shapes={"a": (2,)}) == "BAD_SHAPE"


@PROPERTY
@given(
    count=st.integers(0, 5),
    kept=st.integers(-1, 6) | st.none() | st.floats(0, 3),
    words=st.lists(st.integers(0, 6), max_size=6),
    values=st.lists(_TOPK_VALUES | st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=6),
    codec=st.sampled_from(["topk", "float32"]),
)
def test_any_topk_entry_decodes_or_is_refused_with_a_code(
    count: int, kept: object, words: list[int], values: list[float], codec: str
) -> None:
    """Fuzzed topk entries: decoded to exactly the values at their indices, zero elsewhere,
    or refused with a protocol error code, never a crash."""
    blob = struct.pack(f"<{len(words)}I{len(values)}f", *words, *values)
    try:
        out = _decode([["w", "topk", [count], 0, kept]], blob, codec)
    except RemoteProtocolError:
        return
    assert codec == "topk" and type(kept) is int and len(words) == len(values) == kept <= count
    assert words == sorted(set(words)) and all(w < count for w in words)
    expected = np.zeros(count, np.float32)
    expected[words] = values
    assert out["w"].tolist() == expected.tolist()
