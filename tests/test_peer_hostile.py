"""A running peer refuses tampered, replayed and oversized frames and keeps serving."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trio
from handkit import Neighbour
from peerkit import configs

from silomesh.peer.daemon import Peer
from silomesh.peer.mesh import StreamClosed, open_mesh
from silomesh.peer.transport import Stream
from silomesh.protocol import Ack, ErrorMessage, OpenedEnvelope, ProtocolError, Session, encode_offer

pytestmark = pytest.mark.slow


async def _refused(session: Session, stream: Stream) -> str:
    """The code of the victim's signed ``error``, or "reset" if it ended the stream without one."""
    try:
        with trio.fail_after(10):
            event = await Neighbour.next(session, stream)
    except (ProtocolError, StreamClosed):
        return "reset"
    if isinstance(event, OpenedEnvelope) and isinstance(event.message, ErrorMessage):
        return str(event.message.code)
    return "answered"


async def _answer(stream: Stream) -> int:
    """The victim's answer to a streamed envelope's prelude (PROTOCOL.md 4.2)."""
    data = b""
    with trio.fail_after(10):
        while len(data) < 4:
            data += await stream.read_some(4 - len(data))
    return int.from_bytes(data, "big")


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
                session, _ = await neighbour.hello(stream)
                valid_frame = session.send(neighbour.update(state)).to_frame()
                await stream.write(valid_frame)
                reply = await neighbour.next(session, stream)
                assert isinstance(reply, OpenedEnvelope) and isinstance(reply.message, Ack)

                # 2. the same frame replayed on a new stream is refused, and the (authentic)
                #    sender is told why
                stream = await mesh.open_stream(ids[0].peer_id_text)
                session, _ = await neighbour.hello(stream)
                session.send(neighbour.update(state))  # our side awaits a reply; the wire gets the old frame
                await stream.write(valid_frame)
                assert await _refused(session, stream) == "REPLAY"

                # 3. one flipped ciphertext byte is refused (the signed header is intact: told why)
                stream = await mesh.open_stream(ids[0].peer_id_text)
                session, _ = await neighbour.hello(stream)
                tampered = bytearray(session.send(neighbour.update(state)).to_frame())
                tampered[-10] ^= 0xFF
                await stream.write(bytes(tampered))
                assert await _refused(session, stream) == "DIGEST_MISMATCH"

                # 4. a length prefix far above the limit is refused before any body arrives,
                #    without a word (nothing authenticated). (0xFFFFFFFF itself starts an offer
                #    on the resumable stream this mesh negotiates, PROTOCOL.md 4.1: case 4b.)
                assert stream.resumable
                stream = await mesh.open_stream(ids[0].peer_id_text)
                session, _ = await neighbour.hello(stream)
                session.send(neighbour.update(state))
                await stream.write((0xFFFFFFF0).to_bytes(4, "big"))
                assert await _refused(session, stream) == "reset"

                # 4b. so is an offer of a frame above the limit, at the offer
                stream = await mesh.open_stream(ids[0].peer_id_text)
                session, _ = await neighbour.hello(stream)
                session.send(neighbour.update(state))
                await stream.write(encode_offer(b"\x07" * 32, 0xFFFFFFF0, 0xFFFFFFFE))
                assert await _refused(session, stream) == "reset"

                # 4c. on the 1.2.0 stream this mesh negotiates, a streamed update (PROTOCOL.md 4.2)
                #     is acknowledged; one with a flipped chunk byte is refused as the chunk
                #     arrives, without a word (the header comes last: nothing is authenticated);
                #     so is a prelude announcing more than the frame limit
                assert stream.streamed
                stream = await mesh.open_stream(ids[0].peer_id_text)
                session, _ = await neighbour.hello(stream, streamed=True)
                sealer = session.send_streamed(neighbour.update(state))
                await stream.write(sealer.prelude)
                assert await _answer(stream) == 0  # the chunks it holds from an earlier stream
                await stream.write(b"".join(sealer.chunks()) + sealer.trailer)
                reply = await neighbour.next(session, stream)
                assert isinstance(reply, OpenedEnvelope) and isinstance(reply.message, Ack)
                stream = await mesh.open_stream(ids[0].peer_id_text)
                session, _ = await neighbour.hello(stream, streamed=True)
                sealer = session.send_streamed(neighbour.update(state))
                chunks = bytearray(b"".join(sealer.chunks()))
                chunks[len(chunks) // 2] ^= 0x01
                await stream.write(sealer.prelude)
                assert await _answer(stream) == 0
                await stream.write(bytes(chunks) + sealer.trailer)
                assert await _refused(session, stream) == "reset"
                stream = await mesh.open_stream(ids[0].peer_id_text)
                session, _ = await neighbour.hello(stream, streamed=True)
                session.send(neighbour.update(state))
                await stream.write((0xFFFFFFFE).to_bytes(4, "big") + (0xFFFFFFF0).to_bytes(4, "big") + bytes(24))
                assert await _refused(session, stream) == "reset"

                # 5. the peer still serves: a fresh, valid update is acknowledged
                stream = await mesh.open_stream(ids[0].peer_id_text)
                session, _ = await neighbour.hello(stream)
                await stream.write(session.send(neighbour.update(state)).to_frame())
                reply = await neighbour.next(session, stream)
                assert isinstance(reply, OpenedEnvelope) and isinstance(reply.message, Ack)

            reasons = [e["reason"] for e in victim.audit_log.entries() if e["direction"] == "refused"]
            nursery.cancel_scope.cancel()
    assert any(r.startswith("REPLAY") for r in reasons), reasons
    assert any(r.startswith("DIGEST_MISMATCH") for r in reasons), reasons
    assert any(r.startswith("DECRYPT_FAILED") for r in reasons), reasons
    assert sum(r.startswith("TOO_LARGE") for r in reasons) >= 3, reasons
