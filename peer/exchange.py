"""One exchange conversation over one libp2p stream, and the audit of what crosses it.

:class:`Wire` drives a sans-I/O :class:`~silomesh.protocol.Session` over a
:class:`~silomesh.peer.transport.Stream`: it writes sealed envelopes in bounded
chunks, feeds bounded reads to the session, and records every envelope sent, received
or refused in the audit log. Sealing and opening large envelopes (encryption, hashing,
decoding) run in a worker thread so the trio loop keeps serving other neighbours.

A neighbour cannot hold a stream or our memory hostage (PROTOCOL.md section 12):

* every read waits at most a bounded time: a frame in progress must keep delivering
  bytes (``Timeouts.stall``), and the caller bounds the wait for the next message
  (the dialer's hello, an idle stream, the answer to an update);
* the bytes a stream holds (a partial frame plus frames not yet opened) are charged
  to a :class:`~silomesh.peer.transfers.BufferBudget`, per neighbour and for all neighbours together.

A tensor message is audited once it is settled: as ``received`` when the handler
answers it (or moves on), as ``refused``, with the envelope's header and the reason,
when the handler declines it (:meth:`Wire.decline`).

On a resumable stream (``/silomesh/exchange/1.1.0`` or later, PROTOCOL.md section 4.1) an
envelope of :data:`RESUME_THRESHOLD` bytes or more is *offered* (named by the BLAKE2b-256 of
its bytes) and the receiver answers how much of it it already holds: when a link drops
mid-transfer, the receiver keeps what arrived (:class:`~silomesh.peer.transfers.Transfers`), the sender offers the
same sealed envelope again on a new stream (:meth:`Wire.send_sealed`), and only the rest
travels.

On ``/silomesh/exchange/1.2.0`` a tensor message of :attr:`Wire.stream_threshold` bytes or
more is *streamed* instead (section 4.2): sealed in 64 KiB chunks by worker threads while
the chunks before are written, so no sealed copy of the model exists; the receiving
session decrypts each chunk as it arrives. Its prelude is answered with the chunks the
receiver kept from a stream that broke (:class:`~silomesh.peer.transfers.Transfers` keeps them, with the cipher and
digest states after them), and the sender's :class:`~silomesh.protocol.StreamSealer`
seals the rest again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import trio

from silomesh.peer import muxer
from silomesh.peer.transfers import BufferBudget, Transfers, held_bytes
from silomesh.peer.transport import Stream, StreamClosed
from silomesh.protocol import (
    NEED_DATA,
    ErrorCode,
    FrameOffer,
    LocalProtocolError,
    OpenedEnvelope,
    PartialFrame,
    PartialStream,
    ProtocolError,
    RemoteProtocolError,
    SealedEnvelope,
    SealedHeader,
    Session,
    StreamOffer,
    StreamSealer,
    body_digest,
    decode_answer,
    encode_offer,
)
from silomesh.protocol.frames import ANSWER_SIZE, STREAM_CHUNK_SIZE, STREAM_TAG_SIZE
from silomesh.protocol.messages import Message, TensorMessage

log = logging.getLogger(__name__)

# every peer exchanges through this module: without it two neighbours pushing to each other
# at once can deadlock their Yamux connection for good (silomesh.peer.muxer says why)
muxer.install()

WRITE_CHUNK = 1 << 20
#: envelopes larger than this are sealed/opened in a worker thread
THREAD_THRESHOLD = 1 << 20


#: tensor messages of at least this many tensor bytes are streamed on a 1.2.0 stream
#: (``network.stream_threshold_mb``): sealed chunk by chunk while they are written, so
#: the sender never holds a sealed copy; a broken transfer resumes at the receiver's chunk
STREAM_THRESHOLD = 1_000_000
#: chunks sealed per worker-thread hop and written at once (4 MiB: with 1 MiB per hop two
#: peers exchanging 400 MB took 15.3 s instead of 11.9 s, bench/bench_big.py), and batches
#: sealed ahead of the writes
STREAM_BATCH = 64
STREAM_AHEAD = 2

#: envelopes of at least this size are offered on a resumable stream (smaller ones are
#: cheaper to send again than a round trip)
RESUME_THRESHOLD = 1 << 20
@dataclass(frozen=True)
class Timeouts:
    """How long a neighbour may keep us waiting (seconds); ``network`` in peer.toml."""

    #: the dialer's hello, after the stream opened
    hello: float = 30.0
    #: a frame in progress: the longest gap between two reads that deliver bytes, and the
    #: longest a write of ours may wait for the neighbour to take any of it
    stall: float = 60.0
    #: a stream with no message in progress
    idle: float = 300.0
    #: the answer to an update (the listener acknowledges without training)
    reply: float = 120.0


def _tensor_bytes(message: Message) -> int:
    return sum(a.nbytes for a in message.tensors.values()) if isinstance(message, TensorMessage) else 0


@dataclass(frozen=True)
class AuditRecord:
    """What the audit log keeps of one envelope: never its content."""

    direction: str  # sent | received | refused
    peer: str  # PeerID of the other side
    kind: str
    round: int
    payload_digest: str
    size: int
    envelope_sig: str
    reason: str = ""
    envelope_header: bytes | None = None  # the exact signed header bytes (routing fields, digests)
    sequence: int = -1  # the envelope's sequence number (-1: none)


AuditSink = Callable[[AuditRecord], None]


class ConversationError(Exception):
    """The conversation ended abnormally: the stream closed, or a side broke the protocol."""


class Silent(ConversationError):
    """The neighbour sent nothing (or stopped mid-message) for longer than its timeout."""


class Wire:
    """A Session bound to a stream, with auditing, read deadlines and a buffer budget."""

    def __init__(
        self,
        session: Session,
        stream: Stream,
        audit: AuditSink,
        *,
        timeouts: Timeouts | None = None,
        budget: BufferBudget | None = None,
        transfers: Transfers | None = None,
        stream_threshold: int = STREAM_THRESHOLD,
    ) -> None:
        self.session = session
        #: tensor bytes from which a message is streamed (0: never)
        self.stream_threshold = stream_threshold
        self.stream = stream
        self.audit = audit
        self.timeouts = timeouts or Timeouts()
        self.budget = budget
        self.transfers = transfers if transfers is not None else Transfers()
        self.bytes_sent = 0
        self.bytes_received = 0
        #: bytes of envelopes we offered that the receiver already held from a broken stream
        self.bytes_not_resent = 0
        self._kept = 0  # bytes of a cut-off frame kept to resume when the stream ended
        self._held = 0  # bytes charged to the budget
        self._unsettled: AuditRecord | None = None  # a received tensor message, not yet answered

    def _settle(self) -> None:
        """Audit the last received tensor message as received (the handler moved on)."""
        if self._unsettled is not None:
            rec, self._unsettled = self._unsettled, None
            self.audit(rec)

    def decline(self, reason: str) -> None:
        """Audit the last received message as refused (with its header) instead of received."""
        if self._unsettled is not None:
            rec, self._unsettled = self._unsettled, None
            self.audit(replace(rec, direction="refused", reason=reason))

    def _account(self) -> None:
        """Charge what the session holds now to the budget (refusing a stream over it)."""
        if self.budget is None:
            return
        held = self.session.buffered_bytes
        self.budget.charge(self.stream.remote, held - self._held)
        self._held = held

    def release(self) -> None:
        """Give back this stream's share of the budget (the stream is done)."""
        self._settle()
        if self.budget is not None and self._held:
            self.budget.charge(self.stream.remote, -self._held)
            self._held = 0

    async def close(self) -> None:
        self.release()
        await self.stream.close()

    async def reset(self) -> None:
        self.release()
        await self.stream.reset()

    async def send(self, message: Message) -> SealedEnvelope | SealedHeader:
        """Seal ``message``, write it, and audit it as sent; streamed when :meth:`streams` says so.

        Raises:
            ConversationError: the stream broke (or stalled) before the whole envelope was
                written; the envelope is returned nowhere, so a caller that wants to resume
                it seals with :meth:`seal` and sends with :meth:`send_sealed` instead.
        """
        if self.streams(message):
            sealer = await self.seal_streamed(message)
            await self.send_streamed(sealer, fresh=True)
            return sealer.sealed
        return await self.send_sealed(await self.seal(message), fresh=True)

    def streams(self, message: Message) -> bool:
        """Whether :meth:`send` streams ``message`` (PROTOCOL.md section 4.2): the stream is
        1.2.0 and its tensors hold at least :attr:`stream_threshold` bytes."""
        return (
            self.session.streamed
            and self.stream_threshold > 0
            and _tensor_bytes(message) >= self.stream_threshold
        )

    async def seal_streamed(self, message: Message) -> StreamSealer:
        """Check ``message`` and start sealing it as a streamed envelope for this stream's peer
        (nothing is encrypted yet), advancing the session; send it with :meth:`send_streamed`."""
        self._settle()
        if _tensor_bytes(message) > THREAD_THRESHOLD:  # the codec's finite checks read every tensor
            return await trio.to_thread.run_sync(self.session.send_streamed, message)
        return self.session.send_streamed(message)

    async def send_streamed(self, sealer: StreamSealer, *, fresh: bool = False) -> StreamSealer:
        """Write a streamed envelope (PROTOCOL.md section 4.2) and audit it as sent.

        The prelude goes first; the receiver answers how many chunks it holds from an earlier
        stream that broke (``fresh=False``: ``sealer`` was sent before), and the chunks from
        there on are sealed by worker threads while the ones before are written: at most
        ``STREAM_BATCH * (1 + STREAM_AHEAD)`` chunks (64 KiB each) exist at once, and no sealed copy
        of the payload is made.

        Raises:
            ConversationError: the stream broke or stalled before the envelope was written,
                or the receiver's answer is not a chunk index.
        """
        self._settle()
        if not fresh:
            self.session.send_sealed(sealer)
        # worker threads only when it pays: a thread hop costs more than sealing a small message
        threaded = sealer.payload_len > THREAD_THRESHOLD
        try:
            await self._write(sealer.prelude)  # the prelude is framing, not envelope bytes
            have = int.from_bytes(await self._read_exact(ANSWER_SIZE), "big")
            if have >= sealer.chunk_count:
                await self.reset()
                raise ConversationError(f"{self.stream.remote} holds chunk {have} of our {sealer.chunk_count}")
            self.transfers.stats.offered += 1
            if have:
                skipped = have * (STREAM_CHUNK_SIZE + STREAM_TAG_SIZE)
                self.transfers.stats.resumed_sends += 1
                self.transfers.stats.bytes_not_resent += skipped
                self.bytes_not_resent += skipped
                log.info("%s holds %d of our %d chunks: sending the rest", self.stream.remote, have, sealer.chunk_count)
            chunks = sealer.chunks(have)

            def take() -> bytes:
                return b"".join(c for _, c in zip(range(STREAM_BATCH), chunks, strict=False))

            try:  # the first batch re-encrypts the chunks the receiver holds, and checks them
                batch = await trio.to_thread.run_sync(take) if threaded else take()
            except LocalProtocolError as exc:  # they differ: the tensors changed since
                await self.reset()
                raise ConversationError(f"cannot resume our streamed envelope: {exc.message}") from None
            await self._write_chunks(batch, take, threaded)
            trailer = sealer.trailer
            await self._write_counted(trailer, len(trailer))
        except StreamClosed as exc:
            raise ConversationError(str(exc)) from None
        self._audit_sent(sealer.sealed)
        return sealer

    async def _write_chunks(self, batch: bytes, take: Callable[[], bytes], threaded: bool) -> None:
        """Write ``batch`` and the batches ``take`` seals next (in worker threads if ``threaded``),
        sealing ahead of the writes."""
        to_writer, from_sealer = trio.open_memory_channel[bytes](STREAM_AHEAD)

        async def seal_ahead(batch: bytes) -> None:
            async with to_writer:
                while batch:
                    await to_writer.send(batch)
                    batch = (await trio.to_thread.run_sync(take)) if threaded else take()

        failed: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(seal_ahead, batch)
            try:
                async with from_sealer:
                    async for chunk in from_sealer:
                        await self._write_counted(chunk, len(chunk))
            except (StreamClosed, ConversationError) as exc:  # raised as itself, not in a group
                failed = exc
                nursery.cancel_scope.cancel()
        if failed is not None:
            raise failed

    async def seal(self, message: Message) -> SealedEnvelope:
        """Seal ``message`` for this stream's peer (in a worker thread when large) and advance
        the session; write it with :meth:`send_sealed` (``fresh=True``)."""
        self._settle()
        if _tensor_bytes(message) > THREAD_THRESHOLD:
            return await trio.to_thread.run_sync(self.session.send, message)
        return self.session.send(message)

    async def send_sealed(self, sealed: SealedEnvelope, *, fresh: bool = False) -> SealedEnvelope:
        """Write ``sealed`` and audit it as sent. ``fresh``: :meth:`seal` made it for this
        stream; otherwise it was sealed for an earlier stream that broke, and is sent again
        unchanged, so that the receiver can resume it (PROTOCOL.md section 4.1).

        Raises:
            ConversationError: the stream broke or stalled before the envelope was written.
        """
        self._settle()
        if not fresh:
            self.session.send_sealed(sealed)
        try:
            if self.offers(sealed):
                await self._offer(sealed)
            else:
                head, body = sealed.frame_parts()
                await self._write_counted(head, len(sealed.head))  # the prefix is not envelope bytes
                await self._write_body(memoryview(body))
        except StreamClosed as exc:
            raise ConversationError(str(exc)) from None
        self._audit_sent(sealed)
        return sealed

    def offers(self, sealed: SealedEnvelope) -> bool:
        """Whether :meth:`send_sealed` offers ``sealed`` (so that a broken transfer resumes)."""
        return self.session.resumable and sealed.size >= RESUME_THRESHOLD

    async def _write_counted(self, data: bytes | bytearray | memoryview, counted: int) -> None:
        # counted when handed to the stream: a write the link breaks off used it too, and the
        # receiver cannot hold more of an envelope than was handed over
        self.bytes_sent += counted
        await self._write(data)

    async def _write_body(self, view: memoryview) -> None:
        for start in range(0, len(view), WRITE_CHUNK):
            piece = view[start : start + WRITE_CHUNK]
            await self._write_counted(piece, len(piece))

    async def _offer(self, sealed: SealedEnvelope) -> None:
        """Offer ``sealed`` (its digest and size), read how much the receiver holds, send the rest."""
        head = sealed.head
        if sealed.size > THREAD_THRESHOLD:
            digest = await trio.to_thread.run_sync(body_digest, head, sealed.ciphertext)
        else:
            digest = body_digest(head, sealed.ciphertext)
        await self._write(encode_offer(digest, sealed.size, self.session.peer_max_frame_size))
        have = decode_answer(await self._read_exact(ANSWER_SIZE), sealed.size)
        self.transfers.stats.offered += 1
        if have:
            self.transfers.stats.resumed_sends += 1
            self.transfers.stats.bytes_not_resent += have
            self.bytes_not_resent += have
            log.info("%s holds %d of our %d-byte envelope: sending the rest", self.stream.remote, have, sealed.size)
        if have < len(head):
            await self._write_counted(head[have:], len(head) - have)
            await self._write_body(memoryview(sealed.ciphertext))
        else:
            await self._write_body(memoryview(sealed.ciphertext)[have - len(head) :])

    async def _read_exact(self, n: int) -> bytes:
        """Exactly ``n`` raw bytes (the answer to an offer), each read within ``timeouts.stall``."""
        data = b""
        while len(data) < n:
            got: bytes | None = None
            with trio.move_on_after(self.timeouts.stall):
                got = await self.stream.read_some(n - len(data))
            if got is None:
                await self.reset()
                raise Silent(f"{self.stream.remote} did not answer our offer for {self.timeouts.stall:.0f} s")
            data += got
        self.bytes_received += len(data)
        return data

    async def _write(self, data: bytes | bytearray | memoryview) -> None:
        """Write one piece; a neighbour that accepts none of it within ``timeouts.stall`` is silent.

        Raises:
            Silent: the write made no progress for ``timeouts.stall`` seconds (the stream is reset).
        """
        with trio.move_on_after(self.timeouts.stall):
            await self.stream.write(data)
            return
        await self.reset()
        raise Silent(f"{self.stream.remote} accepted no data for {self.timeouts.stall:.0f} s")

    def _audit_sent(self, sealed: SealedEnvelope | SealedHeader) -> None:
        header = sealed.header
        self.audit(
            AuditRecord(
                "sent",
                self.stream.remote,
                header.kind.value,
                header.round,
                header.payload_digest.hex(),
                sealed.size,
                sealed.signature.hex(),
                envelope_header=sealed.header_bytes,
                sequence=header.sequence,
            )
        )

    async def receive(self, timeout: float | None = None) -> OpenedEnvelope | None:  # noqa: ASYNC109 - a per-read inactivity bound, not an overall deadline
        """The next verified envelope, or None when the peer closed the stream cleanly.

        Args:
            timeout: the longest wait for the next message to start (None: the caller's
                own deadline bounds it). Once a frame has started, each read must deliver
                within ``timeouts.stall``.

        Raises:
            RemoteProtocolError: the peer sent something invalid, or more than its buffer
                budget (audited as refused).
            ConversationError: the stream broke mid-message or stayed silent too long.
        """
        self._settle()
        while True:
            try:
                # a worker thread only for a complete large frame (opening it is the heavy part):
                # while a frame is still arriving next_event is a cheap NEED_DATA, and a thread
                # hop per 64 KiB read cost more than the crypto (bench/bench_exchange.py)
                if self.session.ready_bytes > THREAD_THRESHOLD:
                    event = await trio.to_thread.run_sync(self.session.next_event)
                else:
                    event = self.session.next_event()
                self._account()
            except RemoteProtocolError as exc:
                self._refused_unopened(f"{exc.code.value}: {exc.message}{_kept_note(self._kept)}")
                raise
            if event is NEED_DATA:
                await self._read_more(timeout)
                continue
            if isinstance(event, FrameOffer):
                await self._answer_offer(event)
                continue
            if isinstance(event, StreamOffer):
                await self._answer_stream(event)
                continue
            if not isinstance(event, OpenedEnvelope):
                return None
            header = event.header
            record = AuditRecord(
                "received",
                self.stream.remote,
                header.kind.value,
                header.round,
                header.payload_digest.hex(),
                event.size,
                event.signature.hex(),
                envelope_header=event.header_bytes,
                sequence=header.sequence,
            )
            if isinstance(event.message, TensorMessage):
                self._unsettled = record  # the handler may still refuse it (decline)
            else:
                self.audit(record)
            return event

    async def _answer_offer(self, offer: FrameOffer) -> None:
        held = self.transfers.take(self.stream.remote, offer)
        answer = self.session.answer_offer(held)
        if held:
            log.info("resuming a %d-byte frame from %s at byte %d", offer.length, self.stream.remote, len(held))
        try:
            await self._write(answer)
        except StreamClosed as exc:
            self.transfers.keep(self.stream.remote, self.session.partial())
            raise ConversationError(str(exc)) from None
        self._account()

    async def _answer_stream(self, offer: StreamOffer) -> None:
        kept = self.transfers.take_stream(self.stream.remote, offer)
        answer = self.session.answer_stream(kept)
        if kept is not None:
            log.info("resuming a streamed envelope from %s at chunk %d", self.stream.remote, kept.opened)
        try:
            await self._write(answer)
        except StreamClosed as exc:
            self.transfers.keep(self.stream.remote, self.session.partial_stream())
            raise ConversationError(str(exc)) from None
        self._account()

    def _keep_partial(self) -> int:
        """The stream broke: keep what arrived of an offered frame or a streamed envelope, for
        the neighbour's retry (the bytes kept; 0: none)."""
        partial: PartialFrame | PartialStream | None = self.session.partial() or self.session.partial_stream()
        self.transfers.keep(self.stream.remote, partial)
        return held_bytes(partial) if partial is not None else 0

    def _refused_unopened(self, reason: str) -> None:
        self.audit(AuditRecord("refused", self.stream.remote, "unknown", -1, "", 0, "", reason))

    async def _read_more(self, timeout: float | None) -> None:  # noqa: ASYNC109 - see receive
        mid_frame = self.session.buffered_bytes > 0
        wait = self.timeouts.stall if mid_frame else timeout
        data: bytes | None = None
        with trio.move_on_after(wait if wait is not None else math.inf):
            try:
                data = await self.stream.read_some()
            except StreamClosed:
                data = b""
        if data is None:
            what = "stalled mid-frame" if mid_frame else "sent nothing"
            reason = f"{what} for {wait:.0f} s"
            if mid_frame:  # a started frame that stops is the neighbour's doing: audit it
                kept = self._keep_partial()
                self._refused_unopened(f"TIMEOUT: {reason}{_kept_note(kept)}")
            raise Silent(f"{self.stream.remote} {reason}")
        if not data:  # the stream ended: the session reports a frame it cut off (audited as refused)
            self._kept = self._keep_partial()
        self.bytes_received += len(data)
        try:
            self.session.receive_data(data)
            self._account()
        except RemoteProtocolError as exc:
            self._refused_unopened(f"{exc.code.value}: {exc.message}")
            raise
        except ProtocolError as exc:
            raise ConversationError(str(exc)) from None

    async def refuse(self, error: RemoteProtocolError) -> None:
        """Tell the peer why when it is authenticated (a signed ``error``), then end the stream.

        Before the peer's envelope authenticated (framing, header, signature) the stream is
        just reset: we cannot know whom we would be answering (PROTOCOL.md section 9).
        """
        log.warning("refused envelope from %s: %s %s", self.stream.remote, error.code.value, error.message)
        self._settle()
        try:
            sealed = self.session.refusal(error)
        except ProtocolError:  # sealing our error failed: nothing more to say
            log.exception("cannot seal the error answering %s", self.stream.remote)
            sealed = None
        if sealed is None:
            await self.reset()
            return
        head, body = sealed.frame_parts()
        with trio.move_on_after(self.timeouts.stall):
            try:
                await self.stream.write(head + bytes(body))
            except StreamClosed:
                pass
            else:
                self._audit_sent(sealed)
        await self.close()


def _kept_note(kept: int) -> str:
    return f"; kept {kept} bytes to resume" if kept else ""


def is_unknown_base(error: ProtocolError) -> bool:
    return error.code is ErrorCode.UNKNOWN_BASE
