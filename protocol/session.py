"""One exchange stream as a table-driven state machine, sans-I/O (in the style of h11).

The conversation on ``/silomesh/exchange/1.0.0`` is strictly alternating, so both ends
track one shared state::

    IDLE --dialer hello--> HELLO_SENT --listener hello--> READY
    READY --dialer update--------> AWAIT_UPDATE_REPLY --ack|error|need-base--------> READY
    READY --dialer train-request-> AWAIT_TRAIN_REPLY  --train-result|ack|error|need-base-> READY
    READY --dialer need-base-----> AWAIT_BASE_REPLY   --update|error---------------> READY
    READY --dialer train-result--> AWAIT_RESULT_REPLY --ack|error-------------------> READY
    READY --dialer secagg-group--> AWAIT_DEAL_REPLY    --secagg-deal|error----------> READY
    READY --dialer secagg-shares-> AWAIT_MASKED_REPLY  --secagg-masked|error--------> READY
    READY --dialer secagg-commit-> AWAIT_RELEASE_REPLY --secagg-release|error-------> READY
    HELLO_SENT --listener error--> CLOSED
    READY --dialer error--> CLOSED

End of stream is clean in IDLE, READY and CLOSED. Any violation, by either side, moves
the session to ERROR for good: a message we may not send raises
:class:`LocalProtocolError`, one the peer may not send raises
:class:`RemoteProtocolError`. Until READY the frame limit is the small handshake limit,
so an unauthenticated dialer cannot make us buffer a large frame.

A received envelope is checked in the order of PROTOCOL.md section 10; the session's own
check (the table above, ``UNEXPECTED_MESSAGE``) is step 5, right after the signature. When
an envelope is refused after its signature verified, :meth:`Session.refusal` gives the
signed ``error`` that tells the sender why (section 9); before, the stream is just reset.

Usage (I/O left to the caller)::

    s = Session(Role.DIALER, identity=me, peer=their_key, federation="fed")
    for part in s.send(Hello(...)).frame_parts(): await stream.write(part)
    s.receive_data(await stream.read(65536))
    event = s.next_event()   # OpenedEnvelope | NEED_DATA | CLOSED
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass

from .codec import check_model_dtypes
from .envelope import EnvelopeHeader, OpenedEnvelope, SealedEnvelope, seal_envelope
from .errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from .frames import CLOSED, NEED_DATA, FrameDecoder, FrameOffer, PartialFrame, Signal, StreamedFrame, StreamOffer
from .identity import Identity
from .limits import DEFAULT_LIMITS, MAX_ANNOUNCE_SIZE, Limits
from .messages import MAX_TEXT, ErrorMessage, Hello, Kind, Message
from .opening import (
    AuthenticatedEnvelope,
    StreamedPayload,
    authenticate_envelope,
    authenticate_trailer,
    open_authenticated,
)
from .replay import ReplayGuard
from .streamed import PartialStream, StreamOpener, StreamSealer, seal_streamed

__all__ = ["EOF_STATES", "HANDSHAKE_MAX_FRAME_SIZE", "TRANSITIONS", "Role", "Session", "State"]

logger = logging.getLogger(__name__)

HANDSHAKE_MAX_FRAME_SIZE = MAX_ANNOUNCE_SIZE
"""Frame limit until the session is READY (hello and error messages are small)."""


class Role(enum.Enum):
    """Which end of the stream we are."""

    DIALER = "dialer"
    LISTENER = "listener"

    @property
    def other(self) -> Role:
        """The opposite role."""
        return Role.LISTENER if self is Role.DIALER else Role.DIALER


class State(enum.Enum):
    """Conversation state, the same at both ends."""

    IDLE = "IDLE"
    HELLO_SENT = "HELLO_SENT"
    READY = "READY"
    AWAIT_UPDATE_REPLY = "AWAIT_UPDATE_REPLY"
    AWAIT_TRAIN_REPLY = "AWAIT_TRAIN_REPLY"
    AWAIT_BASE_REPLY = "AWAIT_BASE_REPLY"
    AWAIT_RESULT_REPLY = "AWAIT_RESULT_REPLY"
    AWAIT_DEAL_REPLY = "AWAIT_DEAL_REPLY"
    AWAIT_MASKED_REPLY = "AWAIT_MASKED_REPLY"
    AWAIT_RELEASE_REPLY = "AWAIT_RELEASE_REPLY"
    CLOSED = "CLOSED"
    ERROR = "ERROR"


_D, _L = Role.DIALER, Role.LISTENER
_S = State

TRANSITIONS: Mapping[tuple[State, Role, Kind], State] = {
    (_S.IDLE, _D, Kind.HELLO): _S.HELLO_SENT,
    (_S.HELLO_SENT, _L, Kind.HELLO): _S.READY,
    (_S.HELLO_SENT, _L, Kind.ERROR): _S.CLOSED,
    (_S.READY, _D, Kind.UPDATE): _S.AWAIT_UPDATE_REPLY,
    (_S.READY, _D, Kind.TRAIN_REQUEST): _S.AWAIT_TRAIN_REPLY,
    (_S.READY, _D, Kind.NEED_BASE): _S.AWAIT_BASE_REPLY,
    (_S.READY, _D, Kind.TRAIN_RESULT): _S.AWAIT_RESULT_REPLY,
    (_S.AWAIT_UPDATE_REPLY, _L, Kind.ACK): _S.READY,
    (_S.AWAIT_UPDATE_REPLY, _L, Kind.ERROR): _S.READY,
    (_S.AWAIT_UPDATE_REPLY, _L, Kind.NEED_BASE): _S.READY,
    (_S.AWAIT_TRAIN_REPLY, _L, Kind.TRAIN_RESULT): _S.READY,
    (_S.AWAIT_TRAIN_REPLY, _L, Kind.ACK): _S.READY,
    (_S.AWAIT_TRAIN_REPLY, _L, Kind.ERROR): _S.READY,
    (_S.AWAIT_TRAIN_REPLY, _L, Kind.NEED_BASE): _S.READY,
    (_S.AWAIT_BASE_REPLY, _L, Kind.UPDATE): _S.READY,
    (_S.AWAIT_BASE_REPLY, _L, Kind.ERROR): _S.READY,
    (_S.AWAIT_RESULT_REPLY, _L, Kind.ACK): _S.READY,
    (_S.AWAIT_RESULT_REPLY, _L, Kind.ERROR): _S.READY,
    (_S.READY, _D, Kind.ERROR): _S.CLOSED,
    # secure aggregation: the aggregator dials, each request has one reply or an error
    (_S.READY, _D, Kind.SECAGG_GROUP): _S.AWAIT_DEAL_REPLY,
    (_S.READY, _D, Kind.SECAGG_SHARES): _S.AWAIT_MASKED_REPLY,
    (_S.READY, _D, Kind.SECAGG_COMMIT): _S.AWAIT_RELEASE_REPLY,
    (_S.AWAIT_DEAL_REPLY, _L, Kind.SECAGG_DEAL): _S.READY,
    (_S.AWAIT_DEAL_REPLY, _L, Kind.ERROR): _S.READY,
    (_S.AWAIT_MASKED_REPLY, _L, Kind.SECAGG_MASKED): _S.READY,
    (_S.AWAIT_MASKED_REPLY, _L, Kind.ERROR): _S.READY,
    (_S.AWAIT_RELEASE_REPLY, _L, Kind.SECAGG_RELEASE): _S.READY,
    (_S.AWAIT_RELEASE_REPLY, _L, Kind.ERROR): _S.READY,
}
"""(state, role of the sender, kind) -> next state. Anything absent is a violation."""

EOF_STATES = frozenset({State.IDLE, State.READY, State.CLOSED})
"""States in which the stream may end cleanly."""


@dataclass(frozen=True)
class _Refused:
    """An envelope refused after its signature verified: it may be answered."""

    header: EnvelopeHeader
    error: RemoteProtocolError


def _clip_utf8(text: str, max_bytes: int) -> str:
    return text.encode("utf-8", "replace")[:max_bytes].decode("utf-8", "ignore")


class Session:
    """State machine for one exchange stream with one authenticated peer."""

    def __init__(
        self,
        role: Role,
        *,
        identity: Identity,
        peer: bytes,
        federation: str,
        trusted: Container[bytes] | None = None,
        replay: ReplayGuard | None = None,
        limits: Limits = DEFAULT_LIMITS,
        expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
        expected_dtypes: Mapping[str, str] | None = None,
        complete: bool = False,
        max_skew_ms: int | None = None,
        clock_ms: Callable[[], int] | None = None,
        next_sequence: Callable[[], int] | None = None,
        resumable: bool = False,
        streamed: bool = False,
    ) -> None:
        """Create a session.

        Args:
            role: DIALER opened the stream, LISTENER accepted it.
            identity: Our keys.
            peer: The remote peer's Ed25519 public key (from its authenticated PeerID);
                envelopes from anyone else are refused.
            federation: Our federation id.
            trusted: Allowlist of senders; defaults to ``{peer}``.
            replay: The peer-wide replay guard (share it across sessions); a private
                one is created if omitted.
            limits: Size limits once READY.
            expected_shapes: Model tensor shapes enforced on received tensors.
            expected_dtypes: Model tensor dtypes (numpy names such as ``"float32"``,
                ``"int64"``, ``"bool"``) enforced on received tensors: a floating
                tensor must arrive under a float codec, an integer or bool one in
                exactly its dtype (``BAD_DTYPE``).
            complete: With ``expected_shapes``, require every model tensor.
            max_skew_ms: If set, refuse envelopes whose timestamp is further from
                ``clock_ms()`` than this (the reference peer's default is
                :data:`~.limits.DEFAULT_MAX_SKEW_MS`).
            clock_ms: Current Unix time in ms (default: the system clock); also the
                timestamp of what this session seals.
            next_sequence: The peer's message counter, for the ``error`` that
                :meth:`refusal` seals (or pass ``sequence=`` there).
            resumable: The stream is ``/silomesh/exchange/1.1.0``: the peer may offer a
                frame (:class:`~.frames.FrameOffer` from :meth:`next_event`, answered
                with :meth:`answer_offer`) and resume it after a broken stream.
            streamed: The stream is ``/silomesh/exchange/1.2.0``: envelopes may travel
                streamed (PROTOCOL.md section 4.2; :meth:`send_streamed`), and the peer's
                are opened chunk by chunk as they arrive.

        Raises:
            LocalProtocolError: BAD_DTYPE if ``expected_dtypes`` names no numpy dtype.
        """
        self.role = role
        self.identity = identity
        self.peer = peer
        self.federation = federation
        self._trusted: Container[bytes] = {peer} if trusted is None else trusted
        self._replay = replay if replay is not None else ReplayGuard()
        self._limits = limits
        self._expected_shapes = expected_shapes
        if expected_dtypes is not None:
            check_model_dtypes(expected_dtypes)
        self._expected_dtypes = expected_dtypes
        self._complete = complete
        self._next_sequence = next_sequence
        self._refused: _Refused | None = None
        self._max_skew_ms = max_skew_ms
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._state = State.IDLE
        self.resumable = resumable or streamed
        self.streamed = streamed
        self._decoder = FrameDecoder(
            min(HANDSHAKE_MAX_FRAME_SIZE, limits.max_frame_size),
            resumable=self.resumable,
            streamed=self._open_stream if streamed else None,
        )
        self.peer_hello: Hello | None = None
        """The peer's hello once received."""

    @property
    def state(self) -> State:
        """The current conversation state."""
        return self._state

    @property
    def peer_max_frame_size(self) -> int:
        """The largest frame the peer accepts: its hello's ``max_frame_size``, or our own
        limit before its hello arrived."""
        return self.peer_hello.max_frame_size if self.peer_hello else self._limits.max_frame_size

    @property
    def ready_bytes(self) -> int:
        """Bytes of complete frames received and not yet opened by :meth:`next_event`.

        An I/O layer can use it to open a large envelope in a worker thread.
        """
        return self._decoder.complete_bytes

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and held (a partial frame plus complete frames not yet opened).

        An I/O layer can charge them to a memory budget, and tell a frame in progress
        (``> 0``) from an idle stream.
        """
        return self._decoder.buffered

    def _advance(self, sender: Role, kind: Kind, error: type[ProtocolError]) -> None:
        nxt = TRANSITIONS.get((self._state, sender, kind))
        if nxt is None:
            state = self._state
            self._state = State.ERROR
            raise error(
                ErrorCode.UNEXPECTED_MESSAGE,
                f"{sender.value} may not send {kind.value} in state {state.value}",
            )
        logger.debug(
            "%s session: %s --%s %s--> %s",
            self.role.value,
            self._state.value,
            sender.value,
            kind.value,
            nxt.value,
        )
        self._state = nxt
        if nxt is State.READY:
            self._decoder.max_frame_size = self._limits.max_frame_size

    def _fail(self) -> None:
        self._state = State.ERROR

    def _open_stream(self, payload_len: int, stream_header: bytes, kept: PartialStream | None) -> StreamOpener:
        return StreamOpener(self.identity.shared_key(self.peer), stream_header, payload_len, kept)

    def send(self, message: Message, *, timestamp_ms: int | None = None) -> SealedEnvelope:
        """Seal ``message`` for the peer and advance the state.

        Returns:
            The sealed envelope; write ``envelope.frame_parts()`` to the stream.

        Raises:
            LocalProtocolError: If the message is invalid, not addressed to the peer,
                too large for the peer's advertised frame limit, or not allowed now.
        """
        sealed = self._send(message, timestamp_ms, streamed=False)
        assert isinstance(sealed, SealedEnvelope)
        return sealed

    def send_streamed(self, message: Message, *, timestamp_ms: int | None = None) -> StreamSealer:
        """Start sealing ``message`` as a streamed envelope (PROTOCOL.md section 4.2) and advance the state.

        Returns:
            The sealer: write its ``prelude``, each of its ``chunks()`` as it comes, then its
            ``trailer``, with nothing else on the stream in between.

        Raises:
            LocalProtocolError: As :meth:`send`; UNEXPECTED_MESSAGE on a stream that is not
                ``/silomesh/exchange/1.2.0``.
        """
        if not self.streamed:
            raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "this stream does not carry streamed envelopes")
        sealer = self._send(message, timestamp_ms, streamed=True)
        assert isinstance(sealer, StreamSealer)
        return sealer

    def _send(self, message: Message, timestamp_ms: int | None, *, streamed: bool) -> SealedEnvelope | StreamSealer:
        if self._state in (State.ERROR, State.CLOSED):
            raise LocalProtocolError(
                ErrorCode.UNEXPECTED_MESSAGE, f"session is {self._state.value}"
            )
        try:
            if message.recipient != self.peer or message.federation != self.federation:
                raise LocalProtocolError(
                    ErrorCode.WRONG_RECIPIENT, "message is not addressed to this session's peer"
                )
            if (self._state, self.role, message.kind) not in TRANSITIONS:
                self._advance(self.role, message.kind, LocalProtocolError)
            now = self._clock_ms() if timestamp_ms is None else timestamp_ms
            sealed: SealedEnvelope | StreamSealer
            if streamed:
                sealed = seal_streamed(message, self.identity, limits=self._limits, timestamp_ms=now)
            else:
                sealed = seal_envelope(message, self.identity, limits=self._limits, timestamp_ms=now)
            self._check_peer_limit(sealed)
        except LocalProtocolError:
            self._fail()
            raise
        self._advance(self.role, message.kind, LocalProtocolError)
        return sealed

    def _check_peer_limit(self, sealed: SealedEnvelope | StreamSealer) -> None:
        peer_max = self.peer_hello.max_frame_size if self.peer_hello else None
        if peer_max is not None and sealed.size > peer_max:
            raise LocalProtocolError(
                ErrorCode.TOO_LARGE, f"envelope of {sealed.size} bytes > peer limit {peer_max}"
            )

    def send_sealed(self, sealed: SealedEnvelope | StreamSealer) -> None:
        """Advance the state for an envelope sealed earlier, to send it again unchanged.

        An envelope whose first sending broke off mid-frame may be offered again on a new
        stream, so that the receiver resumes it (PROTOCOL.md section 4.1): the same bytes,
        sequence and timestamp. The receiver opened none of it, so its replay guard has not
        seen that sequence. A streamed envelope (a :class:`~.streamed.StreamSealer`) is sent
        again from the chunk the receiver asks for, on a 1.2.0 stream only.

        Raises:
            LocalProtocolError: If the envelope is not ours, not addressed to the peer, too
                large for the peer's advertised frame limit, or its kind not allowed now.
        """
        if self._state in (State.ERROR, State.CLOSED):
            raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"session is {self._state.value}")
        header = sealed.header
        try:
            if isinstance(sealed, StreamSealer) and not self.streamed:
                raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "this stream does not carry streamed envelopes")
            if (
                header.sender != self.identity.public_key
                or header.recipient != self.peer
                or header.federation != self.federation
            ):
                raise LocalProtocolError(
                    ErrorCode.WRONG_RECIPIENT, "envelope is not ours or not addressed to this session's peer"
                )
            self._check_peer_limit(sealed)
        except LocalProtocolError:
            self._fail()
            raise
        self._advance(self.role, header.kind, LocalProtocolError)

    def answer_offer(self, held: bytes | bytearray | None = None) -> bytes:
        """Answer the peer's pending frame offer; ``held`` are the leading bytes of that body
        kept from an earlier stream (the caller matched the offer's digest), or None.

        Returns:
            The 4-byte answer to write to the stream.

        Raises:
            LocalProtocolError: if no offer is pending.
        """
        return self._decoder.answer_offer(held)

    def partial(self) -> PartialFrame | None:
        """The leading bytes of an offered frame still in progress (keep them when the stream breaks)."""
        return self._decoder.partial()

    def answer_stream(self, kept: PartialStream | None = None) -> bytes:
        """Answer the peer's pending streamed envelope (:class:`~.frames.StreamOffer`): ``kept``
        is what arrived of it on an earlier stream (the caller matched its stream header and
        length), or None.

        Returns:
            The 4-byte answer to write to the stream (the chunks held).

        Raises:
            LocalProtocolError: if no streamed envelope is pending.
        """
        return self._decoder.answer_stream(kept)

    def partial_stream(self) -> PartialStream | None:
        """What arrived of a streamed envelope still in progress, to keep when the stream broke
        (its whole chunks; None if none). The session must not be used afterwards."""
        kept = self._decoder.partial_stream()
        assert kept is None or isinstance(kept, PartialStream)
        return kept

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the stream; ``b""`` signals end of stream."""
        if self._state is State.ERROR:
            raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "session is in ERROR")
        try:
            self._decoder.receive_data(data)
        except LocalProtocolError:
            self._fail()
            raise

    def next_event(self) -> OpenedEnvelope | FrameOffer | StreamOffer | Signal:
        """Return the next verified envelope, a frame offer, :data:`NEED_DATA` or :data:`CLOSED`.

        A :class:`~.frames.FrameOffer` (resumable streams only) must be answered with
        :meth:`answer_offer` before more bytes are fed.

        Raises:
            RemoteProtocolError: The peer violated the protocol (session -> ERROR); if
                the envelope's signature had verified, :meth:`refusal` gives the reply.
            LocalProtocolError: Called after an error.
        """
        if self._state is State.ERROR:
            raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "session is in ERROR")
        authenticated = None
        try:
            frame = self._decoder.next_frame()
            if frame is NEED_DATA:
                return NEED_DATA
            if isinstance(frame, FrameOffer | StreamOffer):
                if self._state is State.CLOSED:
                    raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "offer after close")
                return frame
            if frame is CLOSED:
                if self._state not in EOF_STATES:
                    raise RemoteProtocolError(
                        ErrorCode.UNEXPECTED_EOF, f"stream ended in state {self._state.value}"
                    )
                self._state = State.CLOSED
                return CLOSED
            assert isinstance(frame, bytearray | StreamedFrame)
            if self._state is State.CLOSED:
                raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "data after close")
            # steps 1-4 of PROTOCOL.md section 10: lengths, header, trust, signature
            authenticated = self._authenticate(frame)
            # step 5: the session state
            kind = authenticated.header.kind
            if (self._state, self.role.other, kind) not in TRANSITIONS:
                self._advance(self.role.other, kind, RemoteProtocolError)
            # steps 6-11: recipient, federation, timestamp, digest, replay, decryption, payload
            opened = open_authenticated(
                authenticated,
                identity=self.identity,
                federation=self.federation,
                replay=self._replay,
                limits=self._limits,
                expected_shapes=self._expected_shapes,
                expected_dtypes=self._expected_dtypes,
                complete=self._complete,
                now_ms=self._clock_ms() if self._max_skew_ms is not None else None,
                max_skew_ms=self._max_skew_ms,
                in_place=True,
            )
        except RemoteProtocolError as exc:
            self._fail()
            if authenticated is not None:
                self._refused = _Refused(authenticated.header, exc)
            raise
        except ProtocolError:
            self._fail()
            raise
        if isinstance(opened.message, Hello):
            self.peer_hello = opened.message
        self._advance(self.role.other, kind, RemoteProtocolError)
        return opened

    def _authenticate(self, frame: bytearray | StreamedFrame) -> AuthenticatedEnvelope:
        if isinstance(frame, StreamedFrame):
            assert isinstance(frame.payload, StreamedPayload)
            return authenticate_trailer(
                frame.trailer, frame.payload, size=frame.size, trusted=self._trusted, expected_sender=self.peer
            )
        return authenticate_envelope(frame, trusted=self._trusted, expected_sender=self.peer, limits=self._limits)

    def refusal(
        self,
        error: ProtocolError,
        *,
        sequence: int | None = None,
        timestamp_ms: int | None = None,
    ) -> SealedEnvelope | None:
        """The signed ``error`` answering the envelope that :meth:`next_event` refused.

        PROTOCOL.md section 9: an envelope refused after its signature verified (section
        10, steps 5-11) is answered with an ``error`` carrying the code, ``reply_to`` =
        the refused envelope's sequence and its round; write it, then close the stream.
        An envelope refused before (framing, msgpack, version, kind, types, trust,
        signature) gets no answer: we cannot know whom we would be talking to. Neither
        does a refused ``error`` (errors are never answered), nor an ``error`` this
        session did not raise for a received envelope (e.g. the I/O layer's own limits).
        Peer-level refusals (the envelope was fine; the peer declines it) are normal
        replies: ``send(ErrorMessage(...))`` in the reply state, and the session stays
        usable.

        Args:
            error: The exception :meth:`next_event` raised.
            sequence: Our sequence number for the ``error``; by default the session's
                ``next_sequence()``.
            timestamp_ms: Its timestamp; by default ``clock_ms()``.

        Returns:
            The sealed ``error`` (the session is then CLOSED), or None: reset the stream
            (the session is then ERROR).

        Raises:
            LocalProtocolError: BAD_TYPE if an error is due and no sequence is known.
        """
        refused, self._refused = self._refused, None
        if refused is None or refused.error is not error or refused.header.kind is Kind.ERROR:
            if self._state is not State.CLOSED:
                self._state = State.ERROR
            return None
        if sequence is None:
            if self._next_sequence is None:
                raise LocalProtocolError(
                    ErrorCode.BAD_TYPE, "refusal needs sequence= or the session's next_sequence"
                )
            sequence = self._next_sequence()
        header = refused.header
        reply = ErrorMessage(
            federation=self.federation,
            sender=self.identity.public_key,
            recipient=self.peer,
            round=header.round,
            sequence=sequence,
            code=error.code,
            message=_clip_utf8(error.message, MAX_TEXT),
            reply_to=header.sequence,
        )
        sealed = seal_envelope(
            reply,
            self.identity,
            limits=self._limits,
            timestamp_ms=self._clock_ms() if timestamp_ms is None else timestamp_ms,
        )
        self._state = State.CLOSED
        logger.debug(
            "%s session: refused %s seq=%d with %s; CLOSED",
            self.role.value,
            header.kind.value,
            header.sequence,
            error.code.value,
        )
        return sealed

    def close(self) -> None:
        """Mark our end closed (the caller closes the stream); later sends are refused."""
        if self._state is not State.ERROR:
            self._state = State.CLOSED
