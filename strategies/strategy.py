"""The strategy interface: the maths of aggregation, and the hooks of a round.

A strategy owns what happens in a round; the peer's round loop (``silomesh.peer.rounds``)
only calls these hooks in a fixed order and moves bytes between neighbours:

====================  =================================================================
hook                  called
====================  =================================================================
``round_shape``       picks the round: :attr:`RoundShape.EXCHANGE` (train locally, push
                      the update, gather the neighbours' updates, aggregate) or
                      :attr:`RoundShape.TRAIN_REQUEST` (send our model to be trained on
                      each neighbour's data, gather the trained copies, learn from them)
``extra_networks``    once, when the peer builds its model: further networks that travel
                      in the same state dict under a prefix (FedMix's second network)
``prepared_for``      once, with the built model: a copy of the strategy configured from
                      it (SegViz takes the model's head prefixes)
``local_step``        the round's local training (FedMix: both networks, pseudo-labels)
``shared_keys``       which keys are sent to and merged from neighbours
``screen``            the neighbours' contributions that can be used, and why not others
``learn_from_experts`` ``TRAIN_REQUEST`` rounds: learn from the screened trained copies
``aggregate``         merge the neighbours' contributions into our model (pure)
``adopt``             after the aggregated state is loaded (SegViz's head fine-tune)
``serve_train_request`` a neighbour's train-request: train its model on our data
====================  =================================================================

Adding a strategy is one file in this package and one line in :mod:`.registry`.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .base import (
    KIND_TRAIN_REQUEST,
    KIND_TRAIN_RESULT,
    KIND_UPDATE,
    AggregationResult,
    Contribution,
    StrategyConfig,
)
from .robust import Screened, screen
from .secagg import SecureSum
from .workbench import LocalStep, Workbench

if TYPE_CHECKING:
    from torch import nn


class RoundShape(enum.Enum):
    """The shapes a round can take on the wire."""

    #: train locally, push an ``update`` to each neighbour, gather theirs, aggregate
    EXCHANGE = "exchange"
    #: send a ``train-request`` to each neighbour, gather ``train-result``\\ s, learn from them
    TRAIN_REQUEST = "train-request"
    #: train locally; as aggregator, collect the neighbours' masked vectors and learn only their
    #: sum; as member, mask our model for each neighbour (``secure_aggregation``, fedavg)
    SECURE_EXCHANGE = "secure-exchange"
    #: wait for the predecessor's model, train it, push it to the successor (``cyclic``)
    RELAY = "relay"
    #: send the subtree's mean up the tree of all peers, take the federation's mean coming down
    #: (``fedavg`` with ``reduce = "tree"``)
    TREE = "tree"


#: message kinds each round shape uses, in the order they flow
SHAPE_KINDS: dict[RoundShape, tuple[str, ...]] = {
    RoundShape.EXCHANGE: (KIND_UPDATE,),
    RoundShape.TRAIN_REQUEST: (KIND_TRAIN_REQUEST, KIND_TRAIN_RESULT),
    RoundShape.RELAY: (KIND_UPDATE,),
    RoundShape.TREE: (KIND_UPDATE,),
    RoundShape.SECURE_EXCHANGE: (
        "secagg-group", "secagg-deal", "secagg-shares", "secagg-masked", "secagg-commit", "secagg-release",
    ),
}


class Strategy(ABC):
    """Base class of the federated strategies.

    Subclasses set :attr:`name`, :attr:`config_class` and implement :meth:`aggregate`;
    they override the round hooks (module docstring) where they differ from plain
    gossip averaging. :meth:`aggregate` and :meth:`screen` are pure; the training hooks
    do torch work through the :class:`~.workbench.Workbench` they are given, and the
    peer runs them in a worker thread.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[StrategyConfig]] = StrategyConfig
    round_shape: ClassVar[RoundShape] = RoundShape.EXCHANGE

    def __init__(self, config: StrategyConfig | None = None) -> None:
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, "
                f"got {type(self.config).__name__}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    @property
    def secure_sum(self) -> SecureSum | None:
        """The ``secure_aggregation`` settings when it is on, else None (the default)."""
        return None

    @property
    def shape(self) -> RoundShape:
        """The round the peer runs: :attr:`round_shape`, or ``SECURE_EXCHANGE`` under secure aggregation."""
        return RoundShape.SECURE_EXCHANGE if self.secure_sum is not None else self.round_shape

    @property
    def message_kinds(self) -> tuple[str, ...]:
        """Message kinds the round uses, in the order they flow."""
        return SHAPE_KINDS[self.shape]

    @property
    def contribution_fields(self) -> frozenset[str]:
        """The :class:`Contribution` fields a neighbour must fill in besides its state
        (e.g. ``{"degree"}`` for Metropolis weights, ``{"loss"}`` for FedMix)."""
        return frozenset({"n_samples"})

    # -- building the peer's model ------------------------------------------------------

    def extra_networks(
        self, task: object, make_model: Callable[[int], nn.Module], init_seed: int
    ) -> dict[str, nn.Module]:
        """Networks the peer holds besides its model, by state-dict prefix (default: none).

        Their weights travel, aggregate, commit and restore with the model's, under
        ``prefix + key``; evaluation uses the first network only.
        """
        return {}

    def prepared_for(self, model: nn.Module) -> Strategy:
        """This strategy configured for ``model`` (default: unchanged)."""
        return self

    # -- the round ------------------------------------------------------------------------

    def trust_problem(self, peer_id: str, trusted: Container[str]) -> str | None:
        """Why a peer ``peer_id`` trusting ``trusted`` cannot run this strategy's rounds, or None.

        Default None: the round exchanges with whichever neighbours are trusted. A strategy
        whose parameters name the peers each one exchanges with (cyclic's ring, fedavg's
        tree) needs those peers to be trusted; the peer refuses to start otherwise.
        """
        return None

    def shared_keys(self, names: Iterable[str]) -> list[str]:
        """The state-dict keys exchanged with and merged from neighbours (default: all).

        The peer may send only these keys; the others stay local and are never read
        from a neighbour's state.
        """
        return list(names)

    def carried_keys(self, names: Iterable[str]) -> dict[str, str]:
        """Tensors an update carries besides the model's: name -> the model tensor whose
        shape and dtype it has (default: none). The peer accepts these from neighbours too."""
        return {}

    def local_step(self, bench: Workbench, steps: int) -> LocalStep:
        """The round's local training (default: the task's loss on this silo's data)."""
        return bench.train_plain(steps)

    def screen(self, own: Mapping[str, np.ndarray], contributions: Sequence[Contribution]) -> Screened:
        """Contributions that can be merged into ``own`` (shared keys present, shapes
        right, values finite), and a reason for each of the others."""
        return screen(own, contributions, self.shared_keys(own))

    def learn_from_experts(self, bench: Workbench, experts: Sequence[Contribution]) -> dict[str, Any]:
        """``TRAIN_REQUEST`` rounds: learn from the screened trained copies, in place.

        Returns small facts for the round's report (e.g. ``{"weights": [...]}``).

        Raises:
            NotImplementedError: for strategies whose round is an ``EXCHANGE``.
        """
        raise NotImplementedError(f"strategy {self.name!r} has no train-request round")

    def serve_train_request(self, bench: Workbench, state: Mapping[str, np.ndarray], steps: int) -> LocalStep:
        """A neighbour's train-request: its model trained on this silo's data."""
        return bench.train_copy(state, steps)

    def adopt(self, bench: Workbench) -> bool:
        """After the aggregated state is loaded into ``bench``: any local post-step.

        Returns True if it changed the model (the peer then commits ``bench.state()``
        instead of the aggregated state). Default: nothing, False.
        """
        return False

    @abstractmethod
    def aggregate(
        self,
        own: Mapping[str, np.ndarray],
        own_weight: float,
        neighbours: Sequence[Contribution],
        *,
        own_degree: int | None = None,
        own_loss: float | None = None,
    ) -> AggregationResult:
        """Merge the neighbours' models into the peer's own model.

        Args:
            own: the peer's model after its local training of the round.
            own_weight: the peer's own sample count (for sample-count weighting).
            neighbours: the contributions that arrived in time.
            own_degree: the peer's number of trusted neighbours (Metropolis weights;
                pass the configured count, not the number that answered, so that the
                weights stay symmetric across the graph). Defaults to ``len(neighbours)``.
            own_loss: the peer's own training loss of the round (FedMix weights).

        Returns:
            The new state and a report of weights, drops and clipping.
        """
