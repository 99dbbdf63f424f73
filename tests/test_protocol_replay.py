"""ReplayGuard: each (sender, round, sequence) accepted once, in bounded memory."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from silomesh.protocol import ErrorCode, LocalProtocolError, RemoteProtocolError, ReplayGuard

PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, database=None)
A = b"\xaa" * 32
B = b"\xbb" * 32


def _refused(guard: ReplayGuard, sender: bytes, rnd: int, seq: int) -> bool:
    try:
        guard.accept(sender, rnd, seq)
    except RemoteProtocolError as exc:
        assert exc.code is ErrorCode.REPLAY
        return True
    return False


def test_a_triple_is_accepted_once_then_refused() -> None:
    guard = ReplayGuard()
    assert not _refused(guard, A, 1, 1)
    assert _refused(guard, A, 1, 1)


def test_senders_have_independent_windows() -> None:
    guard = ReplayGuard()
    guard.accept(A, 1, 1)
    assert not _refused(guard, B, 1, 1)


def test_same_sequence_in_another_round_is_a_different_message() -> None:
    guard = ReplayGuard()
    guard.accept(A, 1, 5)
    assert not _refused(guard, A, 2, 5)


def test_out_of_order_delivery_within_the_window_is_accepted() -> None:
    guard = ReplayGuard(window=8)
    for seq in (5, 3, 4, 1, 2):
        assert not _refused(guard, A, 0, seq)


def test_pairs_below_the_low_water_mark_are_refused() -> None:
    guard = ReplayGuard(window=4)
    for seq in range(10, 20):
        guard.accept(A, 0, seq)
    assert _refused(guard, A, 0, 3)  # never seen, but older than the window
    assert (A, 0, 15) in guard
    assert (A, 0, 16) in guard  # still in the window: seen
    assert (A, 0, 20) not in guard


def test_check_records_nothing() -> None:
    guard = ReplayGuard()
    guard.check(A, 1, 1)
    guard.check(A, 1, 1)
    assert (A, 1, 1) not in guard


def test_memory_per_sender_is_bounded_by_the_window() -> None:
    guard = ReplayGuard(window=16)
    for seq in range(5000):
        guard.accept(A, 0, seq)
    assert guard.statistics().remembered == 16


def test_senders_beyond_the_limit_are_compacted_and_old_messages_stay_refused() -> None:
    guard = ReplayGuard(window=8, max_senders=2)
    senders = [bytes([i]) * 32 for i in range(5)]
    for s in senders:
        guard.accept(s, 0, 7)
    stats = guard.statistics()
    assert stats.senders == 2 and stats.compact_senders == 3
    assert _refused(guard, senders[0], 0, 7)
    assert not _refused(guard, senders[0], 0, 8)


def test_low_water_marks_restore_refuses_everything_accepted_before() -> None:
    guard = ReplayGuard()
    for seq in (1, 2, 9):
        guard.accept(A, 3, seq)
    restored = ReplayGuard(low_water_marks=guard.low_water_marks())
    assert all((A, 3, seq) in restored for seq in (1, 2, 9))
    assert not _refused(restored, A, 3, 10)


def test_low_water_marks_are_one_past_the_newest_accepted_pair() -> None:
    guard = ReplayGuard()
    guard.accept(A, 3, 9)
    guard.accept(A, 2, 50)
    guard.accept(A, 3, 2**64 - 1)
    assert guard.low_water_marks() == {A: (3, 2**64)}


def test_restore_raises_marks_and_forgets_pairs_below_them() -> None:
    guard = ReplayGuard()
    guard.accept(A, 1, 5)
    guard.restore({A: (2, 0), B: (7, 3)})
    assert guard.statistics().remembered == 0
    assert (A, 1, 6) in guard and not _refused(guard, A, 2, 0)
    assert (B, 7, 2) in guard and not _refused(guard, B, 7, 3)


def test_restore_never_lowers_a_mark() -> None:
    guard = ReplayGuard(low_water_marks={A: (5, 0)})
    guard.restore({A: (1, 0)})
    guard.accept(B, 4, 4)
    guard.restore({B: (0, 1)})
    assert (A, 4, 9) in guard and (B, 4, 4) in guard


def test_restore_refuses_a_malformed_mark() -> None:
    with pytest.raises(LocalProtocolError):
        ReplayGuard().restore({A: (1, -1)})


def test_guard_refuses_a_zero_window() -> None:
    with pytest.raises(LocalProtocolError):
        ReplayGuard(window=0)


@PROPERTY
@given(
    ops=st.lists(
        st.tuples(st.sampled_from([A, B]), st.integers(0, 3), st.integers(0, 30)), max_size=200
    ),
    window=st.integers(1, 20),
)
def test_no_triple_is_ever_accepted_twice(ops: list[tuple[bytes, int, int]], window: int) -> None:
    guard = ReplayGuard(window=window)
    accepted: set[tuple[bytes, int, int]] = set()
    for op in ops:
        if not _refused(guard, *op):
            assert op not in accepted
            accepted.add(op)
    assert guard.statistics().remembered <= 2 * window


@PROPERTY
@given(
    ops=st.lists(
        st.tuples(st.sampled_from([A, B]), st.integers(0, 3), st.integers(0, 30)), max_size=100
    )
)
def test_with_a_large_window_the_guard_behaves_like_a_set(
    ops: list[tuple[bytes, int, int]],
) -> None:
    guard = ReplayGuard(window=1000)
    seen: set[tuple[bytes, int, int]] = set()
    for op in ops:
        assert _refused(guard, *op) == (op in seen)
        seen.add(op)
