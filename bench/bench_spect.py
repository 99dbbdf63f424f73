"""Benchmark SPECT reconstruction: FBP, MLEM and ReconNet after a short training.

Prints one JSON object: per method the reconstruction time (ms/image) and PSNR / SSIM /
NRMSE on a shared test set (half low dose, half infarcts), plus PSNR on the
infarct / normal and low / high dose subsets. The network is trained centrally on data
mixing both dose levels (an upper reference for the federated runs).

    .venv/bin/python bench/bench_spect.py --size 64 --steps 300 --mlem-iters 10 30
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np
import torch

from silomesh.models.spect import SpectTask, make_dataset, run_baselines
from silomesh.models.task import ArrayDataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--model", default="small", help="tiny | small | base")
    ap.add_argument("--n-train", type=int, default=384)
    ap.add_argument("--n-test", type=int, default=64)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument(
        "--mlem-iters",
        type=int,
        nargs="+",
        default=[10, 30],
        help="MLEM iteration counts to report (the last one is 'mlem')",
    )
    ap.add_argument("--no-attenuation", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    task = SpectTask(size=args.size, attenuation=not args.no_attenuation)
    cfg = task.config
    low, high = cfg.count_levels
    t0 = time.perf_counter()
    mixed = np.where(np.arange(args.n_train) % 2 == 0, low, high)
    train = make_dataset(args.n_train, args.seed, cfg, counts=mixed, infarct_rate=0.5)
    test_counts = np.where(np.arange(args.n_test) % 2 == 0, low, high)
    test = make_dataset(args.n_test, args.seed + 1, cfg, counts=test_counts, infarct_rate=0.5)
    data_seconds = time.perf_counter() - t0

    model = task.make_model(args.model, seed=args.seed)
    init = task.evaluate(model, test)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    rng = np.random.default_rng(args.seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    step = 0
    while step < args.steps:
        for batch in train.batches(args.batch, rng):
            opt.zero_grad()
            loss = task.loss(model, batch)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            if step >= args.steps:
                break
    train_seconds = time.perf_counter() - t0

    methods = ("fbp_noac", "fbp", "mlem_noac", "mlem", "network")
    iters = args.mlem_iters[-1]

    def run(data: ArrayDataset) -> dict[str, dict[str, float]]:
        geo = task.geometry
        res = run_baselines(data, geo, model=model, methods=methods, mlem_iterations=iters)
        for k in args.mlem_iters[:-1]:
            res[f"mlem_{k}"] = run_baselines(data, geo, methods=("mlem",), mlem_iterations=k)[
                "mlem"
            ]
        return res

    results = run(test)
    subsets = {
        "infarct": test.subset(np.flatnonzero(test["infarct"] == 1)),
        "normal": test.subset(np.flatnonzero(test["infarct"] == 0)),
        "low_dose": test.subset(np.flatnonzero(test["counts"] == np.float32(low))),
        "high_dose": test.subset(np.flatnonzero(test["counts"] == np.float32(high))),
    }
    for name, data in subsets.items():
        sub = run(data)
        for method, metrics in sub.items():
            results[method][f"psnr_{name}"] = metrics["psnr"]
    rounded = {m: {k: round(v, 3) for k, v in r.items()} for m, r in results.items()}
    out = {
        "size": args.size,
        "n_angles": task.geometry.n_angles,
        "attenuation": cfg.attenuation,
        "count_levels": list(cfg.count_levels),
        "n_train": args.n_train,
        "n_test": args.n_test,
        "mlem_iterations": iters,
        "model": args.model,
        "n_params": sum(p.numel() for p in model.parameters()),
        "train_steps": args.steps,
        "batch": args.batch,
        "train_seconds": round(train_seconds, 1),
        "data_seconds": round(data_seconds, 1),
        "loss_first_last": [
            round(float(np.mean(losses[:10])), 4),
            round(float(np.mean(losses[-10:])), 4),
        ],
        "network_init_psnr": round(init["psnr"], 3),
        "torch_threads": torch.get_num_threads(),
        "methods": rounded,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
