"""Exchange session state machine: two in-memory Sessions talking, h11-style."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from silomesh.protocol import (
    CLOSED,
    NEED_DATA,
    Ack,
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
    Role,
    SealedEnvelope,
    Session,
    State,
    TrainRequest,
    TrainResult,
    Update,
    frame_prefix,
    seal_envelope,
    state_digest,
)
from silomesh.protocol.secagg_messages import (
    SecaggCommit,
    SecaggDeal,
    SecaggGroup,
    SecaggMasked,
    SecaggRelease,
    SecaggShares,
)
from silomesh.protocol.session import TRANSITIONS

PROPERTY = settings(max_examples=150, deadline=None, derandomize=True, database=None)
ALICE = Identity.from_seed(b"\x01" * 32)  # dialer
BOB = Identity.from_seed(b"\x02" * 32)  # listener
CAROL = Identity.from_seed(b"\x03" * 32)
FED = "hospitals"
WEIGHTS = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
KEYS = {Role.DIALER: ALICE, Role.LISTENER: BOB}


class Peer:
    """One end: a session plus a sequence counter."""

    def __init__(self, role: Role, guard: ReplayGuard | None = None, **kw: Any) -> None:
        me, other = KEYS[role], KEYS[role.other]
        self.me, self.other = me, other
        self.seq = itertools.count(1)
        self.session = Session(
            role,
            identity=me,
            peer=other.public_key,
            federation=FED,
            replay=guard or ReplayGuard(),
            next_sequence=lambda: next(self.seq),
            **kw,
        )

    def make(self, kind: Kind, **kw: Any) -> Message:
        r = {
            "federation": FED,
            "sender": self.me.public_key,
            "recipient": self.other.public_key,
            "round": kw.pop("round", 1),
            "sequence": next(self.seq),
        }
        if kind is Kind.HELLO:
            return Hello(**r, **kw)
        if kind is Kind.UPDATE:
            kw.setdefault("tensors", WEIGHTS)
            kw.setdefault("state_digest", state_digest(kw["tensors"]))
            return Update(**r, **kw)
        if kind is Kind.TRAIN_REQUEST:
            return TrainRequest(**r, **({"tensors": WEIGHTS} | kw))
        if kind is Kind.TRAIN_RESULT:
            return TrainResult(**r, **({"tensors": WEIGHTS, "request_sequence": 0} | kw))
        if kind is Kind.NEED_BASE:
            return NeedBase(**r, **kw)
        if kind is Kind.ACK:
            return Ack(**r, **({"reply_to": 0} | kw))
        members, digest = (b"\x01" * 32, b"\x02" * 32), b"\x03" * 32
        if kind is Kind.SECAGG_GROUP:
            return SecaggGroup(**r, members=members, length=6, bits=32, scale=2.0**20, clip=4.0, max_members=2,
                               threshold=2, weight_cap=0, signature=b"\x04" * 64)
        if kind is Kind.SECAGG_DEAL:
            return SecaggDeal(**r, group_digest=digest, self_digest=digest, pair_digest=digest,
                              sealed=tuple((m, b"sealed") for m in members))
        if kind is Kind.SECAGG_SHARES:
            return SecaggShares(**r, group_digest=digest, dealers=members, sealed=((members[0], b"s"),))
        if kind is Kind.SECAGG_MASKED:
            return SecaggMasked.of(np.arange(6, dtype=np.uint32), **r, group_digest=digest, n_samples=3)
        if kind is Kind.SECAGG_COMMIT:
            return SecaggCommit(**r, group_digest=digest, dealers=members, survivors=members[:1],
                                signature=b"\x04" * 64)
        if kind is Kind.SECAGG_RELEASE:
            return SecaggRelease(**r, group_digest=digest, self_parts=((members[0], b"p"),))
        return ErrorMessage(**r, **({"code": ErrorCode.REFUSED} | kw))

    def send(self, kind: Kind, **kw: Any) -> SealedEnvelope:
        return self.session.send(self.make(kind, **kw))


def deliver(sealed: SealedEnvelope, receiver: Session) -> OpenedEnvelope:
    for part in sealed.frame_parts():
        receiver.receive_data(part)
    event = receiver.next_event()
    assert isinstance(event, OpenedEnvelope)
    return event


def pair(**kw: Any) -> tuple[Peer, Peer]:
    return Peer(Role.DIALER, **kw), Peer(Role.LISTENER, **kw)


def handshake(d: Peer, listener: Peer) -> None:
    deliver(d.send(Kind.HELLO), listener.session)
    deliver(listener.send(Kind.HELLO, max_frame_size=2**20), d.session)


def test_hello_update_ack_exchange_gives_the_same_events_at_both_ends() -> None:
    d, listener = pair()
    sent, received = [], []
    for peer, other, kind in [
        (d, listener, Kind.HELLO),
        (listener, d, Kind.HELLO),
        (d, listener, Kind.UPDATE),
        (listener, d, Kind.ACK),
    ]:
        sealed = peer.send(kind)
        sent.append(sealed.header.kind)
        received.append(deliver(sealed, other.session).message.kind)
    assert sent == received == [Kind.HELLO, Kind.HELLO, Kind.UPDATE, Kind.ACK]
    assert d.session.state is listener.session.state is State.READY
    assert listener.session.peer_hello is not None and d.session.peer_hello is not None


def test_train_request_is_answered_by_a_train_result() -> None:
    d, listener = pair()
    handshake(d, listener)
    request = deliver(d.send(Kind.TRAIN_REQUEST, epochs=2), listener.session).message
    assert listener.session.state is State.AWAIT_TRAIN_REPLY
    result = deliver(
        listener.send(Kind.TRAIN_RESULT, request_sequence=request.sequence, n_samples=40),
        d.session,
    ).message
    assert isinstance(result, TrainResult) and result.request_sequence == request.sequence
    assert d.session.state is State.READY


def test_train_result_can_be_delivered_on_a_stream_dialed_back_by_the_trainer() -> None:
    d, listener = pair()
    handshake(d, listener)
    deliver(d.send(Kind.TRAIN_RESULT, request_sequence=5), listener.session)
    assert listener.session.state is State.AWAIT_RESULT_REPLY
    deliver(listener.send(Kind.ACK, reply_to=5), d.session)
    assert d.session.state is State.READY


def test_need_base_is_answered_by_a_full_snapshot() -> None:
    d, listener = pair()
    handshake(d, listener)
    deliver(d.send(Kind.NEED_BASE, unknown_base=b"\x07" * 32), listener.session)
    snapshot = deliver(listener.send(Kind.UPDATE), d.session).message
    assert isinstance(snapshot, Update) and not snapshot.is_delta


def test_unknown_base_leads_to_need_base_then_keyframe_then_ack() -> None:
    d, listener = pair()
    handshake(d, listener)
    delta = d.send(Kind.UPDATE, base_digest=b"\x09" * 32)
    deliver(delta, listener.session)
    ask = listener.send(Kind.NEED_BASE, unknown_base=b"\x09" * 32, reply_to=delta.header.sequence)
    deliver(ask, d.session)
    deliver(d.send(Kind.UPDATE), listener.session)
    deliver(listener.send(Kind.ACK), d.session)
    assert d.session.state is listener.session.state is State.READY


def test_clean_end_of_stream_after_a_reply_closes_the_session() -> None:
    d, listener = pair()
    handshake(d, listener)
    listener.session.receive_data(b"")
    assert listener.session.next_event() is CLOSED
    assert listener.session.state is State.CLOSED


def test_end_of_stream_while_awaiting_a_reply_is_unexpected() -> None:
    d, listener = pair()
    handshake(d, listener)
    d.send(Kind.UPDATE)
    d.session.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        d.session.next_event()
    assert info.value.code is ErrorCode.UNEXPECTED_EOF
    assert d.session.state is State.ERROR


def test_next_event_returns_need_data_on_a_partial_frame() -> None:
    d, listener = pair()
    head, _ = d.send(Kind.HELLO).frame_parts()
    listener.session.receive_data(head[:10])
    assert listener.session.next_event() is NEED_DATA


def test_dialer_cannot_send_an_update_before_the_handshake() -> None:
    d, _ = pair()
    with pytest.raises(LocalProtocolError) as info:
        d.send(Kind.UPDATE)
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE
    assert d.session.state is State.ERROR


def test_listener_cannot_speak_first() -> None:
    _, listener = pair()
    with pytest.raises(LocalProtocolError):
        listener.send(Kind.HELLO)


def test_dialer_cannot_send_a_second_request_before_the_reply() -> None:
    d, listener = pair()
    handshake(d, listener)
    d.send(Kind.UPDATE)
    with pytest.raises(LocalProtocolError):
        d.send(Kind.UPDATE)


def test_message_the_peer_may_not_send_now_is_a_remote_error() -> None:
    d, listener = pair()
    handshake(d, listener)
    rogue = seal_envelope(d.make(Kind.ACK), ALICE)  # dialers never send acks
    with pytest.raises(RemoteProtocolError) as info:
        deliver(rogue, listener.session)
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE
    assert listener.session.state is State.ERROR


def test_session_in_error_refuses_further_use() -> None:
    d, _ = pair()
    with pytest.raises(LocalProtocolError):
        d.send(Kind.ACK)
    with pytest.raises(LocalProtocolError):
        d.session.next_event()
    with pytest.raises(LocalProtocolError):
        d.send(Kind.HELLO)


def test_handshake_frames_above_64_kib_are_refused_before_buffering() -> None:
    _, listener = pair()
    listener.session.receive_data(frame_prefix(65 * 1024) + b"x" * 100)
    with pytest.raises(RemoteProtocolError) as info:
        listener.session.next_event()
    assert info.value.code is ErrorCode.TOO_LARGE


def test_large_frames_are_accepted_once_ready() -> None:
    d, listener = pair()
    handshake(d, listener)
    big = {"w": np.zeros(40_000, np.float32)}  # 160 kB
    opened = deliver(d.send(Kind.UPDATE, tensors=big), listener.session)
    assert opened.size > 64 * 1024


def test_envelope_from_another_trusted_peer_is_a_sender_mismatch() -> None:
    listener = Peer(Role.LISTENER, trusted={ALICE.public_key, CAROL.public_key})
    hello = Hello(
        federation=FED, sender=CAROL.public_key, recipient=BOB.public_key, round=0, sequence=1
    )
    with pytest.raises(RemoteProtocolError) as info:
        deliver(seal_envelope(hello, CAROL), listener.session)
    assert info.value.code is ErrorCode.SENDER_MISMATCH


def test_replayed_frame_on_a_new_stream_is_refused_by_the_shared_guard() -> None:
    guard = ReplayGuard()
    d = Peer(Role.DIALER, guard)
    frame = d.send(Kind.HELLO).to_frame()
    first = Peer(Role.LISTENER, guard).session
    first.receive_data(frame)
    assert isinstance(first.next_event(), OpenedEnvelope)
    second = Peer(Role.LISTENER, guard).session
    second.receive_data(frame)
    with pytest.raises(RemoteProtocolError) as info:
        second.next_event()
    assert info.value.code is ErrorCode.REPLAY


def test_send_refuses_a_message_for_another_peer() -> None:
    d, _ = pair()
    hello = Hello(
        federation=FED, sender=ALICE.public_key, recipient=CAROL.public_key, round=0, sequence=1
    )
    with pytest.raises(LocalProtocolError) as info:
        d.session.send(hello)
    assert info.value.code is ErrorCode.WRONG_RECIPIENT


def test_send_refuses_an_envelope_above_the_peers_advertised_frame_limit() -> None:
    d, listener = pair()
    deliver(d.send(Kind.HELLO), listener.session)
    deliver(listener.send(Kind.HELLO, max_frame_size=1000), d.session)
    with pytest.raises(LocalProtocolError) as info:
        d.send(Kind.UPDATE, tensors={"w": np.zeros(1000, np.float32)})
    assert info.value.code is ErrorCode.TOO_LARGE


def test_listener_may_refuse_the_hello_with_an_error_and_close() -> None:
    d, listener = pair()
    deliver(d.send(Kind.HELLO), listener.session)
    event = deliver(listener.send(Kind.ERROR, code=ErrorCode.REFUSED), d.session)
    assert isinstance(event.message, ErrorMessage)
    assert d.session.state is listener.session.state is State.CLOSED


def test_received_tensors_are_checked_against_the_model_shapes() -> None:
    d = Peer(Role.DIALER)
    listener = Peer(Role.LISTENER, expected_shapes={"w": (3, 2)})
    handshake(d, listener)
    with pytest.raises(RemoteProtocolError) as info:
        deliver(d.send(Kind.UPDATE), listener.session)
    assert info.value.code is ErrorCode.BAD_SHAPE


def test_stale_envelopes_are_refused_when_a_skew_is_configured() -> None:
    _, listener = pair(max_skew_ms=1000, clock_ms=lambda: 10**13)
    d = Peer(Role.DIALER)
    with pytest.raises(RemoteProtocolError) as info:
        deliver(d.send(Kind.HELLO), listener.session)
    assert info.value.code is ErrorCode.STALE


def test_limits_frame_size_applies_after_the_handshake() -> None:
    d, listener = pair(limits=Limits(max_frame_size=4096))
    handshake(d, listener)
    listener.session.receive_data(frame_prefix(5000, max_frame_size=10_000))
    with pytest.raises(RemoteProtocolError) as info:
        listener.session.next_event()
    assert info.value.code is ErrorCode.TOO_LARGE


_KINDS = [k for k in Kind if k is not Kind.ANNOUNCE]


@PROPERTY
@given(steps=st.lists(st.tuples(st.sampled_from(list(Role)), st.sampled_from(_KINDS)), max_size=10))
def test_both_ends_follow_the_transition_table(steps: list[tuple[Role, Kind]]) -> None:
    peers = dict(zip((Role.DIALER, Role.LISTENER), pair(), strict=True))
    state = State.IDLE
    for role, kind in steps:
        sender, receiver = peers[role], peers[role.other]
        nxt = TRANSITIONS.get((state, role, kind))
        if nxt is None:
            with pytest.raises(LocalProtocolError):
                sender.send(kind)
            assert sender.session.state is State.ERROR
            return
        assert deliver(sender.send(kind), receiver.session).message.kind is kind
        state = nxt
        assert peers[Role.DIALER].session.state is peers[Role.LISTENER].session.state is state
        if state is State.CLOSED:
            return


@PROPERTY
@given(data=st.binary(max_size=300), chunk=st.integers(1, 50))
def test_random_bytes_into_a_session_raise_only_remote_errors(data: bytes, chunk: int) -> None:
    _, listener = pair()
    session = listener.session
    outcome: Any = None
    try:
        for i in range(0, len(data), chunk):
            session.receive_data(data[i : i + chunk])
            while (outcome := session.next_event()) is not NEED_DATA:
                pass
        session.receive_data(b"")
        outcome = session.next_event()
    except RemoteProtocolError:
        outcome = State.ERROR
    assert outcome in (CLOSED, State.ERROR)
    assert session.state in (State.CLOSED, State.ERROR)


_PATHS: dict[State, list[tuple[Role, Kind]]] = {
    State.IDLE: [],
    State.HELLO_SENT: [(Role.DIALER, Kind.HELLO)],
    State.READY: [(Role.DIALER, Kind.HELLO), (Role.LISTENER, Kind.HELLO)],
}
_PATHS[State.AWAIT_UPDATE_REPLY] = _PATHS[State.READY] + [(Role.DIALER, Kind.UPDATE)]
_PATHS[State.AWAIT_TRAIN_REPLY] = _PATHS[State.READY] + [(Role.DIALER, Kind.TRAIN_REQUEST)]
_PATHS[State.AWAIT_BASE_REPLY] = _PATHS[State.READY] + [(Role.DIALER, Kind.NEED_BASE)]
_PATHS[State.AWAIT_RESULT_REPLY] = _PATHS[State.READY] + [(Role.DIALER, Kind.TRAIN_RESULT)]
_PATHS[State.AWAIT_DEAL_REPLY] = _PATHS[State.READY] + [(Role.DIALER, Kind.SECAGG_GROUP)]
_PATHS[State.AWAIT_MASKED_REPLY] = _PATHS[State.READY] + [(Role.DIALER, Kind.SECAGG_SHARES)]
_PATHS[State.AWAIT_RELEASE_REPLY] = _PATHS[State.READY] + [(Role.DIALER, Kind.SECAGG_COMMIT)]


def test_every_non_terminal_state_is_exercised() -> None:
    assert set(_PATHS) == set(State) - {State.CLOSED, State.ERROR}


@pytest.mark.parametrize("state", list(_PATHS), ids=lambda s: s.value)
def test_every_role_and_kind_in_each_state_matches_the_table(state: State) -> None:
    for role, kind in itertools.product(Role, _KINDS):
        peers = dict(zip((Role.DIALER, Role.LISTENER), pair(), strict=True))
        for r, k in _PATHS[state]:
            deliver(peers[r].send(k), peers[r.other].session)
        assert peers[role].session.state is state
        expected = TRANSITIONS.get((state, role, kind))
        if expected is None:
            with pytest.raises(LocalProtocolError):
                peers[role].send(kind)
        else:
            deliver(peers[role].send(kind), peers[role.other].session)
            assert peers[role.other].session.state is expected


# ---------------------------------------------------------------- refusals (PROTOCOL.md 9 and 10)


def refuse(peer: Peer, frame: SealedEnvelope | bytes) -> RemoteProtocolError:
    """Feed ``frame`` to ``peer`` and return the error its session refuses it with."""
    data = frame if isinstance(frame, bytes) else frame.to_frame()
    peer.session.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        peer.session.next_event()
    return info.value


def test_refusal_after_the_signature_is_a_signed_error_with_the_refused_round_and_sequence() -> None:
    d = Peer(Role.DIALER)
    listener = Peer(Role.LISTENER, expected_shapes={"w": (3, 2)})
    handshake(d, listener)
    update = d.send(Kind.UPDATE, round=7)
    error = refuse(listener, update)
    assert error.code is ErrorCode.BAD_SHAPE
    sealed = listener.session.refusal(error, sequence=99)
    assert sealed is not None and listener.session.state is State.CLOSED
    reply = deliver(sealed, d.session).message
    assert isinstance(reply, ErrorMessage) and reply.code is ErrorCode.BAD_SHAPE
    assert (reply.reply_to, reply.round, reply.sequence) == (update.header.sequence, 7, 99)
    assert d.session.state is State.READY  # the listener closes the stream next: a clean end
    d.session.receive_data(b"")
    assert d.session.next_event() is CLOSED


def test_refusal_uses_the_sessions_sequence_counter_and_clock() -> None:
    _, listener = pair(max_skew_ms=1000, clock_ms=lambda: 10**13)
    stale = Peer(Role.DIALER).send(Kind.HELLO, round=4)  # sealed with the real clock
    error = refuse(listener, stale)
    assert error.code is ErrorCode.STALE
    sealed = listener.session.refusal(error)
    assert sealed is not None
    assert (sealed.header.sequence, sealed.header.timestamp, sealed.header.round) == (1, 10**13, 4)


def test_a_refused_hello_is_answered_and_closes_both_ends() -> None:
    d = Peer(Role.DIALER)
    listener = Peer(Role.LISTENER, expected_shapes={"w": (2, 3)})
    hello = d.send(Kind.HELLO)
    forged = seal_envelope(
        Hello(federation="other-fed", sender=ALICE.public_key, recipient=BOB.public_key, round=0, sequence=5),
        ALICE,
    )
    error = refuse(listener, forged)
    assert error.code is ErrorCode.WRONG_FEDERATION
    sealed = listener.session.refusal(error)
    assert sealed is not None and listener.session.state is State.CLOSED
    assert d.session.state is State.HELLO_SENT and hello.header.kind is Kind.HELLO
    deliver(sealed, d.session)
    assert d.session.state is State.CLOSED


def test_the_dialer_answers_a_refused_reply_with_an_error_that_closes_the_listener() -> None:
    d = Peer(Role.DIALER, expected_shapes={"w": (3, 2)})
    listener = Peer(Role.LISTENER)
    handshake(d, listener)
    deliver(d.send(Kind.NEED_BASE), listener.session)
    error = refuse(d, listener.send(Kind.UPDATE))
    assert error.code is ErrorCode.BAD_SHAPE
    sealed = d.session.refusal(error)
    assert sealed is not None and d.session.state is State.CLOSED
    assert listener.session.state is State.READY
    deliver(sealed, listener.session)
    assert listener.session.state is State.CLOSED


def test_an_unexpected_message_with_a_good_signature_is_answered() -> None:
    d, listener = pair()
    handshake(d, listener)
    error = refuse(listener, seal_envelope(d.make(Kind.ACK), ALICE))
    assert error.code is ErrorCode.UNEXPECTED_MESSAGE
    sealed = listener.session.refusal(error)
    assert sealed is not None and sealed.header.kind is Kind.ERROR


def test_the_signature_is_checked_before_the_session_state() -> None:
    d, listener = pair()
    handshake(d, listener)
    head, body = seal_envelope(d.make(Kind.ACK), ALICE).frame_parts()  # unexpected from a dialer
    bad_sig = bytearray(head)
    bad_sig[-1] ^= 0x01  # the last signature byte
    assert refuse(listener, bytes(bad_sig) + bytes(body)).code is ErrorCode.BAD_SIGNATURE


def test_refusals_before_the_signature_get_no_answer() -> None:
    d, listener = pair()
    sealed = d.send(Kind.HELLO)
    head, body = sealed.frame_parts()
    bad_sig = bytearray(head)
    bad_sig[-1] ^= 0x01
    error = refuse(listener, bytes(bad_sig) + bytes(body))
    assert error.code is ErrorCode.BAD_SIGNATURE
    assert listener.session.refusal(error) is None
    assert listener.session.state is State.ERROR


def test_a_refused_error_message_is_never_answered() -> None:
    d = Peer(Role.DIALER, max_skew_ms=1000, clock_ms=lambda: 10**13)
    listener = Peer(Role.LISTENER)
    d.send(Kind.HELLO)
    stale_error = seal_envelope(listener.make(Kind.ERROR, code=ErrorCode.REFUSED), BOB, timestamp_ms=1)
    error = refuse(d, stale_error)
    assert error.code is ErrorCode.STALE
    assert d.session.refusal(error) is None
    assert d.session.state is State.ERROR


def test_an_error_the_session_did_not_raise_gets_no_answer() -> None:
    d, listener = pair()
    handshake(d, listener)
    own = RemoteProtocolError(ErrorCode.TOO_LARGE, "buffer budget")
    assert listener.session.refusal(own) is None
    assert listener.session.state is State.ERROR


def test_a_refusal_needs_a_sequence() -> None:
    listener = Session(
        Role.LISTENER, identity=BOB, peer=ALICE.public_key, federation=FED, max_skew_ms=0, clock_ms=lambda: 10**13
    )
    listener.receive_data(Peer(Role.DIALER).send(Kind.HELLO).to_frame())
    with pytest.raises(RemoteProtocolError) as info:
        listener.next_event()
    with pytest.raises(LocalProtocolError):
        listener.refusal(info.value)


def test_an_unexpected_message_does_not_consume_the_replay_slot() -> None:
    guard = ReplayGuard()
    d = Peer(Role.DIALER, guard)
    listener = Peer(Role.LISTENER, guard)
    handshake(d, listener)
    rogue = seal_envelope(d.make(Kind.ACK), ALICE)
    refuse(listener, rogue)
    assert (ALICE.public_key, rogue.header.round, rogue.header.sequence) not in guard


def test_need_base_without_a_base_asks_for_the_current_model() -> None:
    d, listener = pair()
    handshake(d, listener)
    ask = deliver(d.send(Kind.NEED_BASE, unknown_base=None), listener.session).message
    assert isinstance(ask, NeedBase) and ask.unknown_base is None
    snapshot = deliver(listener.send(Kind.UPDATE), d.session).message
    assert isinstance(snapshot, Update) and not snapshot.is_delta and snapshot.state_digest == state_digest(WEIGHTS)


def test_received_tensors_are_checked_against_the_model_dtypes() -> None:
    d = Peer(Role.DIALER)
    listener = Peer(Role.LISTENER, expected_dtypes={"w": "int64"})
    handshake(d, listener)
    assert refuse(listener, d.send(Kind.UPDATE)).code is ErrorCode.BAD_DTYPE


def test_a_float_model_tensor_may_arrive_under_every_float_codec() -> None:
    for codec in ("float32", "float16", "int8", "int4", "topk"):
        d = Peer(Role.DIALER)
        listener = Peer(Role.LISTENER, expected_dtypes={"w": "float32"})
        handshake(d, listener)
        opened = deliver(d.send(Kind.UPDATE, codec=codec), listener.session)
        assert opened.message.tensors["w"].dtype.kind == "f"


def test_session_refuses_an_expected_dtype_that_is_not_a_numpy_dtype() -> None:
    with pytest.raises(LocalProtocolError) as info:
        Session(Role.LISTENER, identity=BOB, peer=ALICE.public_key, federation=FED, expected_dtypes={"w": "f1oat"})
    assert info.value.code is ErrorCode.BAD_DTYPE
