"""Strategy lookup by name, as written in peer.toml's ``[strategy]`` table::

    [strategy]
    name = "fedefm"
    beta = 0.5
    robust = "median"
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from .cyclic import CyclicStrategy
from .fedavg import FedAvgStrategy
from .fedefm import FedEFMStrategy
from .fedmix import FedMixStrategy
from .segviz import SegVizStrategy
from .strategy import Strategy

logger = logging.getLogger(__name__)

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvgStrategy, FedEFMStrategy, SegVizStrategy, FedMixStrategy, CyclicStrategy)
}


def available_strategies() -> list[str]:
    """Names accepted by :func:`get_strategy`."""
    return sorted(STRATEGIES)


def get_strategy(name: str, params: Mapping[str, Any] | None = None) -> Strategy:
    """Build a strategy from its name and parameters (a ``[strategy]`` table).

    A ``name`` key inside ``params`` is ignored if it agrees with ``name``.

    Raises:
        ValueError: for an unknown strategy, or an unknown/bad parameter (the message
            names it).
    """
    params = dict(params or {})
    if "name" in params and params.pop("name") != name:
        raise ValueError("strategy name given twice with different values")
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(
            f"unknown strategy {name!r}; available: {available_strategies()}"
        ) from None
    config = cls.config_class.from_dict(params)
    logger.debug("strategy %s with %s", name, config)
    return cls(config)


def strategy_from_table(table: Mapping[str, Any]) -> Strategy:
    """Build a strategy from a whole ``[strategy]`` table (its ``name`` key selects it).

    Raises:
        ValueError: if ``name`` is missing, or as :func:`get_strategy`.
    """
    if "name" not in table:
        raise ValueError("the [strategy] table needs a 'name'")
    return get_strategy(str(table["name"]), {k: v for k, v in table.items() if k != "name"})
