"""State-dict digests and deltas.

``state_digest`` names a model version; deltas are ``new - base`` against a base named
by its digest, so a receiver can tell whether it holds the base (else it asks for a
keyframe with ``need-base``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .codec import WIRE_DTYPES, is_finite_array
from .crypto import Blake2b256
from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = ["STATE_DIGEST_DOMAIN", "apply_delta", "make_delta", "state_digest"]

STATE_DIGEST_DOMAIN = b"silomesh/state/v1\x00"
"""Prefix of the canonical encoding hashed by :func:`state_digest`."""

_DIGEST_DTYPES: dict[str, np.dtype[Any]] = {**WIRE_DTYPES, "float64": np.dtype("<f8")}


def _dtype_name(arr: np.ndarray, name: str) -> str:
    for dname, dt in _DIGEST_DTYPES.items():
        if dt.kind == arr.dtype.kind and dt.itemsize == arr.dtype.itemsize:
            return dname
    raise LocalProtocolError(ErrorCode.BAD_DTYPE, f"{name}: dtype {arr.dtype} cannot be digested")


def state_digest(state: Mapping[str, np.ndarray]) -> bytes:
    """BLAKE2b-256 over the canonical encoding of a state dict.

    The encoding is ``"silomesh/state/v1\\0" || u32be(count)`` then, for each name in
    sorted order: ``u16be(len(name)) || name (UTF-8) || u8(len(dtype)) || dtype (ASCII)
    || u8(ndim) || u64be(dim) * ndim || u64be(nbytes) || data`` with data in
    little-endian C order. The digest depends on dtype: float16 and float32 copies of
    the same values differ.

    Raises:
        LocalProtocolError: BAD_TYPE or BAD_DTYPE for values that are not arrays of an
            allowed dtype (the wire dtypes plus float64).
    """
    h = Blake2b256()
    h.update(STATE_DIGEST_DOMAIN)
    h.update(len(state).to_bytes(4, "big"))
    for name in sorted(state):
        arr = state[name]
        if type(name) is not str or not isinstance(arr, np.ndarray):
            raise LocalProtocolError(ErrorCode.BAD_TYPE, "state must map str -> numpy array")
        dname = _dtype_name(arr, name)
        data = np.ascontiguousarray(arr, dtype=_DIGEST_DTYPES[dname])
        raw_name = name.encode("utf-8")
        if len(raw_name) > 0xFFFF or arr.ndim > 0xFF:
            raise LocalProtocolError(ErrorCode.TOO_LARGE, f"{name[:40]}: name or ndim too large")
        parts = [len(raw_name).to_bytes(2, "big"), raw_name, bytes([len(dname)]), dname.encode()]
        parts.append(bytes([arr.ndim]))
        parts.extend(d.to_bytes(8, "big") for d in arr.shape)
        parts.append(data.nbytes.to_bytes(8, "big"))
        h.update(b"".join(parts))
        if data.nbytes:
            h.update(data.reshape(-1).view(np.uint8).data)
    return h.digest()


def make_delta(
    new: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Return ``new - base`` per tensor (same names, shapes and dtypes required).

    Floats subtract; integers subtract with wrap-around (exactly undone by
    :func:`apply_delta`); bools use XOR.

    Raises:
        LocalProtocolError: BAD_TABLE, BAD_SHAPE or BAD_DTYPE if the two states differ
            in names, shapes or dtypes.
    """
    if set(new) != set(base):
        raise LocalProtocolError(ErrorCode.BAD_TABLE, "new and base have different tensors")
    delta: dict[str, np.ndarray] = {}
    for name, n in new.items():
        b = base[name]
        if n.shape != b.shape:
            raise LocalProtocolError(ErrorCode.BAD_SHAPE, f"{name}: {n.shape} vs base {b.shape}")
        if n.dtype != b.dtype:
            raise LocalProtocolError(ErrorCode.BAD_DTYPE, f"{name}: {n.dtype} vs base {b.dtype}")
        if n.dtype.kind == "b":
            delta[name] = np.bitwise_xor(n, b)
        else:
            delta[name] = np.subtract(n, b, dtype=n.dtype)
    return delta


def apply_delta(
    base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Return ``base + delta``; tensors absent from ``delta`` are kept unchanged.

    Each result keeps the base tensor's dtype. ``delta`` usually comes from a peer, so
    mismatches are remote errors.

    Raises:
        RemoteProtocolError: BAD_TABLE (unknown tensor), BAD_SHAPE, BAD_DTYPE (e.g. a
            float delta for an integer tensor), NON_FINITE (the sum overflowed).
    """
    out = dict(base)
    for name, d in delta.items():
        b = base.get(name)
        if not isinstance(d, np.ndarray):
            raise RemoteProtocolError(ErrorCode.BAD_TYPE, f"{name}: delta is not an array")
        if b is None:
            raise RemoteProtocolError(ErrorCode.BAD_TABLE, f"{name}: not in the base state")
        if d.shape != b.shape:
            raise RemoteProtocolError(ErrorCode.BAD_SHAPE, f"{name}: {d.shape} vs base {b.shape}")
        kind = b.dtype.kind
        if kind == "f":
            if d.dtype.kind != "f":
                raise RemoteProtocolError(ErrorCode.BAD_DTYPE, f"{name}: non-float delta")
            with np.errstate(over="ignore", invalid="ignore"):  # detected just below
                result = np.add(b, d, dtype=b.dtype)
            if not is_finite_array(result):
                raise RemoteProtocolError(ErrorCode.NON_FINITE, f"{name}: base + delta overflows")
        elif kind == "b":
            if d.dtype.kind != "b":
                raise RemoteProtocolError(ErrorCode.BAD_DTYPE, f"{name}: non-bool delta")
            result = np.bitwise_xor(b, d)
        elif kind in "iu":
            if d.dtype.kind not in "iu" or d.dtype.itemsize > b.dtype.itemsize:
                raise RemoteProtocolError(ErrorCode.BAD_DTYPE, f"{name}: delta dtype {d.dtype}")
            result = np.add(b, d, dtype=b.dtype, casting="unsafe")
        else:
            raise LocalProtocolError(ErrorCode.BAD_DTYPE, f"{name}: base dtype {b.dtype}")
        out[name] = result
    return out
