"""Benchmark: one model update between two peers, vs raw libp2p and vs a plain TCP socket.

Prints one JSON object. Not a test: the ratios are measured in one run on one machine,
the three transfers interleaved (one of each per repetition) and the best of N kept.
Each transfer also records the process CPU seconds it took (both peers, every thread):
``cpu_ratios`` compare medians, the cost of an update to the machine beyond the transfer.

    .venv/bin/python bench/bench_exchange.py [--mb 50] [--repeats 5] [--memory-peers 4,20]

What is timed (all in one process, both ends on 127.0.0.1, one trio loop):

* ``push_update_full`` / ``push_update_delta``: ``silomesh.peer.dialer.push_update``
  from peer A to peer B, two real :class:`~silomesh.peer.daemon.Peer` objects (store,
  audit log, mesh, handlers) whose model is a float32 U-Net of ``--mb`` MB. From the
  call to its return, which is after B's ``Ack`` arrived, so it covers everything the
  daemon does per update: open a stream on the existing connection, hello both ways,
  (delta: ``new - base``, ``base + delta`` and the digest of the result), seal (codec +
  XSalsa20-Poly1305 + BLAKE2b + Ed25519) in a worker thread, writing in
  ``exchange.WRITE_CHUNK`` pieces, B's 256 KiB reads into the frame decoder, open
  (verify + decrypt + decode) in a worker thread, reconstruction (copy, base + delta,
  digest check against the announced state), B's inbox, B's audit-log appends and
  neighbour row (SQLite, synchronous=FULL), the Ack back, and A's audit appends.
  Writing the *received* model to B's model store is not part of an update: a peer
  only writes the model it aggregates, once per round (``commit_round``), so it is not
  timed here. ``full`` sends a snapshot (no acknowledged base); ``delta`` sends
  ``new - base`` against the last acknowledged model, as every round after a peer's
  first does (same float32 size on the wire). Each is timed twice: sealed whole
  (section 5; offered on the 1.2.0 stream) and ``_streamed`` (section 4.2: sealed and
  opened in 64 KiB chunks while they travel, as the peer streams updates of
  ``[network] stream_threshold_mb`` or more).
* ``raw_libp2p``: the same number of bytes over a stream of a second pair of hosts from
  ``silomesh.peer.mesh.open_mesh`` (Noise + Yamux, the same configuration): a new
  stream, an 8-byte length, the payload written with ``INetStream.write`` in chunks of
  ``--raw-chunk`` (default the Wire's chunk), the receiver reading 256 KiB at a time,
  then a 1-byte acknowledgement back.
* ``trio_tcp``: the same bytes over ``trio.open_tcp_stream`` to a ``trio.serve_tcp``
  handler reading 256 KiB at a time, then a 1-byte acknowledgement back.

``components`` times, on the same state, the pieces of protocol work the update adds on
top of the transfer (single-threaded, outside the peers), to show where the overhead is.

``idle_peer_memory``: RSS growth per extra idle peer, from two fresh subprocesses that
start K1 and K2 peers (a ring, every peer connected to its two neighbours, control API
on, participation ``manual`` so no round runs, a tiny model and one shared tiny data
silo) and read ``VmRSS`` after the mesh settled: ``(RSS(K2) - RSS(K1)) / (K2 - K1)``
minus one peer's model weights.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

if TYPE_CHECKING:  # for annotations only; the benchmarks import silomesh where they use it
    from silomesh.peer.identity import PeerIdentity
    from silomesh.peer.mesh import FramedStream, Mesh

RAW_PROTOCOL = "/silomesh-bench/raw/1.0.0"
READ = 256 * 1024
TINY_CATHETER = {"image_size": 32, "n_train": 16, "n_test": 8, "n_test_source": 8}


# --------------------------------------------------------------------------- helpers


def _identity(name: str) -> PeerIdentity:
    from silomesh.peer.identity import PeerIdentity

    return PeerIdentity.from_seed(hashlib.sha256(f"silomesh-bench-{name}".encode()).digest())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _configs(
    root: Path, n: int, options: dict[str, Any], ports: list[int] | None = None
) -> tuple[list[Any], list[Any]]:
    """Identities and configs of ``n`` idle peers (participation manual) on a ring.

    ``ports``: their listening ports (default: free ones), for peers in several processes.
    """
    from silomesh.peer.config import parse_config

    ids = [_identity(f"p{i}") for i in range(n)]
    ports = ports or [_free_port() for _ in range(n)]
    graph = [[1 - i] for i in range(n)] if n == 2 else [sorted({(i - 1) % n, (i + 1) % n}) for i in range(n)]
    cfgs = []
    for i in range(n):
        raw = {
            "federation": "bench",
            "key_file": "peer.key",
            "listen": f"/ip4/127.0.0.1/tcp/{ports[i]}",
            "data_dir": str(root / f"p{i}"),
            "participation": "manual",
            "task": {"name": "catheter", "size": "tiny", "options": {"silos": 2, "silo": 0, "seed": 0, **options}},
            "rounds": {"count": 0, "deadline_seconds": 600, "local_steps": 1},
            "control": {"port": 0},
            "trusted": [
                {"peer_id": ids[j].peer_id_text, "address": f"/ip4/127.0.0.1/tcp/{ports[j]}", "name": f"p{j}"}
                for j in graph[i]
            ],
        }
        cfgs.append(parse_config(raw, root))
    return ids, cfgs


def _unet_width(target_bytes: int) -> int:
    """Width of a 3-level 2D U-Net whose float32 weights are closest to ``target_bytes``."""
    import torch

    from silomesh.models.unet import UNet, UNetConfig

    def size(w: int) -> int:
        with torch.device("meta"):  # shapes only: no memory for a 400 MB candidate
            return sum(p.numel() for p in UNet(UNetConfig(width=w, depth=3, out_channels=3)).parameters()) * 4

    # parameters grow ~ width^2: start from the width-16 size and refine locally
    w = max(4, round(16 * (target_bytes / size(16)) ** 0.5))
    return min(range(max(4, w - 3), w + 4), key=lambda k: abs(size(k) - target_bytes))


def _best(times: list[float]) -> dict[str, float]:
    return {"best_s": round(min(times), 4), "median_s": round(float(np.median(times)), 4)}


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


# --------------------------------------------------------------------------- transfers


async def raw_receive(stream: FramedStream) -> None:
    """The receiving end of one raw transfer: an 8-byte length, the payload, a 1-byte answer."""
    head = b""
    while len(head) < 8:
        head += await stream.read_some(8 - len(head))
    want, got = int.from_bytes(head, "big"), 0
    while got < want:
        got += len(await stream.stream.read(min(READ, want - got)))
    await stream.stream.write(b"k")
    await stream.close()


async def raw_send(mesh: Mesh, peer_id: str, payload: memoryview, chunk: int) -> None:
    """One raw transfer to ``peer_id`` on a new stream, written ``chunk`` bytes at a time."""
    from libp2p.custom_types import TProtocol

    framed = await mesh.open_stream(peer_id, TProtocol(RAW_PROTOCOL))
    stream = framed.stream
    await stream.write(len(payload).to_bytes(8, "big"))
    for start in range(0, len(payload), chunk):
        await stream.write(bytes(payload[start : start + chunk]))
    assert await stream.read(1) == b"k"
    await framed.close()


async def _raw_pair(nursery: trio.Nursery) -> Callable[[memoryview, int], Awaitable[None]]:
    """Two hosts from open_mesh; returns ``send(payload, chunk)`` timing one raw transfer."""
    from libp2p.custom_types import TProtocol

    from silomesh.peer.mesh import open_mesh

    a, b = _identity("raw-a"), _identity("raw-b")
    pa, pb = _free_port(), _free_port()
    addr = {a.peer_id_text: f"/ip4/127.0.0.1/tcp/{pa}", b.peer_id_text: f"/ip4/127.0.0.1/tcp/{pb}"}
    meshes: dict[str, Mesh] = {}
    ready = trio.Event()

    async def serve(ident: PeerIdentity, port: int, other: PeerIdentity) -> None:
        async with open_mesh(
            ident, f"/ip4/127.0.0.1/tcp/{port}", {other.peer_id_text: addr[other.peer_id_text]}
        ) as mesh:
            meshes[ident.peer_id_text] = mesh
            if len(meshes) == 2:
                ready.set()
            await trio.sleep_forever()

    nursery.start_soon(serve, a, pa, b)
    nursery.start_soon(serve, b, pb, a)
    await ready.wait()
    sender, receiver = meshes[a.peer_id_text], meshes[b.peer_id_text]
    receiver.set_handler(raw_receive, TProtocol(RAW_PROTOCOL))
    assert await sender.connect(b.peer_id_text)

    async def send(payload: memoryview, chunk: int) -> None:
        await raw_send(sender, b.peer_id_text, payload, chunk)

    return send


async def _tcp_pair(nursery: trio.Nursery) -> Callable[[memoryview], Awaitable[None]]:
    async def handler(stream: trio.SocketStream) -> None:
        head = b""
        while len(head) < 8:
            head += await stream.receive_some(8 - len(head))
        want, got = int.from_bytes(head, "big"), 0
        while got < want:
            got += len(await stream.receive_some(min(READ, want - got)))
        await stream.send_all(b"k")
        await stream.aclose()

    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    port = listeners[0].socket.getsockname()[1]

    async def send(payload: memoryview) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(len(payload).to_bytes(8, "big"))
        await stream.send_all(payload)
        assert await stream.receive_some(1) == b"k"
        await stream.aclose()

    return send


def _components(state: dict[str, np.ndarray], base: dict[str, np.ndarray], repeats: int) -> dict[str, Any]:
    """The protocol work of one update, piece by piece, single-threaded."""
    from silomesh.protocol import (
        Identity,
        StreamOpener,
        Update,
        apply_delta,
        make_delta,
        open_envelope,
        seal_envelope,
        seal_streamed,
        state_digest,
    )

    alice, bob = Identity.from_seed(bytes(range(32))), Identity.from_seed(bytes(range(1, 33)))
    delta = make_delta(state, base)
    msg = Update(
        federation="bench",
        sender=alice.public_key,
        recipient=bob.public_key,
        round=1,
        sequence=1,
        tensors=delta,
        n_samples=1,
        base_digest=bytes(32),
        state_digest=bytes(32),
    )
    envelope = seal_envelope(msg, alice).to_bytes()
    sealer = seal_streamed(msg, alice)
    chunks = list(sealer.chunks())

    def seal_chunks() -> None:  # encode, encrypt and digest every chunk, then sign the trailer
        s = seal_streamed(msg, alice)
        for _ in s.chunks():
            pass
        s.trailer  # noqa: B018 - signs the header

    def open_chunks() -> None:  # authenticate, decrypt and digest every chunk (the receiver's part)
        opener = StreamOpener(bob.shared_key(alice.public_key), sealer.stream_header, sealer.payload_len)
        for c in chunks:
            opener.open_chunk(c)
        opener.result()

    def timed(fn: Callable[..., Any], setup: Callable[[], Any] | None = None) -> dict[str, float]:
        times = []
        for _ in range(repeats):
            args = (setup(),) if setup else ()
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)
        return _best(times)

    return {
        "state_digest": timed(lambda: state_digest(state)),
        "make_delta": timed(lambda: make_delta(state, base)),
        "apply_delta": timed(lambda: apply_delta(base, delta)),
        "seal_envelope": timed(lambda: seal_envelope(msg, alice)),
        "open_envelope": timed(
            lambda buf: open_envelope(
                buf,
                identity=bob,
                federation="bench",
                trusted={alice.public_key},
                in_place=True,
            ),
            setup=lambda: bytearray(envelope),
        ),
        "copy_arrays": timed(lambda: {k: np.array(v) for k, v in state.items()}),
        "seal_streamed_chunks": timed(seal_chunks),
        "open_streamed_chunks": timed(open_chunks),
    }


async def exchange(mb: float, repeats: int, raw_chunks: list[int]) -> dict[str, Any]:
    """Time push_update, raw libp2p and trio TCP transfers of the same size, interleaved."""
    import torch

    from silomesh.models.unet import UNet, UNetConfig
    from silomesh.peer.daemon import Peer
    from silomesh.peer.dialer import UpdateMaker, push_update
    from silomesh.peer.exchange import WRITE_CHUNK
    from silomesh.peer.learner import synthetic_silo

    torch.set_num_threads(1)
    width = _unet_width(int(mb * 1e6))
    pushes = ("push_update_full", "push_update_delta", "push_update_full_streamed", "push_update_delta_streamed")
    results: dict[str, list[float]] = {name: [] for name in (*pushes, "trio_tcp")}
    results.update({f"raw_libp2p_chunk_{c}": [] for c in raw_chunks})
    cpu: dict[str, list[float]] = {name: [] for name in results}

    @contextlib.contextmanager
    def clock(name: str) -> Iterator[None]:
        """Wall and process CPU seconds (every thread: the loop's and the workers') of the block."""
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        results[name].append(time.perf_counter() - t0)
        cpu[name].append(time.process_time() - c0)

    with tempfile.TemporaryDirectory(prefix="silomesh-bench-") as tmp:
        ids, cfgs = _configs(Path(tmp), 2, TINY_CATHETER)
        silo = synthetic_silo("catheter", 2, 0, 0, **TINY_CATHETER)
        a, b = (Peer(c, identity=i, silo=silo, serve_control_api=False) for i, c in zip(ids, cfgs, strict=True))
        async with trio.open_nursery() as nursery:
            for p in (a, b):
                await nursery.start(p.run)
            # the configured task has no 50 MB model: give both learners a wide U-Net
            big = UNet(UNetConfig(width=width, depth=3, out_channels=3))
            for p in (a, b):
                p.learner.model = big
            rng = np.random.default_rng(0)
            base = {k: v.detach().numpy().copy() for k, v in big.state_dict().items()}
            nbytes = sum(v.nbytes for v in base.values())
            states = [
                {k: v + rng.standard_normal(v.shape, np.float32) * np.float32(1e-3) for k, v in base.items()}
                for _ in range(2)
            ]
            payload = np.concatenate([v.ravel() for v in base.values()]).view(np.uint8).data
            raw_send = await _raw_pair(nursery)
            tcp_send = await _tcp_pair(nursery)
            assert await a.transport.connect(b.peer_id)

            # warm-up: first connection use, thread pool, first full snapshot
            await push_update(a.context, b.peer_id, UpdateMaker(a.context, 0, states[0], {}))
            for c in raw_chunks:
                await raw_send(payload, c)
            await tcp_send(payload)
            for r in range(repeats):
                for suffix, threshold in (("", 0), ("_streamed", 1)):
                    object.__setattr__(a.context.endpoint, "stream_threshold", threshold)  # a bench knob
                    a.context.bases.acked.pop(b.peer_id, None)
                    with clock(f"push_update_full{suffix}"):
                        await push_update(a.context, b.peer_id, UpdateMaker(a.context, 0, states[r % 2], {}))
                    assert b.peer_id in a.context.bases.acked
                    with clock(f"push_update_delta{suffix}"):
                        delta = UpdateMaker(a.context, 0, states[(r + 1) % 2], {})
                        await push_update(a.context, b.peer_id, delta)  # a delta against the ack
                    assert b.context.inbox.get(a.peer_id, 0).state.keys() == base.keys()
                for c in raw_chunks:
                    with clock(f"raw_libp2p_chunk_{c}"):
                        await raw_send(payload, c)
                with clock("trio_tcp"):
                    await tcp_send(payload)
            need_base = [e for e in b.audit_log.entries() if e["kind"] == "need-base"]
            assert not need_base, "a delta was not understood: the receiver asked for a base"
            nursery.cancel_scope.cancel()
        components = await trio.to_thread.run_sync(_components, states[0], base, repeats)

    def mbps(name: str) -> float:
        return round(nbytes / min(results[name]) / 1e6, 1)

    raw_name = min((f"raw_libp2p_chunk_{c}" for c in raw_chunks), key=lambda n: min(results[n]))
    raw = min(results[raw_name])
    out: dict[str, Any] = {
        "state_bytes": nbytes,
        "tensors": len(base),
        "unet_width": width,
        "wire_write_chunk": WRITE_CHUNK,
        "repeats": repeats,
        "transfers": {
            name: {**_best(t), "MBps": mbps(name), "cpu_best_s": round(min(cpu[name]), 4),
                   "cpu_median_s": round(float(np.median(cpu[name])), 4)}
            for name, t in results.items()
        },
        "raw_libp2p_baseline": raw_name,
        "ratios": {
            **{f"{name}_vs_raw_libp2p": round(min(results[name]) / raw, 3) for name in pushes},
            "raw_libp2p_vs_trio_tcp": round(raw / min(results["trio_tcp"]), 2),
            "push_update_delta_vs_trio_tcp": round(min(results["push_update_delta"]) / min(results["trio_tcp"]), 2),
        },
        # CPU of the whole process (both peers, every thread), medians: what a push costs a
        # machine beyond the transfer, which the wall-clock ratios hide when worker threads overlap
        "cpu_ratios": {
            f"{name}_vs_raw_libp2p": round(float(np.median(cpu[name]) / np.median(cpu[raw_name])), 3)
            for name in pushes
        },
        "components": {k: {**v, "MBps": round(nbytes / v["best_s"] / 1e6, 1)} for k, v in components.items()},
    }
    overhead = {k: round((out["ratios"][f"{k}_vs_raw_libp2p"] - 1) * 100, 1) for k in pushes}
    out["overhead_vs_raw_libp2p_pct"] = overhead
    # the first target (25 %) was for updates sealed whole; the lean-peers issue asks 15 % of a streamed one
    out["target_overhead_pct"] = {"whole": 25.0, "streamed": 15.0}
    out["target_met"] = {
        "whole": all(overhead[k] <= 25.0 for k in pushes if not k.endswith("_streamed")),
        "streamed": all(overhead[k] <= 15.0 for k in pushes if k.endswith("_streamed")),
    }
    return out


# --------------------------------------------------------------------------- idle memory


async def _idle_peers(k: int, settle: float) -> dict[str, Any]:
    """Start ``k`` idle peers on a ring; RSS once every peer is connected and settled."""
    import torch

    from silomesh.peer.daemon import Peer
    from silomesh.peer.learner import synthetic_silo

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="silomesh-bench-mem-") as tmp:
        ids, cfgs = _configs(Path(tmp), k, TINY_CATHETER)
        silo = synthetic_silo("catheter", 2, 0, 0, **TINY_CATHETER)  # one shared, tiny data silo
        peers = [Peer(c, identity=i, silo=silo) for i, c in zip(ids, cfgs, strict=True)]
        gc.collect()
        before = _rss_bytes()
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for p in peers:
                    await nursery.start(p.run)
                while not all(set(p.context.trust) <= p.transport.connected for p in peers):  # noqa: ASYNC110 - no such event
                    await trio.sleep(0.1)
                await trio.sleep(settle)  # a few gossipsub heartbeats
                gc.collect()
                rss = _rss_bytes()
                weights = sum(v.nbytes for v in peers[0].learner.state().values())
                nursery.cancel_scope.cancel()
    return {"peers": k, "rss_bytes": rss, "rss_before_peers_bytes": before, "model_weights_bytes": weights}


def idle_memory(counts: tuple[int, int], settle: float) -> dict[str, Any]:
    """Per-peer RSS growth from two fresh subprocesses with K1 and K2 idle peers."""
    runs = []
    for k in counts:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(k), "--settle", str(settle)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"memory child with {k} peers failed:\n{proc.stderr[-3000:]}")
        runs.append(json.loads(proc.stdout))
    k1, k2 = runs
    per_peer = (k2["rss_bytes"] - k1["rss_bytes"]) / (k2["peers"] - k1["peers"])
    return {
        "method": "(RSS(K2) - RSS(K1)) / (K2 - K1), fresh subprocess each, ring of idle peers with "
        "control API, minus one peer's model weights",
        "runs": runs,
        "per_peer_rss_growth_bytes": round(per_peer),
        "per_peer_excluding_weights_bytes": round(per_peer - k2["model_weights_bytes"]),
        "per_peer_excluding_weights_MiB": round((per_peer - k2["model_weights_bytes"]) / 2**20, 2),
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    """Run the benchmark and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50.0, help="update size in MB (float32 U-Net weights)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--raw-chunk",
        type=int,
        action="append",
        default=None,
        help="write size(s) for the raw libp2p transfer (default: the Wire's chunk)",
    )
    parser.add_argument("--memory-peers", default="4,20", help="K1,K2 idle peers for the memory figure")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds idle peers run before RSS is read")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.ERROR)
    for noisy in ("libp2p", "multiaddr", "async_service"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    if args.memory_child:
        print(json.dumps(trio.run(_idle_peers, args.memory_child, args.settle)))
        return

    from silomesh.peer.exchange import WRITE_CHUNK

    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    result["exchange"] = trio.run(exchange, args.mb, args.repeats, args.raw_chunk or [WRITE_CHUNK])
    if not args.skip_memory:
        k1, k2 = (int(x) for x in args.memory_peers.split(","))
        result["idle_peer_memory"] = idle_memory((k1, k2), args.settle)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
