"""Probe: what a personal step does to each silo's shared model, on its own test set. Prints JSON.

Reads one finished simnet run (``DIR`` with ``report.json`` and the peers' stores) and, for
every silo, takes its peer's final shared model and trains copies on the silo's own data:
the whole model (``[personal] method = "finetune"``) at each learning rate in ``--lrs`` for
each step count in ``--steps``, and the task head only (``"head"``) at the run's learning
rate. Each copy, the shared model and the silo trained alone on the run's budget (as
``per_silo`` does) are scored on the silo's own test set. On organs (partial labels: a
silo annotates one organ, its test set all of them) this shows why a full fine-tune loses
to the silo alone while the shared model gains (docs/RESULTS.md, "Personal models").

Usage::

    python bench/probe_personal.py "runs/results/worth_joining_organs_personal/fine-tune, 4 silos/seed0"
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def probe(run_dir: Path, lrs: list[float], steps: list[int], seed: int) -> dict[str, Any]:
    from silomesh.models.train import train_local
    from silomesh.simnet.evaluations import RunModels
    from silomesh.simnet.runtime import limit_torch_threads
    from silomesh.simnet.scenario import make_scenario
    from silomesh.strategies.segviz import finetune_head

    limit_torch_threads()
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    sc = make_scenario(report["settings"], {})
    run = RunModels(sc, report)
    silos = []
    for i, (silo, shared) in enumerate(zip(run.federation.silos, run.final_models(), strict=True)):
        if shared is None:
            continue
        row: dict[str, Any] = {"silo": i, "shared": run.metric(shared, silo.test),
                               "alone": run.metric(run.train_alone(i), silo.test), "finetune": {}, "head": {}}
        for n in steps:
            for lr in lrs:
                model = copy.deepcopy(shared)
                train_local(run.task, model, silo.train, n, sc.batch_size, lr, seed=seed)
                model.eval()
                row["finetune"][f"lr={lr},steps={n}"] = run.metric(model, silo.test)
            model = copy.deepcopy(shared)
            rng = np.random.default_rng(seed)
            finetune_head(model, lambda: silo.train.batches(sc.batch_size, rng),  # noqa: B023 - used at once
                          lambda m, b: run.task.loss(m, dict(b)), model.head_prefixes, n, sc.lr)
            model.eval()
            row["head"][f"lr={sc.lr},steps={n}"] = run.metric(model, silo.test)
        silos.append(row)
        print(f"silo {i}: shared {row['shared']:.3f}, alone {row['alone']:.3f}", file=sys.stderr)
    return {"run": str(run_dir), "task": sc.task, "strategy": sc.strategy, "peers": sc.peers, "seed": sc.seed,
            "metric": run.task.metric, "probe_seed": seed, "silos": silos}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("run", type=Path, help="a finished simnet run's folder (report.json, peers/)")
    parser.add_argument("--lrs", default="0.003,0.001,0.0003,0.0001", help="full fine-tune learning rates")
    parser.add_argument("--steps", default="10,30", help="step counts")
    parser.add_argument("--seed", type=int, default=99, help="seeds the batch order of every copy")
    args = parser.parse_args()
    out = probe(args.run, [float(x) for x in args.lrs.split(",")], [int(x) for x in args.steps.split(",")],
                args.seed)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
