"""A neighbour that breaks the rules is refused, told why, audited and counted, and the peer goes on.

Each test runs a real peer (manual participation: it stays in round 0 waiting for its
operator) on the in-memory transport under trio's MockClock, and a trusted neighbour
that speaks the protocol by hand (:mod:`handkit`). Timeouts are checked at exact
virtual times.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing
from handkit import Neighbour, ended
from memnet import MemoryNetwork, MemoryTransport, StartTogether
from peerkit import configs

from silomesh.peer.context import InlineCompute
from silomesh.peer.daemon import Peer
from silomesh.peer.identity import PeerIdentity
from silomesh.peer.store import Store
from silomesh.peer.transfers import BufferBudget
from silomesh.peer.transport import Stream, StreamClosed
from silomesh.protocol import (
    Ack,
    ErrorCode,
    ErrorMessage,
    OpenedEnvelope,
    ProtocolError,
    RemoteProtocolError,
    Session,
    TrainResult,
    make_delta,
    state_digest,
)

Clock = trio.testing.MockClock


@dataclass
class Bench:
    victim: Peer
    hand: Neighbour
    transport: MemoryTransport  # the hand neighbour's
    ids: list[PeerIdentity]

    @property
    def victim_id(self) -> str:
        return self.victim.peer_id

    def state(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.victim.learner.state().items()}

    def refusals(self) -> list[dict[str, object]]:
        return [e for e in self.victim.audit_log.entries() if e["direction"] == "refused"]

    def neighbour_row(self) -> dict[str, object]:
        (row,) = [r for r in self.victim.store.neighbours() if r["peer_id"] == self.ids[1].peer_id_text]
        return row


@asynccontextmanager
async def bench(tmp_path: Path, net: MemoryNetwork | None = None) -> AsyncIterator[Bench]:
    net = net or MemoryNetwork()
    ids, cfgs = configs(tmp_path, 2, rounds=1, participation="manual")
    victim = Peer(cfgs[0], identity=ids[0], serve_control_api=False, transport=net.open, compute=InlineCompute(),
                  faults=StartTogether(net, 1))
    hand = Neighbour(ids[1].seed, ids[0].public_key, cfgs[0].federation)
    async with trio.open_nursery() as nursery:
        await nursery.start(victim.run)
        async with net.open(ids[1], "", {ids[0].peer_id_text: ""}) as transport:
            assert await transport.connect(ids[0].peer_id_text)
            yield Bench(victim, hand, transport, ids)
        nursery.cancel_scope.cancel()


async def _reply(b: Bench, message: object) -> object:
    """Send ``message`` on a fresh stream after hellos; the victim's answer (message or CLOSED)."""
    stream = await b.transport.open_stream(b.victim_id)
    session, _ = await b.hand.hello(stream)
    await stream.write(session.send(message).to_frame())  # type: ignore[arg-type]
    event = await b.hand.next(session, stream)
    return event.message if isinstance(event, OpenedEnvelope) else event


async def test_an_update_from_a_far_round_is_refused_and_the_current_one_is_used(
    tmp_path: Path, autojump_clock: Clock
) -> None:
    async with bench(tmp_path) as b:
        state = b.state()
        future = await _reply(b, b.hand.update(state, round=1000))
        assert isinstance(future, ErrorMessage) and future.code == ErrorCode.BAD_ROUND
        assert future.round == 1000  # a reply carries the round of what it answers
        assert b.victim.context.inbox.get(b.ids[1].peer_id_text, 0) is None
        current = await _reply(b, b.hand.update(state, round=0))
        assert isinstance(current, Ack)
        got = b.victim.context.inbox.get(b.ids[1].peer_id_text, 0)
        assert got is not None and got.round == 0
        refused = b.refusals()
        row = b.neighbour_row()
    assert [str(e["reason"]).split(":")[0] for e in refused] == ["BAD_ROUND"]
    assert refused[0]["kind"] == "update" and refused[0]["round"] == 1000
    assert refused[0]["envelope_header"], "a refused envelope keeps its signed header for the auditor"
    assert row["refused"] == 1 and str(row["last_refused"]).startswith("BAD_ROUND")


async def test_a_state_digest_that_does_not_match_is_refused_for_snapshots_and_deltas(
    tmp_path: Path, autojump_clock: Clock
) -> None:
    async with bench(tmp_path) as b:
        state = b.state()
        wrong = await _reply(b, b.hand.update(state, state_digest=b"\x01" * 32))
        assert isinstance(wrong, ErrorMessage) and wrong.code == ErrorCode.STATE_MISMATCH
        assert b.ids[1].peer_id_text not in b.victim.context.bases.received, "a refused state is no base"

        assert isinstance(await _reply(b, b.hand.update(state)), Ack)
        base = state_digest(state)
        assert b.victim.context.bases.received[b.ids[1].peer_id_text].digest == base
        new = {k: v + np.asarray(0.5, dtype=v.dtype) if v.dtype.kind == "f" else v for k, v in state.items()}
        delta = make_delta(new, state)
        bad = await _reply(b, b.hand.update(delta, base_digest=base, state_digest=b"\x02" * 32))
        assert isinstance(bad, ErrorMessage) and bad.code == ErrorCode.STATE_MISMATCH
        good = await _reply(b, b.hand.update(delta, base_digest=base, state_digest=state_digest(new)))
        assert isinstance(good, Ack)
        refused = b.refusals()
        received_digests = {e["payload_digest"] for e in b.victim.audit_log.entries() if e["direction"] == "received"}
    assert [str(e["reason"]).split(":")[0] for e in refused] == ["STATE_MISMATCH", "STATE_MISMATCH"]
    assert not {e["payload_digest"] for e in refused} & received_digests, "refused, not also received"


async def test_a_train_result_nobody_asked_for_is_refused(
    tmp_path: Path, autojump_clock: Clock
) -> None:
    async with bench(tmp_path) as b:
        msg = TrainResult(**b.hand.routing(), tensors=b.state(), request_sequence=12345, n_samples=3)
        reply = await _reply(b, msg)
        refused = b.refusals()
    assert isinstance(reply, ErrorMessage) and reply.code == ErrorCode.REFUSED
    assert [(e["kind"], str(e["reason"]).split(":")[0]) for e in refused] == [("train-result", "REFUSED")]


async def test_a_silent_stream_is_closed_after_the_hello_timeout(
    tmp_path: Path, autojump_clock: Clock
) -> None:
    async with bench(tmp_path) as b:
        stream = await b.transport.open_stream(b.victim_id)
        opened = trio.current_time()
        assert await ended(stream, within=1000)
        waited = trio.current_time() - opened
    assert waited == pytest.approx(b.victim.config.network.hello_timeout_seconds, abs=0.01)


async def test_a_frame_that_stalls_is_reset_and_audited_and_its_bytes_released(
    tmp_path: Path, autojump_clock: Clock
) -> None:
    async with bench(tmp_path) as b:
        stream = await b.transport.open_stream(b.victim_id)
        await b.hand.hello(stream)
        await stream.write((10_000).to_bytes(4, "big") + b"\x00" * 100)  # 100 of 10 000 bytes, then nothing
        sent = trio.current_time()
        assert await ended(stream, within=1000)
        waited = trio.current_time() - sent
        refused = b.refusals()
        budget = b.victim.context.endpoint.budget
        assert budget is not None and budget.held_total == 0
    assert waited == pytest.approx(b.victim.config.network.stall_timeout_seconds, abs=0.01)
    assert [str(e["reason"]).split(":")[0] for e in refused] == ["TIMEOUT"]


async def test_a_neighbour_cannot_buffer_more_than_its_budget(
    tmp_path: Path, autojump_clock: Clock
) -> None:
    async with bench(tmp_path) as b:
        budget = b.victim.context.endpoint.budget
        assert budget is not None
        budget.per_peer = 1 << 20  # so the test moves little data; the default is sized from the model
        streams = []
        for _ in range(3):  # three streams with 400 KiB each of frames that never finish
            stream = await b.transport.open_stream(b.victim_id)
            await b.hand.hello(stream)
            await stream.write((1 << 22).to_bytes(4, "big") + b"\x00" * (400 << 10))
            streams.append(stream)
        assert await ended(streams[2], within=5)  # the third went over 1 MiB
        assert budget.held[b.ids[1].peer_id_text] <= 1 << 20
        for s in streams[:2]:
            await s.close()
        await trio.sleep(1)
        held_after = budget.held_total
        refused = b.refusals()
    assert held_after == 0
    assert any(str(e["reason"]).startswith("TOO_LARGE") and "budget" in str(e["reason"]) for e in refused)


async def test_an_update_accepted_before_a_restart_is_refused_as_a_replay_after_it(
    tmp_path: Path, autojump_clock: Clock
) -> None:
    net = MemoryNetwork()
    async with bench(tmp_path, net) as b:
        stream = await b.transport.open_stream(b.victim_id)
        session, _ = await b.hand.hello(stream)
        frame = session.send(b.hand.update(b.state())).to_frame()
        await stream.write(frame)
        reply = await b.hand.next(session, stream)
        assert isinstance(reply, OpenedEnvelope) and isinstance(reply.message, Ack)
    async with bench(tmp_path, net) as b:  # the same store, a new process
        b.hand.sequence = 100  # the neighbour's counter goes on (a new hello with seq 1 is a replay too)
        stream = await b.transport.open_stream(b.victim_id)
        session, _ = await b.hand.hello(stream)
        session.send(b.hand.update(b.state()))  # our session now awaits a reply; the wire gets the old frame
        await stream.write(frame)
        reply = await _answer_or_end(b, session, stream)
        reasons = [str(e["reason"]) for e in b.refusals()]
    assert isinstance(reply, ErrorMessage) and reply.code == ErrorCode.REPLAY  # authentic: told why
    assert any(r.startswith("REPLAY") for r in reasons), reasons


async def _answer_or_end(b: Bench, session: Session, stream: Stream) -> object:
    """The victim's answer, or None if it ended the stream without one."""
    try:
        event = await b.hand.next(session, stream)
    except ProtocolError:
        return None
    return event.message if isinstance(event, OpenedEnvelope) else None


async def test_a_stale_timestamp_is_refused(
    tmp_path: Path, autojump_clock: Clock
) -> None:
    async with bench(tmp_path) as b:
        stream = await b.transport.open_stream(b.victim_id)
        session, _ = await b.hand.hello(stream)
        an_hour_ago = time.time_ns() // 1_000_000 - 3_600_000
        await stream.write(session.send(b.hand.update(b.state()), timestamp_ms=an_hour_ago).to_frame())
        reply = await _answer_or_end(b, session, stream)
        reasons = [str(e["reason"]) for e in b.refusals()]
    assert isinstance(reply, ErrorMessage) and reply.code == ErrorCode.STALE
    assert any(r.startswith("STALE") for r in reasons), reasons


async def test_the_hello_names_the_base_the_listener_holds_from_the_dialer(
    tmp_path: Path, autojump_clock: Clock
) -> None:
    async with bench(tmp_path) as b:
        stream = await b.transport.open_stream(b.victim_id)
        _, first = await b.hand.hello(stream)
        state = b.state()
        assert isinstance(await _reply(b, b.hand.update(state)), Ack)
        stream = await b.transport.open_stream(b.victim_id)
        _, second = await b.hand.hello(stream)
    assert first.state_digest is None
    assert second.state_digest == state_digest(state)


async def test_a_neighbour_that_keeps_refusing_us_is_visible_to_our_operator(
    tmp_path: Path, autojump_clock: Clock
) -> None:
    """Both operators see it: the refusing peer counts what it refused, the refused one its errors."""
    net = MemoryNetwork()
    ids, cfgs = configs(tmp_path, 2, rounds=4, deadline=30.0)
    cfgs[0] = dataclasses.replace(cfgs[0], participation="manual")  # stays in round 0
    peers = [
        Peer(c, identity=i, serve_control_api=False, transport=net.open, compute=InlineCompute(),
             faults=StartTogether(net, 2))
        for i, c in zip(ids, cfgs, strict=True)
    ]
    ahead = peers[1]
    cfgs[1].data_dir.mkdir(parents=True)
    store = Store(cfgs[1].store)
    store.record_round(2, status="done", started_at=0.0, finished_at=0.0)  # it resumes at round 3:
    store.close()  # beyond the first peer's window (0 +- 2)
    async with trio.open_nursery() as nursery:
        await nursery.start(peers[0].run)
        await nursery.start(ahead.run)
        await ahead.done.wait()
        rows = await ahead.operator.rounds()
        theirs = {r["peer_id"]: r for r in peers[0].store.neighbours()}
        ours = {r["peer_id"]: r for r in ahead.store.neighbours()}
        nursery.cancel_scope.cancel()
    skipped = [s for r in rows if r["round"] >= 3 for s in r["skipped"]]
    assert skipped and all(s["reason"].startswith("refused by the neighbour: BAD_ROUND") for s in skipped), skipped
    assert theirs[ahead.peer_id]["refused"] >= 1
    assert ours[peers[0].peer_id]["refused_by"] >= 1
    assert str(ours[peers[0].peer_id]["last_refused_by"]).startswith("BAD_ROUND")


def test_buffer_budget_refuses_over_the_share_and_the_total_and_releases() -> None:
    budget = BufferBudget(per_peer=100, total=150)
    budget.charge("a", 60)
    budget.charge("b", 60)
    with pytest.raises(RemoteProtocolError) as per_peer:
        budget.charge("a", 41)
    with pytest.raises(RemoteProtocolError) as total:
        budget.charge("b", 31)
    assert per_peer.value.code == total.value.code == ErrorCode.TOO_LARGE
    assert budget.held == {"a": 60, "b": 60}, "a refused charge charges nothing"
    budget.charge("a", -60)
    budget.charge("b", 30)
    assert budget.held_total == 90 and "a" not in budget.held
    sized = BufferBudget.for_model(100 << 20)
    assert (sized.per_peer, sized.total) == (300 << 20, 800 << 20)
    assert BufferBudget.for_model(1).per_peer == 64 << 20


async def test_a_peer_far_behind_its_neighbours_catches_up_instead_of_being_refused_forever(
    tmp_path: Path, autojump_clock: Clock
) -> None:
    net = MemoryNetwork()
    ids, cfgs = configs(tmp_path, 2, rounds=9, deadline=30.0)
    cfgs[1].data_dir.mkdir(parents=True)
    store = Store(cfgs[1].store)
    store.record_round(4, status="done", started_at=0.0, finished_at=0.0)  # it resumes at round 5
    store.close()
    peers = [
        Peer(c, identity=i, serve_control_api=False, transport=net.open, compute=InlineCompute(),
             faults=StartTogether(net, 2))
        for i, c in zip(ids, cfgs, strict=True)
    ]
    behind = peers[0]
    async with trio.open_nursery() as nursery:
        for p in peers:
            await nursery.start(p.run)
        for p in peers:
            await p.done.wait()
        rows = {p.peer_id: await p.operator.rounds() for p in peers}
        nursery.cancel_scope.cancel()
    mine = {r["round"]: r for r in rows[behind.peer_id]}
    assert 0 in mine and max(mine) == 8
    assert not set(mine) & {2, 3, 4}, "it jumped ahead instead of running every round alone"
    assert mine[8]["contributors"] == [peers[1].peer_id], "and learns from its neighbour again"


async def test_a_delta_whose_sum_overflows_is_refused_and_audited(tmp_path: Path, autojump_clock: Clock) -> None:
    async with bench(tmp_path) as b:
        state = b.state()
        name = next(k for k, v in state.items() if v.dtype == np.float32 and v.size)
        state[name].flat[0] = 3.0e38
        assert isinstance(await _reply(b, b.hand.update(state)), Ack)
        delta = {name: np.zeros_like(state[name])}
        delta[name].flat[0] = 3.0e38  # finite, but base + delta is not
        reply = await _reply(b, b.hand.update(delta, base_digest=state_digest(state), state_digest=b"\x03" * 32))
        refused = b.refusals()
    assert isinstance(reply, ErrorMessage) and reply.code == ErrorCode.NON_FINITE
    assert [str(e["reason"]).split(":")[0] for e in refused] == ["NON_FINITE"]


async def test_a_float_weight_sent_as_integers_or_bools_is_refused(tmp_path: Path, autojump_clock: Clock) -> None:
    async with bench(tmp_path) as b:
        codes = []
        for dtype in (np.int32, np.bool_):
            state = b.state()
            name = next(k for k, v in state.items() if v.dtype == np.float32 and v.size)
            state[name] = np.zeros(state[name].shape, dtype=dtype)
            stream = await b.transport.open_stream(b.victim_id)
            session, _ = await b.hand.hello(stream)
            await stream.write(session.send(b.hand.update(state)).to_frame())
            reply = await _answer_or_end(b, session, stream)
            codes.append(reply.code if isinstance(reply, ErrorMessage) else reply)
        reasons = [str(e["reason"]).split(":")[0] for e in b.refusals()]
    assert codes == [ErrorCode.BAD_DTYPE, ErrorCode.BAD_DTYPE]
    assert reasons == ["BAD_DTYPE", "BAD_DTYPE"]


async def test_a_neighbour_that_never_answers_costs_the_hello_timeout_not_the_round_deadline(
    tmp_path: Path, autojump_clock: Clock
) -> None:
    """A connection that stays open but never answers is detected, dropped and redialled."""
    net = MemoryNetwork()
    ids, cfgs = configs(tmp_path, 2, rounds=1, deadline=300.0)
    peer = Peer(cfgs[0], identity=ids[0], serve_control_api=False, transport=net.open, compute=InlineCompute(),
                faults=StartTogether(net, 2))
    async with trio.open_nursery() as nursery, net.open(ids[1], "", {ids[0].peer_id_text: ""}) as silent:

        async def never_answer(stream: Stream) -> None:
            await trio.sleep_forever()

        silent.set_handler(never_answer)
        start = trio.current_time()
        await nursery.start(peer.run)
        await peer.done.wait()
        took = trio.current_time() - start
        (row,) = await peer.operator.rounds()
        await trio.sleep(2)  # the connect loop's next look (every 0.5 s) redials
        dials = [t for t, src, dst, ok in net.dials if src == peer.peer_id and dst == ids[1].peer_id_text and ok]
        nursery.cancel_scope.cancel()
    hello = cfgs[0].network.hello_timeout_seconds
    assert took == pytest.approx(hello, abs=1.0), "the round did not wait its 300 s deadline"
    why = f"unreachable: {ids[1].peer_id_text} sent nothing for {hello:.0f} s"
    assert row["skipped"] == [{"peer": ids[1].peer_id_text, "reason": why}]
    assert len(dials) >= 2, "the silent connection was dropped and dialled afresh"


async def test_a_hello_that_names_no_model_gets_our_hello_and_nothing_more(
    tmp_path: Path, autojump_clock: Clock
) -> None:
    async with bench(tmp_path) as b:
        state = b.state()
        b.hand.model = ""  # "unspecified": weights of an unnamed model are never averaged into ours
        stream = await b.transport.open_stream(b.victim_id)
        session, theirs = await b.hand.hello(stream)
        assert theirs.model == "catheter/tiny"  # the victim says what it runs
        with contextlib.suppress(StreamClosed):  # an update right behind the hello, as a careless client sends it
            await stream.write(session.send(b.hand.update(state, round=0)).to_frame())
        with pytest.raises(RemoteProtocolError, match="UNEXPECTED_EOF"):  # no ack: the stream just ends
            await b.hand.next(session, stream)
        assert b.victim.context.inbox.get(b.ids[1].peer_id_text, 0) is None
        b.hand.model = "catheter/tiny"
        assert isinstance(await _reply(b, b.hand.update(state, round=0)), Ack)  # the same neighbour, named
