"""Probe: is the federation's shortfall against the best silo the federation's, or the budget's?

Issue "worth joining": on catheter the federation never beats the best single silo (chosen on
validation) on the shared test set, and at ``--scale 2`` one silo loses 0.26-0.31 Dice on its
own test set. This asks what the *pooled* data would give: one model trained on every silo's
training images together, which no federation can beat on average (FedAvg over a full
topology approximates it). If the pooled model also loses to the best silo, the shortfall is
in the data and the step budget, not in how the silos federate.

For one experiment arm (its scenario, data and budget exactly as ``silomesh simnet run`` would
lay them out, ``--scale`` included), per seed, with the ``per_silo`` evaluation's split of the
shared test set into a validation and a test half:

* ``alone``: each silo trained alone, ``rounds x local_steps`` steps in per-round chunks (a fresh
  AdamW each, as a peer); the best silo is chosen on the validation half.
* ``fedavg``: the in-process maths of a full-topology ``fedavg`` simnet (each round every silo
  trains its chunk, then all adopt the sample-weighted mean).
* ``pooled``: one model on all silos' training images, the same steps as one silo.
* ``pooled_total``: the same, with as many steps as all silos together (``silos x`` as many).
* ``cyclic``: cyclic weight transfer (Chang et al., JAMIA 2018): one model visits the silos
  in turn each round, each training it ``local_steps`` steps (a fresh AdamW per visit). Each
  silo spends what it spends alone; the model gets the sequential steps of ``pooled_total``.
* ``--distill``: FedAvg and cyclic whose training keeps what a silo's labels leave open
  towards the model as the training began (``[rounds] keep_unlabelled``).
* ``--ring-ends``: cyclic scored as the peers commit it (``cyclic_each``: each silo's model
  as it left that silo in the last round) and as the mean of those (``cyclic_end_average``).
* ``fedavg_step<g>`` (``--server-steps g,...``): FedAvg whose round moves ``g`` times the
  averaged change from the round's start (a server learning rate; ``g = 1`` is FedAvg).

Scored on the test half (``*_common_test``) and, per silo, on its own test set against that
silo alone (``gain_own_<model>`` per silo). No networking. Prints JSON; ``--out DIR`` also
writes ``DIR/probe_pooled.json`` and ``.md``::

    python bench/probe_pooled.py experiments/worth_joining_catheter_short_rounds.toml \
        --arm "4 silos" --scale 2 --out bench/results/pooled/catheter-4-scale2
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from silomesh.models.synth import concat
from silomesh.models.task import ArrayDataset
from silomesh.models.train import train_local
from silomesh.peer.learner import federation_seed, synthetic_federation
from silomesh.simnet.evaluations import split_validation
from silomesh.simnet.experiment import load_experiment, run_scenario
from silomesh.simnet.scenario import Scenario


def one(scenario: Scenario, seed: int, server_steps: tuple[float, ...] = (), pool: bool = True,
        distill: bool = False, ring_ends: bool = False) -> dict[str, Any]:
    """Every model of the probe for one seed: test-half scores and per-silo own-test scores."""
    from silomesh.models.registry import get_task

    sc = scenario
    options = sc.effective_task_options
    task = get_task(sc.task, **options)
    fed = synthetic_federation(sc.task, sc.peers, seed, **options)
    init = federation_seed(sc.federation)
    common = fed.tests["all"] if "all" in fed.tests else next(iter(fed.tests.values()))
    val, test = split_validation(common, seed)
    silos = fed.silos

    def score(model: torch.nn.Module, data: ArrayDataset) -> float:
        model.eval()
        return float(task.evaluate(model, data)[task.metric])

    def trained(data: ArrayDataset, chunks: int) -> torch.nn.Module:
        model = task.make_model(sc.size, seed=init)
        for r in range(chunks):
            train_local(task, model, data, sc.local_steps, sc.batch_size, sc.lr, seed=init + r + 1)
        return model

    alone = [trained(s.train, sc.rounds) for s in silos]
    weights = np.array([len(s.train) for s in silos], dtype=np.float64)
    weights /= weights.sum()

    def fedavg(step: float, distilled: bool = False) -> list[torch.nn.Module]:
        """Full-topology FedAvg; ``step`` > 1 moves each round's model that many times the
        averaged change from the round's start (a server learning rate, FedAvgM without momentum)."""
        models = [task.make_model(sc.size, seed=init) for _ in silos]
        for r in range(sc.rounds):
            start = {k: v.detach().clone() for k, v in models[0].state_dict().items()}
            teacher = copy.deepcopy(models[0]) if distilled else None
            for model, silo in zip(models, silos, strict=True):
                train_local(task, model, silo.train, sc.local_steps, sc.batch_size, sc.lr, seed=init + r + 1,
                            teacher=teacher)
            states = [m.state_dict() for m in models]
            mean = {k: sum(float(w) * s[k].double() for w, s in zip(weights, states, strict=True))
                    for k in states[0]}
            new = {k: (start[k].double() + step * (mean[k] - start[k].double())).to(start[k].dtype) for k in mean}
            for model in models:
                model.load_state_dict(new)
        return models

    models = fedavg(1.0)
    stepped = {f"fedavg_step{g:g}": fedavg(g) for g in server_steps}
    if distill:
        stepped["fedavg_distill"] = fedavg(1.0, distilled=True)

    def cycled(distilled: bool) -> list[torch.nn.Module]:
        """Cyclic weight transfer: one model visits the silos in turn, each training its
        round's chunk (with ``distilled``, towards the model as it arrived where the visited
        silo's labels say nothing). Returns the model as it left each silo in the last
        round (the last one is the ring's final model)."""
        model = task.make_model(sc.size, seed=init)
        left: list[torch.nn.Module] = []
        for r in range(sc.rounds):
            for i, silo in enumerate(silos):
                train_local(task, model, silo.train, sc.local_steps, sc.batch_size, sc.lr,
                            seed=init + (r + 1) * len(silos) + i,
                            teacher=copy.deepcopy(model) if distilled else None)
                if r == sc.rounds - 1:
                    left.append(copy.deepcopy(model))
        return left

    def ends(name: str, left: list[torch.nn.Module]) -> None:
        """``--ring-ends``: each silo's own last model (what a peer commits), and their mean."""
        stepped[f"{name}_each"] = left
        mean = copy.deepcopy(left[0])
        states = [m.state_dict() for m in left]
        mean.load_state_dict({k: (sum(st[k].double() for st in states) / len(states)).to(states[0][k].dtype)
                              for k in states[0]})
        stepped[f"{name}_end_average"] = [mean] * len(silos)

    ring = cycled(False)
    cyclic = ring[-1]
    if ring_ends:
        ends("cyclic", ring)
    if distill:
        ring = cycled(True)
        stepped["cyclic_distill"] = [ring[-1]] * len(silos)
        if ring_ends:
            ends("cyclic_distill", ring)
    if pool:
        union = concat([s.train for s in silos])
        pooled = trained(union, sc.rounds)
        pooled_total = trained(union, sc.rounds * len(silos))

    best = int(np.argmax([score(m, val) for m in alone]))
    out: dict[str, Any] = {
        "seed": seed, "best_silo": best,
        "alone_common_test": [score(m, test) for m in alone],
        "fedavg_common_test": float(np.mean([score(m, test) for m in models])),
        "cyclic_common_test": score(cyclic, test),
    }
    if pool:
        out["pooled_common_test"] = score(pooled, test)
        out["pooled_total_common_test"] = score(pooled_total, test)
    out["best_silo_common_test"] = out["alone_common_test"][best]
    own_alone = [score(m, s.test) for m, s in zip(alone, silos, strict=True)]
    out["own_alone"] = own_alone
    compared = [("fedavg", models), *stepped.items(), ("cyclic", [cyclic] * len(silos))]
    if pool:
        compared += [("pooled", [pooled] * len(silos)), ("pooled_total", [pooled_total] * len(silos))]
    for name, per_silo in compared:
        if name in stepped:
            out[f"{name}_common_test"] = float(np.mean([score(m, test) for m in per_silo]))
        out[f"gain_own_{name}"] = [score(m, s.test) - a for m, s, a in zip(per_silo, silos, own_alone, strict=True)]
    return out


def _ms(values: list[float]) -> list[float]:
    return [round(float(np.mean(values)), 4), round(float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, 4)]


def model_names(run: dict[str, Any]) -> list[str]:
    """The compared models of a run, in order: FedAvg, any stepped FedAvg, the pooled ones."""
    stepped = [k[: -len("_common_test")] for k in run
               if k.startswith(("fedavg_step", "fedavg_distill")) and k.endswith("_common_test")]
    distilled = [n for n in ("cyclic_distill", "cyclic_each", "cyclic_end_average", "cyclic_distill_each",
                             "cyclic_distill_end_average") if f"{n}_common_test" in run]
    pooled = ["pooled", "pooled_total"] if "pooled_common_test" in run else []
    return ["fedavg", *stepped, *pooled, "cyclic", *distilled]


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    names = model_names(runs[0])
    s: dict[str, Any] = {k: _ms([r[k] for r in runs])
                         for k in ["best_silo_common_test", *(f"{n}_common_test" for n in names)]}
    for name in names:
        s[f"margin_{name}"] = _ms([r[f"{name}_common_test"] - r["best_silo_common_test"] for r in runs])
        gains = np.array([r[f"gain_own_{name}"] for r in runs])  # (seeds, silos)
        s[f"gain_own_{name}_per_silo"] = [_ms(list(gains[:, i])) for i in range(gains.shape[1])]
    return s


def _label(name: str) -> str:
    if name.startswith("fedavg_step"):
        return f"FedAvg, {name[len('fedavg_step'):]}x the averaged change"
    return {"fedavg": "FedAvg (in-process)", "pooled": "pooled, one silo's steps",
            "pooled_total": "pooled, all silos' steps", "cyclic": "cyclic (one model visits every silo)",
            "fedavg_distill": "FedAvg, keeping the round's start on unannotated labels",
            "cyclic_distill": "cyclic, keeping the arriving model on unannotated labels",
            "cyclic_each": "cyclic, each silo's own last model (what its peer commits)",
            "cyclic_end_average": "cyclic, the mean of the silos' last models",
            "cyclic_distill_each": "cyclic keeping unannotated labels, each silo's own last model",
            "cyclic_distill_end_average": "cyclic keeping unannotated labels, the mean of the silos' last models",
            }[name]


def markdown(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    lines = [
        "# Pooled data and cyclic weight transfer against the best silo "
        f"({doc['experiment']}, arm {doc['arm']!r}, scale {doc['scale']}, "
        f"seeds {doc['seeds']})", "",
        f"{doc['silos']} silos, {doc['rounds']} rounds x {doc['local_steps']} steps. Test half of the shared test set "
        "(the best silo chosen on the validation half); mean ± std over seeds. Written by `bench/probe_pooled.py`.", "",
        "| model | common test | margin over the best silo |", "|---|---|---|",
        f"| best silo alone | {s['best_silo_common_test'][0]:.3f} ± {s['best_silo_common_test'][1]:.3f} | |",
    ]
    names = model_names(doc["runs"][0])
    labels = [_label(n) for n in names]
    for name, label in zip(names, labels, strict=True):
        v, m = s[f"{name}_common_test"], s[f"margin_{name}"]
        lines.append(f"| {label} | {v[0]:.3f} ± {v[1]:.3f} | {m[0]:+.3f} ± {m[1]:.3f} |")
    lines += ["", "Own test set, each silo against itself alone (mean ± std over seeds):", "",
              "| silo | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for i in range(doc["silos"]):
        cells = [s[f"gain_own_{n}_per_silo"][i] for n in names]
        lines.append(f"| {i} | " + " | ".join(f"{m:+.3f} ± {d:.3f}" for m, d in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--arm", help="the arm's name (default: the first)")
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument("--seeds", help="comma-separated (default: the experiment's)")
    parser.add_argument("--server-steps", default="",
                        help="comma-separated steps > 1 along each round's averaged change (extra FedAvg arms)")
    parser.add_argument("--no-pooled", action="store_true",
                        help="leave out the pooled models (tasks whose silos label differently: organs, lesion)")
    parser.add_argument("--distill", action="store_true",
                        help="add FedAvg and cyclic arms that train unannotated labels towards the model as it "
                             "arrived (tasks that distill: organs)")
    parser.add_argument("--ring-ends", action="store_true",
                        help="add cyclic arms scored as the peers commit them (each silo's own last model) and "
                             "as the mean of those models")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    exp = load_experiment(args.experiment)
    arms = {a.name: a for a in exp.arms}
    if args.arm and args.arm not in arms:
        parser.error(f"unknown arm {args.arm!r}; known: {list(arms)}")
    arm = arms[args.arm] if args.arm else exp.arms[0]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(exp.seeds)
    steps = tuple(float(g) for g in args.server_steps.split(",") if g)
    t0 = time.perf_counter()
    runs = []
    for seed in seeds:
        sc, _ = run_scenario(exp, arm, seed, args.scale, Path("/nonexistent"))
        runs.append(one(sc, seed, steps, not args.no_pooled, args.distill, args.ring_ends))
        print(json.dumps({"seed": seed, "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    doc = {"experiment": exp.name, "arm": arm.name, "scale": args.scale, "seeds": seeds, "task": sc.task,
           "pooled": not args.no_pooled,
           "server_steps": list(steps), "distill": args.distill, "ring_ends": args.ring_ends,
           "silos": sc.peers, "rounds": sc.rounds, "local_steps": sc.local_steps, "runs": runs,
           "summary": summary(runs), "seconds": round(time.perf_counter() - t0, 1)}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "probe_pooled.json").write_text(json.dumps(doc, indent=2) + "\n")
        (args.out / "probe_pooled.md").write_text(markdown(doc))
    print(json.dumps(doc["summary"]))


if __name__ == "__main__":
    main()
