"""A trusted neighbour that speaks the exchange protocol by hand (not a test module).

It sends what a real peer never would (rounds from the future, wrong digests, stalled
frames) over any :class:`~silomesh.peer.transport.Stream`: the libp2p mesh or the
in-memory transport of :mod:`memnet`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import trio

from silomesh.peer.transport import Stream, StreamClosed
from silomesh.protocol import NEED_DATA, Hello, Identity, OpenedEnvelope, Role, Session, Update, state_digest


class Neighbour:
    """One hand-driven neighbour with its own keys and sequence counter."""

    def __init__(self, seed: bytes, victim_key: bytes, federation: str, model: str = "catheter/tiny") -> None:
        self.crypto = Identity.from_seed(seed)
        self.model = model  # the model id its hello names (peers refuse another, or none)
        self.victim_key = victim_key
        self.federation = federation
        self.sequence = 0

    def seq(self) -> int:
        self.sequence += 1
        return self.sequence

    def routing(self, round: int = 0) -> dict[str, Any]:
        return {
            "federation": self.federation,
            "sender": self.crypto.public_key,
            "recipient": self.victim_key,
            "round": round,
            "sequence": self.seq(),
        }

    def session(self, *, streamed: bool = False) -> Session:
        return Session(
            Role.DIALER, identity=self.crypto, peer=self.victim_key, federation=self.federation, streamed=streamed
        )

    async def hello(
        self, stream: Stream, state_digest: bytes | None = None, *, streamed: bool = False
    ) -> tuple[Session, Hello]:
        """Exchange hellos; returns the session and the victim's hello (``streamed``: the
        session may stream envelopes, on a 1.2.0 stream)."""
        session = self.session(streamed=streamed)
        sealed = session.send(
            Hello(
                **self.routing(),
                agent="test",
                model=self.model,
                state_digest=state_digest,
                codecs=("float32",),
                max_frame_size=1 << 30,
            )
        )
        await stream.write(sealed.to_frame())
        reply = await self.next(session, stream)
        assert isinstance(reply, OpenedEnvelope) and isinstance(reply.message, Hello)
        return session, reply.message

    @staticmethod
    async def next(session: Session, stream: Stream) -> object:
        """The victim's next event (an OpenedEnvelope, or CLOSED)."""
        while (event := session.next_event()) is NEED_DATA:
            try:
                data = await stream.read_some()
            except StreamClosed:
                data = b""
            session.receive_data(data)
        return event

    def update(self, state: dict[str, np.ndarray], *, round: int = 0, **fields: Any) -> Update:
        fields.setdefault("state_digest", state_digest(state))
        return Update(**self.routing(round), tensors=state, n_samples=4, **fields)


async def ended(stream: Stream, within: float = 10.0) -> bool:
    """True if the victim reset or closed the stream (instead of answering) within ``within`` s."""
    try:
        with trio.fail_after(within):
            await stream.read_some()
    except StreamClosed:
        return True
    return False
