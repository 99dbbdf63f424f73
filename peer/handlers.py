"""What a peer does when a neighbour talks to it: exchange streams and announces.

A stream handler answers one neighbour's conversation: hello, then updates (deltas or
full snapshots), FedEFM train-requests, or requests for our current model. Everything
that is refused is audited and counted against the sender; the mesh layer already
guarantees the stream comes from a trusted, authenticated PeerID and that an exception
here cannot take the host down.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from silomesh.peer.exchange import ConversationError, Wire
from silomesh.peer.mesh import FramedStream, announce_topic
from silomesh.protocol import (
    Ack,
    ErrorCode,
    ErrorMessage,
    Hello,
    Leaving,
    Message,
    NeedBase,
    NewData,
    ProtocolError,
    RemoteProtocolError,
    Role,
    Session,
    TrainRequest,
    TrainResult,
    Update,
    UpdateAvailable,
    apply_delta,
    decode_announce,
    encode_announce,
    state_digest,
)

if TYPE_CHECKING:
    from silomesh.peer.daemon import Peer

log = logging.getLogger(__name__)

AGENT = "silomesh/0.1"
#: updates more than this many rounds behind ours are acknowledged but not used
MAX_ROUND_LAG = 2


def model_id(peer: Peer) -> str:
    return f"{peer.config.task.name}/{peer.config.task.size}"


def hello(peer: Peer, recipient: bytes) -> Hello:
    return Hello(
        federation=peer.config.federation,
        sender=peer.crypto.public_key,
        recipient=recipient,
        round=max(peer.round, 0),
        sequence=peer.next_sequence(),
        agent=AGENT,
        model=model_id(peer),
        state_digest=None,
        codecs=("float32", "float16", "int8"),
        max_frame_size=peer.limits.max_frame_size,
    )


def new_session(peer: Peer, role: Role, remote: str) -> Session:
    return Session(
        role,
        identity=peer.crypto,
        peer=peer.public_key_of(remote),
        federation=peer.config.federation,
        replay=peer.replay,
        limits=peer.limits,
        expected_shapes=peer.learner.shapes,
        complete=False,
    )


def reply_routing(peer: Peer, msg: Message) -> dict[str, Any]:
    """Routing fields of our reply to ``msg`` (same federation, back to its sender)."""
    return {
        "federation": msg.federation,
        "sender": peer.crypto.public_key,
        "recipient": msg.sender,
        "round": max(peer.round, 0),
        "sequence": peer.next_sequence(),
    }


def reconstruct(peer: Peer, sender: str, message: Update | TrainRequest) -> dict[str, np.ndarray] | None:
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
    known = peer.received.get(sender)
    if known is None or known[0] != message.base_digest:
        return None
    state = apply_delta(known[1], tensors)
    expected = getattr(message, "state_digest", None)
    if expected is not None and state_digest(state) != expected:
        raise RemoteProtocolError(ErrorCode.DIGEST_MISMATCH, "delta does not produce the announced state")
    return state


async def serve_stream(peer: Peer, stream: FramedStream) -> None:
    """Answer one neighbour's exchange stream until it closes."""
    wire = Wire(new_session(peer, Role.LISTENER, stream.remote), stream, peer.record)
    remote = stream.remote
    peer.store.upsert_neighbour(remote, last_seen=time.time())
    try:
        while True:
            opened = await wire.receive()
            if opened is None:
                return
            msg = opened.message
            if isinstance(msg, Hello):
                if msg.model and msg.model != model_id(peer):
                    log.warning("%s runs model %s, we run %s", remote, msg.model, model_id(peer))
                await wire.send(hello(peer, msg.sender))
            elif isinstance(msg, Update):
                await _on_update(peer, wire, remote, msg)
            elif isinstance(msg, TrainRequest):
                await _on_train_request(peer, wire, remote, msg)
            elif isinstance(msg, NeedBase):
                await wire.send(current_update(peer, msg.sender))
            else:  # the session's transition table makes this unreachable
                raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"{msg.kind} not expected")
    except RemoteProtocolError as exc:
        await wire.refuse(exc)
    except (ConversationError, ProtocolError) as exc:
        log.info("conversation with %s ended: %s", remote, exc)
        await stream.reset()
    else:
        await stream.close()


async def _on_update(peer: Peer, wire: Wire, remote: str, msg: Update) -> None:
    state = reconstruct(peer, remote, msg)
    if state is None:
        await wire.send(NeedBase(**reply_routing(peer, msg), unknown_base=msg.base_digest, reply_to=msg.sequence))
        return
    digest = msg.state_digest or state_digest(state)
    peer.received[remote] = (digest, state)
    metrics = dict(getattr(msg, "metrics", {}) or {})
    if msg.round + MAX_ROUND_LAG >= peer.round:
        peer.inbox.put(remote, msg.round, state, msg.n_samples, metrics)
        note = ""
    else:
        note = f"late: round {msg.round} while we are at {peer.round}"
    peer.store.upsert_neighbour(remote, last_seen=time.time())
    await wire.send(
        Ack(**reply_routing(peer, msg), reply_to=msg.sequence, note=note)
    )


async def _on_train_request(peer: Peer, wire: Wire, remote: str, msg: TrainRequest) -> None:
    state = reconstruct(peer, remote, msg)
    if state is None:
        await wire.send(NeedBase(**reply_routing(peer, msg), unknown_base=msg.base_digest, reply_to=msg.sequence))
        return
    if peer.config.participation == "manual":
        name = peer.trusted[remote].name
        approved: bool | None = None
        with trio.move_on_after(peer.config.rounds.deadline_seconds):  # the requester waits no longer
            approved = await peer.consent.wait("train-request", msg.round, remote, f"train {name}'s model")
        if not approved:
            why = "declined by the operator" if approved is False else "not approved before the round deadline"
            await wire.send(
                ErrorMessage(**reply_routing(peer, msg), code=ErrorCode.REFUSED, message=why, reply_to=msg.sequence)
            )
            return
    steps = peer.config.rounds.local_steps
    async with peer.compute:
        trained = await trio.to_thread.run_sync(peer.learner.train_copy, state, steps)
    await wire.send(
        TrainResult(
            **{**reply_routing(peer, msg), "round": msg.round},
            tensors=peer.faults.outgoing_state(peer.peer_id, msg.round, trained.state),
            request_sequence=msg.sequence,
            n_samples=peer.learner.n_samples,
            metrics={"loss": trained.mean_loss} if np.isfinite(trained.mean_loss) else {},
        )
    )


def current_update(peer: Peer, recipient: bytes) -> Update:
    state = peer.learner.shared(peer.learner.state())
    return Update(
        federation=peer.config.federation,
        sender=peer.crypto.public_key,
        recipient=recipient,
        round=max(peer.round, 0),
        sequence=peer.next_sequence(),
        tensors=state,
        n_samples=peer.learner.n_samples,
        state_digest=state_digest(state),
    )


# -- announces --------------------------------------------------------------------------


async def publish(peer: Peer, announce: UpdateAvailable | NewData | Leaving) -> None:
    try:
        await peer.mesh.publish(announce_topic(peer.config.federation), encode_announce(announce, peer.crypto))
    except Exception as exc:  # noqa: BLE001 - announcing is best effort
        log.info("announce %s not published: %s", type(announce).__name__, exc)


async def announce_new_data(peer: Peer, n_samples: int, manifest_digest: bytes) -> None:
    await publish(
        peer,
        NewData(
            federation=peer.config.federation,
            sender=peer.crypto.public_key,
            round=max(peer.round, 0),
            sequence=peer.next_sequence(),
            n_samples=n_samples,
            manifest_digest=manifest_digest,
        ),
    )


async def listen_announces(peer: Peer) -> None:
    """Record neighbours' announces (last seen, new data); refuse forged or foreign ones."""
    topic = announce_topic(peer.config.federation)
    async for sender, data in peer.mesh.subscribe(topic):
        try:
            received = decode_announce(
                data,
                federation=peer.config.federation,
                trusted=set(peer.trusted_keys),
                me=peer.crypto.public_key,
                expected_sender=peer.public_key_of(sender),
                replay=peer.replay,
            )
        except RemoteProtocolError as exc:
            peer.audit_log.append("refused", sender, "announce", reason=f"{exc.code.value}: {exc.message}")
            peer.store.count_refused(sender)
            continue
        announce = received.announce
        fields: dict[str, object] = {"last_seen": time.time()}
        if isinstance(announce, NewData):
            fields.update(
                samples=announce.n_samples, data_digest=announce.manifest_digest.hex(), data_announced_at=time.time()
            )
        elif isinstance(announce, Leaving):
            peer.mesh.connected.discard(sender)
        peer.store.upsert_neighbour(sender, **fields)
