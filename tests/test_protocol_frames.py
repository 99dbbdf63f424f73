"""Length-prefixed framing: FrameDecoder / encode_frame."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from silomesh.protocol import (
    CLOSED,
    DEFAULT_MAX_FRAME_SIZE,
    NEED_DATA,
    ErrorCode,
    FrameDecoder,
    LocalProtocolError,
    RemoteProtocolError,
    encode_frame,
    frame_prefix,
)

PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, database=None)


def _drain(decoder: FrameDecoder) -> list[bytes]:
    frames: list[bytes] = []
    while True:
        frame = decoder.next_frame()
        if frame is NEED_DATA or frame is CLOSED:
            return frames
        assert isinstance(frame, bytearray)
        frames.append(bytes(frame))


def test_default_max_frame_size_fits_a_100m_parameter_float32_model() -> None:
    assert 100_000_000 * 4 < DEFAULT_MAX_FRAME_SIZE <= 2**32 - 1


def test_encoded_frame_is_big_endian_u32_length_then_body() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"


def test_decoder_returns_a_complete_frame() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(b"hello"))
    assert decoder.next_frame() == bytearray(b"hello")
    assert decoder.next_frame() is NEED_DATA


def test_decoder_returns_need_data_until_the_body_is_complete() -> None:
    decoder = FrameDecoder()
    data = encode_frame(b"0123456789")
    for i in range(len(data) - 1):
        decoder.receive_data(data[i : i + 1])
        assert decoder.next_frame() is NEED_DATA
    decoder.receive_data(data[-1:])
    assert decoder.next_frame() == bytearray(b"0123456789")


def test_decoder_accepts_an_empty_frame() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(b""))
    assert decoder.next_frame() == bytearray()


def test_oversize_length_prefix_is_refused_before_any_body_byte_is_buffered() -> None:
    decoder = FrameDecoder(max_frame_size=1000)
    decoder.receive_data(frame_prefix(1001, max_frame_size=2000) + b"x" * 500)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.code is ErrorCode.TOO_LARGE
    assert decoder.buffered <= 4


def test_oversize_prefix_is_reported_after_the_frames_before_it() -> None:
    decoder = FrameDecoder(max_frame_size=100)
    decoder.receive_data(encode_frame(b"ok") + (101).to_bytes(4, "big"))
    assert decoder.next_frame() == bytearray(b"ok")
    with pytest.raises(RemoteProtocolError):
        decoder.next_frame()


def test_decoder_error_repeats_on_later_calls() -> None:
    decoder = FrameDecoder(max_frame_size=100)
    decoder.receive_data((2**32 - 1).to_bytes(4, "big"))
    for _ in range(2):
        with pytest.raises(RemoteProtocolError) as info:
            decoder.next_frame()
        assert info.value.code is ErrorCode.TOO_LARGE


def test_body_buffer_grows_only_with_bytes_received() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(frame_prefix(400_000_000) + b"0123456789")
    assert decoder.next_frame() is NEED_DATA
    assert decoder.buffered == 14


def test_eof_at_a_frame_boundary_returns_closed() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(b"a"))
    decoder.receive_data(b"")
    assert decoder.next_frame() == bytearray(b"a")
    assert decoder.next_frame() is CLOSED


@pytest.mark.parametrize("cut", [1, 3, 4, 6])
def test_eof_inside_a_frame_is_a_truncated_frame(cut: int) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(b"abcdef")[:cut])
    decoder.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.code is ErrorCode.BAD_FRAME


def test_receiving_data_after_eof_is_a_local_error() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        decoder.receive_data(b"x")


def test_many_frames_in_one_chunk_are_all_delivered() -> None:
    decoder = FrameDecoder(max_frame_size=100)
    decoder.receive_data(encode_frame(b"x" * 60) * 5)
    assert _drain(decoder) == [b"x" * 60] * 5


def test_feeding_more_while_frames_beyond_the_limit_wait_is_a_local_error() -> None:
    decoder = FrameDecoder(max_frame_size=100)
    decoder.receive_data(encode_frame(b"x" * 60) * 2)
    with pytest.raises(LocalProtocolError) as info:
        decoder.receive_data(b"\x00")
    assert info.value.code is ErrorCode.TOO_LARGE


def test_frame_prefix_refuses_a_body_above_the_limit() -> None:
    with pytest.raises(LocalProtocolError) as info:
        frame_prefix(101, max_frame_size=100)
    assert info.value.code is ErrorCode.TOO_LARGE


def test_decoder_refuses_a_zero_max_frame_size() -> None:
    with pytest.raises(LocalProtocolError):
        FrameDecoder(max_frame_size=0)


def test_returned_frame_is_owned_by_the_caller() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(b"abc") + encode_frame(b"def"))
    first = decoder.next_frame()
    assert isinstance(first, bytearray)
    first[:] = b"zzz"
    assert decoder.next_frame() == bytearray(b"def")


@PROPERTY
@given(
    bodies=st.lists(st.binary(max_size=300), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=12),
)
def test_frames_survive_any_chunking_of_the_stream(bodies: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(b) for b in bodies)
    decoder = FrameDecoder(max_frame_size=4096)
    got: list[bytes] = []
    start = 0
    for cut in [*sorted({c for c in cuts if 0 < c < len(stream)}), len(stream)]:
        if cut > start:
            decoder.receive_data(stream[start:cut])
        start = cut
        got.extend(_drain(decoder))
    decoder.receive_data(b"")
    assert decoder.next_frame() is CLOSED
    assert got == bodies


@PROPERTY
@given(data=st.binary(max_size=600), chunk=st.integers(min_value=1, max_value=64))
def test_random_bytes_yield_frames_or_remote_errors_only(data: bytes, chunk: int) -> None:
    decoder = FrameDecoder(max_frame_size=256)
    outcome = "ok"
    try:
        for i in range(0, len(data), chunk):
            decoder.receive_data(data[i : i + chunk])
            _drain(decoder)
        decoder.receive_data(b"")
        _drain(decoder)
    except RemoteProtocolError as exc:
        outcome = exc.code.value
    assert outcome in ("ok", "TOO_LARGE", "BAD_FRAME")
    assert decoder.buffered <= 256 + 4
