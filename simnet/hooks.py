"""simnet's :class:`~silomesh.peer.faults.FaultHooks`: faults injected into real peers.

One :class:`SimFaults` per peer incarnation. It drops, delays and partitions messages
(``before_send``), poisons the models a byzantine peer sends (``outgoing_state``), holds
every peer's first round until all peers of the run listen (a start barrier, so round 0
is not lost to peers that are still starting), and tells the runner when a crash is due
(``round_start``). Every injection is counted in :class:`Counters`.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable

import numpy as np
import trio

from silomesh.peer.faults import FaultHooks
from silomesh.simnet.faultspec import FaultPlan

log = logging.getLogger(__name__)

Counters = Counter  # name -> count of injected faults (one per share/process)

#: byzantine "scale": models are multiplied by this (sign flip and blow-up)
SCALE_FACTOR = -10.0
#: byzantine "noise": Gaussian noise of this many times each tensor's std is added
NOISE_SCALE = 3.0


def poison(state: dict[str, np.ndarray], mode: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A poisoned copy of ``state`` (floating tensors only; integer buffers kept)."""
    out: dict[str, np.ndarray] = {}
    for name, a in state.items():
        if a.dtype.kind != "f":
            out[name] = a
        elif mode == "scale":
            out[name] = (a * SCALE_FACTOR).astype(a.dtype)
        elif mode == "nan":
            out[name] = np.full_like(a, np.nan)
        else:
            sigma = NOISE_SCALE * (float(np.std(a)) + 1e-3)
            out[name] = (a + rng.normal(0.0, sigma, size=a.shape)).astype(a.dtype)
    return out


class SimFaults(FaultHooks):
    """The fault plan as seen by one peer incarnation."""

    def __init__(
        self,
        index: int,
        incarnation: int,
        plan: FaultPlan,
        index_of: dict[str, int],
        counters: Counters,
        seed: int,
        *,
        wait_start: Callable[[], Awaitable[None]],
        on_crash_due: Callable[[int], None],
    ) -> None:
        self.index = index
        self.incarnation = incarnation
        self.plan = plan
        self.index_of = index_of
        self.counters = counters
        self.rng = random.Random(f"silomesh-simnet-messages/{seed}/{index}/{incarnation}")
        self.np_rng = np.random.default_rng([seed, index, incarnation, 7])
        self.wait_start = wait_start
        self.on_crash_due = on_crash_due
        self.crash = plan.crash_of(index) if incarnation == 0 else None
        self.byzantine = plan.byzantine.get(index)
        self.side = set(plan.partition_side)
        self.first_round: int | None = None

    async def round_start(self, peer_id: str, round: int) -> None:
        if self.first_round is None:
            self.first_round = round
            await self.wait_start()
        if self.crash is not None and round == self.crash.round:
            self.on_crash_due(round)

    async def before_send(self, peer_id: str, neighbour: str, kind: str, round: int) -> bool:
        other = self.index_of.get(neighbour)
        part = self.plan.partition
        if part is not None and other is not None and part[0] <= round <= part[1] \
                and (self.index in self.side) != (other in self.side):
            self.counters["partitioned_messages"] += 1
            return False
        if self.plan.drop and self.rng.random() < self.plan.drop:
            self.counters["dropped_messages"] += 1
            return False
        if self.plan.delay is not None:
            seconds = self.rng.uniform(*self.plan.delay)
            self.counters["delayed_messages"] += 1
            self.counters["delay_ms_total"] += round_ms(seconds)
            await trio.sleep(seconds)
        return True

    def outgoing_state(self, peer_id: str, round: int, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.byzantine is None:
            return state
        self.counters["poisoned_models"] += 1
        self.counters[f"poisoned_models_{self.byzantine}"] += 1
        return poison(state, self.byzantine, self.np_rng)


def round_ms(seconds: float) -> int:
    return round(seconds * 1000)
