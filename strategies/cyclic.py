"""``cyclic``: cyclic weight transfer, one model passed from hospital to hospital.

Chang et al., "Distributed deep learning networks among institutions for medical imaging"
(JAMIA 2018): instead of averaging models trained side by side, the hospitals take turns.
The hospitals agree on an ``order`` (a ring of peer ids); each round the model arrives from
the previous hospital in the ring, is trained ``local_steps`` steps on this hospital's data,
and is passed on to the next. Every hospital trains as many steps as it would alone, but the
model gets the steps of all of them in sequence; the price is time, since the hospitals wait
for their turn. ``bench/probe_pooled.py`` measured it against averaging (docs/RESULTS.md,
"The federation's shortfall: the federating or the step budget?").

The peer runs it as :attr:`RoundShape.RELAY`: in round ``r`` the hospital at position ``p``
waits for its predecessor's model of round ``r`` (the first hospital: of round ``r - 1``,
from the last one; in round 0 it starts from its own model), adopts it, trains, pushes the
result to its successor and commits it. A predecessor whose model does not come by the round
deadline is skipped: the hospital goes on from its own last model, and the ring carries that
one on. Nothing is averaged: :meth:`CyclicStrategy.aggregate` returns the incoming model.

The model the ring passes on swings from hospital to hospital: each visit pulls it towards
that hospital's data. With ``commit = "lap_mean"`` a hospital commits (and uses, and
fine-tunes its personal model from) the mean of the ring's last lap instead: the last ``n``
models the ring produced, one per hospital, its own newest included. The ring itself goes
on with the model it passes. The mean travels with the model as a running sum: each update
also carries the lap mean under :data:`LAP_PREFIX` and its count in the metric
:data:`LAP_COUNT` (PROTOCOL.md section 7), and each hospital swaps its own model of the lap
before for its new one (:func:`lap_update`). A hospital whose predecessor is skipped starts
a new lap. ``bench/probe_pooled.py --ring-ends`` measured the mean against the passed model.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import SELF, AggregationResult, Contribution, StrategyConfig, check_choice
from .strategy import RoundShape, Strategy

#: what a hospital commits each round: the model it passes on, or the mean of the ring's last lap
COMMITS = ("passed", "lap_mean")
#: with ``commit = "lap_mean"``, an update's tensors ``LAP_PREFIX + name`` are the lap mean of ``name``
LAP_PREFIX = "lap."
#: the update metric that says how many of the ring's models the lap mean holds (1 to n)
LAP_COUNT = "lap_count"


@dataclass(frozen=True)
class CyclicConfig(StrategyConfig):
    """Parameters of ``cyclic``.

    Attributes:
        order: the ring, as peer ids (every hospital lists the same ids in the same order,
            each once, at least two). A hospital's predecessor and successor in it must be
            among its trusted neighbours.
        commit: ``"passed"``: each round's model is the one passed on; ``"lap_mean"``: the
            mean of the ring's last lap (module docstring). Every hospital of a ring sets the
            same (a ``lap_mean`` update carries tensors a ``passed`` peer refuses).
    """

    order: tuple[str, ...] = ()
    commit: str = "passed"

    strategy_name: ClassVar[str] = "cyclic"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("commit", self.commit, COMMITS)
        if self.robust != "none":
            raise ValueError("parameter 'robust' does not apply to 'cyclic' (nothing is averaged)")
        if self.order and len(self.order) < 2:
            raise ValueError("parameter 'order' needs at least two peer ids")
        if len(set(self.order)) != len(self.order):
            raise ValueError("parameter 'order' lists a peer id twice")

    def neighbours(self, me: str) -> tuple[str, str]:
        """``me``'s (predecessor, successor) in the ring.

        Raises:
            ValueError: if ``order`` is empty or does not list ``me``.
        """
        if me not in self.order:
            raise ValueError(f"parameter 'order' of strategy 'cyclic' does not list this peer ({me})")
        i = self.order.index(me)
        return self.order[i - 1], self.order[(i + 1) % len(self.order)]

    def first(self, me: str) -> bool:
        """True for the hospital that opens the ring (the first of ``order``)."""
        return bool(self.order) and self.order[0] == me


class CyclicStrategy(Strategy):
    """Cyclic weight transfer: the model travels round the ring; nothing is averaged."""

    name = "cyclic"
    config_class = CyclicConfig
    config: CyclicConfig
    round_shape = RoundShape.RELAY

    def __init__(self, config: CyclicConfig | None = None) -> None:
        super().__init__(config)
        #: with ``commit = "lap_mean"``: the model this hospital passed on last (memory only: after
        #: a restart the first lap mean it forwards is approximate, :func:`lap_update`)
        self.last_passed: dict[str, np.ndarray] | None = None

    @property
    def lap_mean(self) -> bool:
        return self.config.commit == "lap_mean"

    def trust_problem(self, peer_id: str, trusted: Container[str]) -> str | None:
        """The ring must run through trusted peers: this peer's predecessor and successor."""
        for n in self.config.neighbours(peer_id):
            if n not in trusted:
                return f"params.order: {n}, next to this peer in the ring, is not a trusted peer"
        return None

    def carried_keys(self, names: Iterable[str]) -> dict[str, str]:
        """With ``lap_mean``, each exchanged tensor once more under :data:`LAP_PREFIX`."""
        return {LAP_PREFIX + k: k for k in self.shared_keys(names)} if self.lap_mean else {}

    def lap_problem(
        self, passed: Mapping[str, np.ndarray], lap: Mapping[str, np.ndarray], count: float | None
    ) -> str | None:
        """Why the lap mean ``lap`` (with its ``count``) that came with ``passed`` cannot be
        used, or None. The update bound is the peer's to check."""
        n = len(self.config.order)
        if not lap and count is None:
            return "no lap mean (does the ring's peer.toml set commit = \"lap_mean\" everywhere?)"
        if set(lap) != set(passed):
            return "the lap mean does not name the model's tensors"
        if count is None or not count.is_integer() or not 1 <= count <= n:
            return f"lap_count {count!r} is not a whole number in 1..{n}"
        return None

    def next_lap(
        self, passed_on: Mapping[str, np.ndarray], incoming: Mapping[str, np.ndarray] | None, count: int
    ) -> tuple[dict[str, np.ndarray], int]:
        """The lap mean after ``passed_on`` (what this hospital passes on now) joins ``incoming``
        (None: a new lap); remembers ``passed_on`` for the next lap (:func:`lap_update`)."""
        mean, count = lap_update(passed_on, self.last_passed, incoming, count, len(self.config.order))
        self.last_passed = dict(passed_on)
        return mean, count

    def aggregate(
        self,
        own: Mapping[str, np.ndarray],
        own_weight: float,
        neighbours: Sequence[Contribution],
        *,
        own_degree: int | None = None,
        own_loss: float | None = None,
    ) -> AggregationResult:
        """The predecessor's model when it came (the one contribution), else our own."""
        if not neighbours:
            return AggregationResult({k: np.array(v, copy=True) for k, v in own.items()}, {SELF: 1.0})
        (incoming,) = neighbours
        return AggregationResult({k: np.array(v, copy=True) for k, v in incoming.state.items()},
                                 {incoming.peer_id: 1.0})


def split_lap(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """An update's state as (the model passed on, the lap mean it carries; empty if none)."""
    model = {k: v for k, v in state.items() if not k.startswith(LAP_PREFIX)}
    lap = {k[len(LAP_PREFIX):]: v for k, v in state.items() if k.startswith(LAP_PREFIX)}
    return model, lap


def with_lap(model: Mapping[str, np.ndarray], lap: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors of an update that passes ``model`` on with its lap mean ``lap``."""
    return {**model, **{LAP_PREFIX + k: v for k, v in lap.items()}}


def lap_update(
    trained: Mapping[str, np.ndarray],
    previous: Mapping[str, np.ndarray] | None,
    incoming: Mapping[str, np.ndarray] | None,
    count: int,
    n: int,
) -> tuple[dict[str, np.ndarray], int]:
    """The lap mean (and its count) after this hospital adds the model it now passes on.

    Args:
        trained: the model this hospital trained and passes on now.
        previous: the model it passed on a lap ago (None: not known, after a start or restart).
        incoming: the lap mean that came with its predecessor's model (None: a new lap).
        count: how many models ``incoming`` holds (1 to ``n``).
        n: the ring's length.

    A lap mean of fewer than ``n`` models takes ``trained`` in; a full one swaps ``previous``
    (its oldest model, when the ring went round unbroken) for ``trained``. Without
    ``previous`` the full mean's average stands in for it (the mean moves ``1/n`` of the way
    to ``trained``). Tensors that are not floating point (counters) are ``trained``'s.
    Computed in float64, returned in ``trained``'s dtypes.

    Raises:
        ValueError: ``count`` outside ``1..n``, or ``incoming`` not naming ``trained``'s tensors.
    """
    if incoming is None:
        return {k: np.array(v, copy=True) for k, v in trained.items()}, 1
    if not 1 <= count <= n:
        raise ValueError(f"lap count {count} is outside 1..{n}")
    if set(incoming) != set(trained):
        raise ValueError("the lap mean does not name the model's tensors")
    out: dict[str, np.ndarray] = {}
    for k, t in trained.items():
        t = np.asarray(t)
        if t.dtype.kind != "f":
            out[k] = np.array(t, copy=True)
            continue
        mean, new = np.asarray(incoming[k], dtype=np.float64), t.astype(np.float64)
        if count < n:
            value = (mean * count + new) / (count + 1)
        else:
            oldest = mean if previous is None or k not in previous else np.asarray(previous[k], dtype=np.float64)
            value = mean + (new - oldest) / n
        out[k] = value.astype(t.dtype)
    return out, min(count + 1, n)
