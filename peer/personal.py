"""Personal models: the shared model fine-tuned on this silo's own data after each round.

A hospital contributes the **shared** model (what its neighbours receive and what rounds
resume from) and uses a **personal** one on its own patients: the round's shared model
trained ``[personal] steps`` more steps on its own training data. This works with every
strategy because it runs after the strategy's round and only reads the committed model.

The personal model is stored like any model version, with origin ``personal`` (the ref
``personal`` names the newest), and its metrics on the silo's own test set are recorded as
``personal_<metric>`` of the round. It never leaves the peer: it is not announced, not
sent, not resumed after a restart, and a failed fine-tune costs only that round's personal
model, never the round.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import TYPE_CHECKING

import trio

from silomesh.models.train import train_local
from silomesh.peer.config import PersonalConfig
from silomesh.peer.learner import Learner, StateDict, to_numpy
from silomesh.peer.safety import state_violation
from silomesh.peer.store import PERSONAL
from silomesh.protocol import state_digest

if TYPE_CHECKING:
    from silomesh.peer.context import RoundContext

log = logging.getLogger(__name__)

#: seeds the fine-tune's batch order apart from the round's own training
SEED_OFFSET = 0x5E45


def fine_tune(learner: Learner, config: PersonalConfig, lr: float, round: int) -> tuple[StateDict, dict[str, float]]:
    """A copy of the learner's (shared) model, trained ``config.steps`` steps on its silo's
    data; returns its state and its metrics on the silo's own test set. The learner's own
    model and its seed counter are not touched, so a peer trains the same shared models
    with and without personal ones."""
    model = copy.deepcopy(learner.model)
    train_local(learner.task, model, learner.silo.train, config.steps, learner.batch_size,
                config.lr if config.lr is not None else lr, seed=learner.init_seed + SEED_OFFSET + round)
    metrics = learner.task.evaluate(model, learner.silo.test)
    return to_numpy(model), {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


async def personalise(ctx: RoundContext, round: int, shared_digest: str) -> bool:
    """Fine-tune and store round ``round``'s personal model (if ``[personal] steps`` > 0).

    Returns whether one was stored. Never raises for a failed fine-tune: it is logged and
    the round, already committed, stands.
    """
    config = ctx.personal
    if config.steps <= 0:
        return False
    try:
        state, metrics = await ctx.compute.run(fine_tune, ctx.learner, config, ctx.rounds.lr, round)
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
