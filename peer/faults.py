"""Hooks through which simnet injects faults into real peers (no-ops in production).

A peer calls these at fixed points of its round; the default :class:`NoFaults` does
nothing, so production peers run exactly the code simnet exercises.
"""

from __future__ import annotations

import numpy as np


class FaultHooks:
    """Fault injection points. Subclass and override what a scenario needs."""

    async def round_start(self, peer_id: str, round: int) -> None:
        """Called when a round begins (a crash fault may cancel the peer from here)."""

    async def before_send(self, peer_id: str, neighbour: str, kind: str, round: int) -> bool:
        """Called before each message to a neighbour; may sleep (delay). False drops it."""
        return True

    def outgoing_state(self, peer_id: str, round: int, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model actually sent (a byzantine peer returns a poisoned copy)."""
        return state


class NoFaults(FaultHooks):
    """Production: no faults."""
