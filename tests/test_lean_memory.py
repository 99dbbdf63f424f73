"""Memory a peer holds: one copy of its round's model for all its neighbours' delta bases,
and glibc tuned so that freed buffers leave the process (peer/memory.py, issue 15)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import msgpack
import numpy as np
import trio
import trio.testing
from memnet import MemoryNetwork
from test_exchange_path import make
from test_round_loop import running

from silomesh.peer import memory
from silomesh.peer.dialer import _share_exact
from silomesh.protocol import state_digest


def test_share_exact_takes_only_bitwise_equal_tensors() -> None:
    state = {"w": np.array([1.0, 2.0, 0.0], dtype=np.float32), "z": np.array([0.0, 1.0], dtype=np.float32),
             "n": np.zeros(2, dtype=np.float32), "s": np.full((), 3.0, dtype=np.float32)}
    result = {"w": np.array([1.0, 2.0, 0.0], dtype=np.float32),
              "z": np.array([-0.0, 1.0], dtype=np.float32),  # == but not bitwise: the digest would differ
              "n": np.zeros(1, dtype=np.float64),  # the same 8 bytes, another dtype and shape
              "s": np.full((), 3.0, dtype=np.float32)}
    shared = _share_exact(result, state)
    assert shared["w"] is state["w"] and shared["s"] is state["s"]
    assert shared["z"] is result["z"] and shared["n"] is result["n"]
    assert state_digest(shared) == state_digest(result)


async def test_neighbours_delta_bases_share_one_copy_of_the_round_model(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Four peers, every one the neighbour of all others, three rounds (deltas from round 1):
    what each peer keeps as its three neighbours' acknowledged bases is one model, not
    three, with float32 and with int8 updates (one delta per base, made once)."""
    for codec in ("float32", "int8"):
        net = MemoryNetwork()
        table = {"count": 3, "deadline_seconds": 30.0, "local_steps": 2, "batch_size": 8, "codec": codec}
        peers = make(tmp_path / codec, 4, net, extra={"rounds": table})
        async with running(peers):
            for p in peers:
                await p.done.wait()
            for p in peers:
                assert [r["status"] for r in await p.operator.rounds()] == ["done"] * 3
                sent = [e for e in p.store.audit_entries() if e["direction"] == "sent" and e["kind"] == "update"]
                headers = [msgpack.unpackb(bytes.fromhex(e["envelope_header"])) for e in sent]
                assert sum(1 for h in headers if h.get("base_digest")) == 6  # rounds 1 and 2 were deltas
                acked = list(p.context.bases.acked.values())
                assert len(acked) == 3
                first, *others = acked
                total = sum(a.nbytes for a in first.state.values())
                for other in others:
                    assert other.digest == first.digest
                    together = sum(a.nbytes for name, a in other.state.items()
                                   if np.shares_memory(a, first.state[name]))
                    assert together == total, (codec, together, total)


def test_lean_malloc_applies_on_glibc_and_trim_is_rate_limited(monkeypatch: object) -> None:
    libc = memory._glibc()
    if libc is None:  # musl or macOS: nothing to tune, and nothing to fail
        assert memory.lean_malloc() is False
        return
    assert memory.lean_malloc() is True
    calls: list[int] = []

    class Counting:
        def malloc_trim(self, pad: int) -> int:
            calls.append(pad)
            return 1

    monkeypatch.setattr(memory, "_glibc", lambda: Counting())  # type: ignore[attr-defined]
    monkeypatch.setattr(memory, "_last_trim", 0.0)  # type: ignore[attr-defined]
    memory.trim()
    memory.trim()  # within TRIM_EVERY of the first: skipped
    assert calls == [0]
    assert isinstance(libc, ctypes.CDLL)


def _buffer_of(arr: np.ndarray) -> object:
    """The object that owns an array's memory (through views and memoryviews)."""
    owner: object = arr
    while isinstance(owner, np.ndarray) and owner.base is not None:
        owner = owner.base
    while isinstance(owner, memoryview):
        owner = owner.obj
    return owner


async def test_a_received_snapshot_is_kept_as_views_of_its_frame(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A full snapshot is not copied out of the frame it was decrypted in: what the peer
    keeps of each neighbour (its delta base and its inbox entry) is that frame's memory."""
    net = MemoryNetwork()
    table = {"count": 1, "deadline_seconds": 30.0, "local_steps": 2, "batch_size": 8}
    peers = make(tmp_path, 3, net, extra={"rounds": table})
    async with running(peers):
        for p in peers:
            await p.done.wait()
        for p in peers:
            assert [r["status"] for r in await p.operator.rounds()] == ["done"]
            for neighbour, base in p.context.bases.received.items():
                owners = {id(_buffer_of(a)) for a in base.state.values()}
                frame = _buffer_of(next(iter(base.state.values())))
                assert isinstance(frame, bytearray) and len(owners) == 1
                model = sum(a.nbytes for a in base.state.values())
                assert model <= len(frame) < model + 4096  # the envelope's header, table and tag
                assert not any(a.flags.writeable for a in base.state.values())
                assert p.context.inbox.get(neighbour, 0).state is base.state
