"""Personal models: trained on this silo's own data after each round, beside the shared one.

A hospital contributes the **shared** model (what its neighbours receive and what rounds
resume from) and uses a **personal** one on its own patients. ``[personal] method``:

* ``finetune`` (default): the round's shared model trained ``[personal] steps`` more steps
  on its own training data.
* ``head``: the round's shared model with only its task head (``head_prefixes``: the last
  1x1 convolution of the U-Nets) trained ``steps`` steps, the body frozen (FedPer / FedRep's
  split: the representation is shared, the head personal). With partial labels (organs:
  a silo annotates one organ) only that organ's row of the head learns; the organs the
  silo never annotated keep the shared model's detectors, which a full fine-tune degrades
  as the body drifts (docs/RESULTS.md, "Personal models").
* ``ditto`` (Li et al., "Ditto: Fair and Robust Federated Learning Through
  Personalization", ICML 2021): one personal model lives across rounds. After each round
  it is trained ``steps`` steps on its own data with the loss plus
  ``ditto_lambda / 2 * ||personal - shared||^2``, the pull towards the round's shared
  model. It starts as the first round's shared model, and after a restart goes on from
  the newest stored personal model.

This works with every strategy because it runs after the strategy's round and only reads
the committed model.

The personal model is stored like any model version, with origin ``personal`` (the ref
``personal`` names the newest), and its metrics on the silo's own test set are recorded as
``personal_<metric>`` of the round. It never leaves the peer: it is not announced, not
sent, and a failed personal step costs only that round's personal model, never the round.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import trio

from silomesh.models.train import train_local, with_teacher
from silomesh.peer.config import PersonalConfig
from silomesh.peer.learner import Learner, StateDict, load_numpy, to_numpy
from silomesh.peer.safety import state_violation
from silomesh.peer.store import PERSONAL, Store
from silomesh.protocol import state_digest
from silomesh.strategies.segviz import finetune_head

if TYPE_CHECKING:
    from silomesh.peer.context import RoundContext

log = logging.getLogger(__name__)

#: seeds the fine-tune's batch order apart from the round's own training
SEED_OFFSET = 0x5E45


def fine_tune(
    learner: Learner, config: PersonalConfig, lr: float, round: int, previous: StateDict | None = None
) -> tuple[StateDict, dict[str, float]]:
    """This round's personal model: a copy of the learner's (shared) model (``finetune``), or
    ``previous`` pulled towards it (``ditto``; None: start from the shared model), trained
    ``config.steps`` steps on its silo's data; returns its state and its metrics on the silo's
    own test set. The learner's own model and its seed counter are not touched, so a peer
    trains the same shared models with and without personal ones."""
    model = copy.deepcopy(learner.model)
    teacher = learner.teacher(learner.model)  # [rounds] keep_unlabelled: keep the shared model's other labels
    lr = config.lr if config.lr is not None else lr
    seed = learner.init_seed + SEED_OFFSET + round
    if config.method == "head":
        prefixes = tuple(getattr(model, "head_prefixes", ()))
        if not prefixes:
            raise ValueError(f"[personal] method = \"head\" needs a model with a task head; "
                             f"{type(model).__name__} names none (head_prefixes)")
        rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        data, size = learner.silo.train, learner.batch_size
        finetune_head(model, lambda: data.batches(size, rng),
                      lambda m, b: learner.task.loss(m, with_teacher(b, teacher)), prefixes, config.steps, lr)
    elif config.method == "ditto":
        anchor = {name: p.detach().clone() for name, p in learner.model.named_parameters()}
        own = model.state_dict()
        if previous is not None and (previous.keys() != own.keys()
                                     or any(previous[k].shape != tuple(own[k].shape) for k in own)):
            log.warning("round %d: the stored personal model does not fit the model; "
                        "Ditto starts again from the shared model", round)
        elif previous is not None:
            load_numpy(model, previous)
        train_local(learner.task, model, learner.silo.train, config.steps, learner.batch_size, lr, seed=seed,
                    anchor=anchor, anchor_weight=config.ditto_lambda, teacher=teacher)
    else:
        train_local(learner.task, model, learner.silo.train, config.steps, learner.batch_size, lr, seed=seed,
                    teacher=teacher)
    metrics = learner.task.evaluate(model, learner.silo.test)
    return to_numpy(model), {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


async def previous_personal(ctx: RoundContext) -> StateDict | None:
    """Ditto's personal model to go on from: the newest stored one (None: none yet, or its
    file is unreadable; Ditto then starts from the shared model)."""
    record = ctx.store.latest_personal_model()
    if record is None:
        return None
    try:
        return await ctx.compute.run_blocking(Store.read_model_file, record)
    except Exception:  # a missing or unreadable file: start again, and say so
        log.exception("%s: personal model %s unreadable; Ditto starts again from the shared model",
                      ctx.peer_id[-8:], record.digest[:12])
        return None


async def personalise(ctx: RoundContext, round: int, shared_digest: str) -> bool:
    """Fine-tune and store round ``round``'s personal model (if ``[personal] steps`` > 0).

    Returns whether one was stored. Never raises for a failed fine-tune: it is logged and
    the round, already committed, stands.
    """
    config = ctx.personal
    if config.steps <= 0:
        return False
    try:
        previous = await previous_personal(ctx) if config.method == "ditto" else None
        state, metrics = await ctx.compute.run(fine_tune, ctx.learner, config, ctx.rounds.lr, round, previous)
        why = state_violation(state, metrics)
        if why is not None:
            log.warning("%s round %d: personal model not kept: %s", ctx.peer_id[-8:], round, why)
            return False
        digest = state_digest(state).hex()
        store = ctx.store
        with trio.CancelScope(shield=True):
            await ctx.compute.run_blocking(store.write_model_file, state, digest)
            with store.atomic():
                store.save_model(state, digest, round=round, parent=shared_digest, origin=PERSONAL)
                for name, value in metrics.items():
                    if math.isfinite(value):
                        store.record_metric(round, f"personal_{name}", value)
        return True
    except Exception:  # a personal model is a convenience: its failure never costs the round
        log.exception("%s round %d: the personal model could not be made", ctx.peer_id[-8:], round)
        return False
