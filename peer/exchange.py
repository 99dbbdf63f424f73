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
  to a :class:`BufferBudget`, per neighbour and for all neighbours together.

A tensor message is audited once it is settled: as ``received`` when the handler
answers it (or moves on), as ``refused``, with the envelope's header and the reason,
when the handler declines it (:meth:`Wire.decline`).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

import trio

from silomesh.peer import muxer
from silomesh.peer.transport import Stream, StreamClosed
from silomesh.protocol import (
    NEED_DATA,
    ErrorCode,
    OpenedEnvelope,
    ProtocolError,
    RemoteProtocolError,
    SealedEnvelope,
    Session,
)
from silomesh.protocol.messages import Message, TensorMessage

log = logging.getLogger(__name__)

# every peer exchanges through this module: without it two neighbours pushing to each other
# at once can deadlock their Yamux connection for good (silomesh.peer.muxer says why)
muxer.install()

WRITE_CHUNK = 1 << 20
#: envelopes larger than this are sealed/opened in a worker thread
THREAD_THRESHOLD = 1 << 20


#: the per-neighbour and total buffer budgets never go below these
MIN_PEER_BUDGET = 64 << 20
MIN_TOTAL_BUDGET = 256 << 20


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


class BufferBudget:
    """Received bytes not yet processed, per neighbour and for all together.

    A stream charges what its session holds after every read; a neighbour that would go
    over its share (or all of them over the total) has the stream refused ``TOO_LARGE``.
    """

    def __init__(self, per_peer: int, total: int) -> None:
        self.per_peer = per_peer
        self.total = total
        self.held: Counter[str] = Counter()
        self.held_total = 0

    @classmethod
    def for_model(cls, model_bytes: int) -> BufferBudget:
        """Room for three copies of the model per neighbour and eight in all (at least 64 / 256 MiB)."""
        return cls(max(MIN_PEER_BUDGET, 3 * model_bytes), max(MIN_TOTAL_BUDGET, 8 * model_bytes))

    def charge(self, peer: str, delta: int) -> None:
        """Add ``delta`` bytes (negative: release) to ``peer``'s share.

        Raises:
            RemoteProtocolError: TOO_LARGE when a positive charge would exceed a budget;
                nothing is charged then.
        """
        if delta > 0:
            if self.held[peer] + delta > self.per_peer:
                raise RemoteProtocolError(
                    ErrorCode.TOO_LARGE,
                    f"{self.held[peer] + delta} buffered bytes from one neighbour > budget {self.per_peer}",
                )
            if self.held_total + delta > self.total:
                raise RemoteProtocolError(
                    ErrorCode.TOO_LARGE, f"{self.held_total + delta} buffered bytes in all > budget {self.total}"
                )
        self.held[peer] += delta
        self.held_total += delta
        if self.held[peer] <= 0:
            del self.held[peer]


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
    ) -> None:
        self.session = session
        self.stream = stream
        self.audit = audit
        self.timeouts = timeouts or Timeouts()
        self.budget = budget
        self.bytes_sent = 0
        self.bytes_received = 0
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

    async def send(self, message: Message) -> SealedEnvelope:
        """Seal ``message``, write it, and audit it as sent."""
        self._settle()
        if isinstance(message, TensorMessage) and sum(a.nbytes for a in message.tensors.values()) > THREAD_THRESHOLD:
            sealed = await trio.to_thread.run_sync(self.session.send, message)
        else:
            sealed = self.session.send(message)
        head, body = sealed.frame_parts()
        try:
            await self._write(head)
            view = memoryview(body)
            for start in range(0, len(view), WRITE_CHUNK):
                await self._write(view[start : start + WRITE_CHUNK])
        except StreamClosed as exc:
            raise ConversationError(str(exc)) from None
        self.bytes_sent += sealed.size
        self._audit_sent(sealed)
        return sealed

    async def _write(self, data: bytes | memoryview) -> None:
        """Write one piece; a neighbour that accepts none of it within ``timeouts.stall`` is silent.

        Raises:
            Silent: the write made no progress for ``timeouts.stall`` seconds (the stream is reset).
        """
        with trio.move_on_after(self.timeouts.stall):
            await self.stream.write(data)
            return
        await self.reset()
        raise Silent(f"{self.stream.remote} accepted no data for {self.timeouts.stall:.0f} s")

    def _audit_sent(self, sealed: SealedEnvelope) -> None:
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
                self._refused_unopened(f"{exc.code.value}: {exc.message}")
                raise
            if event is NEED_DATA:
                await self._read_more(timeout)
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
                self._refused_unopened(f"TIMEOUT: {reason}")
            raise Silent(f"{self.stream.remote} {reason}")
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


def is_unknown_base(error: ProtocolError) -> bool:
    return error.code is ErrorCode.UNKNOWN_BASE
