"""The dialer side of the exchange: we open a stream to a neighbour and talk.

* :func:`push_update`: send our round's model (a delta against what the neighbour
  acknowledged last, or a full snapshot when it lacks that base) and wait for its ack;
* :func:`request_training`: a train-request round trip (our model, trained on the
  neighbour's data, comes back as a train-result);
* :func:`connect_loop`: keep every trusted neighbour dialled, backing off per neighbour.

A neighbour that does not answer in time (its hello, or the ack of an update) is
treated as a dead connection: the transport closes it, so the connect loop dials it
afresh instead of waiting on a link that stays open but never answers. A neighbour
that refuses our message with a signed ``error`` raises :class:`Refused`, counted in
the store so that both operators see it.

Every function raises :class:`~silomesh.peer.exchange.ConversationError`,
:class:`~silomesh.peer.transport.StreamClosed` or a
:class:`~silomesh.protocol.ProtocolError` when the neighbour could not be served; the
round loop turns that into "skipped" for the round.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import trio

from silomesh.models.architecture import model_difference
from silomesh.peer.context import Base, RoundContext
from silomesh.peer.exchange import ConversationError, Silent, Wire
from silomesh.peer.study import study_refusal
from silomesh.peer.transport import StreamClosed
from silomesh.protocol import (
    Ack,
    Codec,
    ErrorCode,
    ErrorMessage,
    Hello,
    LocalProtocolError,
    NeedBase,
    OpenedEnvelope,
    Role,
    SealedEnvelope,
    StreamSealer,
    TrainRequest,
    TrainResult,
    Update,
    apply_delta,
    make_delta,
    state_digest,
)
from silomesh.protocol.codec import keep_largest, received_as
from silomesh.protocol.study import split_hello_model
from silomesh.strategies import StateDict

log = logging.getLogger(__name__)

#: a neighbour that cannot be dialled is retried after 0.5 s, then 1, 2, 4... up to this
MAX_BACKOFF = 30.0
FIRST_BACKOFF = 0.5
#: how often the connect loop looks for lost neighbours
CONNECT_POLL = 0.5
DIAL_TIMEOUT = 5.0
#: models larger than this are turned into deltas in a worker thread
DELTA_THREAD_THRESHOLD = 1 << 20


async def connect_loop(ctx: RoundContext) -> None:
    """Keep trying to connect to every trusted neighbour, backing off per neighbour."""
    transport = ctx.transport
    backoff = dict.fromkeys(ctx.trust, FIRST_BACKOFF)
    next_try = dict.fromkeys(ctx.trust, 0.0)
    while True:
        for p in ctx.trust:
            if p in transport.connected or trio.current_time() < next_try[p]:
                continue
            if await transport.connect(p, timeout=DIAL_TIMEOUT):
                backoff[p] = FIRST_BACKOFF
                ctx.inbox.reachable(p)
                ctx.store.note_seen(p)
            else:
                next_try[p] = trio.current_time() + backoff[p]
                backoff[p] = min(backoff[p] * 2, MAX_BACKOFF)
        await trio.sleep(CONNECT_POLL)


async def open_wire(ctx: RoundContext, neighbour: str) -> Wire:
    """A stream to ``neighbour`` with hellos exchanged.

    Raises:
        ConversationError: if the neighbour cannot be reached or closes during hello.
    """
    transport = ctx.transport
    if not await transport.connect(neighbour, timeout=DIAL_TIMEOUT):
        raise ConversationError(f"{neighbour} unreachable")
    try:
        stream = await transport.open_stream(neighbour)
    except StreamClosed:
        # The connection may have died without the transport telling us: redial once.
        transport.forget(neighbour)
        if not await transport.connect(neighbour, timeout=DIAL_TIMEOUT):
            raise ConversationError(f"{neighbour} unreachable") from None
        stream = await transport.open_stream(neighbour)
    wire = ctx.endpoint.wire(Role.DIALER, stream, ctx.learner.wire_shapes)
    try:
        base = ctx.bases.received.get(neighbour)
        await wire.send(ctx.endpoint.hello(ctx.trust.public_key_of(neighbour), base.digest if base else None))
        hello = await answer(ctx, wire, neighbour, ctx.endpoint.timeouts.hello)
        if hello is None:
            raise ConversationError(f"{neighbour} closed the stream during hello")
        ctx.neighbour_rounds[neighbour] = hello.message.round
        if isinstance(hello.message, Hello):  # no weights go to a neighbour running another model
            differs = model_difference(ctx.endpoint.model_id, split_hello_model(hello.message.model)[0])
            if differs:
                log.warning("%s runs another model (%s); nothing sent", neighbour, differs)
                raise ConversationError(f"{neighbour} runs another model: {differs}")
            why = study_refusal(ctx.endpoint.study, neighbour, hello.message.model)
            if why:
                log.warning("%s: %s; nothing sent", neighbour, why)
                ctx.endpoint.journal.refused(neighbour, "hello", f"REFUSED: {why}", round=hello.message.round)
                raise ConversationError(f"{neighbour}: {why}")
    except BaseException:
        await wire.reset()
        raise
    return wire


class Refused(ConversationError):
    """The neighbour answered our message with a signed ``error``."""


class Dropped(ConversationError):
    """Fault injection (simnet) dropped our message before it was sent: a lost message."""


def skip_reason(exc: Exception) -> str:
    """Why a neighbour is skipped for the round (or did not get our update), for the round record."""
    if isinstance(exc, Refused):
        return str(exc)
    if isinstance(exc, LocalProtocolError):  # our own message was refused at our end
        return f"not sent: {exc}"
    return f"unreachable: {exc}"


async def answer(ctx: RoundContext, wire: Wire, neighbour: str, timeout: float | None) -> OpenedEnvelope | None:  # noqa: ASYNC109 - see Wire.receive
    """The neighbour's next message; a silent neighbour is forgotten, an ``error`` raises :class:`Refused`."""
    try:
        reply = await wire.receive(timeout=timeout)
    except Silent:
        ctx.transport.drop_connection(neighbour)  # open but never answering: close it, dial afresh
        raise
    if reply is not None and isinstance(reply.message, ErrorMessage):
        why = f"{reply.message.code}: {reply.message.message}"
        ctx.store.count_refused_by(neighbour, why)
        log.warning("%s refused our message: %s", neighbour, why)
        raise Refused(f"refused by the neighbour: {why}")
    return reply


@dataclass(frozen=True)
class Outgoing:
    """An update message, and the exact state the receiver will reconstruct from it."""

    message: Update
    result: Base


#: an update whose push broke off is offered again unchanged (to be resumed) while it is
#: younger than this; older ones are sealed afresh (receivers refuse envelopes older than
#: their clock skew limit, 15 minutes by default, as STALE)
RESEND_MAX_AGE_MS = 10 * 60 * 1000


@dataclass(frozen=True)
class Unfinished:
    """A sealed update whose push broke off: offered again as is, the receiver resumes it."""

    out: Outgoing
    #: sealed whole, or streamed (PROTOCOL.md 4.2: sent again from the chunk the neighbour asks for)
    sealed: SealedEnvelope | StreamSealer
    #: it was offered or streamed on a resumable stream: the neighbour keeps what arrived
    resumable: bool


class UpdateMaker:
    """Builds a round's update messages; the model's digest is computed once per round.

    A delta is ``state - base``; float rounding makes ``base + delta`` differ from
    ``state`` in the last bit, so the announced digest (and our record of what the
    neighbour holds) is that of the reconstruction, not of ``state``. Neighbours that hold
    the same base (all of them, in a steady round) get one delta and one reconstruction,
    made once and shared: their acknowledged bases are then one copy of the model, not one
    each.
    """

    def __init__(
        self,
        ctx: RoundContext,
        round: int,
        state: StateDict,
        metrics: dict[str, float],
        codec: str = "float32",
        n_samples: int | None = None,
    ) -> None:
        self.ctx = ctx
        self.round = round
        self.state = state
        self.metrics = metrics
        #: the samples the update's model stands for (default: our own; a tree round's subtree mean: its subtree's)
        self.n_samples = ctx.learner.n_samples if n_samples is None else n_samples
        #: ``[rounds] codec``: float16, int8, int4 and topk are lossy; the base of the next delta is
        #: what the neighbour decoded, so the loss is carried into that delta (error feedback)
        self.codec = Codec(codec)
        #: ``[rounds] topk``: under topk, the share of each tensor's delta values sent
        self.topk = ctx.rounds.topk
        self._digest: bytes | None = None
        self._received_full: tuple[StateDict, bytes] | None = None  # an int8 snapshot, as decoded
        self._large = sum(a.nbytes for a in state.values()) > DELTA_THREAD_THRESHOLD
        #: (base digest, codec) -> the delta against that base and what it reconstructs
        self._deltas: dict[tuple[bytes, Codec], tuple[StateDict, Base]] = {}
        self._lock = threading.Lock()  # pushes make their updates in worker threads at once
        #: neighbour -> the update whose push to it broke off, to offer again (PROTOCOL.md 4.1)
        self.unfinished: dict[str, Unfinished] = {}

    def _digest_of_state(self) -> bytes:
        if self._digest is None:
            self._digest = state_digest(self.state)
        return self._digest

    def _make(self, recipient: bytes, base: Base | None, codecs: tuple[str, ...]) -> Outgoing:
        lossy = self.codec if self.codec is not Codec.FLOAT32 and self.codec.value in codecs else None
        if lossy is None and self.codec in (Codec.INT4, Codec.TOPK) and Codec.INT8.value in codecs:
            lossy = Codec.INT8  # a neighbour that does not decode int4 or topk (not set to it) gets int8
        if base is not None and set(base.state) == set(self.state):
            codec = lossy or Codec.FLOAT32
            tensors, made = self._delta(base, codec)
            result, base_digest, digest = made.state, base.digest, made.digest
        elif lossy in (Codec.INT8, Codec.INT4, Codec.TOPK) and Codec.INT8.value in codecs:
            # a snapshot too (float16 ones would stay float16 at the receiver); int4 snapshots
            # would be too coarse for a model's weights and topk ones would lose most of it (or,
            # all kept, take twice float32's bytes): those go as int8
            codec = Codec.INT8
            result, digest = self._int8_snapshot()
            tensors, base_digest = self.state, None
        else:
            codec = Codec.FLOAT32
            result, tensors, base_digest, digest = self.state, self.state, None, self._digest_of_state()
        msg = Update(
            **self.ctx.endpoint.routing(recipient, self.round),
            tensors=tensors,
            base_digest=base_digest,
            codec=codec,
            n_samples=self.n_samples,
            state_digest=digest,
            metrics=self.metrics,
        )
        return Outgoing(msg, Base(digest, result))

    def _delta(self, base: Base, codec: Codec) -> tuple[StateDict, Base]:
        """The delta against ``base`` and the state it reconstructs, made once per base."""
        with self._lock:
            made = self._deltas.get((base.digest, codec))
            if made is None:
                delta = make_delta(self.state, base.state)
                if codec is Codec.TOPK:
                    delta = keep_largest(delta, self.topk)  # what is left out stays in the next delta
                lossy = codec is not Codec.FLOAT32
                result = apply_delta(base.state, received_as(delta, codec) if lossy else delta)
                if not lossy:
                    result = _share_exact(result, self.state)
                made = self._deltas[(base.digest, codec)] = (delta, Base(state_digest(result), result))
            return made

    def _int8_snapshot(self) -> tuple[StateDict, bytes]:
        with self._lock:
            if self._received_full is None:
                decoded = received_as(self.state, Codec.INT8)
                self._received_full = (decoded, state_digest(decoded))
            return self._received_full

    async def make(self, recipient: bytes, base: Base | None, codecs: tuple[str, ...] = ("float32",)) -> Outgoing:
        """The update for ``recipient`` (a delta against ``base`` if given), off the loop when large.

        ``codecs``: what the recipient's hello says it decodes; a lossy ``[rounds] codec`` it
        does not list is replaced by float32.
        """
        if self._large:
            return await trio.to_thread.run_sync(functools.partial(self._make, recipient, base, codecs))
        return self._make(recipient, base, codecs)


def _share_exact(result: StateDict, state: StateDict) -> StateDict:
    """``result`` with each tensor that is bitwise ``state``'s replaced by ``state``'s array.

    Most tensors of a float32 reconstruction ``base + (state - base)`` are exact (the
    subtraction is exact where base and state are within a factor of two), so the bases
    that every neighbour acknowledged share the round's model instead of holding a copy
    each: in a full topology that is the difference between one model and N - 1.
    """
    out = {}
    for name, value in result.items():
        own = state.get(name)
        if (own is not None and own.dtype == value.dtype and own.shape == value.shape
                and np.array_equal(np.ascontiguousarray(own).view(np.uint8),
                                   np.ascontiguousarray(value).view(np.uint8))):
            value = own
        out[name] = value
    return out


async def push_update(
    ctx: RoundContext, neighbour: str, maker: UpdateMaker, count: Callable[[int], None] | None = None
) -> int:
    """Send our round's model to ``neighbour``; returns bytes sent.

    ``count`` is told the bytes this push wrote even when it fails (a broken push still
    used the link; the round's ``bytes_sent`` counts them).

    Raises:
        ConversationError, StreamClosed, ProtocolError: the neighbour could not be served.
    """
    if not await ctx.faults.before_send(ctx.peer_id, neighbour, "update", maker.round):
        raise Dropped("dropped by fault injection")
    stage = functools.partial(ctx.progress.waiting_on.__setitem__, neighbour)  # what a stuck push is stuck on
    stage("push: dialling and hello")
    wire = await open_wire(ctx, neighbour)
    try:
        recipient = ctx.trust.public_key_of(neighbour)
        base = _agreed_base(ctx, wire, neighbour)
        earlier = maker.unfinished.pop(neighbour, None)
        hello = wire.session.peer_hello
        if earlier is not None and hello is not None and hello.state_digest == earlier.out.result.digest:
            # the broken push had delivered: only its ack was lost, and the hello says so
            ctx.bases.acknowledged(neighbour, earlier.out.result, earlier.out.message.codec)
            return wire.bytes_sent
        codecs = hello.codecs if hello is not None else ("float32",)
        stage("push: sealing and sending our update")
        if earlier is not None and _resendable(earlier, base, wire):
            out = await _send(wire, maker, neighbour, earlier.out, earlier)
        else:
            out = await _send(wire, maker, neighbour, await maker.make(recipient, base, codecs), None)
        stage("push: waiting for its ack")
        reply = await _await_ack(ctx, wire, maker, neighbour)
        if reply is not None and isinstance(reply.message, NeedBase):
            stage("push: sending a full snapshot (it lacked our base)")
            out = await _send(wire, maker, neighbour, await maker.make(recipient, None, codecs), None)
            stage("push: waiting for its ack")
            reply = await _await_ack(ctx, wire, maker, neighbour)
        if reply is None:
            raise ConversationError(f"{neighbour} closed the stream without answering")
        maker.unfinished.pop(neighbour, None)
        if isinstance(reply.message, Ack):
            ctx.bases.acknowledged(neighbour, out.result, out.message.codec)
        return wire.bytes_sent
    finally:
        if count is not None:
            count(wire.bytes_sent)
        await wire.close()


def _resendable(earlier: Unfinished, base: Base | None, wire: Wire) -> bool:
    """The broken push's envelope may be offered again: same base, and not near STALE."""
    if isinstance(earlier.sealed, StreamSealer) and not wire.session.streamed:
        return False
    same_base = earlier.out.message.base_digest == (base.digest if base is not None else None)
    return same_base and time.time() * 1000 - earlier.sealed.header.timestamp < RESEND_MAX_AGE_MS


async def _send(wire: Wire, maker: UpdateMaker, neighbour: str, out: Outgoing, earlier: Unfinished | None) -> Outgoing:
    """Write ``out`` (``earlier``'s sealed envelope again, unchanged, when given); if the stream
    breaks, remember the sealed envelope so that the next attempt offers it for resuming.
    A large update on a 1.2.0 stream is streamed (PROTOCOL.md 4.2): what is kept then is the
    sealer, which seals the same chunks again from where the neighbour's copy broke off."""
    streamed = isinstance(earlier.sealed, StreamSealer) if earlier is not None else wire.streams(out.message)
    if streamed:
        sealer = earlier.sealed if earlier is not None else await wire.seal_streamed(out.message)
        assert isinstance(sealer, StreamSealer)
        try:
            await wire.send_streamed(sealer, fresh=earlier is None)
        finally:
            maker.unfinished[neighbour] = Unfinished(out, sealer, True)  # until acked
        return out
    sealed = earlier.sealed if earlier is not None else await wire.seal(out.message)
    assert isinstance(sealed, SealedEnvelope)
    kept = Unfinished(out, sealed, wire.offers(sealed))
    try:
        await wire.send_sealed(sealed, fresh=earlier is None)
    finally:
        maker.unfinished[neighbour] = kept  # until acked
    return out


async def _await_ack(ctx: RoundContext, wire: Wire, maker: UpdateMaker, neighbour: str) -> OpenedEnvelope | None:
    """The neighbour's reply to our update; a refusal forgets the envelope (it was opened)."""
    try:
        return await answer(ctx, wire, neighbour, ctx.endpoint.timeouts.reply)
    except Refused:
        maker.unfinished.pop(neighbour, None)
        raise


def _agreed_base(ctx: RoundContext, wire: Wire, neighbour: str) -> Base | None:
    """The base of our delta: what the neighbour acknowledged, if its hello says it still holds it."""
    acked = ctx.bases.acked.get(neighbour)
    hello = wire.session.peer_hello
    if acked is None or hello is None or hello.state_digest != acked.digest:
        return None  # it restarted or lost our base: a full snapshot spares a need-base round trip
    return acked


@dataclass(frozen=True)
class Expert:
    """Our model as trained on a neighbour's data (a train-result)."""

    state: StateDict
    n_samples: int
    loss: float | None
    bytes: int


async def request_training(ctx: RoundContext, neighbour: str, round: int, state: StateDict, deadline_ms: int) -> Expert:
    """Have ``neighbour`` train our model on its data.

    Raises:
        ConversationError, StreamClosed, ProtocolError: the neighbour could not be served.
    """
    if not await ctx.faults.before_send(ctx.peer_id, neighbour, "train-request", round):
        raise Dropped("dropped by fault injection")
    wire = await open_wire(ctx, neighbour)
    try:
        msg = TrainRequest(
            **ctx.endpoint.routing(ctx.trust.public_key_of(neighbour), round),
            tensors=state,
            epochs=1,
            deadline_ms=deadline_ms,
        )
        sent = await wire.send(msg)
        reply = await answer(ctx, wire, neighbour, None)  # training takes time: the round's deadline bounds it
        if reply is None or not isinstance(reply.message, TrainResult):
            what = "nothing" if reply is None else reply.message.kind
            raise ConversationError(f"{neighbour} answered {what} to a train-request")
        result = reply.message
        if result.request_sequence != sent.header.sequence:
            wire.decline(f"{ErrorCode.BAD_TYPE.value}: train-result answers another request")
            raise ConversationError(f"{neighbour} answered another train-request")
        return Expert(
            {k: np.array(v) for k, v in result.tensors.items()},
            result.n_samples,
            result.metrics.get("loss"),
            wire.bytes_sent + wire.bytes_received,
        )
    finally:
        await wire.close()
