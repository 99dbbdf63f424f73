"""Benchmark: what a curious neighbour learns about our patients, per DP budget. Prints JSON.

An in-process federation of ``--silos`` silos on a ring (each trains on half its images), one
:class:`silomesh.peer.learner.Learner` each (the object a peer daemon drives), FedAvg:
every round each learner trains ``--steps`` local steps (DP-SGD through its one
:class:`~silomesh.models.privacy.DPTrainer` when ε is finite), sends its trained state to
its neighbours, and averages what it receives, as ``peer/rounds.py`` does minus the network.

The attacker is silo 1, a neighbour of silo 0: it keeps every model silo 0 sends it and runs
a **loss-threshold membership-inference attack** (Yeom et al. 2018) against silo 0's
training images: score = minus the model's loss on one image; members are silo 0's training
images, non-members as many images of silo 0's own distribution that it never trained on
(its test set). Reported: the attack's ROC AUC on the last model received
(``auc_final``) and the highest AUC over every round's model (``auc_max``, the neighbour
picks its best round, which favours the attacker). 0.5 is chance.

Utility: the federation's mean Dice on each silo's own test set after the last round.

Grid: task in {catheter, lesion} x ε in {1, 3, 8, inf} (δ = 1e-5; the noise is calibrated so
``rounds x steps`` steps spend exactly ε) x ``--seeds`` seeds. ``--out`` writes the JSON,
a markdown table and a plot. Reproduce docs/PRIVACY.md's table (about 9 minutes on 2 shared cores)::

    .venv/bin/python bench/bench_privacy.py --out bench/results/privacy
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from silomesh.models.privacy import DPSettings
from silomesh.models.registry import get_task
from silomesh.models.task import ArrayDataset, Silo, Task
from silomesh.peer.learner import Learner
from silomesh.strategies import Contribution, get_strategy

TASK_OPTIONS: dict[str, dict[str, Any]] = {
    "catheter": {"image_size": 32, "n_train": 64, "n_test": 32, "n_test_source": 8},
    "lesion": {"image_size": 32, "n_train": 64, "n_test": 32, "label_kinds": ("mask",)},
}
EPSILONS = (1.0, 3.0, 8.0, math.inf)
DELTA = 1e-5


def auc(members: np.ndarray, others: np.ndarray) -> float:
    """ROC AUC of scores (higher = member): P(member score > non-member score), ties half."""
    m, o = members[:, None], others[None, :]
    return float(((m > o).sum() + 0.5 * (m == o).sum()) / (len(members) * len(others)))


@torch.no_grad()
def per_sample_losses(task: Task, model: torch.nn.Module, data: ArrayDataset) -> np.ndarray:
    """The task's training loss of ``model`` on each image alone (what the attacker scores)."""
    model.eval()
    out = []
    for i in range(len(data)):
        batch = {k: torch.from_numpy(np.ascontiguousarray(v[i:i + 1])) for k, v in data.arrays.items()}
        out.append(float(task.loss(model, batch)))
    model.train()
    return np.array(out)


def attack(task: Task, learner: Learner, state: dict[str, np.ndarray], members: ArrayDataset,
           others: ArrayDataset) -> float:
    model = learner.copies([state])[0]
    return auc(-per_sample_losses(task, model, members), -per_sample_losses(task, model, others))


def run_one(task_name: str, eps: float, seed: int, silos: int, rounds: int, steps: int, batch: int,
            lr: float, clip: float) -> dict[str, Any]:
    torch.manual_seed(seed)
    task = get_task(task_name)
    fed = task.make_federation(silos, seed, **TASK_OPTIONS[task_name])
    privacy = None if math.isinf(eps) else DPSettings(target_epsilon=eps, delta=DELTA, max_grad_norm=clip,
                                                      planned_steps=rounds * steps)
    # every silo trains on half its training images; the other half of silo 0's are the
    # attack's non-members: the same distribution, never trained on
    rng = np.random.default_rng(seed)
    halves = []
    for s in fed.silos:
        order = rng.permutation(len(s.train))
        halves.append((s.train.subset(order[: len(order) // 2]), s.train.subset(order[len(order) // 2:])))
    trained_silos = [Silo(s.name, h[0], s.test, s.info) for s, h in zip(fed.silos, halves, strict=True)]
    ls = [Learner(task, s, size="tiny", init_seed=seed, batch_size=batch, lr=lr, strategy=get_strategy("fedavg"),
                  privacy=privacy) for s in trained_silos]
    ring = [sorted({(i - 1) % silos, (i + 1) % silos} - {i}) for i in range(silos)]
    victim = 0
    members, others = halves[victim]
    aucs = []
    t0 = time.time()
    for _ in range(rounds):
        trained = [x.train(steps) for x in ls]
        # the curious neighbour attacks the model silo 0 just sent it
        aucs.append(attack(task, ls[1], ls[0].shared(trained[victim].state), members, others))
        new = []
        for i, x in enumerate(ls):
            contributions = [Contribution(f"p{j}", ls[j].shared(trained[j].state), ls[j].n_samples,
                                          degree=len(ring[j])) for j in ring[i]]
            new.append(x.strategy.aggregate(trained[i].state, float(x.n_samples), contributions,
                                            own_degree=len(ring[i])).state)
        for x, t, s in zip(ls, trained, new, strict=True):
            x.load({**t.state, **s})
    dice = float(np.mean([x.evaluate()["dice"] for x in ls]))
    spent = ls[0].dp.epsilon if ls[0].dp is not None else math.inf
    return {"task": task_name, "epsilon": eps, "seed": seed, "epsilon_spent": spent,
            "noise_multiplier": ls[0].dp.noise_multiplier if ls[0].dp is not None else 0.0,
            "auc_final": aucs[-1], "auc_max": max(aucs), "auc_per_round": aucs, "dice": dice,
            "seconds": round(time.time() - t0, 1)}


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for task in TASK_OPTIONS:
        base = [r["dice"] for r in rows if r["task"] == task and math.isinf(r["epsilon"])]
        for eps in EPSILONS:
            sel = [r for r in rows if r["task"] == task and r["epsilon"] == eps]
            if not sel:
                continue
            dice = float(np.mean([r["dice"] for r in sel]))
            out.append({
                "task": task, "epsilon": eps, "seeds": len(sel),
                "auc_final_mean": float(np.mean([r["auc_final"] for r in sel])),
                "auc_final_std": float(np.std([r["auc_final"] for r in sel])),
                "auc_max_mean": float(np.mean([r["auc_max"] for r in sel])),
                "dice_mean": dice, "dice_std": float(np.std([r["dice"] for r in sel])),
                "dice_vs_nonprivate": dice / float(np.mean(base)) if base and np.mean(base) > 0 else None,
                "noise_multiplier": float(np.mean([r["noise_multiplier"] for r in sel])),
            })
    return out


def markdown(summary: list[dict[str, Any]]) -> str:
    lines = ["| task | ε (δ = 1e-5) | noise σ | attack AUC, last model | attack AUC, best round | Dice "  # noqa: RUF001
             "| Dice / non-private |",
             "|---|---|---|---|---|---|---|"]
    for s in summary:
        ratio = f"{s['dice_vs_nonprivate']:.2f}" if s["dice_vs_nonprivate"] is not None else "-"
        eps = "∞ (no DP)" if math.isinf(s["epsilon"]) else f"{s['epsilon']:g}"
        lines.append(f"| {s['task']} | {eps} | {s['noise_multiplier']:.2f} | {s['auc_final_mean']:.3f} ± "
                     f"{s['auc_final_std']:.3f} | {s['auc_max_mean']:.3f} | {s['dice_mean']:.3f} ± {s['dice_std']:.3f} "
                     f"| {ratio} |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for task in TASK_OPTIONS:
        sel = [s for s in summary if s["task"] == task]
        xs = list(range(len(sel)))
        axes[0].errorbar(xs, [s["auc_final_mean"] for s in sel], yerr=[s["auc_final_std"] for s in sel],
                         marker="o", label=task, capsize=3)
        axes[1].errorbar(xs, [s["dice_mean"] for s in sel], yerr=[s["dice_std"] for s in sel], marker="o",
                         label=task, capsize=3)
        labels = ["∞" if math.isinf(s["epsilon"]) else f"{s['epsilon']:g}" for s in sel]
    for ax, title in zip(axes, ("membership-inference AUC (0.5 = chance)", "Dice"), strict=True):
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("ε (δ = 1e-5)")
        ax.set_title(title)
        ax.legend()
    axes[0].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[0].axhline(0.55, color="red", lw=0.8, ls=":")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _finite(x: Any) -> Any:  # noqa: ANN401 - JSON values
    """inf as the string "inf", so the output is strict JSON."""
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASK_OPTIONS), choices=list(TASK_OPTIONS))
    ap.add_argument("--epsilons", nargs="+", type=float, default=list(EPSILONS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--silos", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30, help="local steps per round")
    ap.add_argument("--batch", type=int, default=8, help="(expected) batch size")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--clip", type=float, default=1.0, help="per-sample clipping norm C")
    ap.add_argument("--out", type=Path, default=None, help="write privacy.json, privacy.md, privacy.png here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for t in args.tasks:
        for e in args.epsilons:
            for s in range(args.seeds):
                rows.append(run_one(t, e, s, args.silos, args.rounds, args.steps, args.batch, args.lr, args.clip))
                r = rows[-1]
                print(f"{t} eps {e:g} seed {s}: auc {r['auc_final']:.3f} (max {r['auc_max']:.3f}), "
                      f"dice {r['dice']:.3f}, {r['seconds']:.0f} s", file=sys.stderr, flush=True)
    summary = summarise(rows)
    result = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "delta": DELTA, "task_options": TASK_OPTIONS, "summary": summary, "runs": rows}
    text = json.dumps(_finite(result), indent=1, default=lambda x: list(x) if isinstance(x, tuple) else str(x))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "privacy.json").write_text(text, encoding="utf-8")
        (args.out / "privacy.md").write_text(markdown(summary), encoding="utf-8")
        plot(summary, args.out / "privacy.png")
    print(text)


if __name__ == "__main__":
    main()
