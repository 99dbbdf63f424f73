"""The same federation in Flower's simulation, for bench_ray.py's memory comparison (issue 20).

Not part of silomesh: it runs in a venv of its own that has Flower (``pip install
'flwr[simulation]==1.42.0'``, which brings its own Ray), and borrows silomesh's task, tiny
model, synthetic silos and local training from silomesh's venv (``--silomesh-site``, added
after Flower's own packages). N simulated clients, one per silo of the same seeded
catheter federation as ``silomesh simnet run --peers N --seed 0``; FedAvg over all
clients each round (Flower's server-side average, not silomesh's ring), ``--local-steps``
optimiser steps per round with the same batch size and learning rate as simnet's defaults.

Prints one JSON line: clients, rounds, seconds, and the mean Dice of the global model on
every silo's own test set after the last round.

    /tmp/flwr/bin/python bench/flower_sim.py --clients 100 --silomesh-site .venv/lib/python3.11/site-packages
"""

from __future__ import annotations

import argparse
import json
import site
import sysconfig
import time
from pathlib import Path
from typing import Any

ARGS: argparse.Namespace


def _setup() -> tuple[Any, Any, Any, Any, Any, dict[str, Any]]:
    # silomesh's packages after Flower's own (its Ray and numpy win), here and in Ray's workers:
    # a .pth file in this (Flower's own) venv, so every interpreter of it adds the directory
    purelib = Path(sysconfig.get_paths()["purelib"])
    line = f"import site; site.addsitedir({str(Path(ARGS.silomesh_site).resolve())!r})\n"
    pth = purelib / "zz_silomesh_site.pth"
    if not pth.is_file() or pth.read_text(encoding="utf-8") != line:
        pth.write_text(line, encoding="utf-8")
    site.addsitedir(ARGS.silomesh_site)
    from silomesh.models.registry import get_task
    from silomesh.models.train import train_local
    from silomesh.peer.learner import load_numpy, synthetic_silo, to_numpy
    from silomesh.simnet.scenario import make_scenario

    # the geometry and data sizes simnet gives the same scenario
    options = make_scenario({"peers": ARGS.clients, "size": "tiny", "task": "catheter"}).effective_task_options
    return get_task, train_local, synthetic_silo, to_numpy, load_numpy, options


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--silomesh-site", required=True, help="site-packages of silomesh's venv")
    ARGS = parser.parse_args()
    get_task, train_local, synthetic_silo, to_numpy, load_numpy, options = _setup()

    import torch
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    torch.set_num_threads(1)
    n, args = ARGS.clients, ARGS
    task = get_task("catheter", **options)
    init = task.make_model("tiny", seed=0)
    keys = list(to_numpy(init))
    initial = [to_numpy(init)[k] for k in keys]
    result: dict[str, Any] = {}

    class Silo(NumPyClient):  # type: ignore[misc]
        def __init__(self, index: int) -> None:
            self.index = index
            self.silo = synthetic_silo("catheter", n, index, 0, **options)
            self.model = task.make_model("tiny", seed=0)

        def fit(self, parameters: list[Any], config: dict[str, Any]) -> tuple[list[Any], int, dict[str, Any]]:
            torch.set_num_threads(1)
            load_numpy(self.model, dict(zip(keys, parameters, strict=True)))
            train_local(task, self.model, self.silo.train, args.local_steps, args.batch_size, args.lr,
                        seed=int(config.get("round", 0)) + 1)
            state = to_numpy(self.model)
            return [state[k] for k in keys], len(self.silo.train), {}

    def client_fn(context: Context) -> Any:  # noqa: ANN401 (Flower's Client)
        return Silo(int(context.node_config["partition-id"])).to_client()

    def server_fn(context: Context) -> ServerAppComponents:
        def fit_config(rnd: int) -> dict[str, Any]:
            return {"round": rnd}

        class Keep(FedAvg):  # type: ignore[misc]
            def aggregate_fit(self, rnd: int, results: list[Any], failures: list[Any]) -> tuple[Any, Any]:
                params, metrics = super().aggregate_fit(rnd, results, failures)
                result["clients_done"] = len(results)
                result["failures"] = len(failures)
                if params is not None:
                    result["final"] = parameters_to_ndarrays(params)
                return params, metrics

        strategy = Keep(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n,
                        on_fit_config_fn=fit_config, initial_parameters=ndarrays_to_parameters(initial))
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=args.rounds))

    t0 = time.time()
    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=n, backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    seconds = time.time() - t0
    dice = None
    if "final" in result:
        load_numpy(init, dict(zip(keys, result["final"], strict=True)))
        values = [float(task.evaluate(init, synthetic_silo("catheter", n, i, 0, **options).test)[task.metric])
                  for i in range(n)]
        dice = sum(values) / len(values)
    print(json.dumps({"clients": n, "rounds": args.rounds, "seconds": round(seconds, 1),
                      "clients_in_last_round": result.get("clients_done"), "failures": result.get("failures"),
                      "final_dice_mean": dice}), flush=True)


if __name__ == "__main__":
    main()
