"""What every strategy shares: configs, contributions, aggregation results.

The :class:`~silomesh.strategies.strategy.Strategy` interface itself, with the hooks
through which a strategy owns its round, is in :mod:`.strategy`.

State dicts are ``dict[str, numpy.ndarray]``, the wire codec's representation. All
functions here are pure: they never do I/O, sleep or touch the network, and they never
modify their inputs.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, Union

import numpy as np

logger = logging.getLogger(__name__)

#: A model's weights as the wire codec carries them.
StateDict = dict[str, np.ndarray]

#: Message kinds (DESIGN.md, "Exchange") a strategy's round uses.
KIND_UPDATE = "update"
KIND_TRAIN_REQUEST = "train-request"
KIND_TRAIN_RESULT = "train-result"

#: The key :attr:`AggregationResult.weights` uses for the peer's own model.
SELF = "self"

ROBUST_RULES = ("none", "median", "trimmed_mean", "clip")
INT_POLICIES = ("own", "round")

C = TypeVar("C", bound="StrategyConfig")


@dataclass(frozen=True)
class Contribution:
    """One neighbour's model as received in a round.

    Attributes:
        peer_id: the sender (a PeerID string); used to report drops and weights.
        state: the neighbour's full model (a base plus the received delta).
        n_samples: training samples the sender holds (sample-count weighting).
        loss: the sender's reported mean training loss of the round (FedMix).
        degree: the sender's number of trusted neighbours (Metropolis weights).
        metadata: anything else the peer wants to carry along (not interpreted).
    """

    peer_id: str
    state: Mapping[str, np.ndarray]
    n_samples: int = 1
    loss: float | None = None
    degree: int | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AggregationResult:
    """What :meth:`Strategy.aggregate` returns.

    Attributes:
        state: the peer's new model (every key of its own state dict).
        weights: effective mixing weight per contributor, ``SELF`` for the peer itself
            (for the median and trimmed-mean rules these are the weights the plain
            rule would have used; the robust rule itself is unweighted).
        dropped: peer id -> reason for every contribution that was not used
            (non-finite values, missing keys, wrong shapes, missing metadata, duplicate).
        clip_scale: peer id -> factor (< 1) its delta was scaled by under ``robust="clip"``.
        info: small extra facts for logs (rule used, clip threshold, trimmed count...).
    """

    state: StateDict
    weights: dict[str, float]
    dropped: dict[str, str] = field(default_factory=dict)
    clip_scale: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def _coerce(name: str, hint: object, value: object) -> object:
    """Convert a TOML/JSON value to a config field's declared type or raise ValueError."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, arg, value)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else f"parameter {name!r}: bad value {value!r}")
    if origin is tuple:
        (item,) = typing.get_args(hint)[:1]
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise ValueError(f"parameter {name!r} must be a list, got {value!r}")
        return tuple(_coerce(name, item, v) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"parameter {name!r} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"parameter {name!r} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"parameter {name!r} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"parameter {name!r} must be a string, got {value!r}")
        return value
    raise ValueError(f"parameter {name!r}: unsupported type {hint!r}")  # pragma: no cover


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"parameter {name!r} must be one of {list(choices)}, got {value!r}")


def check_range(
    name: str, value: float, lo: float | None = None, hi: float | None = None,
    *, lo_open: bool = False, hi_open: bool = False,
) -> None:
    """Raise ValueError naming ``name`` unless ``lo <= value <= hi`` (open ends optional)."""
    if not np.isfinite(value):
        raise ValueError(f"parameter {name!r} must be finite, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"parameter {name!r} must be {'>' if lo_open else '>='} {lo}, "
                         f"got {value!r}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ValueError(f"parameter {name!r} must be {'<' if hi_open else '<='} {hi}, "
                         f"got {value!r}")


@dataclass(frozen=True)
class StrategyConfig:
    """Parameters every strategy shares: the robust aggregation rule.

    Attributes:
        robust: ``"none"`` (the strategy's weighted average), ``"median"``
            (coordinate-wise median over own + neighbours), ``"trimmed_mean"``
            (coordinate-wise, ``trim`` of the values cut at each end) or ``"clip"``
            (each neighbour's delta to the own model clipped in L2 norm, then the
            weighted average).
        trim: fraction trimmed at each end by ``trimmed_mean``; the count is
            ``ceil(trim * n)`` capped at ``(n - 1) // 2`` so that it bites for the
            2–4 neighbours a peer typically has.
        clip_norm: absolute L2 bound on a neighbour's delta (``None``: no absolute bound).
        clip_multiplier: relative bound, this many times the lower median of the
            neighbours' delta norms (``0`` disables it). With both set the smaller bound
            wins; with a single neighbour only the absolute bound can catch it.
        int_policy: how integer buffers (BatchNorm ``num_batches_tracked``) are merged:
            ``"own"`` keeps the peer's value, ``"round"`` rounds the combined value.
    """

    robust: str = "none"
    trim: float = 0.2
    clip_norm: float | None = None
    clip_multiplier: float = 2.0
    int_policy: str = "own"

    #: strategy name, for error messages
    strategy_name: ClassVar[str] = "strategy"

    def __post_init__(self) -> None:
        check_choice("robust", self.robust, ROBUST_RULES)
        check_range("trim", self.trim, 0.0, 0.5, hi_open=True)
        if self.clip_norm is not None:
            check_range("clip_norm", self.clip_norm, 0.0, lo_open=True)
        check_range("clip_multiplier", self.clip_multiplier, 0.0)
        if self.robust == "clip" and self.clip_norm is None and self.clip_multiplier == 0:
            raise ValueError("parameter 'clip_norm' or 'clip_multiplier' must be set "
                             "when robust = 'clip'")
        check_choice("int_policy", self.int_policy, INT_POLICIES)

    @classmethod
    def from_dict(cls: type[C], params: Mapping[str, Any] | None = None) -> C:
        """Build the config from a peer.toml ``[strategy]`` table (minus its ``name``).

        Raises:
            ValueError: naming an unknown parameter, or one of the wrong type or range.
        """
        params = dict(params or {})
        params.pop("name", None)
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(
                f"unknown parameter {unknown[0]!r} for strategy {cls.strategy_name!r}; "
                f"known parameters: {sorted(known)}"
            )
        # each value now has its field's declared type, which _coerce checked at run time
        values: dict[str, Any] = {k: _coerce(k, hints[k], v) for k, v in params.items()}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The parameters as a plain dict (for reports and logs)."""
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
