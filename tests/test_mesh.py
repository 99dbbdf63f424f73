"""The libp2p layer: Noise only, trusted peers only, handler failures contained."""

from __future__ import annotations

import hashlib

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport

from silomesh.peer.identity import PeerIdentity
from silomesh.peer.mesh import FramedStream, Mesh, StreamClosed, open_mesh

pytestmark = pytest.mark.slow
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def _identity(name: str) -> PeerIdentity:
    return PeerIdentity.from_seed(hashlib.sha256(name.encode()).digest())


A, B, EVE = _identity("a"), _identity("b"), _identity("eve")


async def _read_exactly(stream: FramedStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        buf += await stream.read_some(n - len(buf))
    return bytes(buf)


async def _echo_upper(stream: FramedStream) -> None:
    data = await _read_exactly(stream, 5)
    await stream.write(data.upper())
    await stream.close()


def _addr(mesh: Mesh) -> str:
    return mesh.addrs[0].split("/p2p/")[0]


async def test_trusted_peers_exchange_bytes_over_the_exchange_protocol() -> None:
    with trio.fail_after(30):
        async with open_mesh(B, LOOPBACK, {A.peer_id_text: "/ip4/127.0.0.1/tcp/1"}) as b:
            b.set_handler(_echo_upper)
            async with open_mesh(A, LOOPBACK, {B.peer_id_text: _addr(b)}) as a:
                assert await a.connect(B.peer_id_text)
                stream = await a.open_stream(B.peer_id_text)
                await stream.write(b"hello")
                assert await _read_exactly(stream, 5) == b"HELLO"


async def test_untrusted_peer_is_disconnected_and_never_reaches_the_handler() -> None:
    refused: list[tuple[str, str]] = []
    served: list[str] = []
    first_refusal = trio.Event()

    def on_refused(peer: str, reason: str) -> None:
        refused.append((peer, reason))
        first_refusal.set()

    async def handler(stream: FramedStream) -> None:
        served.append(stream.remote)
        await stream.close()

    with trio.fail_after(30):
        async with open_mesh(
            B, LOOPBACK, {A.peer_id_text: "/ip4/127.0.0.1/tcp/1"}, on_refused=on_refused
        ) as b:
            b.set_handler(handler)
            # Eve trusts B, but B does not trust Eve.
            async with open_mesh(EVE, LOOPBACK, {B.peer_id_text: _addr(b)}) as eve:
                await eve.connect(B.peer_id_text)
                with pytest.raises(StreamClosed):
                    stream = await eve.open_stream(B.peer_id_text)
                    await stream.write(b"hello")
                    await _read_exactly(stream, 1)
                with trio.move_on_after(5):
                    await first_refusal.wait()
    assert served == []
    assert refused and refused[0][0] == EVE.peer_id_text
    assert b.stats.refused_connections >= 1


async def test_plaintext_only_dialer_cannot_connect() -> None:
    with trio.fail_after(30):
        async with open_mesh(B, LOOPBACK, {EVE.peer_id_text: "/ip4/127.0.0.1/tcp/1"}) as b:
            b.set_handler(_echo_upper)
            plain = new_host(
                key_pair=EVE.key_pair,
                sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(EVE.key_pair)},
                muxer_preference="YAMUX",
            )
            async with plain.run([multiaddr.Multiaddr(LOOPBACK)]):
                info = info_from_p2p_addr(multiaddr.Multiaddr(f"{_addr(b)}/p2p/{B.peer_id_text}"))
                with pytest.raises(Exception):  # noqa: B017 - any failure: no common security protocol
                    with trio.fail_after(10):
                        await plain.connect(info)
            assert EVE.peer_id_text not in b.connected


async def test_failing_handler_is_contained_and_host_keeps_serving() -> None:
    calls = 0

    async def flaky(stream: FramedStream) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("bug in a handler")
        await _echo_upper(stream)

    with trio.fail_after(30):
        async with open_mesh(B, LOOPBACK, {A.peer_id_text: "/ip4/127.0.0.1/tcp/1"}) as b:
            b.set_handler(flaky)
            async with open_mesh(A, LOOPBACK, {B.peer_id_text: _addr(b)}) as a:
                assert await a.connect(B.peer_id_text)
                with pytest.raises(StreamClosed):  # the failed handler reset the stream
                    first = await a.open_stream(B.peer_id_text)
                    await first.write(b"first")
                    await _read_exactly(first, 1)
                second = await a.open_stream(B.peer_id_text)
                await second.write(b"again")
                assert await _read_exactly(second, 5) == b"AGAIN"
            assert b.stats.handler_errors == 1


async def test_any_stream_error_of_libp2p_is_a_closed_stream_for_the_peer() -> None:
    from libp2p.network.stream.exceptions import StreamError

    class Broken:
        async def read(self, n: int) -> bytes:
            raise StreamError("connection reset by peer")

        async def write(self, data: bytes) -> None:
            raise StreamError("connection reset by peer")

    stream = FramedStream(Broken(), "12D3KooWremote")  # type: ignore[arg-type]
    with pytest.raises(StreamClosed, match="StreamError"):
        await stream.write(b"x")
    with pytest.raises(StreamClosed, match="StreamError"):
        await stream.read_some()
