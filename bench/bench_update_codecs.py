"""Bytes against the final metric for the update codecs (float32, float16, int8, int4, topk).

Each run is a fresh ``silomesh simnet run`` (4 peers, ring, fedavg, 3 rounds, the default
small model and data) with every peer's ``[rounds] codec`` set; tasks and seeds are
paired, so a codec's metric is compared with float32 on the same seed. float16 sends
deltas in half precision; int8 sends deltas and snapshots quantized per tensor; int4 sends
deltas in 4 bits (snapshots as int8); ``topk:F`` sends each tensor's largest share F of
a delta's values with their indices (``[rounds] topk = F``, default 0.1; snapshots as int8),
``topk:F:S`` also sets the consensus step ``[rounds] topk_step = S`` (default 2 x F).
All carry the quantization error into the next
delta: a peer's next delta is made against what the neighbour decoded (error feedback).

Prints one JSON document and writes it, with a Markdown table and a plot of the final
metric against the bytes (one curve per task, mean and range over the seeds), to ``--out``:

    python bench/bench_update_codecs.py                       # catheter and lesion, seeds 0,1,2
    python bench/bench_update_codecs.py --tasks catheter --seeds 0 --codecs float32,int8
    python bench/bench_update_codecs.py --codecs float32,topk:0.05,topk:0.1,topk:0.1:1.0 --rounds 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def codec_flags(spec: str) -> list[str]:
    """The simnet flags of a codec as this benchmark names it: ``int8``, ``topk:0.05`` (the
    share kept) or ``topk:0.05:1.0`` (and the consensus step)."""
    codec, *params = spec.split(":")
    if (params and codec != "topk") or len(params) > 2:
        raise SystemExit(f"--codecs: only topk takes a share and a step (topk:0.05:1.0), got {spec!r}")
    flags = ["--codec", codec]
    for flag, value in zip(("--topk", "--topk-step"), params, strict=False):
        try:
            float(value)
        except ValueError:
            raise SystemExit(f"--codecs: {value!r} in {spec!r} is not a number") from None
        flags += [flag, value]
    return flags


def run_one(task: str, seed: int, codec: str, rounds: int, work: Path) -> dict[str, Any]:
    out = work / f"{task}-{seed}-{codec.replace(':', '-')}"
    cmd = [sys.executable, "-m", "silomesh.simnet.cli", "run", "--peers", "4", "--topology", "ring",
           "--strategy", "fedavg", "--task", task, "--rounds", str(rounds), "--seed", str(seed),
           *codec_flags(codec), "--out", str(out), "--json", "--quiet"]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        return {"task": task, "seed": seed, "codec": codec, "error": proc.stderr.strip().splitlines()[-3:]}
    r = json.loads(proc.stdout)
    return {
        "task": task, "seed": seed, "codec": codec, "rounds": rounds,
        "seconds": round(time.time() - started, 1),
        "bytes_sent": r["bytes_sent_total"],
        "metric": r["metric"],
        "final": r["final"]["federated_mean"],
        "round_success_rate": r["round_success_rate"],
    }


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task and codec: bytes and metric relative to float32 on the same seeds."""
    ok = [r for r in runs if "error" not in r]
    base = {(r["task"], r["seed"]): r for r in ok if r["codec"] == "float32"}
    rows = []
    for task in sorted({r["task"] for r in ok}):
        for codec in dict.fromkeys(r["codec"] for r in ok):  # in the order they ran
            mine = [r for r in ok if r["task"] == task and r["codec"] == codec and (task, r["seed"]) in base]
            if not mine:
                continue
            ratios = [r["bytes_sent"] / base[(task, r["seed"])]["bytes_sent"] for r in mine]
            rel = [(r["final"] - base[(task, r["seed"])]["final"]) / abs(base[(task, r["seed"])]["final"])
                   for r in mine if base[(task, r["seed"])]["final"]]
            rows.append({
                "task": task, "codec": codec, "seeds": [r["seed"] for r in mine],
                "metric": mine[0]["metric"],
                "final_mean": round(statistics.fmean(r["final"] for r in mine), 4),
                "final_per_seed": [round(r["final"], 4) for r in mine],
                "bytes_mean": round(statistics.fmean(r["bytes_sent"] for r in mine)),
                "bytes_vs_float32": round(statistics.fmean(ratios), 4),
                "metric_change_vs_float32": round(statistics.fmean(rel), 4) if rel else None,
                "metric_change_per_seed": [round(x, 4) for x in rel],
            })
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| task | codec | bytes vs float32 | final metric (mean; per seed) | change vs float32 (mean; per seed) |",
             "|---|---|---|---|---|"]
    for r in rows:
        change = "—" if r["metric_change_vs_float32"] is None else (
            f"{100 * r['metric_change_vs_float32']:+.2f}%; "
            + ", ".join(f"{100 * x:+.2f}%" for x in r["metric_change_per_seed"]))
        lines.append(f"| {r['task']} | {r['codec']} | {r['bytes_vs_float32']:.3f} | "
                     f"{r['metric']} {r['final_mean']:.4f}; {', '.join(f'{x:.4f}' for x in r['final_per_seed'])} | "
                     f"{change} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """The final metric against the bytes (relative to float32), a curve per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for task in sorted({r["task"] for r in rows}):
        mine = sorted((r for r in rows if r["task"] == task), key=lambda r: r["bytes_vs_float32"])
        xs = [r["bytes_vs_float32"] for r in mine]
        ys = [r["final_mean"] for r in mine]
        lo = [r["final_mean"] - min(r["final_per_seed"]) for r in mine]
        hi = [max(r["final_per_seed"]) - r["final_mean"] for r in mine]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=task)
        for r in mine:
            ax.annotate(r["codec"], (r["bytes_vs_float32"], r["final_mean"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    ax.set_xlabel("bytes sent, relative to float32")
    ax.set_ylabel(f"final {rows[0]['metric'] if rows else 'metric'} (mean, range over seeds)")
    ax.set_xlim(0, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="catheter,lesion")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--codecs", default="float32,float16,int8,int4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "codecs")
    args = ap.parse_args()
    for spec in args.codecs.split(","):
        codec_flags(spec)  # refuse a bad spec before the first run
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-codecs-") as tmp:
        for task in args.tasks.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                for codec in args.codecs.split(","):
                    runs.append(run_one(task, seed, codec, args.rounds, Path(tmp)))
                    print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    doc = {"runs": runs, "summary": summarise(runs)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_update_codecs.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out / "bench_update_codecs.md").write_text(markdown(doc["summary"]))
    plot(doc["summary"], args.out / "bench_update_codecs.png")
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
