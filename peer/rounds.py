"""The decentralised round loop and the dialer side of the exchange.

Each peer runs its own round clock. A round:

1. waits for operator approval when the participation policy is ``manual``;
2. ``update`` strategies (fedavg, segviz, fedmix): trains locally, pushes the trained
   model to every selected neighbour (a delta against the last state that neighbour
   acknowledged, or a full snapshot), then waits until every reachable selected
   neighbour's update for this round (or a later one) has arrived — or the deadline;
   ``fedefm``: sends its model to every selected neighbour as a train-request, waits for
   the trained copies (train-results) until the deadline, distils them into its model;
3. aggregates with the strategy (robust rules and screening of broken contributions
   included), evaluates on its own test data, and commits model, metrics and round row
   in one transaction.

A neighbour that cannot be reached or misses the deadline is skipped for the round and
never blocks the peer; :func:`connect_loop` redials lost neighbours with backoff.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from silomesh.peer.exchange import ConversationError, Wire
from silomesh.peer.handlers import hello, new_session, publish
from silomesh.peer.mesh import StreamClosed
from silomesh.protocol import (
    Ack,
    ErrorMessage,
    NeedBase,
    ProtocolError,
    Role,
    TrainRequest,
    TrainResult,
    Update,
    UpdateAvailable,
    apply_delta,
    make_delta,
    state_digest,
)
from silomesh.strategies import Contribution

if TYPE_CHECKING:
    from silomesh.peer.daemon import Peer

log = logging.getLogger(__name__)

MAX_BACKOFF = 30.0


async def connect_loop(peer: Peer) -> None:
    """Keep trying to connect to every trusted neighbour, backing off per neighbour."""
    backoff = {p: 0.5 for p in peer.trusted}
    next_try = {p: 0.0 for p in peer.trusted}
    while True:
        now = trio.current_time()
        for p in peer.trusted:
            if p in peer.mesh.connected or now < next_try[p]:
                continue
            if await peer.mesh.connect(p, timeout=5.0):
                backoff[p] = 0.5
                peer.unreachable.discard(p)
                peer.store.upsert_neighbour(p, last_seen=time.time())
            else:
                next_try[p] = trio.current_time() + backoff[p]
                backoff[p] = min(backoff[p] * 2, MAX_BACKOFF)
        await trio.sleep(0.5)


async def _open_wire(peer: Peer, neighbour: str) -> Wire:
    if not await peer.mesh.connect(neighbour, timeout=5.0):
        raise ConversationError(f"{neighbour} unreachable")
    try:
        stream = await peer.mesh.open_stream(neighbour)
    except StreamClosed:
        # The connection may have died without libp2p telling us: redial once.
        peer.mesh.connected.discard(neighbour)
        if not await peer.mesh.connect(neighbour, timeout=5.0):
            raise ConversationError(f"{neighbour} unreachable") from None
        stream = await peer.mesh.open_stream(neighbour)
    wire = Wire(new_session(peer, Role.DIALER, neighbour), stream, peer.record)
    await wire.send(hello(peer, peer.public_key_of(neighbour)))
    if await wire.receive() is None:
        raise ConversationError(f"{neighbour} closed the stream during hello")
    return wire


def _update(
    peer: Peer,
    recipient: bytes,
    round: int,
    state: dict[str, np.ndarray],
    *,
    base: tuple[bytes, dict[str, np.ndarray]] | None,
    metrics: dict[str, float],
) -> tuple[Update, dict[str, np.ndarray]]:
    """An update message and the exact state the receiver will reconstruct from it.

    A delta is ``state - base``; float rounding makes ``base + delta`` differ from
    ``state`` in the last bit, so the announced digest (and our record of what the
    neighbour holds) is that of the reconstruction, not of ``state``.
    """
    if base is not None and set(base[1]) == set(state):
        delta = make_delta(state, base[1])
        result = apply_delta(base[1], delta)
        tensors, base_digest = delta, base[0]
    else:
        result, tensors, base_digest = state, state, None
    msg = Update(
        federation=peer.config.federation,
        sender=peer.crypto.public_key,
        recipient=recipient,
        round=round,
        sequence=peer.next_sequence(),
        tensors=tensors,
        base_digest=base_digest,
        n_samples=peer.learner.n_samples,
        state_digest=_digest(peer, result),
        metrics=metrics,
    )
    return msg, result


def _digest(peer: Peer, state: dict[str, np.ndarray]) -> bytes:
    """``state_digest`` of a round's model, computed once however many neighbours get it."""
    memo = peer.digest_memo
    if memo is not None and memo[0] is state:
        return memo[1]
    digest = state_digest(state)
    peer.digest_memo = (state, digest)
    return digest


async def _update_off_thread(peer: Peer, *args: Any, **kwargs: Any) -> tuple[Update, dict[str, np.ndarray]]:
    """:func:`_update` in a worker thread for large models (delta and digest are O(size))."""
    if sum(a.nbytes for a in args[2].values()) > (1 << 20):
        return await trio.to_thread.run_sync(functools.partial(_update, peer, *args, **kwargs))
    return _update(peer, *args, **kwargs)


async def push_update(
    peer: Peer, neighbour: str, round: int, state: dict[str, np.ndarray], metrics: dict[str, float]
) -> int:
    """Send our round-``round`` model to ``neighbour``; returns bytes sent.

    Raises:
        ConversationError, StreamClosed, ProtocolError: the neighbour could not be served.
    """
    if not await peer.faults.before_send(peer.peer_id, neighbour, "update", round):
        raise ConversationError("dropped by fault injection")
    wire = await _open_wire(peer, neighbour)
    try:
        recipient = peer.public_key_of(neighbour)
        msg, result = await _update_off_thread(
            peer, recipient, round, state, base=peer.acked.get(neighbour), metrics=metrics
        )
        await wire.send(msg)
        reply = await wire.receive()
        if reply is not None and isinstance(reply.message, NeedBase):
            msg, result = await _update_off_thread(peer, recipient, round, state, base=None, metrics=metrics)
            await wire.send(msg)
            reply = await wire.receive()
        if reply is None:
            raise ConversationError(f"{neighbour} closed the stream without answering")
        if isinstance(reply.message, Ack):
            assert msg.state_digest is not None
            peer.acked[neighbour] = (msg.state_digest, result)
        elif isinstance(reply.message, ErrorMessage):
            raise ConversationError(f"{neighbour} refused: {reply.message.code}: {reply.message.message}")
        return wire.bytes_sent
    finally:
        await wire.stream.close()


async def request_training(
    peer: Peer, neighbour: str, round: int, state: dict[str, np.ndarray], deadline_ms: int
) -> tuple[dict[str, np.ndarray], int, dict[str, float], int]:
    """FedEFM: have ``neighbour`` train our model on its data; returns (state, n, metrics, bytes)."""
    if not await peer.faults.before_send(peer.peer_id, neighbour, "train-request", round):
        raise ConversationError("dropped by fault injection")
    wire = await _open_wire(peer, neighbour)
    try:
        msg = TrainRequest(
            federation=peer.config.federation,
            sender=peer.crypto.public_key,
            recipient=peer.public_key_of(neighbour),
            round=round,
            sequence=peer.next_sequence(),
            tensors=state,
            epochs=1,
            deadline_ms=deadline_ms,
        )
        await wire.send(msg)
        reply = await wire.receive()
        if reply is None or not isinstance(reply.message, TrainResult):
            what = "nothing" if reply is None else reply.message.kind
            raise ConversationError(f"{neighbour} answered {what} to a train-request")
        result = reply.message
        trained = {k: np.array(v) for k, v in result.tensors.items()}
        return trained, result.n_samples, dict(result.metrics), wire.bytes_sent + wire.bytes_received
    finally:
        await wire.stream.close()


async def _gather_updates(
    peer: Peer,
    round: int,
    selected: list[str],
    state: dict[str, np.ndarray],
    metrics: dict[str, float],
    deadline: float,
    report: dict[str, Any],
) -> None:
    async def push(n: str) -> None:
        try:
            report["bytes_sent"] += await push_update(peer, n, round, state, metrics)
        except (ConversationError, StreamClosed, ProtocolError) as exc:
            log.info("%s: no update delivered to %s in round %d: %s", peer.peer_id[-8:], n[-8:], round, exc)
            peer.unreachable.add(n)
            report["skipped"][n] = f"unreachable: {exc}"

    with trio.move_on_at(deadline):
        async with trio.open_nursery() as nursery:
            for n in selected:
                nursery.start_soon(push, n)
    with trio.move_on_at(deadline):
        while True:
            waiting = set(selected) - peer.inbox.ready(set(selected), round) - peer.unreachable
            if not waiting:
                break
            await peer.inbox.changed.wait()


async def _update_round(
    peer: Peer, round: int, selected: list[str], deadline: float, report: dict[str, Any]
) -> dict[str, np.ndarray]:
    async with peer.compute:
        trained = await trio.to_thread.run_sync(peer.learner.train, peer.config.rounds.local_steps)
    report["train_loss"] = trained.mean_loss
    metrics = {"degree": float(len(peer.trusted))}
    if math.isfinite(trained.mean_loss):
        metrics["loss"] = trained.mean_loss
    shared = peer.faults.outgoing_state(peer.peer_id, round, peer.learner.shared(trained.state))
    await _gather_updates(peer, round, selected, shared, metrics, deadline, report)
    contributions = []
    for n in selected:
        got = peer.inbox.latest.get(n)
        if got is None or got[0] < round:
            report["skipped"].setdefault(n, "missed the deadline")
            continue
        _, state, n_samples, m = got
        degree = m.get("degree")
        contributions.append(
            Contribution(
                peer_id=n,
                state=state,
                n_samples=max(n_samples, 1),
                loss=m.get("loss"),
                degree=int(degree) if degree else None,
            )
        )
    return _aggregate(peer, trained.state, contributions, report, own_loss=trained.mean_loss)


def _aggregate(
    peer: Peer,
    own: dict[str, np.ndarray],
    contributions: list[Contribution],
    report: dict[str, Any],
    own_loss: float | None = None,
) -> dict[str, np.ndarray]:
    result = peer.learner.strategy.aggregate(
        own,
        float(peer.learner.n_samples),
        contributions,
        own_degree=len(peer.trusted),
        own_loss=own_loss if own_loss is not None and math.isfinite(own_loss) else None,
    )
    for n, reason in result.dropped.items():
        report["skipped"][n] = f"dropped: {reason}"
        peer.audit_log.append("refused", n, "update", round=report["round"], reason=f"aggregation: {reason}")
        peer.store.count_refused(n)
    report["contributors"] = sorted(set(c.peer_id for c in contributions) - set(result.dropped))
    return {**own, **result.state}


async def _fedefm_round(
    peer: Peer, round: int, selected: list[str], deadline: float, report: dict[str, Any]
) -> dict[str, np.ndarray]:
    own = peer.learner.state()
    experts: dict[str, tuple[dict[str, np.ndarray], int, dict[str, float]]] = {}
    deadline_ms = int((time.time() + max(deadline - trio.current_time(), 0)) * 1000)

    async def ask(n: str) -> None:
        try:
            state, count, metrics, nbytes = await request_training(peer, n, round, own, deadline_ms)
            experts[n] = (state, count, metrics)
            report["bytes_sent"] += nbytes
        except (ConversationError, StreamClosed, ProtocolError) as exc:
            log.info("%s: no expert from %s in round %d: %s", peer.peer_id[-8:], n[-8:], round, exc)
            report["skipped"][n] = f"unreachable: {exc}"

    with trio.move_on_at(deadline):
        async with trio.open_nursery() as nursery:
            for n in selected:
                nursery.start_soon(ask, n)
    for n in selected:
        if n not in experts:
            report["skipped"].setdefault(n, "missed the deadline")
    contributions = [
        Contribution(peer_id=n, state=s, n_samples=max(c, 1), loss=m.get("loss")) for n, (s, c, m) in experts.items()
    ]
    strategy = peer.learner.strategy
    screened = strategy.screen(own, contributions) if hasattr(strategy, "screen") else contributions
    good = [c for c in screened if c.peer_id not in report["skipped"]] if isinstance(screened, list) else contributions
    if good:
        async with peer.compute:
            info = await trio.to_thread.run_sync(peer.learner.distill, [dict(c.state) for c in good])
        report["expert_weights"] = dict(zip([c.peer_id for c in good], info["weights"], strict=True))
    else:
        async with peer.compute:
            trained = await trio.to_thread.run_sync(peer.learner.train, peer.config.rounds.local_steps)
        report["train_loss"] = trained.mean_loss
    return _aggregate(peer, peer.learner.state(), good, report)


async def round_loop(peer: Peer) -> None:
    """Run rounds until ``rounds.count`` is reached (forever when 0)."""
    cfg = peer.config.rounds
    round = peer.store.last_committed_round() + 1
    while cfg.count == 0 or round < cfg.count:
        peer.round = round
        if peer.config.participation == "manual":
            peer.phase = "waiting-approval"
            if not await peer.consent.wait("round", round, detail=f"take part in round {round}"):
                log.info("operator declined round %d", round)
                peer.store.record_round(round, status="declined", started_at=time.time(), finished_at=time.time())
                round += 1
                continue
        started = time.time()
        deadline = trio.current_time() + cfg.deadline_seconds
        selected = peer.selected_neighbours()
        peer.unreachable.clear()
        report: dict[str, Any] = {"round": round, "skipped": {}, "bytes_sent": 0, "contributors": []}
        peer.phase = "exchanging"
        await peer.faults.round_start(peer.peer_id, round)
        if peer.learner.strategy.message_kinds[0] == "train-request":
            state = await _fedefm_round(peer, round, selected, deadline, report)
        else:
            state = await _update_round(peer, round, selected, deadline, report)
        peer.phase = "evaluating"
        async with peer.compute:
            state = await trio.to_thread.run_sync(peer.learner.adopt, state)
            metrics = await trio.to_thread.run_sync(peer.learner.evaluate)
        await commit_round(peer, round, state, metrics, report, started)
        round += 1


async def commit_round(
    peer: Peer,
    round: int,
    state: dict[str, np.ndarray],
    metrics: dict[str, float],
    report: dict[str, Any],
    started: float,
) -> None:
    """Save the model file, then model row, metrics and round row in one transaction."""
    digest = state_digest(state).hex()
    parent = peer.store.latest_model()
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(peer.store.write_model_file, state, digest)
        with peer.store.atomic():
            peer.store.save_model(state, digest, round=round, parent=parent.digest if parent else None)
            for name, value in metrics.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    peer.store.record_metric(round, name, float(value))
            if "train_loss" in report and math.isfinite(report["train_loss"]):
                peer.store.record_metric(round, "train_loss", report["train_loss"])
            peer.store.record_round(
                round,
                status="done",
                started_at=started,
                finished_at=time.time(),
                model=digest,
                contributors=report["contributors"],
                skipped=[{"peer": p, "reason": r} for p, r in report["skipped"].items()],
                bytes_sent=report["bytes_sent"],
            )
            peer.audit_log.checkpoint()  # signed tree head over the audit log, with the round
    log.info(
        "%s round %d done: %s=%.4f, %d contributors, %d skipped",
        peer.peer_id[-8:],
        round,
        peer.task.metric,
        metrics.get(peer.task.metric, float("nan")),
        len(report["contributors"]),
        len(report["skipped"]),
    )
    await publish(
        peer,
        UpdateAvailable(
            federation=peer.config.federation,
            sender=peer.crypto.public_key,
            round=round,
            sequence=peer.next_sequence(),
            digest=bytes.fromhex(digest),
            size=sum(a.nbytes for a in state.values()),
        ),
    )
