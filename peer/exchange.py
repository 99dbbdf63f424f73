"""One exchange conversation over one libp2p stream, and the audit of what crosses it.

:class:`Wire` drives a sans-I/O :class:`~silomesh.protocol.Session` over a
:class:`~silomesh.peer.transport.Stream`: it writes sealed envelopes in bounded
chunks, feeds bounded reads to the session, and records every envelope sent, received
or refused in the audit log. Sealing and opening large envelopes (encryption, hashing,
decoding) run in a worker thread so the trio loop keeps serving other neighbours.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

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

WRITE_CHUNK = 1 << 20
#: envelopes larger than this are sealed/opened in a worker thread
THREAD_THRESHOLD = 1 << 20


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


AuditSink = Callable[[AuditRecord], None]


class ConversationError(Exception):
    """The conversation ended abnormally: the stream closed, or a side broke the protocol."""


class Wire:
    """A Session bound to a stream, with auditing."""

    def __init__(self, session: Session, stream: Stream, audit: AuditSink) -> None:
        self.session = session
        self.stream = stream
        self.audit = audit
        self.bytes_sent = 0
        self.bytes_received = 0

    async def send(self, message: Message) -> SealedEnvelope:
        """Seal ``message``, write it, and audit it as sent."""
        if isinstance(message, TensorMessage) and sum(a.nbytes for a in message.tensors.values()) > THREAD_THRESHOLD:
            sealed = await trio.to_thread.run_sync(self.session.send, message)
        else:
            sealed = self.session.send(message)
        head, body = sealed.frame_parts()
        try:
            await self.stream.write(head)
            view = memoryview(body)
            for start in range(0, len(view), WRITE_CHUNK):
                await self.stream.write(view[start : start + WRITE_CHUNK])
        except StreamClosed as exc:
            raise ConversationError(str(exc)) from None
        self.bytes_sent += sealed.size
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
            )
        )
        return sealed

    async def receive(self) -> OpenedEnvelope | None:
        """The next verified envelope, or None when the peer closed the stream cleanly.

        Raises:
            RemoteProtocolError: the peer sent something invalid (audited as refused).
            ConversationError: the stream broke mid-message.
        """
        while True:
            try:
                # a worker thread only for a complete large frame (opening it is the heavy part):
                # while a frame is still arriving next_event is a cheap NEED_DATA, and a thread
                # hop per 64 KiB read cost more than the crypto (bench/bench_exchange.py)
                if self.session.ready_bytes > THREAD_THRESHOLD:
                    event = await trio.to_thread.run_sync(self.session.next_event)
                else:
                    event = self.session.next_event()
            except RemoteProtocolError as exc:
                self.audit(
                    AuditRecord(
                        "refused", self.stream.remote, "unknown", -1, "", 0, "", f"{exc.code.value}: {exc.message}"
                    )
                )
                raise
            if event is NEED_DATA:
                try:
                    data = await self.stream.read_some()
                except StreamClosed:
                    data = b""
                self.bytes_received += len(data)
                try:
                    self.session.receive_data(data)
                except ProtocolError as exc:
                    raise ConversationError(str(exc)) from None
                continue
            if not isinstance(event, OpenedEnvelope):
                return None
            header = event.header
            self.audit(
                AuditRecord(
                    "received",
                    self.stream.remote,
                    header.kind.value,
                    header.round,
                    header.payload_digest.hex(),
                    event.size,
                    event.signature.hex(),
                    envelope_header=event.header_bytes,
                )
            )
            return event

    async def refuse(self, error: RemoteProtocolError) -> None:
        """Tell the peer why (best effort), then reset the stream."""
        log.warning("refused envelope from %s: %s %s", self.stream.remote, error.code.value, error.message)
        await self.stream.reset()


def is_unknown_base(error: ProtocolError) -> bool:
    return error.code is ErrorCode.UNKNOWN_BASE
