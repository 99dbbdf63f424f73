"""Benchmark: a big model (default 100M parameters, 400 MB in float32) exchanged between two peers.

Each peer is a real :class:`~silomesh.peer.daemon.Peer` (store, audit log, libp2p host) in its
own process, so that each one's memory is its own. Both hold a wide float32 U-Net of about
``--mb`` MB (seeded differently) and send it to the other as a full snapshot
(``push_update``: seal, write in chunks, the other's open, reconstruction, inbox and ack), at
the same time (``--order simultaneous``, as in a round) or one after the other
(``--order sequential``). The state sent is the model's own tensors (numpy views of the torch
parameters), so a peer holds its model once before the exchange.

Measured in each process: RSS before the model was made (interpreter, torch, libp2p, the
peer), after, and the peak (``VmHWM``, reset with ``/proc/self/clear_refs`` just before the
exchange), and the exchange's wall time. ``peak_over_model`` is the peak RSS less the RSS
before the model, divided by the model's bytes: the issue's goal is <= 2.5 (the model, the
neighbour's model it receives, and at most half a model of buffers). Each receiver checks that
the state it got has the digest the sender computed. Prints one JSON document (``--out FILE``
also writes it)::

    python bench/bench_big.py                       # 400 MB, simultaneous
    python bench/bench_big.py --mb 50 --order sequential
    python bench/bench_big.py --whole               # sealed whole, as before streaming

By default the update travels streamed (PROTOCOL.md section 4.2: sealed and opened in 64 KiB
chunks, as the peer does for updates of ``[network] stream_threshold_mb`` = 1 MB or more);
``--whole`` seals it as one envelope (``stream_threshold_mb = 0``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_exchange  # noqa: E402  (the peers' configs and the U-Net width)


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _wait_file(path: Path, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end:
            raise TimeoutError(f"no {path.name} after {timeout} s")
        time.sleep(0.05)


async def child(args: argparse.Namespace) -> dict[str, Any]:
    """One peer: make the model, exchange it with the other, measure."""
    import gc

    import numpy as np
    import torch
    import trio

    from silomesh.models.unet import UNet, UNetConfig
    from silomesh.peer.daemon import Peer
    from silomesh.peer.dialer import UpdateMaker, push_update
    from silomesh.peer.learner import synthetic_silo
    from silomesh.peer.transfers import BufferBudget
    from silomesh.protocol import state_digest

    torch.set_num_threads(1)
    root = Path(args.root)
    me, other = args.child_index, 1 - args.child_index
    ports = json.loads((root / "ports.json").read_text())
    ids, cfgs = bench_exchange._configs(root, 2, bench_exchange.TINY_CATHETER, ports=ports)
    silo = synthetic_silo("catheter", 2, 0, 0, **bench_exchange.TINY_CATHETER)
    peer = Peer(cfgs[me], identity=ids[me], silo=silo, serve_control_api=False)
    out: dict[str, Any] = {"peer": me}
    with trio.fail_after(args.timeout):
        async with trio.open_nursery() as nursery:
            await nursery.start(peer.run)
            gc.collect()
            out["rss_before_model_bytes"] = _status("VmRSS")
            torch.manual_seed(100 + me)
            model = UNet(UNetConfig(width=args.width, depth=3, out_channels=3))
            peer.learner.model = model
            state = {k: v.detach().numpy() for k, v in model.state_dict().items()}  # views: one copy
            out["model_bytes"] = sum(v.nbytes for v in state.values())
            out["tensors"] = len(state)
            # the peer sized its receive budget for the configured (tiny) model: size it for this one
            fresh = BufferBudget.for_model(out["model_bytes"])
            budget = peer.context.endpoint.budget
            assert budget is not None
            budget.per_peer, budget.total = fresh.per_peer, fresh.total
            peer.context.endpoint.transfers.max_bytes = fresh.total
            if args.whole:
                object.__setattr__(peer.context.endpoint, "stream_threshold", 0)
            out["stream_threshold"] = peer.context.endpoint.stream_threshold
            digest = state_digest(state)
            (root / f"digest{me}").write_text(digest.hex())
            gc.collect()
            out["rss_with_model_bytes"] = _status("VmRSS")
            other_id = ids[other].peer_id_text
            while other_id not in peer.transport.connected:
                await peer.transport.connect(other_id)
                await trio.sleep(0.2)
            (root / f"ready{me}").touch()
            await trio.to_thread.run_sync(_wait_file, root / f"ready{other}", args.timeout)
            _reset_peak()
            t0 = time.perf_counter()
            if args.order == "sequential" and me == 1:
                while peer.context.inbox.get(other_id, 0) is None:  # noqa: ASYNC110 - no such event
                    await trio.sleep(0.05)
            sent = await push_update(peer.context, other_id, UpdateMaker(peer.context, 0, state, {}))
            out["push_s"] = round(time.perf_counter() - t0, 3)
            while peer.context.inbox.get(other_id, 0) is None:  # noqa: ASYNC110 - no such event
                await trio.sleep(0.05)
            out["exchange_s"] = round(time.perf_counter() - t0, 3)
            out["peak_rss_bytes"] = _status("VmHWM")
            out["bytes_sent"] = sent
            received = peer.context.inbox.get(other_id, 0)
            assert received is not None
            await trio.to_thread.run_sync(_wait_file, root / f"digest{other}", args.timeout)
            expected = (root / f"digest{other}").read_text()
            out["received_digest_ok"] = state_digest(received.state).hex() == expected
            out["received_writable"] = all(np.asarray(v).flags.writeable for v in received.state.values())
            (root / f"done{me}").touch()
            await trio.to_thread.run_sync(_wait_file, root / f"done{other}", args.timeout)
            nursery.cancel_scope.cancel()
    over = out["peak_rss_bytes"] - out["rss_before_model_bytes"]
    out["peak_over_model"] = round(over / out["model_bytes"], 3)
    out["peak_total_over_model"] = round(out["peak_rss_bytes"] / out["model_bytes"], 3)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    width = bench_exchange._unet_width(int(args.mb * 1e6))
    with tempfile.TemporaryDirectory(prefix="silomesh-bench-big-") as tmp:
        root = Path(tmp)
        (root / "ports.json").write_text(json.dumps([bench_exchange._free_port() for _ in range(2)]))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        base = [sys.executable, __file__, "--root", tmp, "--width", str(width), "--order", args.order,
                "--timeout", str(args.timeout), *(["--whole"] if args.whole else [])]
        procs = [
            subprocess.Popen([*base, "--child-index", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
            for i in range(2)
        ]
        outputs = [p.communicate(timeout=args.timeout + 60) for p in procs]
        failed = [f"peer {i} exited {p.returncode}:\n{err[-4000:]}" for i, (p, (_, err)) in
                  enumerate(zip(procs, outputs, strict=True)) if p.returncode != 0]
        if failed:
            raise RuntimeError("\n".join(failed))
        peers = [json.loads(out) for out, _ in outputs]
    nbytes = peers[0]["model_bytes"]
    worst = max(p["peak_over_model"] for p in peers)
    return {
        "model": {"unet_width": width, "parameters": nbytes // 4, "float32_bytes": nbytes},
        "order": args.order,
        "envelope": "whole" if args.whole else "streamed",
        "peers": peers,
        "worst_peak_over_model": worst,
        "target_peak_over_model": 2.5,
        "target_met": worst <= 2.5 and all(p["received_digest_ok"] for p in peers),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=400.0, help="model size in MB (float32 U-Net weights)")
    parser.add_argument("--order", choices=("simultaneous", "sequential"), default="simultaneous")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a peer process may take")
    parser.add_argument("--whole", action="store_true", help="seal the update whole, not streamed")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-index", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("silomesh").setLevel(os.environ.get("SILOMESH_BENCH_LOG", "ERROR"))
    for noisy in ("libp2p", "multiaddr", "async_service"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    if args.child_index is not None:
        import trio

        print(json.dumps(trio.run(child, args)))
        return
    doc = run(args)
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
