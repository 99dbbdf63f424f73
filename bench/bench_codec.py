"""Benchmark: seal/open of a ~2M-parameter float32 state dict vs a plain numpy copy.

Prints one JSON object. Not a test: ratios are measured in one run on one machine.

    .venv/bin/python bench/bench_codec.py [--params 2000000] [--repeats 15]

* ``baseline``: ``b"".join(a.tobytes() for a in arrays)`` (numpy.tobytes + a bytes copy).
* ``seal``: encode + encrypt + sign (``seal_envelope``); output left in two parts,
  as a peer writes it to the stream.
* ``open``: verify + decrypt + decode (``open_envelope`` in place) on a frame
  buffer, plus ``open_via_decoder``: the same preceded by feeding the framed bytes
  through ``FrameDecoder`` in 256 KiB chunks, as a peer reads them.
* ``primitives``: the floor set by the mandated crypto alone (XSalsa20-Poly1305 in
  place + BLAKE2b-256 over the same bytes).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from silomesh.protocol import (
    FrameDecoder,
    Identity,
    Update,
    open_envelope,
    seal_envelope,
    state_digest,
)
from silomesh.protocol.crypto import MAC_SIZE, blake2b256, encrypt_in_place


def make_state(params: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A conv-net-like state dict with about ``params`` float32 parameters."""
    rng = np.random.default_rng(seed)
    state: dict[str, np.ndarray] = {}
    remaining = params
    i = 0
    while remaining > 0:
        cout = 256
        cin = max(1, min(remaining // (cout * 9), 128))
        w = rng.standard_normal((cout, cin, 3, 3), dtype=np.float32) * 0.05
        state[f"layer{i:02d}.conv.weight"] = w
        state[f"layer{i:02d}.bn.weight"] = np.ones(cout, np.float32)
        state[f"layer{i:02d}.bn.bias"] = np.zeros(cout, np.float32)
        remaining -= w.size + 2 * cout
        i += 1
    return state


def timeit(
    fn: Callable[..., Any], repeats: int, setup: Callable[[], Any] | None = None
) -> dict[str, float]:
    """Best and median wall time (seconds) of ``fn`` over ``repeats`` runs (after a warm-up)."""
    times = []
    for k in range(repeats + 1):
        arg = setup() if setup else None
        t0 = time.perf_counter()
        fn() if arg is None else fn(arg)
        dt = time.perf_counter() - t0
        if k:
            times.append(dt)
    return {"best_s": min(times), "median_s": statistics.median(times)}


def main() -> None:
    """Run the benchmark and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    state = make_state(args.params)
    arrays = list(state.values())
    nbytes = sum(a.nbytes for a in arrays)
    alice = Identity.from_seed(bytes(range(32)))
    bob = Identity.from_seed(bytes(range(1, 33)))
    msg = Update(
        federation="bench",
        sender=alice.public_key,
        recipient=bob.public_key,
        round=1,
        sequence=1,
        tensors=state,
        n_samples=100,
        state_digest=state_digest(state),
    )
    trusted = {alice.public_key}

    baseline = timeit(lambda: b"".join([a.tobytes() for a in arrays]), args.repeats)
    seal = timeit(lambda: seal_envelope(msg, alice), args.repeats)

    sealed = seal_envelope(msg, alice)
    envelope = sealed.to_bytes()
    framed = sealed.to_frame()

    def open_one(buf: bytearray) -> None:
        opened = open_envelope(
            buf, identity=bob, federation="bench", trusted=trusted, in_place=True
        )
        assert len(opened.message.tensors) == len(state)

    open_ = timeit(open_one, args.repeats, setup=lambda: bytearray(envelope))

    def via_decoder() -> None:
        dec = FrameDecoder()
        view = memoryview(framed)
        for i in range(0, len(view), 256 * 1024):
            dec.receive_data(view[i : i + 256 * 1024])
        frame = dec.next_frame()
        assert isinstance(frame, bytearray)
        open_one(frame)

    open_dec = timeit(via_decoder, args.repeats)

    plain = bytearray(MAC_SIZE + nbytes)
    key = alice.shared_key(bob.public_key)
    nonce = bytes(24)
    primitives = timeit(
        lambda: (encrypt_in_place(plain, key, nonce), blake2b256(plain)), args.repeats
    )

    other_codecs = {}
    for codec in ("float16", "int8", "int4"):
        m = Update(
            federation="bench",
            sender=alice.public_key,
            recipient=bob.public_key,
            round=1,
            sequence=1,
            tensors=state,
            codec=codec,
            state_digest=bytes(32),  # the receiver is not checked here
        )
        s = seal_envelope(m, alice)
        env = s.to_bytes()
        other_codecs[codec] = {
            "envelope_bytes": len(env),
            "seal": timeit(functools.partial(seal_envelope, m, alice), max(3, args.repeats // 3)),
            "open": timeit(
                open_one, max(3, args.repeats // 3), setup=functools.partial(bytearray, env)
            ),
        }

    def mbps(t: dict[str, float]) -> float:
        return round(nbytes / t["best_s"] / 1e6, 1)

    def ratio(t: dict[str, float]) -> float:
        return round(t["best_s"] / baseline["best_s"], 2)

    def over_floor(t: dict[str, float]) -> float:
        return round(t["best_s"] / primitives["best_s"], 2)

    result = {
        "params": sum(a.size for a in arrays),
        "tensors": len(arrays),
        "state_bytes": nbytes,
        "envelope_bytes": len(envelope),
        "repeats": args.repeats,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "baseline_tobytes_join": {**baseline, "MBps": mbps(baseline)},
        "seal_encode_encrypt_sign": {
            **seal,
            "MBps": mbps(seal),
            "ratio_vs_baseline": ratio(seal),
            "ratio_vs_primitives": over_floor(seal),
        },
        "open_verify_decrypt_decode": {
            **open_,
            "MBps": mbps(open_),
            "ratio_vs_baseline": ratio(open_),
            "ratio_vs_primitives": over_floor(open_),
        },
        "open_via_frame_decoder": {
            **open_dec,
            "MBps": mbps(open_dec),
            "ratio_vs_baseline": ratio(open_dec),
            "ratio_vs_primitives": over_floor(open_dec),
        },
        "primitives_xsalsa20poly1305_plus_blake2b": {
            **primitives,
            "MBps": mbps(primitives),
            "ratio_vs_baseline": ratio(primitives),
        },
        "other_codecs": other_codecs,
        "target_ratio": 4.0,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
