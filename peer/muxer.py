"""A fix for a deadlock in py-libp2p 0.8.1's Yamux: the connection's reader never waits on a write.

Why (``libp2p/stream_muxer/yamux/yamux.py``): one task per connection
(``Yamux.handle_incoming``) reads every frame off the socket. For some frames it also
writes one back, through ``Yamux._write_frame``, which holds the connection's write lock
while the socket write blocks: the ACK of a stream the other side opened, the answer to
a ping, the RST of an unknown stream. When both sides send large data at once (two
peers pushing updates to each other, the common case in a full topology) each side's
data writer can hold its write lock while blocked on a full socket; if each side's
reader then wants to write an ACK or a pong, it waits on that lock and stops reading,
so neither socket drains and both connections stop for good, silently
(``tests/test_exchange_path.py`` reproduces it: 64 MiB each way while streams open).

The fix: frames the reader writes go to a queue served by a writer task of the same
connection, so the reader never blocks on the socket. They are small control frames
(ACK, pong, RST) written in order; data frames written by the stream tasks are
unchanged. :func:`install` patches the class once; it is idempotent.

**Window updates.** py-libp2p 0.8.1's Yamux by default grants the sender a window update
for the bytes of *every* read (``PY_YAMUX_RELEASE_ON_READ=1``), however small, instead of
batching them to half the window as go-yamux does. A reader that falls behind then reads
small pieces, grants small windows, and is sent small frames: each costs a Noise message,
a syscall and a TCP segment, so it falls further behind (silly window syndrome). Over a
circuit relay, where a relayed connection's Yamux runs inside a stream of the relay's
Yamux, it never recovered: measured in the namespace test bed (three hospitals, two
behind NAT reaching each other only through the third's relay, tiny models), 2-3 rounds
in 60 s, 57-76 bytes per TCP segment and 1.6-1.9 MB unread in the relay's socket queues;
with batched updates 138 rounds, about 950 bytes per segment and empty queues, as fast
as with no relay (docs/NETWORK-NOTES.md). :func:`install` turns batching on
(``PY_YAMUX_RELEASE_ON_READ=0``) unless the environment already sets it.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
from collections.abc import Awaitable, Callable

import trio
from libp2p.stream_muxer.yamux.yamux import Yamux

log = logging.getLogger(__name__)

#: set in the reader task of a connection: where the frames it writes go
_READER_QUEUE: contextvars.ContextVar[trio.MemorySendChannel[bytes] | None] = contextvars.ContextVar(
    "silomesh_yamux_reader_queue", default=None
)
_installed = False
#: after its reader ended, how long a connection's queued control frames may take to go out
DRAIN_SECONDS = 5.0
#: py-libp2p's switch for a window update on every read (module docstring, "Window updates")
RELEASE_ON_READ = "PY_YAMUX_RELEASE_ON_READ"


async def _serve_queue(write: Callable[[bytes], Awaitable[None]], frames: trio.MemoryReceiveChannel[bytes]) -> None:
    async for frame in frames:
        try:
            await write(frame)
        except Exception:
            log.debug("yamux control frame not written", exc_info=True)
            return


def install() -> None:
    """Make every Yamux connection's reader hand its writes to a writer task (once per process)."""
    global _installed
    if _installed:
        return
    # batched window updates (see the module docstring); read by py-libp2p at every read
    os.environ.setdefault(RELEASE_ON_READ, "0")
    original_read_loop = Yamux.handle_incoming
    original_write_frame = Yamux._write_frame

    async def handle_incoming(self: Yamux) -> None:
        send, receive = trio.open_memory_channel[bytes](math.inf)  # control frames only: bounded by what arrives

        async def write(frame: bytes) -> None:
            await original_write_frame(self, frame)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve_queue, write, receive)
            token = _READER_QUEUE.set(send)  # after the writer started: only this task's context sees it
            try:
                await original_read_loop(self)
            finally:
                _READER_QUEUE.reset(token)
                send.close()  # the writer drains what is queued, then ends...
                nursery.cancel_scope.deadline = trio.current_time() + DRAIN_SECONDS  # ...or gives up

    async def write_frame(self: Yamux, data: bytes) -> None:
        queue = _READER_QUEUE.get()
        if queue is None:
            await original_write_frame(self, data)
            return
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            queue.send_nowait(data)  # fails only once the connection's writer ended: it is going away
        await trio.lowlevel.checkpoint()

    Yamux.handle_incoming = handle_incoming  # type: ignore[method-assign]
    Yamux._write_frame = write_frame  # type: ignore[method-assign]
    _installed = True
