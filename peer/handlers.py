"""What a peer does when a neighbour talks to it: one exchange stream, start to end.

:func:`serve_stream` answers one neighbour's conversation: hello, then updates (deltas
or full snapshots), train-requests, or requests for our current model. The transport
already guarantees the stream comes from a trusted, authenticated PeerID and that an
exception here cannot take the host down.

Everything refused is audited (as ``refused``, with the envelope's header when it
authenticated) and counted against the sender, and the sender is told why with a signed
``error`` (PROTOCOL.md sections 9 and 10):

* envelope-level refusals (the :class:`~silomesh.protocol.Session` raises) end the stream;
* peer-level refusals answer the message and keep the stream: a round outside our window
  (``BAD_ROUND``), a state whose digest is not the announced one (``STATE_MISMATCH``), a
  delta that does not apply (``NON_FINITE``, ``BAD_SHAPE``...), a train-result we never
  asked for, a train-request the operator declined (``REFUSED``);
* a stream that never says hello, stalls mid-frame, or idles is closed (timeouts in
  :class:`~silomesh.peer.exchange.Timeouts`).
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import trio

from silomesh.models.architecture import model_difference
from silomesh.models.privacy import BudgetExhausted
from silomesh.peer import privacy, secure_member
from silomesh.peer.context import Base, Received, RoundContext
from silomesh.peer.exchange import ConversationError, Wire
from silomesh.peer.study import study_refusal
from silomesh.peer.transport import Stream
from silomesh.protocol import (
    Ack,
    ErrorCode,
    ErrorMessage,
    Hello,
    Message,
    NeedBase,
    ProtocolError,
    RemoteProtocolError,
    Role,
    TrainRequest,
    TrainResult,
    Update,
    apply_delta,
    state_digest,
)
from silomesh.protocol.secagg_messages import SecaggCommit, SecaggGroup, SecaggShares
from silomesh.protocol.study import split_hello_model
from silomesh.strategies import StateDict

log = logging.getLogger(__name__)

class Declined(Exception):
    """A peer-level refusal of one message: answered with a signed ``error``, the stream goes on."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


async def serve_stream(ctx: RoundContext, stream: Stream) -> None:
    """Answer one neighbour's exchange stream until it closes."""
    wire = ctx.endpoint.wire(Role.LISTENER, stream, ctx.learner.wire_shapes)
    remote = stream.remote
    ctx.store.note_seen(remote)
    timeouts = ctx.endpoint.timeouts
    try:
        wait = timeouts.hello
        while True:
            opened = await wire.receive(timeout=wait)
            wait = timeouts.idle
            if opened is None:
                await wire.close()
                return
            msg = opened.message
            try:
                await _answer(ctx, wire, msg)
            except Declined as exc:
                await _decline(ctx, wire, msg, exc)
    except RemoteProtocolError as exc:
        await wire.refuse(exc)
    except (ConversationError, ProtocolError) as exc:
        log.info("conversation with %s ended: %s", remote, exc)
        await wire.reset()
    finally:
        wire.release()


async def _answer(ctx: RoundContext, wire: Wire, msg: Message) -> None:
    remote = wire.stream.remote
    if isinstance(msg, Hello):
        ctx.neighbour_rounds[remote] = msg.round
        base = ctx.bases.received.get(remote)
        await wire.send(ctx.endpoint.hello(msg.sender, base.digest if base else None))
        differs = model_difference(ctx.endpoint.model_id, split_hello_model(msg.model)[0])
        if differs:  # our hello tells the dialer our model; the stream ends before any weights travel
            raise RemoteProtocolError(ErrorCode.REFUSED, f"model differs: {differs}")
        why = study_refusal(ctx.endpoint.study, remote, msg.model)
        if why:  # another study, a non-member, or ours not approved yet: nothing more on this stream
            gate = ctx.endpoint.study
            ctx.endpoint.journal.refused(remote, "hello", f"{ErrorCode.REFUSED.value}: {why}", round=msg.round,
                                         blame=gate is None or gate.approved)
            raise RemoteProtocolError(ErrorCode.REFUSED, why)
    elif isinstance(msg, Update):
        await _on_update(ctx, wire, msg)
    elif isinstance(msg, TrainRequest):
        await _on_train_request(ctx, wire, msg)
    elif isinstance(msg, NeedBase):
        await wire.send(current_update(ctx, msg.sender))
    elif isinstance(msg, SecaggGroup | SecaggShares | SecaggCommit):
        await _on_secagg(ctx, wire, msg)
    elif isinstance(msg, TrainResult):
        # we answer train-requests on their own stream, so a train-result dialled in is never ours
        raise Declined(ErrorCode.REFUSED, "no train-request of ours is waiting for a result")
    else:  # the session's transition table makes this unreachable
        raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"{msg.kind} not expected")


async def _decline(ctx: RoundContext, wire: Wire, msg: Message, exc: Declined) -> None:
    """Audit ``msg`` as refused (counted against its sender) and tell the sender why."""
    log.warning("refused %s from %s: %s", msg.kind, wire.stream.remote, exc)
    wire.decline(f"{exc.code.value}: {exc.message}")
    await wire.send(
        ErrorMessage(**ctx.endpoint.reply_routing(msg, round=msg.round), code=exc.code, message=exc.message[:1024],
                     reply_to=msg.sequence)
    )


def check_round(ctx: RoundContext, msg: Message) -> None:
    """Refuse a tensor message whose round is outside ``current +- round_window`` (BAD_ROUND)."""
    current, window = ctx.progress.wire_round, ctx.endpoint.round_window
    low, high = current - window, current + window
    if not low <= msg.round <= high:
        raise Declined(ErrorCode.BAD_ROUND, f"round {msg.round} is outside {low}..{high} (ours is {current})")


def reconstruct(ctx: RoundContext, sender: str, message: Update | TrainRequest) -> StateDict | None:
    """The full state a tensor message describes, or None if its base is unknown.

    A full snapshot is kept in the dtypes it arrived in (a float16 snapshot stays float16);
    a delta applies in its base's dtypes (PROTOCOL.md section 7).

    Raises:
        Declined: the delta does not apply (``NON_FINITE``, ``BAD_SHAPE``...), or the
            state's digest is not the ``state_digest`` the update announced (``STATE_MISMATCH``).
    """
    if message.base_digest is None:
        # kept as the read-only views of the decrypted frame they are: a copy would hold the
        # model twice while the frame lives on underneath (the frame is this message's alone)
        state = dict(message.tensors)
    else:
        known = ctx.bases.received.get(sender)
        if known is None or known.digest != message.base_digest:
            return None
        try:  # new arrays: the decoded delta (views of the plaintext) is not kept
            state = apply_delta(known.state, message.tensors)
        except ProtocolError as exc:
            raise Declined(exc.code, f"the delta does not apply to its base: {exc.message}") from None
    expected = message.state_digest if isinstance(message, Update) else None
    if expected is not None and state_digest(state) != expected:
        raise Declined(ErrorCode.STATE_MISMATCH, "the update does not produce the state_digest it announced")
    return state


async def _need_base(ctx: RoundContext, wire: Wire, msg: Update | TrainRequest) -> None:
    await wire.send(
        NeedBase(**ctx.endpoint.reply_routing(msg, round=msg.round), unknown_base=msg.base_digest,
                 reply_to=msg.sequence)
    )


async def _on_update(ctx: RoundContext, wire: Wire, msg: Update) -> None:
    """Acknowledge a verified update in our round window: it becomes the sender's latest
    model of its round and the base of its next delta (an ack does not promise use)."""
    remote = wire.stream.remote
    check_round(ctx, msg)
    state = reconstruct(ctx, remote, msg)
    if state is None:
        await _need_base(ctx, wire, msg)
        return
    ctx.bases.received[remote] = Base(msg.state_digest or state_digest(state), state)
    ctx.inbox.put(Received.from_metrics(remote, msg.round, state, msg.n_samples, msg.metrics))
    note = f"late: round {msg.round} while we are at {ctx.progress.round}" if msg.round < ctx.progress.round else ""
    ctx.store.note_seen(remote)
    await wire.send(Ack(**ctx.endpoint.reply_routing(msg, round=msg.round), reply_to=msg.sequence, note=note))


async def _on_train_request(ctx: RoundContext, wire: Wire, msg: TrainRequest) -> None:
    remote = wire.stream.remote
    check_round(ctx, msg)
    state = reconstruct(ctx, remote, msg)
    if state is None:
        await _need_base(ctx, wire, msg)
        return
    if ctx.participation == "manual":
        approved: bool | None = None
        with trio.move_on_after(ctx.rounds.deadline_seconds):  # the requester waits no longer
            approved = await ctx.consent.wait(
                "train-request", msg.round, remote, f"train {ctx.trust.name(remote)}'s model"
            )
        if not approved:
            why = "declined by the operator" if approved is False else "not approved before the round deadline"
            # the operator's decision, not the neighbour's fault: answered, not counted against it
            await wire.send(
                ErrorMessage(**ctx.endpoint.reply_routing(msg, round=msg.round), code=ErrorCode.REFUSED, message=why,
                             reply_to=msg.sequence)
            )
            return
    try:  # our data trains the neighbour's model: it spends our privacy budget
        serve = functools.partial(ctx.learner.serve_train_request, request=(msg.round, remote))
        trained = await ctx.compute.run(serve, state, ctx.rounds.local_steps)
    except BudgetExhausted as exc:
        await wire.send(ErrorMessage(**ctx.endpoint.reply_routing(msg, round=msg.round), code=ErrorCode.REFUSED,
                                     message=f"privacy budget exhausted: {exc}", reply_to=msg.sequence))
        return
    finally:
        privacy.record_round(ctx.endpoint.journal.audit_log, ctx.learner.dp, msg.round)
    await wire.send(
        TrainResult(
            **ctx.endpoint.reply_routing(msg, round=msg.round),
            tensors=ctx.faults.outgoing_state(ctx.peer_id, msg.round, trained.state),
            request_sequence=msg.sequence,
            n_samples=ctx.learner.n_samples,
            metrics={"loss": trained.mean_loss} if np.isfinite(trained.mean_loss) else {},
        )
    )


async def _on_secagg(ctx: RoundContext, wire: Wire, msg: SecaggGroup | SecaggShares | SecaggCommit) -> None:
    """A neighbour aggregating securely asks us, a member of its group (peer/secure_member.py)."""
    check_round(ctx, msg)
    try:
        if isinstance(msg, SecaggGroup):
            reply: Message = secure_member.on_group(ctx, msg)
        elif isinstance(msg, SecaggShares):
            reply = await secure_member.on_shares(ctx, msg)
        else:
            reply = secure_member.on_commit(ctx, msg)
    except ProtocolError as exc:  # what the group, the shares or the release policy refuse
        raise Declined(exc.code, exc.message) from None
    before = wire.bytes_sent
    await wire.send(reply)
    ctx.secure.member_bytes += wire.bytes_sent - before  # counted in our next round's bytes_sent


def current_update(ctx: RoundContext, recipient: bytes) -> Update:
    """Our current model as a full snapshot (the answer to a neighbour's need-base)."""
    state = ctx.learner.shared(ctx.learner.state())
    return Update(
        **ctx.endpoint.routing(recipient),
        tensors=state,
        n_samples=ctx.learner.n_samples,
        state_digest=state_digest(state),
    )
