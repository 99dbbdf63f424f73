"""Benchmark: does each strategy help on the task it was made for? Prints one JSON object.

An in-process federation: one :class:`silomesh.peer.learner.Learner` per silo (the same
object a peer daemon drives), neighbours on a ring, and each round exactly what
``peer/rounds.py`` does, minus the network:

* ``fedavg`` / ``segviz`` / ``fedmix``: every learner ``train(steps)``; then each
  aggregates its trained state with its neighbours' trained (shared) states through
  ``strategy.aggregate`` (``Contribution`` with ``n_samples``, the neighbour's mean
  training ``loss`` and ``degree``); then all load their new state.
* ``fedefm``: each learner's start-of-round state is trained by each neighbour
  (``train_copy(state, steps)``, a ``train-request``); the owner ``distill``\\ s the
  returned experts and ``strategy.aggregate``\\ s with them (the mixing step).
* ``local``: every learner trains ``steps`` per round and exchanges nothing.

Experiments (``--task``):

* ``catheter``: 4 silos, each sees 2 of the 4 sources (ring-wise); Dice on the shared
  per-source test sets, split into the sources a silo saw and the ones it never saw.
  Arms: local, fedavg, fedefm with ``mix`` in ``--mixes``.
* ``organs``: 4 silos, silo k labels organ k only; per-organ Dice of the silo that labels
  the organ, on the federation's fully labelled test set. Arms: local, fedavg, segviz.
* ``lesion``: 6 silos with pixel masks / boxes / image-level labels (twice each), the
  mask silos keeping only ``--lesion-mask-images`` training images (FedMix's premise:
  pixel labels are scarce; 0 keeps all); Dice on each silo's own (pixel-labelled) test
  set. Arms: local, fedavg (uniform weights,
  weak losses), fedmix with ``pseudo_weight = 0`` (adaptive weights only), fedmix
  (pseudo-labels + adaptive weights), fedmix with ``lam = 0`` (pseudo-labels, uniform
  weights), and pixel-only (only the mask silos federate; every silo is scored with
  their model).

Each arm reports its metrics after every round (``history``), after the last (``final``)
and averaged over the last three rounds (``last3``), plus its wall time.

Seeds: data ``--seed``, the shared initial model ``--seed`` (FedMix's second network
``seed + TWIN_SEED_OFFSET``), batch order from the learners' own counters; results are
identical from run to run on one machine. Torch runs on one thread per process; arms
run in ``--jobs`` processes. Reproduce the numbers in docs/STRATEGIES.md ("Measured",
about 9 minutes on 2 cores) with::

    .venv/bin/python bench/bench_strategies.py --out bench-strategies.json
    .venv/bin/python bench/bench_strategies.py --task catheter --seed 1
    .venv/bin/python bench/bench_strategies.py --task lesion --lesion-mask-images 0
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from silomesh.models.registry import get_task
from silomesh.models.task import Federation, Task
from silomesh.peer.learner import Learner
from silomesh.strategies import Contribution, LocalStep, get_strategy

Arm = dict[str, Any]


def ring(n: int) -> list[list[int]]:
    """Neighbours on a ring (two silos: each other)."""
    if n == 2:
        return [[1], [0]]
    return [sorted({(i - 1) % n, (i + 1) % n}) for i in range(n)]


def make_learners(task: Task, fed: Federation, strategy: str, params: dict[str, Any],
                  args: argparse.Namespace, silos: Sequence[int] | None = None) -> list[Learner]:
    """One learner per silo, all starting from the same model (seed ``args.seed``)."""
    chosen = range(len(fed.silos)) if silos is None else silos
    return [
        Learner(task, fed.silos[i], size=args.size, init_seed=args.seed, batch_size=args.batch_size,
                lr=args.lr, strategy=get_strategy(strategy, params))
        for i in chosen
    ]


def update_round(learners: list[Learner], graph: list[list[int]], steps: int) -> dict[str, Any]:
    """Train, exchange shared states, aggregate (``peer/rounds.py``'s update round)."""
    trained: list[LocalStep] = [lr.train(steps) for lr in learners]
    new_states = []
    for i, lr in enumerate(learners):
        contributions = [
            Contribution(
                peer_id=f"silo{j}",
                state=learners[j].shared(trained[j].state),
                n_samples=learners[j].n_samples,
                loss=trained[j].mean_loss if math.isfinite(trained[j].mean_loss) else None,
                degree=len(graph[j]),
            )
            for j in graph[i]
        ]
        own_loss = trained[i].mean_loss if math.isfinite(trained[i].mean_loss) else None
        result = lr.strategy.aggregate(trained[i].state, float(lr.n_samples), contributions,
                                       own_degree=len(graph[i]), own_loss=own_loss)
        new_states.append({**trained[i].state, **result.state})
    for lr, state in zip(learners, new_states, strict=True):
        lr.load(state)
    rep: dict[str, Any] = {"train_loss": float(np.nanmean([t.mean_loss for t in trained]))}
    infos = [t.info for t in trained if t.info]
    if infos:  # FedMix pseudo-label statistics, summed over the weakly labelled silos
        rep["pseudo"] = {k: int(sum(i[k] for i in infos))
                         for k in ("weak_samples", "kept", "kept_foreground")}
    return rep


def fedefm_round(learners: list[Learner], graph: list[list[int]], steps: int) -> dict[str, Any]:
    """Train-requests to every neighbour, distillation, mixing (``peer/rounds.py``)."""
    starts = [lr.state() for lr in learners]
    experts = [[learners[j].train_copy(starts[i], steps) for j in graph[i]] for i in range(len(learners))]
    losses = []
    for i, lr in enumerate(learners):
        contributions = [Contribution(f"silo{j}", e.state, learners[j].n_samples, loss=e.mean_loss)
                         for j, e in zip(graph[i], experts[i], strict=True)]
        info = lr.learn_from_experts(contributions)
        result = lr.strategy.aggregate(lr.state(), float(lr.n_samples), contributions)
        lr.load({**lr.state(), **result.state})
        losses.append(float(np.mean([e.mean_loss for e in experts[i]])))
        del info
    return {"train_loss": float(np.mean(losses))}


def local_round(learners: list[Learner], steps: int) -> dict[str, Any]:
    trained = [lr.train(steps) for lr in learners]
    return {"train_loss": float(np.nanmean([t.mean_loss for t in trained]))}


def run_arm(learners: list[Learner], kind: str, graph: list[list[int]], rounds: int, steps: int,
            score: Callable[[list[Learner]], dict[str, Any]]) -> Arm:
    """``rounds`` rounds of ``kind`` (local | update | fedefm); score after each."""
    history = []
    started = time.perf_counter()
    for _ in range(rounds):
        if kind == "local":
            rep = local_round(learners, steps)
        elif kind == "fedefm":
            rep = fedefm_round(learners, graph, steps)
        else:
            rep = update_round(learners, graph, steps)
        history.append({**rep, **score(learners)})
    seconds = time.perf_counter() - started
    return {"final": history[-1], "last3": mean_of(history[-3:]), "history": history,
            "seconds": round(seconds, 1), "seconds_per_round": round(seconds / rounds, 2)}


def mean_of(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over rounds of every number, and of every dict of numbers, in ``entries``."""
    out: dict[str, Any] = {}
    for k, v in entries[0].items():
        if isinstance(v, float):
            out[k] = float(np.mean([e[k] for e in entries]))
        elif isinstance(v, dict) and all(isinstance(x, float) for x in v.values()):
            out[k] = {kk: float(np.mean([e[k][kk] for e in entries])) for kk in v}
    return out


# --- the three experiments ------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def federation(name: str, seed: int, image_size: int, n_train: int, n_test_source: int,
               mask_images: int) -> tuple[Task, Federation]:
    """The experiment's task and federation (cached per process)."""
    task = get_task(name)
    if name == "catheter":
        fed = task.make_federation(4, seed, image_size=image_size, n_train=n_train, n_test=16,
                                   n_test_source=n_test_source)
    elif name == "organs":
        fed = task.make_federation(4, seed, image_size=image_size, n_train=n_train, n_test=16)
    else:
        fed = task.make_federation(6, seed, image_size=image_size, n_train=n_train, n_test=32)
        if mask_images:  # FedMix's premise: pixel masks are scarce, weak labels plentiful
            fed = dataclasses.replace(fed, silos=[
                dataclasses.replace(s, train=s.train.subset(np.arange(mask_images)))
                if s.train.label_kind == "mask" else s for s in fed.silos])
    return task, fed


def _fed(name: str, args: argparse.Namespace) -> tuple[Task, Federation]:
    return federation(name, args.seed, args.image_size, args.n_train, args.n_test_source,
                      args.lesion_mask_images)


def catheter_score(fed: Federation) -> Callable[[list[Learner]], dict[str, Any]]:
    """Dice per shared source test set, averaged over (silo, seen) and (silo, unseen)."""
    sources = [k.split(":", 1)[1] for k in fed.tests if k.startswith("source:")]

    def score(learners: list[Learner]) -> dict[str, Any]:
        seen, unseen, per_silo = [], [], []
        for lr in learners:
            own = set(lr.silo.info["sources"])
            dice = {s: lr.evaluate(fed.tests[f"source:{s}"])["dice"] for s in sources}
            seen += [dice[s] for s in sources if s in own]
            unseen += [dice[s] for s in sources if s not in own]
            per_silo.append({s: round(v, 4) for s, v in dice.items()})
        return {"dice_seen": float(np.mean(seen)), "dice_unseen": float(np.mean(unseen)),
                "dice_per_silo": per_silo}

    return score


def organs_score(fed: Federation) -> Callable[[list[Learner]], dict[str, Any]]:
    """Per-organ Dice of the silo that labels the organ, on the fully labelled test set."""
    names = [s.info["organ"] for s in fed.silos]
    test = fed.tests["all"]

    def score(learners: list[Learner]) -> dict[str, Any]:
        reports = [lr.evaluate(test) for lr in learners]
        own = {o: reports[k][f"dice_{o}"] for k, o in enumerate(names)}
        return {"dice_own_organ": own, "dice": float(np.mean(list(own.values()))),
                "dice_all_organs_per_silo": [round(r["dice"], 4) for r in reports]}

    return score


def lesion_summary(fed: Federation, dices: list[float]) -> dict[str, Any]:
    kinds = [s.train.label_kind for s in fed.silos]
    by_kind = {k: float(np.mean([d for d, kk in zip(dices, kinds, strict=True) if kk == k]))
               for k in ("mask", "box", "present")}
    return {"dice": float(np.mean(dices)), "dice_by_kind": by_kind,
            "dice_per_silo": [round(d, 4) for d in dices]}


def lesion_score(fed: Federation) -> Callable[[list[Learner]], dict[str, Any]]:
    """Dice of every silo's model on its own (pixel-labelled) test set."""
    return lambda learners: lesion_summary(fed, [lr.evaluate()["dice"] for lr in learners])


def pixel_only_score(fed: Federation) -> Callable[[list[Learner]], dict[str, Any]]:
    """The mask silos' average model, scored on every silo's test set."""
    def score(learners: list[Learner]) -> dict[str, Any]:
        states = [lr.state() for lr in learners]
        avg = {k: np.mean([s[k] for s in states], axis=0).astype(v.dtype) for k, v in states[0].items()}
        probe = learners[0]
        probe.load(avg)
        try:
            return lesion_summary(fed, [probe.evaluate(s.test)["dice"] for s in fed.silos])
        finally:
            probe.load(states[0])
    return score


#: experiment -> arm -> (round kind, strategy, strategy params)
ARMS: dict[str, dict[str, tuple[str, str, dict[str, Any]]]] = {
    "catheter": {"local": ("local", "fedavg", {}), "fedavg": ("update", "fedavg", {})},
    "organs": {"local": ("local", "fedavg", {}), "fedavg": ("update", "fedavg", {}),
               "segviz": ("update", "segviz", {})},
    "lesion": {
        "local": ("local", "fedavg", {}),
        "fedavg_uniform": ("update", "fedavg", {"weighting": "uniform"}),
        "fedmix_weights_only": ("update", "fedmix", {"pseudo_weight": 0}),
        "fedmix_uniform": ("update", "fedmix", {"lam": 0}),
        "fedmix": ("update", "fedmix", {}),
        "pixel_only": ("update", "fedavg", {"weighting": "uniform"}),
    },
}


def arms_of(name: str, args: argparse.Namespace) -> dict[str, tuple[str, str, dict[str, Any]]]:
    arms = dict(ARMS[name])
    if name == "catheter":
        for mix in args.mixes:
            arms[f"fedefm_mix{mix:g}"] = ("fedefm", "fedefm",
                                         {"mix": mix, "distill_steps": args.steps, "lr": args.lr})
    return arms


def run_job(name: str, arm: str, args: argparse.Namespace) -> Arm:
    """One arm of one experiment (a process-pool job)."""
    torch.set_num_threads(1)
    task, fed = _fed(name, args)
    kind, strategy, params = arms_of(name, args)[arm]
    silos = None
    if arm == "pixel_only":
        silos = [i for i, s in enumerate(fed.silos) if s.train.label_kind == "mask"]
    learners = make_learners(task, fed, strategy, params, args, silos=silos)
    graph = ring(len(learners))
    score = {"catheter": catheter_score, "organs": organs_score, "lesion": lesion_score}[name](fed)
    if arm == "pixel_only":
        score = pixel_only_score(fed)
    result = run_arm(learners, kind, graph, args.rounds, args.steps, score)
    result["strategy"] = {"name": strategy, **params}
    return result


def describe(name: str, args: argparse.Namespace) -> dict[str, Any]:
    _, fed = _fed(name, args)
    out: dict[str, Any] = {"silos": len(fed.silos), "graph": "ring",
                           "train_images": [len(s.train) for s in fed.silos]}
    if name == "catheter":
        out["silo_sources"] = [s.info["sources"] for s in fed.silos]
    elif name == "organs":
        out["organs"] = [s.info["organ"] for s in fed.silos]
    else:
        out["label_kinds"] = [s.train.label_kind for s in fed.silos]
    return out


EXPERIMENTS = tuple(ARMS)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--task", choices=[*EXPERIMENTS, "all"], default="all")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=36, help="local steps per round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="tiny")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--n-train", type=int, default=48, help="training images per silo")
    p.add_argument("--n-test-source", type=int, default=32, help="catheter: test frames per source")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--mixes", type=float, nargs="+", default=[0.0, 0.5, 0.75],
                   help="fedefm mix values")
    p.add_argument("--lesion-mask-images", type=int, default=8,
                   help="lesion: training images kept at the pixel-mask silos (0: all)")
    p.add_argument("--jobs", type=int, default=2, help="arms run in this many processes")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    tasks = list(EXPERIMENTS) if args.task == "all" else [args.task]
    out: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpus": os.cpu_count(), "torch_threads": 1},
    }
    jobs = [(name, arm) for name in tasks for arm in arms_of(name, args)]
    if args.jobs > 1:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            futures = [pool.submit(run_job, name, arm, args) for name, arm in jobs]
            results = [f.result() for f in futures]
    else:
        results = [run_job(name, arm, args) for name, arm in jobs]
    for name in tasks:
        out[name] = {**describe(name, args), "arms": {}}
    for (name, arm), result in zip(jobs, results, strict=True):
        out[name]["arms"][arm] = result
    out["wall_seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(out, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return out


if __name__ == "__main__":
    main()
