"""Secure aggregation's arithmetic on models: what a member masks, what the aggregator makes of the sum.

Pure functions over state dicts (the cryptography is :mod:`silomesh.protocol.secagg`; the
round on the wire is :mod:`silomesh.peer.secure_rounds`). A member flattens the floating
tensors of its shared state into one float64 vector (:func:`flatten`, sorted by name),
weighted by the group's rule (:meth:`~silomesh.protocol.secagg.Group.weight`). The
aggregator decodes ``S = sum_j e_j * clip(x_j)`` over the survivors, ``e_j = n_j / W``
(``W``: the group's ``weight_cap``; ``n_j`` is capped at ``W``) or ``e_j = 1`` (uniform),
and combines it with its own model (:func:`combine`):

* ``weighting = "samples"``: ``(n_i x_i + W * S) / (n_i + sum_j n_j)``, FedAvg's rule;
* ``weighting = "uniform"``: ``(x_i + S) / (1 + m)``.

Both equal plain :func:`~.averaging.weighted_average` over the same survivors, within
:func:`result_bound`. Integer and boolean buffers are the peer's own (``int_policy =
"own"``): the ring carries floating tensors only.

FedMix's weights (:func:`~.fedmix.fedmix_weights`) add to each size share a loss share
``lam * l_j / sum_k l_k`` with ``l_j = L_j^beta``, normalised over the survivors, whom no
member knows when it masks. So a fedmix member masks two weighted copies of its clipped
model and its loss score (:func:`member_vector`, ``2 * len + 1`` values)::

    [ e_j * clip(x_j) | c_j * clip(x_j) | c_j ],   c_j = min(l_j, FEDMIX_LOSS_CAP) / FEDMIX_LOSS_CAP

and the aggregator rebuilds both normalised parts from the two sums and ``sum_j c_j``
(:func:`combine_fedmix`): the aggregator learns the sum of the loss scores, not one of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .averaging import cast_like, is_float_array
from .base import StateDict, check_range

__all__ = [
    "FEDMIX",
    "FEDMIX_LOSS_CAP",
    "SECURE_WEIGHTINGS",
    "SecureParams",
    "SecureSum",
    "combine",
    "combine_fedmix",
    "flatten",
    "float_names",
    "loss_score",
    "member_vector",
    "result_bound",
    "weight_cap",
]

SECURE_WEIGHTINGS = ("samples", "uniform")
"""Weightings of fedavg and segviz a member can apply itself under a rule the whole group shares."""
FEDMIX = "fedmix"
"""The weighting of fedmix's secure sum: sizes and training losses (:func:`member_vector`)."""
FEDMIX_LOSS_CAP = 4.0
"""Loss scores ``L^beta`` above this count as this much (a protocol constant, so every member
scales its score alike and no aggregator can choose it per member). Below it the secure sum
equals plain fedmix within the stated bound; a silo with a higher loss gets a smaller loss
share than plain fedmix would give it."""


@dataclass(frozen=True)
class SecureSum:
    """The ``secure_aggregation`` settings a strategy hands to the peer's round.

    Attributes:
        weighting: ``"samples"`` or ``"uniform"`` (:data:`SECURE_WEIGHTINGS`), or
            :data:`FEDMIX` (fedmix's sizes and losses; ``lam`` and ``beta`` apply).
        clip: Coordinates are clipped to ``[-clip, clip]`` before masking.
        ring_bits: 32 (the bytes of float32) or 64 (a far smaller error bound).
        fallback: With fewer than 2 neighbours selected, run a plain round instead of
            keeping the own model (the operator's explicit choice).
        threshold: The share of a group's members whose shares unmask the sum
            (:meth:`threshold_of`): as aggregator we name that threshold, as member we refuse
            a group whose threshold is lower.
    """

    weighting: str
    clip: float
    ring_bits: int
    fallback: bool = False
    threshold: float = 0.5
    lam: float = 0.0
    beta: float = 1.0

    def vector_length(self, model_values: int) -> int:
        """Values a member masks for a model of ``model_values`` floats (:func:`member_vector`)."""
        return 2 * model_values + 1 if self.weighting == FEDMIX else model_values

    @property
    def weighs_samples(self) -> bool:
        """Whether members weight by sample count (the group then names a ``weight_cap``)."""
        return self.weighting in ("samples", FEDMIX)

    def threshold_of(self, members: int) -> int:
        """Shares needed in a group of ``members``: ``max(floor(n/2) + 1, ceil(threshold * n))``.

        At least a strict majority (what the core requires); a higher share tolerates more
        members colluding with a lying aggregator (``2t - n - 1``) and fewer dropouts (``n - t``).
        """
        return max(members // 2 + 1, math.ceil(round(self.threshold * members, 9)))


@dataclass(frozen=True)
class SecureParams:
    """The ``secure_aggregation`` parameters of the averaging strategies (fedavg, segviz).

    Attributes:
        secure_aggregation: The peer learns only the masked sum of its neighbours' (shared)
            models, never one of them (docs/SECURE-AGGREGATION.md); needs at least 2 neighbours.
        secure_fallback: With fewer than 2 trusted neighbours, run plain rounds instead of
            refusing to start (the operator's explicit choice: that neighbour sees our model).
        secure_clip: Values are clipped to ``[-secure_clip, secure_clip]`` before masking.
        secure_ring_bits: 32 (the bytes of float32) or 64 (a far smaller error bound).
        secure_threshold: Share of a group's members (0.5 to 1) whose shares are needed to
            unmask; 0.5 means a strict majority ``floor(n/2) + 1``, 1 means every member (no
            dropout tolerated). Members refuse groups with a lower threshold than theirs.
    """

    secure_aggregation: bool = False
    secure_fallback: bool = False
    secure_clip: float = 8.0
    secure_ring_bits: int = 32
    secure_threshold: float = 0.5

    def check_secure(self, robust: str, weighting: str, int_policy: str) -> None:
        """Refuse what cannot be combined with secure aggregation, saying why.

        Raises:
            ValueError: naming the parameter and the reason.
        """
        check_range("secure_clip", self.secure_clip, 0.0, lo_open=True)
        if self.secure_ring_bits not in (32, 64):
            raise ValueError(f"parameter 'secure_ring_bits' must be 32 or 64, got {self.secure_ring_bits}")
        check_range("secure_threshold", self.secure_threshold, 0.5, 1.0)
        if not self.secure_aggregation:
            return
        if robust != "none":
            raise ValueError(
                f"parameter 'robust' = {robust!r} cannot be combined with secure_aggregation: the "
                "median, the trimmed mean and per-update clipping need each neighbour's model, which "
                "secure aggregation hides (only secure_clip's coordinate clip remains)")
        if weighting not in (*SECURE_WEIGHTINGS, FEDMIX):
            raise ValueError(
                f"parameter 'weighting' = {weighting!r} cannot be combined with secure_aggregation: "
                f"a member must weight its own model under a rule the whole group shares; use one of "
                f"{list(SECURE_WEIGHTINGS)}")
        if int_policy != "own":
            raise ValueError("parameter 'int_policy' must be 'own' with secure_aggregation: the ring "
                             "carries floating tensors only, integer buffers stay the peer's own")

    def secure_sum(self, weighting: str, lam: float = 0.0, beta: float = 1.0) -> SecureSum | None:
        """The settings the peer's round needs, or None when secure aggregation is off."""
        if not self.secure_aggregation:
            return None
        return SecureSum(weighting=weighting, clip=self.secure_clip, ring_bits=self.secure_ring_bits,
                         fallback=self.secure_fallback, threshold=self.secure_threshold, lam=lam, beta=beta)


def float_names(state: Mapping[str, np.ndarray]) -> list[str]:
    """The names of the floating tensors (those the ring carries), sorted."""
    return sorted(k for k, v in state.items() if is_float_array(v))


def flatten(state: Mapping[str, np.ndarray]) -> npt.NDArray[np.float64]:
    """The floating tensors of ``state`` as one float64 vector, in :func:`float_names` order."""
    names = float_names(state)
    if not names:
        return np.zeros(0)
    return np.concatenate([np.asarray(state[k], dtype=np.float64).reshape(-1) for k in names])


def weight_cap(n_samples: Sequence[int]) -> int:
    """The ``W`` an aggregator names: the smallest power of two at least twice the largest known count.

    Members weight ``min(n, W) / W``; with ``W`` at most four times a typical count the weights
    stay well above the ring's grid step. A member with more than ``W`` samples counts as ``W``
    that round (the next round's ``W`` follows the counts the aggregator saw).
    """
    largest = max([1, *n_samples])
    return 1 << (2 * largest - 1).bit_length()


def combine(own: Mapping[str, np.ndarray], own_samples: float, masked_sum: npt.NDArray[np.float64],
            survivor_samples: Sequence[int], weighting: str, cap: int) -> StateDict:
    """The new model from the peer's own and the decoded sum of the survivors' weighted models.

    Args:
        own: The peer's state (its keys, shapes and dtypes define the result).
        own_samples: The peer's sample count (its own weight under ``"samples"``).
        masked_sum: The decoded ring sum ``sum_j e_j * clip(x_j)``, :func:`flatten` order.
        survivor_samples: Each survivor's ``n_j`` as it weighted (capped at ``cap``).
        weighting: ``"samples"`` or ``"uniform"``.
        cap: The group's ``weight_cap`` (``W``; 0 under ``"uniform"``).

    Raises:
        ValueError: on a sum of the wrong length or an unknown weighting.
    """
    x = flatten(own)
    if masked_sum.shape != x.shape:
        raise ValueError(f"combine: a sum of {masked_sum.size} values for a model of {x.size}")
    if weighting == "samples":
        total = float(own_samples) + float(sum(survivor_samples))
        mixed = (float(own_samples) * x + cap * masked_sum) / total
    elif weighting == "uniform":
        mixed = (x + masked_sum) / (1 + len(survivor_samples))
    else:
        raise ValueError(f"combine: weighting {weighting!r} is not one of {SECURE_WEIGHTINGS}")
    return _unflatten(own, mixed)


def _unflatten(own: Mapping[str, np.ndarray], mixed: npt.NDArray[np.float64]) -> StateDict:
    """``own`` with its floating tensors replaced by ``mixed`` (:func:`flatten` order), cast alike."""
    out: StateDict = {k: np.array(v, copy=True) for k, v in own.items()}
    offset = 0
    for name in float_names(own):
        ref = np.asarray(own[name])
        out[name] = cast_like(mixed[offset:offset + ref.size].reshape(ref.shape), ref)
        offset += ref.size
    return out


def loss_score(loss: float | None, beta: float) -> float:
    """FedMix's ``L^beta``, capped at :data:`FEDMIX_LOSS_CAP`; 0 for a missing or non-finite loss
    (plain fedmix drops such a neighbour; here it still counts by its size)."""
    if loss is None or not math.isfinite(loss) or loss < 0:
        return 0.0
    return min(float(float(loss) ** beta), FEDMIX_LOSS_CAP)


def member_vector(x: npt.NDArray[np.float64], secure: SecureSum, size_weight: float, loss: float | None,
                  clip: float) -> tuple[npt.NDArray[np.float64], float]:
    """What a member masks and the weight to encode it with.

    ``x`` is its :func:`flatten`-ed model, ``size_weight`` the group's weight for its sample
    count (:meth:`~silomesh.protocol.secagg.Group.weight`). Under :data:`FEDMIX` the vector is
    ``[e * clip(x) | c * clip(x) | c]`` with ``c = loss_score / FEDMIX_LOSS_CAP``, encoded with
    weight 1 (the clip and the weights are applied here, so each value carries one float64
    rounding, as :meth:`~silomesh.protocol.fixedpoint.FixedPoint.encode` assumes); otherwise ``x``
    with ``size_weight``.
    """
    if secure.weighting != FEDMIX:
        return x, size_weight
    xc = np.clip(x, -clip, clip)
    c = loss_score(loss, secure.beta) / FEDMIX_LOSS_CAP
    return np.concatenate([size_weight * xc, c * xc, [c]]), 1.0


def combine_fedmix(own: Mapping[str, np.ndarray], own_samples: float, own_loss: float | None,
                   masked_sum: npt.NDArray[np.float64], survivor_samples: Sequence[int], cap: int,
                   secure: SecureSum, sum_bound: float) -> tuple[StateDict, float]:
    """FedMix's weighted average from the decoded sum of :func:`member_vector` s, and its bound.

    With ``S = [S_a | S_b | s_c]`` over the survivors, ``l_i`` our own loss score and
    ``V = FEDMIX_LOSS_CAP``::

        size = (n_i x_i + W S_a) / (n_i + sum_j n_j)
        loss = (l_i x_i + V S_b) / (l_i + V s_c)
        new  = (size + lam * loss) / (1 + lam)        (size alone when every loss score is 0)

    which is :func:`~.fedmix.fedmix_weights`' average over own + survivors. Returned bound, on
    the float64 result against that average of the clipped models: ``(b_size + lam * b_loss) /
    (1 + lam)`` with ``b_size = W e / (n_i + sum n_j)`` and ``b_loss = V e (1 + K) / D``, where
    ``e`` is ``sum_bound`` (the ring's ``error_bound(m)``), ``D = l_i + V s_c`` as decoded, and
    ``K`` bounds the magnitude of the loss part (the clip, or our own largest value).

    Raises:
        ValueError: on a sum of the wrong length.
    """
    x = flatten(own)
    n = x.size
    if masked_sum.shape != (2 * n + 1,):
        raise ValueError(f"combine_fedmix: a sum of {masked_sum.size} values for a model of {n} (needs {2 * n + 1})")
    s_a, s_b, s_c = masked_sum[:n], masked_sum[n:2 * n], float(masked_sum[2 * n])
    total = float(own_samples) + float(sum(survivor_samples))
    mixed = (float(own_samples) * x + cap * s_a) / total
    bound = cap * sum_bound / total
    own_score = loss_score(own_loss, secure.beta)
    denominator = own_score + FEDMIX_LOSS_CAP * s_c
    if secure.lam > 0 and denominator > FEDMIX_LOSS_CAP * sum_bound:
        by_loss = (own_score * x + FEDMIX_LOSS_CAP * s_b) / denominator
        k = max(secure.clip, float(np.abs(x).max(initial=0.0)))
        loss_bound = FEDMIX_LOSS_CAP * sum_bound * (1 + k) / denominator
        mixed = (mixed + secure.lam * by_loss) / (1 + secure.lam)
        bound = (bound + secure.lam * loss_bound) / (1 + secure.lam)
    return _unflatten(own, mixed), bound


def result_bound(sum_bound: float, own_samples: float, survivor_samples: Sequence[int], weighting: str,
                 cap: int) -> float:
    """The bound on :func:`combine`'s float64 result against the plain weighted average of the
    clipped models: the ring's ``error_bound(m)`` scaled as the sum is (before the final cast
    to the model's dtype)."""
    if weighting == "samples":
        return cap * sum_bound / (float(own_samples) + float(sum(survivor_samples)))
    return sum_bound / (1 + len(survivor_samples))
