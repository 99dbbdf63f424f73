"""Probe: does FedEFM's EMD weighting tell experts apart on our data? Prints one JSON object.

FedEFM weighs each returned expert (our model, trained by a neighbour on its data) by the
Earth Mover's Distance between the expert's and our model's feature maps on our own batch
(``strategies/fedefm.py``: ``w_j ∝ exp(-EMD_j / weight_temperature)``). An independent
probe saw the weights stay at 0.50 ± 0.01 with two experts. This measures why, and whether
anything in reach makes the weighting matter.

Set-up (catheter, ``holdout_source = "clinical"``, one source per silo, 4 silos): the
remaining 3 sources go ring-wise, so silo 3 sees the **same** source as silo 0 and silos
1 and 2 see others. The student is silo 0's model after ``--warm`` steps on its own data;
expert ``j`` is a copy trained ``k`` more steps on silo ``j``'s data (a train-request),
for ``k`` in ``--expert-steps``. On silo 0's batches we record, per expert:

* the batch-mean EMD (what ``expert_weights`` uses), its spread across experts relative to
  its mean, and the resulting weights at each temperature in ``--temperatures``;
* how often the same-source expert (silo 3) is the closest, per batch and per sample
  (``per-sample`` weighting would use the latter);
* the same for the output layer (class-probability maps) instead of the feature layer.

Usage::

    python bench/probe_fedefm_weights.py --seeds 0,1,2 > probe.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from typing import Any

import numpy as np
import torch

from silomesh.models.registry import get_task
from silomesh.models.train import batch_stream, train_local
from silomesh.strategies.emd import feature_map_emd, similarity_weights

SAME_SOURCE = 3  # with 3 sources over 4 silos ring-wise, silo 3 shares silo 0's source


def probe(seed: int, warm: int, expert_steps: list[int], temperatures: list[float], batches: int,
          image_size: int, n_train: int, lr: float) -> dict[str, Any]:
    task = get_task("catheter", image_size=image_size, n_train=n_train, n_test=8, n_test_source=8,
                    holdout_source="clinical", sources_per_silo=1)
    fed = task.make_federation(4, seed)
    sources = [s.info["sources"] for s in fed.silos]
    assert sources[SAME_SOURCE] == sources[0] and all(sources[j] != sources[0] for j in (1, 2)), sources
    student = task.make_model("tiny", seed=seed)
    train_local(task, student, fed.silos[0].train, warm, 8, lr, seed=seed)
    student.eval()
    out: dict[str, Any] = {"seed": seed, "sources": sources, "by_expert_steps": {}}
    for k in expert_steps:
        experts = []
        for j in (1, 2, 3):
            e = copy.deepcopy(student)
            train_local(task, e, fed.silos[j].train, k, 8, lr, seed=seed + 100 + j)
            e.eval()
            experts.append(e)
        rng = np.random.default_rng(seed + 7)
        stream = batch_stream(fed.silos[0].train, 8, rng)
        layers: dict[str, dict[str, list[Any]]] = {"features": {"batch": [], "sample": []},
                                                    "output": {"batch": [], "sample": []}}
        with torch.no_grad():
            for _ in range(batches):
                x = next(stream)["image"]
                s_out, s_feat = student.forward_features(x)
                e_pairs = [e.forward_features(x) for e in experts]
                for layer, s_map, e_maps in (("features", s_feat, [f for _, f in e_pairs]),
                                             ("output", torch.softmax(s_out, 1),
                                              [torch.softmax(o, 1) for o, _ in e_pairs])):
                    per_sample = np.stack([feature_map_emd(s_map, m, grid=8) for m in e_maps])  # (3, B)
                    layers[layer]["sample"].append(per_sample)
                    layers[layer]["batch"].append(per_sample.mean(axis=1))
        result: dict[str, Any] = {}
        for layer, rec in layers.items():
            batch_emd = np.array(rec["batch"])  # (batches, 3)
            sample_emd = np.concatenate(rec["sample"], axis=1)  # (3, batches * B)
            mean = batch_emd.mean(axis=0)
            result[layer] = {
                "mean_emd": dict(zip(("silo1", "silo2", "silo3_same_source"), mean.round(6).tolist(), strict=True)),
                "relative_spread": float((mean.max() - mean.min()) / max(mean.mean(), 1e-12)),
                "same_source_closest_batches": float(np.mean(batch_emd.argmin(axis=1) == 2)),
                "same_source_closest_samples": float(np.mean(sample_emd.argmin(axis=0) == 2)),
                "weights": {str(t): np.mean([similarity_weights(b, "softmax", t) for b in batch_emd],
                                            axis=0).round(4).tolist() for t in temperatures},
            }
        out["by_expert_steps"][str(k)] = result
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--warm", type=int, default=50, help="student's own steps before the probe")
    ap.add_argument("--expert-steps", default="10,50", help="steps each expert trains on its silo")
    ap.add_argument("--temperatures", default="0.1,0.01,0.001")
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--n-train", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.01)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = [probe(s, args.warm, [int(k) for k in args.expert_steps.split(",")],
                  [float(t) for t in args.temperatures.split(",")], args.batches, args.image_size,
                  args.n_train, args.lr) for s in seeds]
    json.dump({"benchmark": "probe_fedefm_weights", "args": vars(args), "runs": runs,
               "wall_seconds": round(time.time() - t0, 1)}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
