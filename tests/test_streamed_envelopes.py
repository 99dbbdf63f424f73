"""Streamed envelopes (PROTOCOL.md section 4.2): sealed and opened in 64 KiB chunks while
they travel, with the signed header last.

Sans-I/O first (sealer, decoder, session), then hostile senders (tampered, reordered,
truncated, mislabelled chunks; a header that lies about them; replays; fuzzed bytes),
resuming a broken stream from the chunks the receiver kept, the sender's memory, and Wires
and peers over in-memory streams (one whose link drops mid-update).
"""

from __future__ import annotations

import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing
from memnet import MemoryNetwork, MemoryStream
from nacl._sodium import ffi, lib
from test_exchange_path import make
from test_resumable_frames import _Cut
from test_round_loop import running

from silomesh.protocol import (
    NEED_DATA,
    ErrorCode,
    Hello,
    Identity,
    LocalProtocolError,
    PartialStream,
    ProtocolError,
    RemoteProtocolError,
    Role,
    Session,
    State,
    StreamedFrame,
    StreamOffer,
    Update,
    state_digest,
)
from silomesh.protocol.envelope import ENVELOPE_SIGNING_DOMAIN, EnvelopeHeader
from silomesh.protocol.frames import PRELUDE_SIZE, STREAM_CHUNK_SIZE, STREAM_MARKER, STREAM_TAG_SIZE
from silomesh.protocol.streamed import StreamSealer, stream_key
from silomesh.protocol.wire import packb

ALICE, BOB, EVE = (Identity.from_seed(bytes([i]) * 32) for i in (1, 2, 3))
FED = "hospitals"
MiB = STREAM_CHUNK_SIZE

_counter = iter(range(1, 1 << 30))


def _seq() -> int:
    return next(_counter)


def _update(n: int = 600_000, *, codec: str = "float32", seed: int = 0) -> Update:
    rng = np.random.default_rng(seed)
    state = {"w": rng.standard_normal(n).astype(np.float32), "steps": np.arange(3, dtype=np.int64)}
    return Update(
        federation=FED, sender=ALICE.public_key, recipient=BOB.public_key, round=1, sequence=_seq(),
        tensors=state, n_samples=8, state_digest=state_digest(state), codec=codec,
    )


def _sessions(*, streamed: bool = True) -> tuple[Session, Session]:
    """A dialer (Alice) and a listener (Bob), READY."""
    dialer = Session(Role.DIALER, identity=ALICE, peer=BOB.public_key, federation=FED, streamed=streamed)
    listener = Session(Role.LISTENER, identity=BOB, peer=ALICE.public_key, federation=FED, streamed=streamed)
    for sender, receiver, me, you in ((dialer, listener, ALICE, BOB), (listener, dialer, BOB, ALICE)):
        hello = Hello(federation=FED, sender=me.public_key, recipient=you.public_key, round=0, sequence=_seq())
        receiver.receive_data(sender.send(hello).to_frame())
        assert receiver.next_event() is not NEED_DATA
    assert dialer.state is State.READY and listener.state is State.READY
    return dialer, listener


def _wire_bytes(sealer: StreamSealer) -> tuple[bytes, list[bytes], bytes]:
    """(prelude, chunks, trailer) of a sealer, each as bytes."""
    prelude = sealer.prelude
    chunks = [bytes(c) for c in sealer.chunks()]
    return prelude, chunks, sealer.trailer


def _feed(session: Session, data: bytes, rng: random.Random | None = None, kept: PartialStream | None = None) -> object:
    """Feed a streamed envelope's prelude, answer it (holding ``kept``), then feed the rest
    in random pieces; return the next event."""
    session.receive_data(data[:PRELUDE_SIZE])
    offer = session.next_event()
    assert isinstance(offer, StreamOffer), offer
    assert session.next_event() is NEED_DATA  # reported once; nothing more until answered
    have = int.from_bytes(session.answer_stream(kept), "big")
    assert have == (kept.opened if kept is not None else 0)
    rng = rng or random.Random(0)
    at = PRELUDE_SIZE
    while at < len(data):
        step = rng.randint(1, 300_000)
        session.receive_data(data[at : at + step])
        at += step
    return session.next_event()


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    ("n", "codec"),
    [
        (1, "float32"),  # one short chunk
        (MiB // 4 - 60, "float32"),  # the payload just under one chunk
        (MiB // 4, "float32"),  # just over: a second chunk of a few bytes
        (3 * MiB // 4 + 1, "float32"),
        (700_000, "float16"),
        (2 * MiB + 3, "int8"),
        (2 * MiB + 3, "int4"),
        (2 * MiB + 3, "topk"),  # all values non-zero: 8 bytes each
    ],
)
def test_a_streamed_update_opens_to_the_same_tensors_whatever_the_chunking(n: int, codec: str) -> None:
    dialer, listener = _sessions()
    msg = _update(n, codec=codec)
    sealer = dialer.send_streamed(msg)
    prelude, chunks, trailer = _wire_bytes(sealer)
    assert len(chunks) == max(1, -(-sealer.payload_len // MiB))
    assert all(len(c) == MiB + STREAM_TAG_SIZE for c in chunks[:-1])
    assert sealer.size == sum(map(len, chunks)) + len(trailer)
    opened = _feed(listener, prelude + b"".join(chunks) + trailer, random.Random(n))
    assert opened is not NEED_DATA and not isinstance(opened, StreamedFrame)
    assert opened.header == sealer.sealed.header and opened.signature == sealer.sealed.signature  # type: ignore[union-attr]
    assert opened.size == sealer.size  # type: ignore[union-attr]
    got = opened.message.tensors  # type: ignore[union-attr]
    if codec in ("float32", "topk"):  # topk: the non-zero values, exactly
        np.testing.assert_array_equal(got["w"], msg.tensors["w"])
    else:
        atol = {"int8": 0.05, "int4": float(np.abs(msg.tensors["w"]).max()) / 14 + 1e-6}.get(codec, 5e-3)
        np.testing.assert_allclose(got["w"], msg.tensors["w"], atol=atol, rtol=1e-3)
    np.testing.assert_array_equal(got["steps"], msg.tensors["steps"])
    assert listener.state is State.AWAIT_UPDATE_REPLY


def test_the_header_and_plain_frames_interleave_on_a_streamed_stream() -> None:
    """A streamed envelope, then a whole one (the ack), then another streamed one on the same sessions."""
    from silomesh.protocol import Ack

    dialer, listener = _sessions()
    rng = random.Random(7)
    for _ in range(2):
        prelude, chunks, trailer = _wire_bytes(dialer.send_streamed(_update(300_000)))
        opened = _feed(listener, prelude + b"".join(chunks) + trailer, rng)
        ack = Ack(federation=FED, sender=BOB.public_key, recipient=ALICE.public_key, round=1, sequence=_seq(),
                  reply_to=opened.header.sequence)  # type: ignore[union-attr]
        dialer.receive_data(listener.send(ack).to_frame())
        assert isinstance(dialer.next_event().message, Ack)  # type: ignore[union-attr]
    assert dialer.state is State.READY and listener.state is State.READY


def test_a_session_without_streaming_refuses_to_stream_and_reads_the_marker_as_an_oversize_length() -> None:
    dialer, listener = _sessions(streamed=False)
    with pytest.raises(LocalProtocolError) as exc:
        dialer.send_streamed(_update(10))
    assert exc.value.code is ErrorCode.UNEXPECTED_MESSAGE
    listener.receive_data(STREAM_MARKER.to_bytes(4, "big") + bytes(28))
    with pytest.raises(RemoteProtocolError) as err:
        listener.next_event()
    assert err.value.code is ErrorCode.TOO_LARGE


# ---------------------------------------------------------------- hostile senders


class Crafted:
    """A streamed envelope from Alice to Bob built by hand, to break one rule at a time."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.state = ffi.new("unsigned char[]", 52)
        header = ffi.new("unsigned char[]", 24)
        key = stream_key(ALICE.shared_key(BOB.public_key))
        assert lib.crypto_secretstream_xchacha20poly1305_init_push(self.state, header, key) == 0
        self.stream_header = bytes(ffi.buffer(header, 24))

    def push(self, plain: bytes, tag: int) -> bytes:
        out = bytearray(len(plain) + STREAM_TAG_SIZE)
        rc = lib.crypto_secretstream_xchacha20poly1305_push(
            self.state, ffi.from_buffer("unsigned char[]", out, require_writable=True), ffi.NULL,
            plain, len(plain), ffi.NULL, 0, tag,
        )
        assert rc == 0
        return bytes(out)

    def chunks(self, tags: list[int] | None = None) -> list[bytes]:
        pieces = [self.payload[i : i + MiB] for i in range(0, len(self.payload), MiB)]
        tags = tags or [0] * (len(pieces) - 1) + [3]
        return [self.push(p, t) for p, t in zip(pieces, tags, strict=True)]

    def prelude(self, payload_len: int | None = None) -> bytes:
        n = len(self.payload) if payload_len is None else payload_len
        return STREAM_MARKER.to_bytes(4, "big") + n.to_bytes(4, "big") + self.stream_header

    def trailer(self, digest: bytes, *, nonce: bytes | None = None, signer: Identity = ALICE) -> bytes:
        from silomesh.protocol import Codec

        header = EnvelopeHeader(
            version=2, kind="update", federation=FED, sender=ALICE.public_key, recipient=BOB.public_key,
            round=1, sequence=_seq(), timestamp=1_700_000_000_000, base_digest=None, payload_digest=digest,
            codec=Codec.FLOAT32, nonce=self.stream_header if nonce is None else nonce,
        )
        raw = packb(header.to_map())
        return len(raw).to_bytes(2, "big") + raw + signer.sign(ENVELOPE_SIGNING_DOMAIN + raw)


def _valid_payload(n: int = 400_000) -> bytes:
    """The payload of a real update (body and blob), as a sealer lays it out."""
    from silomesh.protocol.envelope import encode_payload

    payload = encode_payload(_update(n), ALICE)
    return b"".join(bytes(p) for p in payload.pieces())


def _digest(chunks: list[bytes]) -> bytes:
    from silomesh.protocol.crypto import blake2b256

    return blake2b256(b"".join(chunks))


def _refused(data: bytes) -> ErrorCode:
    """The code the listener refuses ``data`` with (a prelude is answered: nothing held)."""
    _, listener = _sessions()
    with pytest.raises(RemoteProtocolError) as exc:
        listener.receive_data(data[:PRELUDE_SIZE])
        if isinstance(listener.next_event(), StreamOffer):
            listener.answer_stream(None)
        listener.receive_data(data[PRELUDE_SIZE:])
        listener.next_event()
    assert listener.state is State.ERROR
    return exc.value.code


def test_a_crafted_stream_that_follows_the_rules_opens() -> None:
    """The hand-made sender below is right when it follows the rules: the refusals that
    follow are caused by the one rule each breaks."""
    c = Crafted(_valid_payload())
    chunks = c.chunks()
    _, listener = _sessions()
    opened = _feed(listener, c.prelude() + b"".join(chunks) + c.trailer(_digest(chunks)))
    assert isinstance(opened.message, Update)  # type: ignore[attr-defined]


def test_a_flipped_ciphertext_byte_is_refused_as_it_arrives_before_the_header() -> None:
    c = Crafted(_valid_payload())
    chunks = c.chunks()
    bad = bytearray(chunks[1])
    bad[1000] ^= 1
    _, listener = _sessions()
    with pytest.raises(RemoteProtocolError) as exc:
        _feed(listener, c.prelude() + chunks[0] + bytes(bad))  # no trailer yet
    assert exc.value.code is ErrorCode.DECRYPT_FAILED
    assert listener.refusal(exc.value) is None  # unauthenticated: the stream is reset, not answered


def test_reordered_chunks_and_a_stream_from_another_key_do_not_decrypt() -> None:
    c = Crafted(_valid_payload())
    chunks = c.chunks()
    assert _refused(c.prelude() + chunks[1] + chunks[0]) is ErrorCode.DECRYPT_FAILED
    # Eve streams to Bob under the Alice-Bob prelude: she has no key for it
    eve = Crafted(_valid_payload())
    eve_key = stream_key(EVE.shared_key(BOB.public_key))
    assert lib.crypto_secretstream_xchacha20poly1305_init_push(eve.state, ffi.new("unsigned char[]", 24), eve_key) == 0
    assert _refused(c.prelude() + eve.push(eve.payload[:MiB], 0)) is ErrorCode.DECRYPT_FAILED


@pytest.mark.parametrize(
    ("tags", "what"),
    [([3, 3], "final too early"), ([0, 0], "last not final"), ([0, 1], "last pushed, not final")],
)
def test_a_chunk_mislabelled_final_or_not_is_refused(tags: list[int], what: str) -> None:
    payload = _valid_payload(20_000)  # two chunks
    c = Crafted(payload)
    chunks = c.chunks(tags)
    assert _refused(c.prelude() + b"".join(chunks) + c.trailer(_digest(chunks))) is ErrorCode.BAD_FRAME, what


def test_a_header_that_names_other_chunks_or_another_stream_header_is_refused_and_answered() -> None:
    c = Crafted(_valid_payload())
    chunks = c.chunks()
    for trailer in (c.trailer(bytes(32)), c.trailer(_digest(chunks), nonce=bytes(24))):
        _, listener = _sessions()
        with pytest.raises(RemoteProtocolError) as exc:
            _feed(listener, c.prelude() + b"".join(chunks) + trailer)
        assert exc.value.code is ErrorCode.DIGEST_MISMATCH
        answer = listener.refusal(exc.value, sequence=_seq())  # authenticated: a signed error goes back
        assert answer is not None and answer.header.kind.value == "error"


def test_a_trailer_signed_by_someone_else_or_too_large_is_refused() -> None:
    c = Crafted(_valid_payload())
    chunks = c.chunks()
    body = c.prelude() + b"".join(chunks)
    assert _refused(body + c.trailer(_digest(chunks), signer=EVE)) is ErrorCode.BAD_SIGNATURE
    assert _refused(body + (4097).to_bytes(2, "big")) is ErrorCode.TOO_LARGE


def test_the_prelude_is_checked_before_anything_is_allocated() -> None:
    c = Crafted(_valid_payload())
    _, listener = _sessions()
    listener.receive_data(c.prelude(payload_len=(1 << 32) - 1))
    assert listener.buffered_bytes <= 64
    with pytest.raises(RemoteProtocolError) as exc:
        listener.next_event()
    assert exc.value.code is ErrorCode.TOO_LARGE
    assert _refused(c.prelude(payload_len=3)) is ErrorCode.BAD_FRAME
    # before the hellos only small frames are accepted, streamed ones included
    early = Session(Role.LISTENER, identity=BOB, peer=ALICE.public_key, federation=FED, streamed=True)
    early.receive_data(c.prelude())
    with pytest.raises(RemoteProtocolError) as exc:
        early.next_event()
    assert exc.value.code is ErrorCode.TOO_LARGE


def test_a_stream_that_ends_inside_a_streamed_envelope_is_a_bad_frame() -> None:
    c = Crafted(_valid_payload())
    chunks = c.chunks()
    whole = c.prelude() + b"".join(chunks) + c.trailer(_digest(chunks))
    for cut in (10, 40, len(whole) - 100, len(whole) - 1):
        _, listener = _sessions()
        if cut < PRELUDE_SIZE:
            listener.receive_data(whole[:cut])
            assert listener.next_event() is NEED_DATA
        else:
            assert _feed(listener, whole[:cut]) is NEED_DATA
        listener.receive_data(b"")
        with pytest.raises(RemoteProtocolError) as exc:
            listener.next_event()
        assert exc.value.code is ErrorCode.BAD_FRAME, cut


def test_a_streamed_envelope_sent_again_is_a_replay() -> None:
    dialer, listener = _sessions()
    prelude, chunks, trailer = _wire_bytes(dialer.send_streamed(_update(1000)))
    data = prelude + b"".join(chunks) + trailer
    _feed(listener, data)
    _, again = _sessions()
    again._replay = listener._replay  # one peer: its sessions share a replay guard
    with pytest.raises(RemoteProtocolError) as exc:
        _feed(again, data)
    assert exc.value.code is ErrorCode.REPLAY


def test_fuzzed_streamed_envelopes_raise_only_protocol_errors() -> None:
    rng = random.Random(20261204)
    dialer, _ = _sessions()
    prelude, chunks, trailer = _wire_bytes(dialer.send_streamed(_update(300_000)))
    good = prelude + b"".join(chunks) + trailer
    for _ in range(60):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            data[at] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
        _, listener = _sessions()
        try:
            listener.receive_data(bytes(data[:PRELUDE_SIZE]))
            if isinstance(listener.next_event(), StreamOffer):
                listener.answer_stream(None)
            listener.receive_data(bytes(data[PRELUDE_SIZE:]))
            listener.receive_data(b"")
            listener.next_event()
        except ProtocolError:
            continue


def test_the_receivers_payload_holds_only_chunks_that_arrived_and_authenticated() -> None:
    """However long the prelude says the payload is, the buffer is exactly the chunks opened so
    far (it used to double ahead of them, zero-filled); a chunk that does not authenticate
    adds nothing."""
    from silomesh.protocol import StreamOpener, seal_streamed

    sealer = seal_streamed(_update(), ALICE)
    chunks = [bytes(c) for c in sealer.chunks()]
    assert len(chunks) > 4
    opener = StreamOpener(BOB.shared_key(ALICE.public_key), sealer.stream_header, sealer.payload_len)
    assert len(opener.plaintext) == 0
    for i in range(3):
        opener.open_chunk(chunks[i])
        assert len(opener.plaintext) == opener.filled == (i + 1) * STREAM_CHUNK_SIZE
    forged = bytearray(chunks[3])
    forged[-1] ^= 1
    with pytest.raises(RemoteProtocolError) as exc:
        opener.open_chunk(forged)
    assert exc.value.code is ErrorCode.DECRYPT_FAILED
    assert len(opener.plaintext) == 3 * STREAM_CHUNK_SIZE and opener.opened == 3


# ---------------------------------------------------------------- resuming


def test_a_streamed_envelope_cut_off_resumes_from_the_chunks_the_receiver_kept() -> None:
    """The first stream breaks in the middle of chunk 2 of 4 (64 KiB each); the receiver keeps chunks 0-1
    (decrypted, with the cipher and digest states after them). The same sealer, sent again on a
    new session, re-encrypts chunks 0-1 without sending them and sends 2-3 and the trailer: the
    envelope opens as if it had come in one piece."""
    dialer, listener = _sessions()
    msg = _update(3 * MiB // 4 + 100)  # 4 chunks
    sealer = dialer.send_streamed(msg)
    prelude, chunks, trailer = _wire_bytes(sealer)
    assert len(chunks) == 4
    cut = PRELUDE_SIZE + len(chunks[0]) + len(chunks[1]) + 1000
    assert _feed(listener, (prelude + b"".join(chunks))[:cut]) is NEED_DATA
    listener.receive_data(b"")  # the stream ends
    kept = listener.partial_stream()
    assert kept is not None and kept.opened == 2 and len(kept.plaintext) == 2 * MiB
    assert kept.ciphertext_bytes == len(chunks[0]) + len(chunks[1])

    dialer2, listener2 = _sessions()
    dialer2.send_sealed(sealer)  # the same envelope: same stream header, sequence, timestamp
    rest = list(sealer.chunks(start=2))
    assert [bytes(c) for c in rest] == chunks[2:]  # the same bytes as the first time
    assert sealer.trailer == trailer  # so the same digest and signature
    opened = _feed(listener2, prelude + b"".join(chunks[2:]) + trailer, kept=kept)
    np.testing.assert_array_equal(opened.message.tensors["w"], msg.tensors["w"])  # type: ignore[attr-defined]
    assert opened.header.sequence == sealer.header.sequence  # type: ignore[attr-defined]


def test_a_resumed_sending_refuses_when_the_tensors_changed_since() -> None:
    """Re-encrypting changed plaintext under the same stream header would be a keystream reuse:
    the sealer checks the digest state of the chunks it skips against the first sending's."""
    dialer, _ = _sessions()
    msg = _update(600_000)
    sealer = dialer.send_streamed(msg)
    first = sealer.chunks()
    next(first), next(first)
    msg.tensors["w"][10] += 1.0  # type: ignore[index]  # chunk 0 changes
    with pytest.raises(LocalProtocolError) as exc:
        list(sealer.chunks(start=2))
    assert "changed" in exc.value.message
    with pytest.raises(LocalProtocolError):
        list(sealer.chunks(start=5))  # never sent: nothing to resume from


def test_kept_chunks_are_used_only_for_the_same_envelope_and_a_stream_cut_inside_chunk_0_keeps_nothing() -> None:
    from silomesh.peer.transfers import Transfers

    dialer, listener = _sessions()
    sealer = dialer.send_streamed(_update(600_000))
    prelude, chunks, _ = _wire_bytes(sealer)
    _feed(listener, prelude + chunks[0][:500])
    listener.receive_data(b"")
    assert listener.partial_stream() is None
    _, listener = _sessions()
    _feed(listener, prelude + chunks[0] + chunks[1][:10])
    kept = listener.partial_stream()
    assert kept is not None

    async def check() -> None:
        transfers = Transfers()
        transfers.keep("alice", kept)
        assert transfers.take_stream("alice", StreamOffer(kept.payload_len, bytes(24))) is None  # another header
        transfers.keep("alice", kept)
        assert transfers.take_stream("bob", StreamOffer(kept.payload_len, kept.stream_header)) is None  # another peer
        assert transfers.take_stream("alice", StreamOffer(kept.payload_len, kept.stream_header)) is kept
        assert transfers.take_stream("alice", StreamOffer(kept.payload_len, kept.stream_header)) is None  # once

    trio.run(check)


async def test_a_wire_resumes_a_broken_streamed_transfer_and_counts_what_it_did_not_resend() -> None:
    from silomesh.peer.exchange import ConversationError, Wire
    from silomesh.peer.transfers import Transfers

    kept = Transfers()
    msg = _update(900_000)
    sealer: StreamSealer | None = None
    outcomes: list[object] = []
    for limit in (2_500_000, None):  # the first link breaks inside chunk 2
        a, b = trio.testing.memory_stream_pair()
        a_stream = _Cut(a, "bob", limit) if limit is not None else MemoryStream(a, "bob")
        dialer, listener = _sessions()
        alice = Wire(dialer, a_stream, lambda r: None, transfers=Transfers(), stream_threshold=1)
        bob = Wire(listener, MemoryStream(b, "alice"), lambda r: None, transfers=kept)

        async def receive(bob: Wire = bob) -> None:
            try:
                outcomes.append(await bob.receive(timeout=10))
            except (ConversationError, RemoteProtocolError) as exc:
                outcomes.append(exc)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                try:
                    if sealer is None:
                        sealer = await alice.seal_streamed(msg)
                        await alice.send_streamed(sealer, fresh=True)
                    else:
                        await alice.send_streamed(sealer)
                except ConversationError:
                    pass
    assert isinstance(outcomes[0], RemoteProtocolError) and outcomes[0].code is ErrorCode.BAD_FRAME
    assert "inside a streamed envelope" in outcomes[0].message
    opened = outcomes[1]
    np.testing.assert_array_equal(opened.message.tensors["w"], msg.tensors["w"])  # type: ignore[attr-defined]
    assert kept.stats.partials_kept == 1 and kept.stats.resumed_receives == 1
    # the link took 2.5 MB (the prelude, then chunks in 1 MiB writes): the whole chunks in it
    assert kept.stats.bytes_resumed == (2_500_000 - PRELUDE_SIZE) // (MiB + STREAM_TAG_SIZE) * (MiB + STREAM_TAG_SIZE)
    assert alice.transfers.stats.resumed_sends == 1 and alice.bytes_not_resent == kept.stats.bytes_resumed
    assert alice.bytes_sent == sealer.size - kept.stats.bytes_resumed  # type: ignore[union-attr]


# ---------------------------------------------------------------- the sender's memory


def test_sealing_a_streamed_update_holds_a_few_chunks_not_a_sealed_copy() -> None:
    """16 MB of tensors: a whole envelope allocates the payload's size; streaming it allocates
    a few chunks at a time (its plaintext buffer, the chunk being sealed, the one just handed
    out; what the writer drops is freed)."""
    msg = _update(4_000_000)  # 16 MB
    dialer, _ = _sessions()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        dialer.send(msg)
        _, whole_peak = tracemalloc.get_traced_memory()
        dialer2, _ = _sessions()
        tracemalloc.reset_peak()
        sealer = dialer2.send_streamed(msg)
        for chunk in sealer.chunks():
            del chunk
        _, streamed_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert whole_peak > 16_000_000
    # a few chunks, the body and the digest state after each chunk (400 bytes per 64 KiB)
    assert streamed_peak < 1_000_000, streamed_peak


# ---------------------------------------------------------------- over streams


async def test_a_wire_streams_a_large_update_and_audits_it_on_both_sides() -> None:
    from silomesh.peer.exchange import Wire

    a, b = trio.testing.memory_stream_pair()
    dialer, listener = _sessions()
    sent_log: list[object] = []
    got_log: list[object] = []
    alice = Wire(dialer, MemoryStream(a, "bob"), sent_log.append, stream_threshold=1 << 20)
    bob = Wire(listener, MemoryStream(b, "alice"), got_log.append)
    msg = _update(1_000_000)  # 4 MB: streamed
    small = _update(1000)
    assert alice.streams(msg) and not alice.streams(small)
    received: list[object] = []

    async def receive() -> None:
        received.append(await bob.receive(timeout=10))
        bob._settle()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            sealed = await alice.send(msg)
    opened = received[0]
    np.testing.assert_array_equal(opened.message.tensors["w"], msg.tensors["w"])  # type: ignore[attr-defined]
    (sent,), (got,) = sent_log, got_log
    assert sent.direction == "sent" and got.direction == "received"  # type: ignore[attr-defined]
    for field in ("payload_digest", "envelope_sig", "size", "envelope_header", "sequence"):
        assert getattr(sent, field) == getattr(got, field), field
    assert sent.payload_digest == sealed.header.payload_digest.hex()  # type: ignore[attr-defined]
    assert alice.bytes_sent == sealed.size == bob.bytes_received - 32  # the 32-byte prelude is not the envelope's


async def test_two_peers_federate_with_streamed_updates(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every update streamed (threshold 1 byte): both rounds commit with the neighbour's
    contribution, and each update one peer audited as sent the other audited as received,
    with the same digest, signature and size."""
    from silomesh.peer.exchange import Wire

    streamed: list[int] = []
    original = Wire.send_streamed

    async def counted(self: Wire, sealer: StreamSealer, *, fresh: bool = False) -> StreamSealer:
        streamed.append(sealer.header.round)
        return await original(self, sealer, fresh=fresh)

    monkeypatch.setattr(Wire, "send_streamed", counted)
    net = MemoryNetwork()
    peers = make(tmp_path, 2, net, rounds=2, extra={"network": {"stream_threshold_mb": 0.000001}})
    async with running(peers):
        for p in peers:
            await p.done.wait()
        rows = {p.peer_id: await p.operator.rounds() for p in peers}
        audit = {p.peer_id: p.store.audit_entries() for p in peers}
    for p in peers:
        assert [r["status"] for r in rows[p.peer_id]] == ["done", "done"]
        assert all(len(r["contributors"]) == 1 for r in rows[p.peer_id]), rows[p.peer_id]
    a, b = (p.peer_id for p in peers)
    for sender, receiver in ((a, b), (b, a)):
        key = ("payload_digest", "envelope_sig", "size")
        updates = {p: [e for e in audit[p] if e["kind"] == "update"] for p in (sender, receiver)}
        sent = [tuple(e[k] for k in key) for e in updates[sender] if e["direction"] == "sent"]
        got = {tuple(e[k] for k in key) for e in updates[receiver] if e["direction"] == "received"}
        assert len(sent) >= 2 and set(sent) <= got, (sent, got)
    assert sorted(streamed) == [0, 0, 1, 1]  # every update of both rounds went streamed


@pytest.mark.slow
async def test_a_link_that_drops_mid_streamed_update_resumes_within_the_round(tmp_path: Path) -> None:
    """Peer 0's first streamed update (the "small" U-Net, 1.9 MB: 30 chunks) to peer 1 breaks
    after 1.3 MB and the link is down for 2 s. Peer 0 dials again, sends the prelude of the
    same envelope, peer 1 answers with the chunks it holds, and only the rest and the trailer
    travel; both rounds complete with both contributions.

    On the real clock: an update this size is sealed in worker threads, and trio's MockClock
    would jump to the round's deadline while a thread works."""
    import dataclasses

    from memnet import StartTogether
    from peerkit import configs

    from silomesh.peer.context import InlineCompute
    from silomesh.peer.daemon import Peer

    net = MemoryNetwork()
    ids, cfgs = configs(tmp_path, 2, rounds=2, extra={"network": {"stream_threshold_mb": 1.0}})
    cfgs = [dataclasses.replace(c, task=dataclasses.replace(c.task, size="small")) for c in cfgs]
    faults = StartTogether(net, 2)
    peers = [
        Peer(c, identity=i, serve_control_api=False, transport=net.open, compute=InlineCompute(), faults=faults)
        for i, c in zip(ids, cfgs, strict=True)
    ]
    a, b = peers[0].peer_id, peers[1].peer_id
    net.break_next_stream(a, b, after=1_300_000, down_for=2.0)
    with trio.fail_after(120):
        async with running(peers):
            for p in peers:
                await p.done.wait()
            rows = {p.peer_id: await p.operator.rounds() for p in peers}
            stats = {p.peer_id: p.context.endpoint.transfers.stats for p in peers}
            audit_b = peers[1].store.audit_entries()
    assert len(net.outages) == 1
    cut = [e for e in audit_b if e["direction"] == "refused" and "to resume" in e["reason"]]
    assert len(cut) == 1 and "inside a streamed envelope" in cut[0]["reason"], cut
    for p in peers:
        assert [r["status"] for r in rows[p.peer_id]] == ["done", "done"]
        assert all(len(r["contributors"]) == 1 for r in rows[p.peer_id]), rows[p.peer_id]
    assert stats[b].resumed_receives == 1 and stats[b].bytes_resumed % (MiB + STREAM_TAG_SIZE) == 0
    assert 1_000_000 < stats[b].bytes_resumed <= 1_300_000
    assert stats[a].resumed_sends == 1 and stats[a].bytes_not_resent == stats[b].bytes_resumed
