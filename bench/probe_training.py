"""Probe: what the round loop's training does to federation, each silo paired with itself alone.

Issue "worth joining", item 4: a peer trains every round with a fresh AdamW, at ``[rounds]
lr``, for ``local_steps`` steps. This measures, for FedAvg over every silo (the maths of a
full-topology simnet with ``fedavg``: each peer averages all models by sample count), and for
each silo alone on the same number of steps *with the same optimiser rule*, the metric on
the silo's own test set. Arms vary one thing at a time from the worth-joining catheter
defaults (4 rounds of 25 steps, lr 0.01, batch 8, fresh AdamW; other tasks: ``--lr``,
``--rounds``, ``--steps`` as their worth-joining experiment):

* ``keep``: each silo keeps its AdamW (moments and step count) across rounds; in the
  federation the averaged weights are loaded into the same parameters, so the moments
  carry over the averaging. Alone, this is one AdamW for all steps.
* ``lr``: another learning rate.
* ``10-step rounds``: the same total steps in more, shorter rounds (rounds x steps / 10 rounds).
* ``local norm layers`` (FedBN): the normalisation layers' weights are not averaged, each
  silo keeps its own; ``local head`` (FedRep-like): the last layer stays each silo's own.
  (Alone is the same as the default's then.)

No networking: the in-process loop is the floor of ``bench/bench_lean.py``. Per arm and seed
the JSON has every silo's federated and alone metric; the summary has the mean gain
(federated - alone) with its sample std over seeds, and how many silos gain (>= 0).
Prints JSON, and with ``--out DIR`` writes ``DIR/probe_training.json`` and ``.md``::

    python bench/probe_training.py --task catheter --silos 4 --seeds 0,1,2 --out bench/results/training
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from silomesh.models.registry import get_task
from silomesh.models.train import train_local
from silomesh.peer.learner import federation_seed, synthetic_silo

#: name -> (optimiser rule, lr, rounds, steps per round, layers kept local); None: the default
ARMS: dict[str, tuple[str, float | None, int | None, int | None, str | None]] = {
    "default (fresh AdamW each round)": ("fresh", None, None, None, None),
    "keep AdamW across rounds": ("keep", None, None, None, None),
    "lr 0.003": ("fresh", 0.003, None, None, None),
    "lr 0.03": ("fresh", 0.03, None, None, None),
    "10-step rounds (same total steps)": ("fresh", None, None, 10, None),
    "local norm layers (FedBN)": ("fresh", None, None, None, "norm"),
    "local head": ("fresh", None, None, None, "head"),
}

_NORMS = (torch.nn.GroupNorm, torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d, torch.nn.LayerNorm)


def local_keys(model: torch.nn.Module, kind: str | None) -> set[str]:
    """State keys that are not averaged: the normalisation layers', or the last layer's."""
    if kind == "norm":
        return {f"{name}.{k}" for name, mod in model.named_modules() if isinstance(mod, _NORMS)
                for k in mod.state_dict()}
    if kind == "head":
        last = [name for name, mod in model.named_modules() if isinstance(mod, torch.nn.Conv2d | torch.nn.Linear)][-1]
        return {k for k in model.state_dict() if k.startswith(last + ".")}
    return set()


def one(task_name: str, n: int, seed: int, size: str, rule: str, lr: float, rounds: int, steps: int,
        local: str | None = None) -> dict[str, Any]:
    """Every silo federated (FedAvg) and alone, on its own test set."""
    task = get_task(task_name)
    init = federation_seed(f"probe-training-{seed}")
    silos = [synthetic_silo(task_name, n, i, seed) for i in range(n)]
    weights = np.array([len(s.train) for s in silos], dtype=np.float64)
    weights /= weights.sum()

    def optimiser(model: torch.nn.Module) -> torch.optim.Optimizer | None:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0) if rule == "keep" else None

    alone = []
    for silo in silos:
        model = task.make_model(size, seed=init)
        opt = optimiser(model)
        for r in range(rounds):
            train_local(task, model, silo.train, steps, 8, lr, seed=init + r + 1, optimizer=opt)
        model.eval()
        alone.append(float(task.evaluate(model, silo.test)[task.metric]))
    models = [task.make_model(size, seed=init) for _ in silos]
    keep = local_keys(models[0], local)
    opts = [optimiser(m) for m in models]
    for r in range(rounds):
        for model, silo, opt in zip(models, silos, opts, strict=True):
            train_local(task, model, silo.train, steps, 8, lr, seed=init + r + 1, optimizer=opt)
        states = [m.state_dict() for m in models]
        mean = {k: sum(float(w) * s[k].double() for w, s in zip(weights, states, strict=True)).to(v.dtype)
                for k, v in states[0].items()}
        for model in models:
            own = {k: v for k, v in model.state_dict().items() if k in keep}
            model.load_state_dict({**mean, **own})  # copies into the same parameters: a kept optimiser stays attached
    fed = []
    for model, silo in zip(models, silos, strict=True):
        model.eval()
        fed.append(float(task.evaluate(model, silo.test)[task.metric]))
    return {"seed": seed, "alone": alone, "federated": fed, "gain": [f - a for f, a in zip(fed, alone, strict=True)]}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def ms(values: list[float]) -> list[float]:
        return [round(float(np.mean(values)), 4), round(float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, 4)]

    return {
        "alone_mean": ms([float(np.mean(r["alone"])) for r in runs]),
        "federated_mean": ms([float(np.mean(r["federated"])) for r in runs]),
        "gain_mean": ms([float(np.mean(r["gain"])) for r in runs]),
        "silos_gain": [sum(g >= 0 for g in r["gain"]) for r in runs],
    }


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"# Training rules, each silo paired with itself ({doc['task']}, {doc['silos']} silos, "
        f"seeds {doc['seeds']})", "",
        f"**{doc['task']}**, {doc['silos']} silos, size {doc['size']}, default lr {doc['defaults']['lr']}, "
        f"{doc['defaults']['rounds']} rounds x {doc['defaults']['steps']} steps. "
        "Mean ± std over seeds of the silos' mean metric on their own test sets; gain = federated - alone; "
        f"silos gaining (of {doc['silos']}) per seed. Written by `bench/probe_training.py`.", "",
        "| arm | alone | federated (FedAvg) | gain | silos gaining |", "|---|---|---|---|---|",
    ]
    for name, arm in doc["arms"].items():
        s = arm["summary"]
        lines.append(
            f"| {name} | {s['alone_mean'][0]:.3f} ± {s['alone_mean'][1]:.3f} | "
            f"{s['federated_mean'][0]:.3f} ± {s['federated_mean'][1]:.3f} | "
            f"{s['gain_mean'][0]:+.3f} ± {s['gain_mean'][1]:.3f} | {', '.join(map(str, s['silos_gain']))} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="catheter")
    parser.add_argument("--silos", type=int, default=4)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--arm", action="append", dest="arms", help="an arm's name; repeat for more (default: all)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    chosen = args.arms or list(ARMS)
    unknown = [a for a in chosen if a not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; known: {list(ARMS)}")
    doc: dict[str, Any] = {"task": args.task, "silos": args.silos, "size": args.size, "seeds": seeds,
                           "defaults": {"lr": args.lr, "rounds": args.rounds, "steps": args.steps, "batch_size": 8},
                           "arms": {}}
    if args.out and (args.out / "probe_training.json").exists():  # add to an earlier run's arms
        earlier = json.loads((args.out / "probe_training.json").read_text())
        if all(earlier[k] == doc[k] for k in ("task", "silos", "size", "seeds", "defaults")):
            doc["arms"] = {k: v for k, v in earlier["arms"].items() if k not in chosen}
    for name in chosen:
        rule, lr, rounds, steps, local = ARMS[name]
        if steps is not None and rounds is None:  # the same total steps in rounds of ``steps``
            rounds = max(1, args.rounds * args.steps // steps)
        t0 = time.perf_counter()
        runs = [one(args.task, args.silos, s, args.size, rule, lr or args.lr, rounds or args.rounds,
                    steps or args.steps, local) for s in seeds]
        doc["arms"][name] = {"rule": rule, "local": local, "lr": lr or args.lr, "rounds": rounds or args.rounds,
                             "steps": steps or args.steps, "runs": runs, "summary": summary(runs),
                             "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps({name: doc["arms"][name]["summary"]}), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "probe_training.json").write_text(json.dumps(doc, indent=2) + "\n")
        (args.out / "probe_training.md").write_text(markdown(doc))
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
