"""Resumable frames (PROTOCOL.md section 4.1): an envelope cut off by a broken stream is
offered again on a new stream and only the bytes the receiver lacks travel.

Sans-I/O first (decoder and session), then a Wire over in-memory streams that break, then
two peers whose link drops in the middle of an update and comes back within the round.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing
from memnet import MemoryNetwork, MemoryStream
from test_exchange_path import make
from test_round_loop import running

from silomesh.peer import exchange
from silomesh.peer.exchange import ConversationError, Wire
from silomesh.peer.transfers import Transfers
from silomesh.protocol import (
    NEED_DATA,
    ErrorCode,
    FrameDecoder,
    FrameOffer,
    Identity,
    LocalProtocolError,
    RemoteProtocolError,
    Role,
    SealedEnvelope,
    Session,
    State,
    Update,
    body_digest,
    decode_answer,
    encode_frame,
    encode_offer,
    state_digest,
)
from silomesh.protocol.frames import OFFER_MARKER

ALICE, BOB = Identity.from_seed(b"\x01" * 32), Identity.from_seed(b"\x02" * 32)
FED = "hospitals"


def offered(body: bytes, have: int = 0) -> tuple[bytes, bytes]:
    """(offer, rest of the body after ``have`` bytes)."""
    return encode_offer(body_digest(body), len(body)), body[have:]


# ---------------------------------------------------------------- the frame decoder


def test_an_offered_frame_is_answered_then_delivered_whole() -> None:
    body = bytes(range(256)) * 40
    offer, rest = offered(body)
    dec = FrameDecoder(1 << 20, resumable=True)
    dec.receive_data(offer)
    event = dec.next_frame()
    assert event == FrameOffer(body_digest(body), len(body))
    assert dec.next_frame() is NEED_DATA  # nothing more until answered
    assert dec.answer_offer(None) == (0).to_bytes(4, "big")
    dec.receive_data(rest)
    assert dec.next_frame() == body


def test_a_frame_resumes_from_the_bytes_held_and_the_digest_covers_the_whole() -> None:
    body = np.random.default_rng(0).bytes(100_000)
    first = FrameDecoder(1 << 20, resumable=True)
    offer, _ = offered(body)
    first.receive_data(offer)
    assert isinstance(first.next_frame(), FrameOffer)
    first.answer_offer(None)
    first.receive_data(body[:37_000])
    partial = first.partial()
    assert partial is not None and partial.data == body[:37_000] and partial.length == len(body)

    second = FrameDecoder(1 << 20, resumable=True)
    second.receive_data(offer)
    assert isinstance(second.next_frame(), FrameOffer)
    answer = second.answer_offer(partial.data)
    assert decode_answer(answer, len(body)) == 37_000
    second.receive_data(body[37_000:])
    assert second.next_frame() == body


def test_a_continuation_that_does_not_match_the_digest_is_refused() -> None:
    body = b"a" * 5000
    offer, _ = offered(body)
    dec = FrameDecoder(1 << 20, resumable=True)
    dec.receive_data(offer)
    dec.next_frame()
    dec.answer_offer(body[:1000])
    dec.receive_data(b"b" * 4000)  # another body's bytes under this body's name
    with pytest.raises(RemoteProtocolError) as err:
        dec.next_frame()
    assert err.value.code is ErrorCode.BAD_FRAME and "digest" in err.value.message
    with pytest.raises(RemoteProtocolError):  # the error repeats
        dec.next_frame()


def test_bytes_before_the_answer_are_refused() -> None:
    body = b"x" * 100
    offer, rest = offered(body)
    dec = FrameDecoder(1 << 20, resumable=True)
    dec.receive_data(offer + rest)  # a sender that does not wait for the answer
    with pytest.raises(RemoteProtocolError) as err:
        dec.next_frame()
    assert err.value.code is ErrorCode.BAD_FRAME


def test_an_oversize_offer_is_refused_at_its_prefix() -> None:
    dec = FrameDecoder(1000, resumable=True)
    dec.receive_data(encode_offer(b"\0" * 32, 1001, 1 << 20))
    with pytest.raises(RemoteProtocolError) as err:
        dec.next_frame()
    assert err.value.code is ErrorCode.TOO_LARGE


def test_without_resumable_the_marker_is_just_an_oversize_length() -> None:
    dec = FrameDecoder(1 << 20)
    dec.receive_data(OFFER_MARKER.to_bytes(4, "big"))
    with pytest.raises(RemoteProtocolError) as err:
        dec.next_frame()
    assert err.value.code is ErrorCode.TOO_LARGE


def test_plain_frames_still_work_on_a_resumable_stream_and_a_stream_ending_mid_offer_is_bad() -> None:
    dec = FrameDecoder(1 << 20, resumable=True)
    dec.receive_data(encode_frame(b"plain") + encode_offer(b"\1" * 32, 10)[:20])
    assert dec.next_frame() == b"plain"
    dec.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as err:
        dec.next_frame()
    assert err.value.code is ErrorCode.BAD_FRAME


def test_answers_and_offers_are_checked() -> None:
    with pytest.raises(RemoteProtocolError):
        decode_answer((10).to_bytes(4, "big"), 10)  # a receiver never holds all of an offered frame
    with pytest.raises(RemoteProtocolError):
        decode_answer(b"\0\0", 10)
    with pytest.raises(LocalProtocolError):
        encode_offer(b"short", 10)
    dec = FrameDecoder(1 << 20, resumable=True)
    with pytest.raises(LocalProtocolError):
        dec.answer_offer(None)  # nothing offered


# ---------------------------------------------------------------- sessions


def _sessions(resumable: bool = True) -> tuple[Session, Session]:
    """A dialer (Alice) and a listener (Bob), READY."""
    dialer = Session(Role.DIALER, identity=ALICE, peer=BOB.public_key, federation=FED, resumable=resumable)
    listener = Session(Role.LISTENER, identity=BOB, peer=ALICE.public_key, federation=FED, resumable=resumable)
    from silomesh.protocol import Hello

    for sender, receiver, me, you in ((dialer, listener, ALICE, BOB), (listener, dialer, BOB, ALICE)):
        hello = Hello(federation=FED, sender=me.public_key, recipient=you.public_key, round=0, sequence=_seq())
        receiver.receive_data(sender.send(hello).to_frame())
        assert receiver.next_event() is not NEED_DATA
    assert dialer.state is State.READY and listener.state is State.READY
    return dialer, listener


_counter = iter(range(1, 1 << 30))


def _seq() -> int:
    return next(_counter)


def _update() -> Update:
    state = {"w": np.arange(50_000, dtype=np.float32)}
    return Update(
        federation=FED, sender=ALICE.public_key, recipient=BOB.public_key, round=1, sequence=_seq(),
        tensors=state, n_samples=8, state_digest=state_digest(state),
    )


def test_an_envelope_resent_unchanged_on_a_new_session_is_resumed_and_opens() -> None:
    """The first stream breaks after 60% of the envelope; the sealed envelope is offered again
    on a new session, the listener answers with the bytes it kept, and the envelope that
    completes verifies (signature, digest, replay) as if it had come in one piece."""
    dialer, listener = _sessions()
    sealed = dialer.send(_update())
    body = sealed.to_bytes()
    listener.receive_data(encode_offer(body_digest(body), len(body)))
    listener.answer_offer(None) if isinstance(listener.next_event(), FrameOffer) else pytest.fail("no offer")
    cut = int(len(body) * 0.6)
    listener.receive_data(body[:cut])
    assert listener.next_event() is NEED_DATA
    kept = listener.partial()
    assert kept is not None and len(kept.data) == cut

    dialer2, listener2 = _sessions()
    dialer2.send_sealed(sealed)  # the same bytes, sequence and timestamp
    assert dialer2.state is State.AWAIT_UPDATE_REPLY
    listener2.receive_data(encode_offer(body_digest(body), len(body)))
    offer = listener2.next_event()
    assert isinstance(offer, FrameOffer) and offer.digest == kept.digest
    have = decode_answer(listener2.answer_offer(kept.data), len(body))
    assert have == cut
    listener2.receive_data(body[have:])
    opened = listener2.next_event()
    assert isinstance(opened.message, Update)  # type: ignore[union-attr]
    np.testing.assert_array_equal(opened.message.tensors["w"], np.arange(50_000, dtype=np.float32))  # type: ignore[union-attr]


def test_send_sealed_refuses_an_envelope_for_another_peer() -> None:
    dialer, _ = _sessions()
    other = Session(Role.DIALER, identity=BOB, peer=ALICE.public_key, federation=FED)
    from silomesh.protocol import Hello

    foreign = other.send(Hello(federation=FED, sender=BOB.public_key, recipient=ALICE.public_key, round=0,
                               sequence=_seq()))
    with pytest.raises(LocalProtocolError):
        dialer.send_sealed(foreign)


# ---------------------------------------------------------------- a Wire over streams that break


class _Cut(MemoryStream):
    """Writes stop and the stream ends once ``limit`` bytes went through."""

    def __init__(self, inner: trio.abc.Stream, remote: str, limit: int) -> None:
        super().__init__(inner, remote)
        self.limit = limit

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        room = self.limit - self.written
        await super().write(bytes(data)[:room])
        if self.written >= self.limit:
            await trio.testing.wait_all_tasks_blocked()
            await self.close()
            raise exchange.StreamClosed("cut")


async def _transfer(
    limit: int | None, transfers: Transfers, sealed: SealedEnvelope | None = None
) -> tuple[SealedEnvelope, Wire, object]:
    """One stream: Alice's wire sends an update (or ``sealed`` again), Bob's wire receives."""
    a, b = trio.testing.memory_stream_pair()
    a_stream = _Cut(a, "bob", limit) if limit is not None else MemoryStream(a, "bob")
    b_stream = MemoryStream(b, "alice")
    dialer, listener = _sessions()
    alice = Wire(dialer, a_stream, lambda r: None, transfers=Transfers())
    bob = Wire(listener, b_stream, lambda r: None, transfers=transfers)
    got: list[object] = []

    async def receive() -> None:
        try:
            got.append(await bob.receive(timeout=10))
        except ConversationError as exc:
            got.append(exc)
        except RemoteProtocolError as exc:
            got.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        try:
            if sealed is None:
                sealed = await alice.seal(_update())
                await alice.send_sealed(sealed, fresh=True)
            else:
                await alice.send_sealed(sealed)
        except ConversationError:
            pass
    return sealed, alice, got[0]


async def test_a_wire_resumes_a_broken_transfer_and_counts_what_it_did_not_resend(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(exchange, "RESUME_THRESHOLD", 1024)
    kept = Transfers()
    sealed, first, outcome = await _transfer(120_000, kept)
    assert isinstance(outcome, RemoteProtocolError) and "ended inside a frame" in outcome.message
    assert kept.stats.partials_kept == 1
    size = sealed.size
    _, second, outcome = await _transfer(None, kept, sealed)
    assert isinstance(outcome.message, Update)  # type: ignore[union-attr]
    assert kept.stats.resumed_receives == 1 and kept.stats.bytes_resumed == second.bytes_not_resent
    held = second.bytes_not_resent
    assert 100_000 < held < 120_000  # all that went through, less the offer and the hello
    # bytes count when handed to the stream: the first try handed over the whole envelope (the
    # link took 120 kB of it), the second only what Bob lacked
    assert first.bytes_sent == size and second.bytes_sent == size - held


async def test_bytes_changed_since_the_broken_try_are_never_stitched_to_the_kept_ones(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second offer names other bytes (one flipped in the tail): Bob does not resume from
    what he kept, the whole envelope travels, and its payload digest refuses it. (A sender
    that offers the right digest and then sends other bytes is refused by the frame decoder:
    test_a_continuation_that_does_not_match_the_digest_is_refused.)"""
    monkeypatch.setattr(exchange, "RESUME_THRESHOLD", 1024)
    kept = Transfers()
    sealed, _, _ = await _transfer(120_000, kept)
    sealed.ciphertext[-1] ^= 1
    _, second, outcome = await _transfer(None, kept, sealed)
    assert isinstance(outcome, RemoteProtocolError) and outcome.code is ErrorCode.DIGEST_MISMATCH
    assert second.bytes_not_resent == 0 and kept.stats.resumed_receives == 0
    assert kept.stats.partials_dropped == 1 and kept.held_bytes == 0


# ---------------------------------------------------------------- two peers, a link that drops


async def test_a_link_that_drops_mid_update_resumes_within_the_round(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Peer 0's first update to peer 1 breaks after 40 KB; the link is down for 4 s. Peer 0
    dials again with backoff, offers the same envelope, peer 1 answers with what it kept,
    and the round completes with both contributions; the bytes not re-sent are counted."""
    monkeypatch.setattr(exchange, "RESUME_THRESHOLD", 1024)
    net = MemoryNetwork()
    peers = make(tmp_path, 2, net, rounds=2)
    a, b = peers[0].peer_id, peers[1].peer_id
    net.break_next_stream(a, b, after=40_000, down_for=4.0)
    async with running(peers):
        for p in peers:
            await p.done.wait()
        rows = {p.peer_id: await p.operator.rounds() for p in peers}
        stats = {p.peer_id: p.context.endpoint.transfers.stats for p in peers}
        sent = [e for e in peers[0].store.audit_entries() if e["direction"] == "sent" and e["kind"] == "update"]
        audit_b = peers[1].store.audit_entries()
        links_a = [(e["kind"], e["peer"]) for e in peers[0].store.audit_entries() if e["direction"] == "local"]
    assert len(net.outages) == 1
    # the audit logs: B refused the cut-off frame, saying what it kept; A saw the link go and come back
    cut = [e for e in audit_b if e["direction"] == "refused" and "to resume" in e["reason"]]
    assert len(cut) == 1 and "ended inside a frame" in cut[0]["reason"], cut
    assert ("link-lost", b) in links_a and ("link-back", b) in links_a, links_a
    for p in peers:
        assert [r["status"] for r in rows[p.peer_id]] == ["done", "done"]
        assert all(len(r["contributors"]) == 1 for r in rows[p.peer_id]), rows[p.peer_id]
    assert stats[b].resumed_receives == 1 and 30_000 < stats[b].bytes_resumed <= 40_000
    assert stats[a].resumed_sends == 1 and stats[a].bytes_not_resent == stats[b].bytes_resumed
    update_size = sent[0]["size"]
    first_round = rows[a][0]
    # the round's bytes: what the broken try handed to the stream (the whole envelope) and the
    # rest, less the bytes peer 1 kept; hellos add a few hundred bytes per stream
    resent = 2 * update_size - stats[b].bytes_resumed
    assert resent <= first_round["bytes_sent"] <= resent + 2048, (first_round, update_size)


# ---------------------------------------------------------------- links lost and back, audited


def test_links_lost_and_back_are_written_to_the_audit_log(tmp_path: Path) -> None:
    """The watcher learns the links on its first look (no entry), then writes one entry when a
    link drops and one when it is back, with how long it was down; the log still verifies."""
    from peerkit import identity

    from silomesh.audit.verify import verify_chain
    from silomesh.peer.audit import AuditLog
    from silomesh.peer.linklog import BACK_KIND, LOST_KIND, LinkWatch
    from silomesh.peer.store import Store

    me, b, c = identity("link-a"), identity("link-b"), identity("link-c")
    store = Store(tmp_path / "store.sqlite")
    log = AuditLog(store, me.signing_key)
    watch = LinkWatch()

    def links(b_up: bool, reconnects: int = 0) -> list[dict[str, object]]:
        return [
            {"peer_id": b.peer_id_text, "connected": b_up, "kind": "direct" if b_up else None,
             "reconnects": reconnects, "dial_failures": 0 if b_up else 3, "last_error": None if b_up else "timed out"},
            {"peer_id": c.peer_id_text, "connected": True, "kind": "relayed", "reconnects": 0},
        ]

    assert watch.look(log, links(True), 100.0) == 0
    assert watch.look(log, links(True), 102.0) == 0
    assert watch.look(log, links(False), 104.0) == 1
    assert watch.look(log, links(False), 106.0) == 0
    assert watch.look(log, links(True, reconnects=1), 130.5) == 1
    entries = [e for e in store.audit_entries() if e["direction"] == "local"]
    assert [(e["kind"], e["peer"]) for e in entries] == [(LOST_KIND, b.peer_id_text), (BACK_KIND, b.peer_id_text)]
    assert '"last_error":"timed out"' in entries[0]["reason"]
    assert entries[1]["reason"] == '{"connection":"direct","down_seconds":26.5,"reconnects":1}'
    assert verify_chain(store.audit_entries(), me.signing_key.verify_key.encode()) == []
