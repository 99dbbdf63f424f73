"""silomesh.strategies: federated algorithms as pure functions over state dicts.

Gossip averaging (``fedavg``), FedEFM neighbour distillation with EMD (``fedefm``),
SegViz selective synchronisation (``segviz``), FedMix adaptive weights (``fedmix``),
and robust aggregation usable under all of them. No I/O, no sleeping, no networking:
the peer's round loop calls these. See docs/STRATEGIES.md.
"""

from __future__ import annotations

from .averaging import (
    average_states,
    metropolis_matrix,
    metropolis_weights,
    sample_weights,
    uniform_weights,
    weighted_average,
)
from .base import (
    KIND_TRAIN_REQUEST,
    KIND_TRAIN_RESULT,
    KIND_UPDATE,
    SELF,
    AggregationResult,
    Contribution,
    StateDict,
    StrategyConfig,
)
from .cyclic import CyclicConfig, CyclicStrategy
from .emd import feature_map_emd, node_emd, similarity_weights
from .fedavg import FedAvgConfig, FedAvgStrategy
from .fedefm import (
    DistillResult,
    FedEFMConfig,
    FedEFMStrategy,
    distill,
    distillation_term,
    global_model,
)
from .fedmix import (
    FedMixConfig,
    FedMixStrategy,
    PairTrainResult,
    PseudoLabels,
    cps_targets,
    cross_pseudo_supervision,
    fedmix_weights,
    make_pseudo_labels,
    pseudo_labels,
    train_pair,
)
from .registry import available_strategies, get_strategy, strategy_from_table
from .robust import Screened, coordinate_median, screen, trimmed_mean
from .segviz import SegVizConfig, SegVizStrategy, finetune_head, partition_keys
from .strategy import RoundShape, Strategy
from .training import TrainResult, train_steps
from .workbench import LocalStep, Workbench

__all__ = [
    "KIND_TRAIN_REQUEST",
    "KIND_TRAIN_RESULT",
    "KIND_UPDATE",
    "SELF",
    "AggregationResult",
    "Contribution",
    "CyclicConfig",
    "CyclicStrategy",
    "DistillResult",
    "FedAvgConfig",
    "FedAvgStrategy",
    "FedEFMConfig",
    "FedEFMStrategy",
    "FedMixConfig",
    "FedMixStrategy",
    "LocalStep",
    "PairTrainResult",
    "PseudoLabels",
    "RoundShape",
    "Screened",
    "SegVizConfig",
    "SegVizStrategy",
    "StateDict",
    "Strategy",
    "StrategyConfig",
    "TrainResult",
    "Workbench",
    "available_strategies",
    "average_states",
    "coordinate_median",
    "cps_targets",
    "cross_pseudo_supervision",
    "distill",
    "distillation_term",
    "feature_map_emd",
    "fedmix_weights",
    "finetune_head",
    "get_strategy",
    "global_model",
    "make_pseudo_labels",
    "metropolis_matrix",
    "metropolis_weights",
    "node_emd",
    "partition_keys",
    "pseudo_labels",
    "sample_weights",
    "screen",
    "similarity_weights",
    "strategy_from_table",
    "train_pair",
    "train_steps",
    "trimmed_mean",
    "uniform_weights",
    "weighted_average",
]
