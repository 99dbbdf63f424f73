"""What a peer does when a neighbour talks to it: one exchange stream, start to end.

:func:`serve_stream` answers one neighbour's conversation: hello, then updates (deltas
or full snapshots), train-requests, or requests for our current model. Everything
refused is audited and counted against the sender (the :class:`~silomesh.peer.exchange.Wire`
does that); the transport already guarantees the stream comes from a trusted,
authenticated PeerID and that an exception here cannot take the host down.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import trio

from silomesh.peer.context import Base, Received, RoundContext
from silomesh.peer.exchange import ConversationError, Wire
from silomesh.peer.transport import Stream
from silomesh.protocol import (
    Ack,
    ErrorCode,
    ErrorMessage,
    Hello,
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
from silomesh.strategies import StateDict

log = logging.getLogger(__name__)

#: updates more than this many rounds behind ours are acknowledged but not used
MAX_ROUND_LAG = 2


async def serve_stream(ctx: RoundContext, stream: Stream) -> None:
    """Answer one neighbour's exchange stream until it closes."""
    wire = ctx.endpoint.wire(Role.LISTENER, stream, ctx.learner.shapes)
    remote = stream.remote
    ctx.store.upsert_neighbour(remote, last_seen=time.time())
    try:
        while True:
            opened = await wire.receive()
            if opened is None:
                return
            msg = opened.message
            if isinstance(msg, Hello):
                if msg.model and msg.model != ctx.endpoint.model_id:
                    log.warning("%s runs model %s, we run %s", remote, msg.model, ctx.endpoint.model_id)
                await wire.send(ctx.endpoint.hello(msg.sender))
            elif isinstance(msg, Update):
                await _on_update(ctx, wire, msg)
            elif isinstance(msg, TrainRequest):
                await _on_train_request(ctx, wire, msg)
            elif isinstance(msg, NeedBase):
                await wire.send(current_update(ctx, msg.sender))
            else:  # the session's transition table makes this unreachable
                raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"{msg.kind} not expected")
    except RemoteProtocolError as exc:
        await wire.refuse(exc)
    except (ConversationError, ProtocolError) as exc:
        log.info("conversation with %s ended: %s", remote, exc)
        await stream.reset()
    else:
        await stream.close()


def reconstruct(ctx: RoundContext, sender: str, message: Update | TrainRequest) -> StateDict | None:
    """The full state a tensor message describes, or None if its base is unknown.

    Raises:
        RemoteProtocolError: if the delta does not apply or the result's digest differs.
    """
    tensors = {k: np.array(v) for k, v in message.tensors.items()}  # own copies, writable
    if message.base_digest is None:
        # A full snapshot is covered by the signed payload digest already; its announced
        # state digest only names it as the base of the sender's next delta, and that
        # delta's result is checked below.
        return tensors
    known = ctx.bases.received.get(sender)
    if known is None or known.digest != message.base_digest:
        return None
    state = apply_delta(known.state, tensors)
    expected = message.state_digest if isinstance(message, Update) else None
    if expected is not None and state_digest(state) != expected:
        raise RemoteProtocolError(ErrorCode.DIGEST_MISMATCH, "delta does not produce the announced state")
    return state


async def _need_base(ctx: RoundContext, wire: Wire, msg: Update | TrainRequest) -> None:
    await wire.send(NeedBase(**ctx.endpoint.reply_routing(msg), unknown_base=msg.base_digest, reply_to=msg.sequence))


async def _on_update(ctx: RoundContext, wire: Wire, msg: Update) -> None:
    remote = wire.stream.remote
    state = reconstruct(ctx, remote, msg)
    if state is None:
        await _need_base(ctx, wire, msg)
        return
    ctx.bases.received[remote] = Base(msg.state_digest or state_digest(state), state)
    note = ""
    if msg.round + MAX_ROUND_LAG >= ctx.progress.round:
        ctx.inbox.put(Received.from_metrics(remote, msg.round, state, msg.n_samples, msg.metrics))
    else:
        note = f"late: round {msg.round} while we are at {ctx.progress.round}"
    ctx.store.upsert_neighbour(remote, last_seen=time.time())
    await wire.send(Ack(**ctx.endpoint.reply_routing(msg), reply_to=msg.sequence, note=note))


async def _on_train_request(ctx: RoundContext, wire: Wire, msg: TrainRequest) -> None:
    remote = wire.stream.remote
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
            await wire.send(
                ErrorMessage(**ctx.endpoint.reply_routing(msg), code=ErrorCode.REFUSED, message=why,
                             reply_to=msg.sequence)
            )
            return
    trained = await ctx.compute.run(ctx.learner.serve_train_request, state, ctx.rounds.local_steps)
    await wire.send(
        TrainResult(
            **ctx.endpoint.reply_routing(msg, round=msg.round),
            tensors=ctx.faults.outgoing_state(ctx.peer_id, msg.round, trained.state),
            request_sequence=msg.sequence,
            n_samples=ctx.learner.n_samples,
            metrics={"loss": trained.mean_loss} if np.isfinite(trained.mean_loss) else {},
        )
    )


def current_update(ctx: RoundContext, recipient: bytes) -> Update:
    """Our current model as a full snapshot (the answer to a neighbour's need-base)."""
    state = ctx.learner.shared(ctx.learner.state())
    return Update(
        **ctx.endpoint.routing(recipient),
        tensors=state,
        n_samples=ctx.learner.n_samples,
        state_digest=state_digest(state),
    )
