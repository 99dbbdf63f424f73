"""Streamed envelopes (PROTOCOL.md section 4.2): sealed and opened in 1 MiB chunks while
they travel, with the signed header last.

Sans-I/O first (sealer, decoder, session), then hostile senders (tampered, reordered,
truncated, mislabelled chunks; a header that lies about them; replays; fuzzed bytes), the
sender's memory, and a Wire and two peers over in-memory streams.
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
from test_round_loop import running

from silomesh.protocol import (
    NEED_DATA,
    ErrorCode,
    Hello,
    Identity,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    Role,
    Session,
    State,
    StreamedFrame,
    Update,
    state_digest,
)
from silomesh.protocol.envelope import ENVELOPE_SIGNING_DOMAIN, EnvelopeHeader
from silomesh.protocol.frames import STREAM_CHUNK_SIZE, STREAM_MARKER, STREAM_TAG_SIZE
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


def _feed(session: Session, data: bytes, rng: random.Random) -> object:
    """Feed ``data`` in random pieces, then return the next event."""
    at = 0
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
    if codec == "float32":
        np.testing.assert_array_equal(got["w"], msg.tensors["w"])
    else:
        np.testing.assert_allclose(got["w"], msg.tensors["w"], atol=0.05 if codec == "int8" else 5e-3, rtol=1e-3)
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
    _, listener = _sessions()
    with pytest.raises(RemoteProtocolError) as exc:
        listener.receive_data(data)
        listener.next_event()
    assert listener.state is State.ERROR
    return exc.value.code


def test_a_crafted_stream_that_follows_the_rules_opens() -> None:
    """The hand-made sender below is right when it follows the rules: the refusals that
    follow are caused by the one rule each breaks."""
    c = Crafted(_valid_payload())
    chunks = c.chunks()
    _, listener = _sessions()
    listener.receive_data(c.prelude() + b"".join(chunks) + c.trailer(_digest(chunks)))
    assert isinstance(listener.next_event().message, Update)  # type: ignore[union-attr]


def test_a_flipped_ciphertext_byte_is_refused_as_it_arrives_before_the_header() -> None:
    c = Crafted(_valid_payload())
    chunks = c.chunks()
    bad = bytearray(chunks[1])
    bad[1000] ^= 1
    _, listener = _sessions()
    listener.receive_data(c.prelude() + chunks[0] + bytes(bad))  # no trailer yet
    with pytest.raises(RemoteProtocolError) as exc:
        listener.next_event()
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
    payload = _valid_payload(400_000)  # two chunks
    c = Crafted(payload)
    chunks = c.chunks(tags)
    assert _refused(c.prelude() + b"".join(chunks) + c.trailer(_digest(chunks))) is ErrorCode.BAD_FRAME, what


def test_a_header_that_names_other_chunks_or_another_stream_header_is_refused_and_answered() -> None:
    c = Crafted(_valid_payload())
    chunks = c.chunks()
    for trailer in (c.trailer(bytes(32)), c.trailer(_digest(chunks), nonce=bytes(24))):
        _, listener = _sessions()
        listener.receive_data(c.prelude() + b"".join(chunks) + trailer)
        with pytest.raises(RemoteProtocolError) as exc:
            listener.next_event()
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
        listener.receive_data(whole[:cut])
        assert listener.next_event() is NEED_DATA
        listener.receive_data(b"")
        with pytest.raises(RemoteProtocolError) as exc:
            listener.next_event()
        assert exc.value.code is ErrorCode.BAD_FRAME, cut


def test_a_streamed_envelope_sent_again_is_a_replay() -> None:
    dialer, listener = _sessions()
    prelude, chunks, trailer = _wire_bytes(dialer.send_streamed(_update(1000)))
    data = prelude + b"".join(chunks) + trailer
    listener.receive_data(data)
    listener.next_event()
    _, again = _sessions()
    again._replay = listener._replay  # one peer: its sessions share a replay guard
    again.receive_data(data)
    with pytest.raises(RemoteProtocolError) as exc:
        again.next_event()
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
            listener.receive_data(bytes(data))
            listener.receive_data(b"")
            listener.next_event()
        except ProtocolError:
            continue


# ---------------------------------------------------------------- the sender's memory


def test_sealing_a_streamed_update_holds_about_one_chunk_not_a_sealed_copy() -> None:
    """16 MB of tensors: a whole envelope allocates the payload's size; streaming it allocates
    about one chunk at a time (what the writer drops is freed)."""
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
    assert streamed_peak < 3 * MiB, streamed_peak


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
    original = Wire._send_streamed

    async def counted(self: Wire, message: Update) -> object:
        streamed.append(message.round)
        return await original(self, message)

    monkeypatch.setattr(Wire, "_send_streamed", counted)
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
