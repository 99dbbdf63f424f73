"""``--compare-local``: what each hospital would reach training alone on the same budget.

Every silo trains the same initial model (the federation's shared seed) on its own
data for ``rounds x local_steps`` optimiser steps, in the same per-round chunks with
the same optimiser settings as a peer (a fresh AdamW with the run's ``lr`` and
``batch_size`` per round), and is evaluated on its own test set after every round —
the same set its peer is evaluated on. With ``personal_steps`` each silo trains as many
more steps at the end as a peer's personal model has had (``Scenario.personal_total_steps``:
every round's for Ditto). With ``keep_unlabelled`` the silo alone trains under the same
rule as its peer: each chunk keeps what its labels leave open towards the model as the
chunk began (for weak lesion labels, self-training on its own model's outputs).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from silomesh.simnet.plan import Plan
from silomesh.simnet.runtime import limit_torch_threads

log = logging.getLogger(__name__)


def compare_local(plan: Plan) -> dict[str, Any]:
    """Train every silo alone; returns per-peer final metrics, history, mean and best."""
    from silomesh.models.registry import get_task
    from silomesh.models.train import frozen_copy, train_local
    from silomesh.peer.learner import federation_seed, synthetic_silo

    limit_torch_threads()
    sc = plan.scenario
    options = sc.effective_task_options  # the federation's geometry (image size, sinogram size)
    task = get_task(sc.task, **options)
    metric = task.metric
    init_seed = federation_seed(plan.federation)
    per_peer: dict[str, float] = {}
    history: list[dict[str, float]] = [{} for _ in range(plan.rounds)]
    for p in plan.peers:
        silo = synthetic_silo(sc.task, plan.n, p.index, sc.seed, **options)
        model = task.make_model(sc.size, seed=init_seed)
        for r in range(plan.rounds):
            train_local(task, model, silo.train, sc.local_steps, sc.batch_size, sc.lr, seed=init_seed + r + 1,
                        teacher=frozen_copy(model) if sc.keep_unlabelled else None)
            value = float(task.evaluate(model, silo.test)[metric])
            history[r][p.name] = value
        per_peer[p.name] = history[-1][p.name]
        if sc.personal_steps > 0:  # as many steps as a personal model has had
            train_local(task, model, silo.train, sc.personal_total_steps, sc.batch_size, sc.lr,
                        seed=init_seed + plan.rounds + 1, teacher=frozen_copy(model) if sc.keep_unlabelled else None)
            per_peer[p.name] = float(task.evaluate(model, silo.test)[metric])
        log.info("local-only %s: %s=%.4f", p.name, metric, per_peer[p.name])
    values = np.array(list(per_peer.values()), dtype=float)
    return {
        "metric": metric,
        "per_peer": per_peer,
        "history": [{"round": r, "mean": float(np.mean(list(h.values()))), "per_peer": h}
                    for r, h in enumerate(history)],
        "mean": float(np.mean(values)),
        "best": float(np.max(values)),
        "steps": plan.rounds * sc.local_steps + sc.personal_total_steps,
    }
