"""PNG plots of a run (matplotlib, Agg backend): metric and bytes per round, the graph.

The topology is drawn on a circle (peer 0 at the top, clockwise), nodes coloured by
their final metric; crashed peers get a red outline, byzantine peers a square marker.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType
from typing import Any

from silomesh.simnet.plan import Plan


def write_plots(plan: Plan, report: dict[str, Any], out: Path) -> list[Path]:
    """Write ``metric_per_round.png``, ``bytes_per_round.png`` and ``topology.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [_metric_plot(plt, report, out / "metric_per_round.png"),
             _bytes_plot(plt, report, out / "bytes_per_round.png"),
             _topology_plot(plt, plan, report, out / "topology.png")]
    return paths


def _metric_plot(plt: ModuleType, report: dict[str, Any], path: Path) -> Path:
    metric = report["metric"]
    history = report["history"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    names = [p["name"] for p in report["peers_detail"]]
    for name in names:
        pts = [(h["round"], h["metric_per_peer"][name]) for h in history if name in h["metric_per_peer"]]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, color="0.6", lw=0.8, alpha=0.7, marker="." if len(names) <= 16 else None)
    mean = [(h["round"], h["metric_mean"]) for h in history if h["metric_mean"] is not None]
    if mean:
        xs, ys = zip(*mean, strict=True)
        ax.plot(xs, ys, color="C0", lw=2.5, marker="o", label="federated mean")
    local = report["final"].get("local_only_history")
    if local:
        ax.plot([h["round"] for h in local], [h["mean"] for h in local], color="C3", lw=2, ls="--",
                marker="s", label="local-only mean")
    ax.plot([], [], color="0.6", lw=0.8, label="each peer")
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.set_title(f"{report['strategy']} on {report['task']}, {report['peers']} peers, {report['topology']}")
    ax.set_xticks([h["round"] for h in history])
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _bytes_plot(plt: ModuleType, report: dict[str, Any], path: Path) -> Path:
    history = report["history"]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    ax.bar([h["round"] for h in history], [h["bytes"] / 1e6 for h in history], color="C2")
    ax.set_xlabel("round")
    ax.set_ylabel("MB sent (all peers)")
    ax.set_xticks([h["round"] for h in history])
    ax.set_title(f"bytes per round (total {report['bytes_sent_total'] / 1e6:.2f} MB)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def circle_layout(n: int) -> list[tuple[float, float]]:
    """Node positions on the unit circle, peer 0 at the top, clockwise."""
    return [(math.sin(2 * math.pi * i / n), math.cos(2 * math.pi * i / n)) for i in range(n)]


def _topology_plot(plt: ModuleType, plan: Plan, report: dict[str, Any], path: Path) -> Path:
    n = plan.n
    pos = circle_layout(n)
    detail = report["peers_detail"]
    values = [d["final_metric"] for d in detail]
    known = [v for v in values if v is not None]
    lo, hi = (min(known), max(known)) if known else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    for a, b in plan.topology.edges:
        ax.plot([pos[a][0], pos[b][0]], [pos[a][1], pos[b][1]], color="0.75", lw=0.8, zorder=1)
    cmap = plt.get_cmap("viridis")
    size = 420 if n <= 16 else max(60, 420 * 16 // n)
    for i, d in enumerate(detail):
        v = values[i]
        colour = cmap((v - lo) / (hi - lo)) if v is not None else "lightgrey"
        ax.scatter([pos[i][0]], [pos[i][1]], s=size, c=[colour], marker="s" if d.get("byzantine") else "o",
                   edgecolors="red" if d.get("crashed") else "black", linewidths=2.0 if d.get("crashed") else 0.6,
                   zorder=2)
        if n <= 32:
            ax.annotate(d["name"], (pos[i][0] * 1.2, pos[i][1] * 1.2), ha="center", va="center", fontsize=8)
    mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(lo, hi))
    fig.colorbar(mappable, ax=ax, shrink=0.7, label=f"final {report['metric']}")
    ax.set_aspect("equal")
    ax.set_xlim(-1.3, 1.3)
    ax.set_ylim(-1.3, 1.3)
    ax.axis("off")
    ax.set_title(f"topology {report['topology']} (red outline: crashed, square: byzantine)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


#: the ``gain_<kind>_<i>`` metrics of the ``per_silo`` evaluation, and their column titles
GAIN_KINDS = {"own": "own test set", "unseen": "unseen sources", "common": "shared test half",
              "personal_own": "personal, own test set", "personal_unseen": "personal, unseen sources",
              "personal_common": "personal, shared test half"}


def per_silo_gains(results: dict[str, Any]) -> dict[str, dict[str, list[dict[str, float]]]]:
    """Per arm, per kind (``own``, ``unseen``, ``common``): one ``{silo, mean, std, n}`` per silo.

    Read from the ``gain_<kind>_<i>`` metrics that the ``per_silo`` evaluation writes;
    mean and sample std over the seeds where that silo had a federated model.
    """
    import numpy as np

    out: dict[str, dict[str, list[dict[str, float]]]] = {}
    for name, arm in results["arms"].items():
        kinds: dict[str, list[dict[str, float]]] = {}
        for kind in GAIN_KINDS:
            silos = sorted({int(k.rsplit("_", 1)[1]) for run in arm["runs"].values() for k in run
                            if k.startswith(f"gain_{kind}_") and k.rsplit("_", 1)[1].isdigit()})
            rows = []
            for i in silos:
                values = [float(run[f"gain_{kind}_{i}"]) for run in arm["runs"].values()
                          if f"gain_{kind}_{i}" in run and math.isfinite(float(run[f"gain_{kind}_{i}"]))]
                if values:
                    a = np.array(values)
                    rows.append({"silo": i, "mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
                                 "n": len(a)})
            if rows:
                kinds[kind] = rows
        if kinds:
            out[name] = kinds
    return out


def write_per_silo_plot(results: dict[str, Any], path: Path) -> Path | None:
    """``per_silo_gains.png``: one panel per arm, one bar group per silo (federated minus
    alone on its own test set, and on unseen sources or the shared test half), mean ± std
    over seeds. ``None`` when no arm has ``per_silo`` metrics."""
    gains = per_silo_gains(results)
    if not gains:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(gains), figsize=(max(4.0, 3.2 * len(gains)), 3.8), dpi=100,
                             squeeze=False, sharey=True)
    for ax, (name, kinds) in zip(axes[0], gains.items(), strict=True):
        shown = [k for k in ("own", "personal_own", "unseen") if k in kinds] or list(kinds)[:2]
        width = 0.8 / len(shown)
        for j, kind in enumerate(shown):
            rows = kinds[kind]
            xs = [r["silo"] + (j - (len(shown) - 1) / 2) * width for r in rows]
            label = GAIN_KINDS[kind]
            ax.bar(xs, [r["mean"] for r in rows], width, yerr=[r["std"] for r in rows], capsize=2,
                   color=f"C{j}", label=label)
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("silo")
        ax.set_xticks(sorted({r["silo"] for rows in kinds.values() for r in rows}))
    axes[0][0].set_ylabel("gain: federated - alone")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
