"""Fixed-point encoding of weighted model values into a wrap-around integer ring.

Secure aggregation (:mod:`.secagg`) adds masks in Z_{2^b}; masks cancel only in exact
integer arithmetic, so each member first turns ``weight * value`` into an integer on a
grid of step ``1 / scale``. The scale is the finest power of two at which the sum of all
members' vectors can neither wrap around the ring nor leave float64's exact integers, which
makes the error of the decoded sum a closed formula (:meth:`FixedPoint.error_bound`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from .errors import ErrorCode, LocalProtocolError

__all__ = ["FLOAT_EXACT_BITS", "FixedPoint"]

FLOAT_EXACT_BITS: Final = 52
"""Integers up to 2^52 in magnitude survive a float64 round trip exactly (and with spacing < 1)."""


@dataclass(frozen=True)
class FixedPoint:
    """Fixed-point encoding of weighted values into the ring Z_{2^bits}.

    A member with weight ``w`` in [0, 1] sends ``q = rint(scale * fl(w * clip(x, -clip, clip)))``
    per coordinate, as an unsigned ``bits``-bit integer (two's complement wraps). The ring sum
    of up to ``max_members`` such vectors, read back as a signed integer and divided by
    ``scale``, is ``sum_j w_j * clip(x_j)`` within :meth:`error_bound`.

    Attributes:
        bits: 32 or 64, the ring's word size.
        scale: A power of two; one unit in the ring is ``1 / scale``.
        clip: Coordinates are clipped to ``[-clip, clip]`` before weighting.
        max_members: The most vectors that may be summed without overflow.
    """

    bits: int
    scale: float
    clip: float
    max_members: int

    def __post_init__(self) -> None:
        if self.bits not in (32, 64):
            raise LocalProtocolError(ErrorCode.BAD_TYPE, f"ring bits must be 32 or 64, got {self.bits}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise LocalProtocolError(ErrorCode.BAD_TYPE, f"clip must be positive and finite, got {self.clip}")
        mantissa, _ = math.frexp(self.scale)
        if not (math.isfinite(self.scale) and self.scale >= 1 and mantissa == 0.5):
            raise LocalProtocolError(ErrorCode.BAD_TYPE, f"scale must be a power of two >= 1, got {self.scale}")
        if self.max_members < 1:
            raise LocalProtocolError(ErrorCode.BAD_TYPE, "max_members must be at least 1")
        if self.max_members * (self.scale * self.clip + 0.5) > self.headroom(self.bits):
            raise LocalProtocolError(
                ErrorCode.TOO_LARGE,
                f"{self.max_members} members at scale {self.scale} and clip {self.clip} could overflow "
                f"the {self.bits}-bit ring or float64's exact integers",
            )

    @staticmethod
    def headroom(bits: int) -> float:
        """The largest magnitude a ring sum may reach: exact in float64 and in signed ``bits``."""
        return float(min(2**FLOAT_EXACT_BITS, 2 ** (bits - 1) - 1))

    @classmethod
    def for_group(cls, max_members: int, clip: float, bits: int = 64) -> FixedPoint:
        """The finest power-of-two scale at which ``max_members`` clipped vectors cannot overflow.

        Raises:
            LocalProtocolError: TOO_LARGE if not even scale 1 fits.
        """
        limit = cls.headroom(bits) / max(max_members, 1) - 0.5
        if limit < clip:
            raise LocalProtocolError(ErrorCode.TOO_LARGE, f"clip {clip} is too large for a {bits}-bit ring")
        scale = 2.0 ** math.floor(math.log2(limit / clip))
        while max_members * (scale * clip + 0.5) > cls.headroom(bits):  # guard log2's rounding
            scale /= 2
        return cls(bits=bits, scale=scale, clip=clip, max_members=max_members)

    @property
    def dtype(self) -> np.dtype[np.unsignedinteger]:
        """The ring's numpy dtype (little-endian on the wire)."""
        return np.dtype(np.uint64) if self.bits == 64 else np.dtype(np.uint32)

    def error_bound(self, n: int) -> float:
        """Worst-case absolute error per coordinate of :meth:`decode` of a sum of ``n`` vectors.

        ``n * (1 / (2 * scale) + clip * 2**-53)``: rounding to the grid costs each member at
        most half a unit, and the one float64 product ``w * x`` at most ``|w x| * 2^-53 <=
        clip * 2^-53``. The integer sum is exact (no wrap, by the headroom check), its
        conversion to float64 is exact (below 2^52) and so is the division by a power of two.
        Holds for the clipped values; a coordinate beyond ``clip`` is moved to the edge first.
        """
        if not 0 <= n <= self.max_members:
            raise LocalProtocolError(ErrorCode.TOO_LARGE, f"{n} vectors, at most {self.max_members} fit")
        return n * (0.5 / self.scale + self.clip * 2.0**-53)

    def encode(self, values: npt.ArrayLike, weight: float) -> npt.NDArray[np.unsignedinteger]:
        """``rint(scale * weight * clip(values))`` as ring elements.

        Raises:
            LocalProtocolError: NON_FINITE if a value is NaN or infinite; BAD_TYPE if the weight
                is outside [0, 1].
        """
        x = np.asarray(values, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(x)):
            raise LocalProtocolError(ErrorCode.NON_FINITE, "a value to encode is NaN or infinite")
        if not (math.isfinite(weight) and 0.0 <= weight <= 1.0):
            raise LocalProtocolError(ErrorCode.BAD_TYPE, f"weight must lie in [0, 1], got {weight}")
        q = np.rint(np.clip(x, -self.clip, self.clip) * weight * self.scale).astype(np.int64)
        return q.astype(self.dtype)  # two's complement: negative values wrap into the ring

    def decode(self, ring_sum: npt.NDArray[np.unsignedinteger]) -> npt.NDArray[np.float64]:
        """Read a ring sum as signed integers and scale it back to floats."""
        signed = np.asarray(ring_sum, dtype=self.dtype).view(np.int64 if self.bits == 64 else np.int32)
        return signed.astype(np.float64) / self.scale
