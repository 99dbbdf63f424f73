"""A running peer refuses tampered, replayed and oversized frames and keeps serving."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import trio
from peerkit import configs

from silomesh.peer.daemon import Peer
from silomesh.peer.mesh import FramedStream, StreamClosed, open_mesh
from silomesh.protocol import NEED_DATA, Ack, Hello, Identity, OpenedEnvelope, Role, Session, Update, state_digest

pytestmark = pytest.mark.slow


class Neighbour:
    """A trusted neighbour speaking the protocol by hand, to send what a peer never would."""

    def __init__(self, seed: bytes, victim_key: bytes, federation: str) -> None:
        self.crypto = Identity.from_seed(seed)
        self.victim_key = victim_key
        self.federation = federation
        self.sequence = 0

    def seq(self) -> int:
        self.sequence += 1
        return self.sequence

    async def hello(self, stream: FramedStream) -> Session:
        session = Session(Role.DIALER, identity=self.crypto, peer=self.victim_key, federation=self.federation)
        sealed = session.send(
            Hello(
                federation=self.federation,
                sender=self.crypto.public_key,
                recipient=self.victim_key,
                round=0,
                sequence=self.seq(),
                agent="test",
                model="",
                state_digest=None,
                codecs=("float32",),
                max_frame_size=1 << 30,
            )
        )
        await stream.write(sealed.to_frame())
        assert isinstance(await self.next(session, stream), OpenedEnvelope)
        return session

    async def next(self, session: Session, stream: FramedStream) -> object:
        while (event := session.next_event()) is NEED_DATA:
            session.receive_data(await stream.read_some())
        return event

    def update(self, state: dict[str, np.ndarray]) -> Update:
        return Update(
            federation=self.federation,
            sender=self.crypto.public_key,
            recipient=self.victim_key,
            round=0,
            sequence=self.seq(),
            tensors=state,
            n_samples=4,
            state_digest=state_digest(state),
        )


async def _refused(stream: FramedStream) -> bool:
    """True if the victim reset or closed the stream instead of answering."""
    try:
        with trio.fail_after(10):
            await stream.read_some()
    except StreamClosed:
        return True
    return False


async def test_tampered_replayed_and_oversized_frames_are_refused_and_peer_keeps_serving(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    ids, cfgs = configs(tmp_path, 2, rounds=1)
    victim = Peer(cfgs[0], identity=ids[0], serve_control_api=False)
    neighbour = Neighbour(ids[1].seed, ids[0].public_key, cfgs[0].federation)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(victim.run)
            state = {k: v.copy() for k, v in victim.learner.state().items()}
            addr = victim.transport.addrs[0].split("/p2p/")[0]
            async with open_mesh(ids[1], "/ip4/127.0.0.1/tcp/0", {ids[0].peer_id_text: addr}) as mesh:
                assert await mesh.connect(ids[0].peer_id_text)

                # 1. a valid update is acknowledged; keep its frame to replay it
                stream = await mesh.open_stream(ids[0].peer_id_text)
                session = await neighbour.hello(stream)
                valid_frame = session.send(neighbour.update(state)).to_frame()
                await stream.write(valid_frame)
                reply = await neighbour.next(session, stream)
                assert isinstance(reply, OpenedEnvelope) and isinstance(reply.message, Ack)

                # 2. the same frame replayed on a new stream is refused
                stream = await mesh.open_stream(ids[0].peer_id_text)
                await neighbour.hello(stream)
                await stream.write(valid_frame)
                assert await _refused(stream)

                # 3. one flipped ciphertext byte is refused
                stream = await mesh.open_stream(ids[0].peer_id_text)
                session = await neighbour.hello(stream)
                tampered = bytearray(session.send(neighbour.update(state)).to_frame())
                tampered[-10] ^= 0xFF
                await stream.write(bytes(tampered))
                assert await _refused(stream)

                # 4. a length prefix far above the limit is refused before any body arrives
                stream = await mesh.open_stream(ids[0].peer_id_text)
                await neighbour.hello(stream)
                await stream.write((0xFFFFFFFF).to_bytes(4, "big"))
                assert await _refused(stream)

                # 5. the peer still serves: a fresh, valid update is acknowledged
                stream = await mesh.open_stream(ids[0].peer_id_text)
                session = await neighbour.hello(stream)
                await stream.write(session.send(neighbour.update(state)).to_frame())
                reply = await neighbour.next(session, stream)
                assert isinstance(reply, OpenedEnvelope) and isinstance(reply.message, Ack)

            reasons = [e["reason"] for e in victim.audit_log.entries() if e["direction"] == "refused"]
            nursery.cancel_scope.cancel()
    assert any(r.startswith("REPLAY") for r in reasons), reasons
    assert any(r.startswith("DIGEST_MISMATCH") for r in reasons), reasons
    assert any(r.startswith("TOO_LARGE") for r in reasons), reasons
