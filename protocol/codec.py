"""Tensor codec: a state dict as one raw blob plus a msgpack-ready table.

The table is a list of entries ``[name, dtype, shape, offset, scale]`` sorted by name;
entry ``i`` starts where entry ``i - 1`` ends, the first at 0 and the last ends at the
end of the blob (no gaps, no overlaps, no trailing bytes). Data is little-endian and
C-ordered. The codec chooses how *floating* tensors travel:

* ``float32``: as ``float32``;
* ``float16``: as ``float16`` (values beyond +-65504 are refused, not turned into inf);
* ``int8``: as ``int8`` with a per-tensor symmetric ``scale``:
  ``scale = float32(max|x|) / 127`` in float32, replaced by 0 when below the smallest
  normal float32 (all-zero and vanishingly small tensors: every ``q`` is then 0),
  ``q = clip(rint(x * float32(1 / scale)), -127, 127)`` and the decoder's
  ``x' = float32(q) * float32(scale)``. Scalars (shape ``[]``) follow the same rules.
* ``int4``: as ``int4`` entries, two values a byte, with a per-tensor symmetric ``scale``:
  as ``int8`` with 7 for 127 (``q`` in -7..7); value ``i`` of a tensor is the low nibble
  (even ``i``) or the high nibble (odd ``i``) of byte ``i // 2`` and holds ``q + 8``
  (1..15; nibble 0 is refused); an odd count leaves the last high nibble 0.
* ``topk``: as ``topk`` entries holding only the tensor's non-zero values: the entry's fifth
  element is their number ``k`` (not a scale), its data ``k`` indices (``uint32``, C order,
  strictly increasing) then the ``k`` values (``float32``); every other value decodes to 0.
  Exact for float32 tensors (-0.0 decodes to 0.0). The *sender* makes a delta sparse first
  (:func:`keep_largest`: its largest magnitudes per tensor, the rest carried into the next
  delta as the quantized codecs' error is); the codec itself chooses nothing.

Integer and bool tensors travel unchanged. Decoding is zero-copy (``np.frombuffer`` on
the caller's buffer; arrays come back read-only and possibly unaligned) except for
``int8``- and ``int4``-quantized tensors, which are dequantized to ``float32``, and ``topk``
entries, which become dense ``float32`` arrays. No pickle anywhere.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .limits import DEFAULT_LIMITS, Limits

__all__ = [
    "WIRE_DTYPES",
    "Codec",
    "EncodedTensors",
    "check_model_dtypes",
    "decode_tensors",
    "encode_tensors",
    "int4_scale",
    "int8_scale",
    "is_finite_array",
    "keep_largest",
    "received_as",
]

logger = logging.getLogger(__name__)


class Codec(enum.StrEnum):
    """How floating-point tensors are encoded; ``NONE`` marks messages without tensors."""

    NONE = "none"
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    INT8 = "int8"
    INT4 = "int4"
    TOPK = "topk"


WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "bool": np.dtype("?"),
}
"""The dtype allowlist: wire name -> numpy dtype (explicitly little-endian).

``int4`` (:data:`INT4`) is allowed too: it has no numpy dtype (two values a byte)."""

INT4 = "int4"
"""The packed 4-bit wire dtype of the ``int4`` codec (quantized floats only)."""
_NIBBLES = np.dtype("u1")  # int4 data is read and written as bytes
TOPK = "topk"
"""The sparse wire dtype of the ``topk`` codec (floats only): indices, then values."""
_TOPK_WORDS = np.dtype("<u4")  # topk data is k uint32 indices then k float32 values
_TOPK_VALUES = np.dtype("<f4")
_TOPK_MAX_COUNT = 2**32  # indices are uint32

_FLOAT16_MAX = 65504.0
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_MAX_SCALE = _FLOAT32_MAX / 128.0  # so that -128 * scale stays finite
_MAX_SCALE_INT4 = _FLOAT32_MAX / 8.0  # so that 8 * scale stays finite
_MIN_SCALE = float(np.finfo(np.float32).tiny)  # 2**-126: below it 1 / scale overflows float32


def is_finite_array(arr: np.ndarray) -> bool:
    """True if a floating array holds no NaN or infinity (other dtypes: always True)."""
    if arr.size == 0 or arr.dtype.kind != "f":
        return True
    if arr.dtype.itemsize == 2:  # float16: exponent bits all ones <=> inf or nan
        bits = (
            arr.view(np.uint16)
            if arr.flags.c_contiguous
            else arr.astype(np.float16).view(np.uint16)
        )
        return not bool(((bits & 0x7C00) == 0x7C00).any())
    return bool(np.isfinite(arr.min()) and np.isfinite(arr.max()))


def int8_scale(amax: float) -> float:
    """The int8 codec's scale for a tensor whose largest magnitude is ``amax``.

    ``float32(amax) / float32(127)`` in float32 arithmetic, widened to float64 (exactly);
    0.0 when that is below the smallest normal float32 (``2**-126``), so that
    ``float32(1 / scale)`` never overflows. With scale 0 every quantized value is 0.
    """
    scale = float(np.float32(amax) / np.float32(127.0))
    return 0.0 if scale < _MIN_SCALE else scale


def int4_scale(amax: float) -> float:
    """The int4 codec's scale for a tensor whose largest magnitude is ``amax``: as
    :func:`int8_scale` with ``float32(7)`` for ``float32(127)``."""
    scale = float(np.float32(amax) / np.float32(7.0))
    return 0.0 if scale < _MIN_SCALE else scale


def _entry_bytes(wire: np.dtype[Any], packed: bool, count: int) -> int:
    """Bytes of a table entry's data: ``count`` elements of ``wire``, or of int4 if ``packed``
    (a ``topk`` entry's are ``8 * k``: :func:`_topk_bytes`)."""
    return (count + 1) // 2 if packed else count * wire.itemsize


def _topk_bytes(kept: int) -> int:
    """Bytes of a ``topk`` entry keeping ``kept`` values: a uint32 index and a float32 each."""
    return 8 * kept


def _wire_name(dtype: np.dtype[Any]) -> str | None:
    for name, wire in WIRE_DTYPES.items():
        if wire.kind == dtype.kind and wire.itemsize == dtype.itemsize:
            return name
    return None


@dataclass(frozen=True)
class _Source:
    array: np.ndarray
    wire: np.dtype[Any]
    offset: int
    scale: float | None
    #: int4: two values a byte (``wire`` is then bytes)
    packed: bool = False
    #: topk: the flat indices of the values kept (``wire`` is then uint32 words)
    kept: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        if self.kept is not None:
            return _topk_bytes(self.kept.size)
        return _entry_bytes(self.wire, self.packed, self.array.size)


@dataclass(frozen=True)
class EncodedTensors:
    """A state dict laid out for the wire, not yet copied anywhere.

    Attributes:
        table: The msgpack-ready table (list of ``[name, dtype, shape, offset, scale]``).
        nbytes: Size of the blob :meth:`write_into` produces.
        codec: The codec used.
    """

    table: list[list[Any]]
    nbytes: int
    codec: Codec
    _sources: tuple[_Source, ...]

    def write_into(self, out: bytearray | memoryview) -> None:
        """Write the blob into ``out`` (a writable buffer of exactly :attr:`nbytes`)."""
        view = memoryview(out).cast("B")
        if len(view) != self.nbytes or view.readonly:
            raise LocalProtocolError(ErrorCode.BAD_TABLE, "output buffer has the wrong size")
        for src in self._sources:
            if src.array.size:
                count = src.nbytes // src.wire.itemsize
                _write_source(src, np.frombuffer(view, dtype=src.wire, count=count, offset=src.offset))

    def pieces(self) -> Iterator[memoryview]:
        """The blob as consecutive pieces, one per non-empty tensor, in table order.

        A tensor that already has its wire layout (C-ordered, little-endian, the wire
        dtype) is a view of its own memory; any other is encoded into a buffer of its own
        size. So the whole blob never exists at once (a streamed envelope, PROTOCOL.md
        section 4.2).
        """
        for src in self._sources:
            arr = src.array
            if not arr.size:
                continue
            if src.scale is None and src.kept is None and arr.dtype == src.wire and arr.flags.c_contiguous:
                yield arr.reshape(-1).data.cast("B")
                continue
            dst = np.empty(src.nbytes // src.wire.itemsize, dtype=src.wire)
            _write_source(src, dst)
            yield dst.data.cast("B")

    def to_bytes(self) -> bytes:
        """The blob as a new ``bytes`` object."""
        buf = bytearray(self.nbytes)
        self.write_into(buf)
        return bytes(buf)


def _write_source(src: _Source, flat: np.ndarray) -> None:
    """Encode one tensor into ``flat`` (its wire dtype, ``src.nbytes`` bytes)."""
    if src.packed:
        _write_int4(src, flat)
        return
    if src.kept is not None:
        k = src.kept.size
        flat[:k] = src.kept
        np.copyto(flat[k:].view(_TOPK_VALUES), src.array.reshape(-1)[src.kept], casting="unsafe")
        return
    dst = flat.reshape(src.array.shape)
    if src.scale is None:
        np.copyto(dst, src.array, casting="unsafe")
    elif src.scale == 0.0:
        dst[...] = 0
    else:
        # an explicit output array: for a 0-d tensor numpy would return a scalar
        q = np.empty(src.array.shape, dtype=np.float32)
        np.multiply(src.array, np.float32(1.0 / src.scale), out=q, dtype=np.float32)
        np.rint(q, out=q)
        np.clip(q, -127, 127, out=q)
        np.copyto(dst, q, casting="unsafe")


def _write_int4(src: _Source, out: np.ndarray) -> None:
    """Quantize ``src`` to q in -7..7 and pack ``q + 8`` two a byte into ``out`` (bytes)."""
    n = src.array.size
    nibbles = np.full(2 * out.size, 8, dtype=np.uint8)
    if n % 2:
        nibbles[-1] = 0  # the unused high nibble of an odd count
    if src.scale:
        q = np.empty(n, dtype=np.float32)
        np.multiply(src.array.reshape(-1), np.float32(1.0 / src.scale), out=q, dtype=np.float32)
        np.rint(q, out=q)
        np.clip(q, -7, 7, out=q)
        q += 8
        np.copyto(nibbles[:n], q, casting="unsafe")
    np.bitwise_or(nibbles[0::2], np.left_shift(nibbles[1::2], 4), out=out)


def _read_int4(data: np.ndarray, shape: tuple[int, ...], count: int, name: str) -> np.ndarray:
    """The q values of ``count`` int4 elements packed in ``data`` (bytes), as a new float32
    array (4 bytes an element, plus a byte array half the count while it is read).

    Raises:
        RemoteProtocolError: BAD_DTYPE for a nibble 0 among the values, or a non-zero
            unused high nibble (odd count).
    """
    if count % 2 and data[-1] >> 4:
        raise _remote(ErrorCode.BAD_DTYPE, f"{name}: the unused last int4 nibble must be 0")
    q = np.empty(shape, dtype=np.float32)  # the caller gets an array of its own
    flat = q.reshape(-1)  # a view: writes land in q
    flat[0::2] = np.bitwise_and(data, 0x0F)
    flat[1::2] = np.right_shift(data[: count // 2], 4)
    if count and not flat.min():
        raise _remote(ErrorCode.BAD_DTYPE, f"{name}: int4 nibble 0 is not a value")
    flat -= 8
    return q


def _read_topk(data: np.ndarray, shape: tuple[int, ...], count: int, name: str) -> np.ndarray:
    """The dense float32 tensor of a ``topk`` entry: ``data`` holds ``k`` uint32 indices then
    ``k`` float32 values (``2 * k`` words); a new array, zero where no value is kept.

    Raises:
        RemoteProtocolError: BAD_TABLE for indices not strictly increasing or not below
            ``count``; NON_FINITE for a NaN or infinite value.
    """
    k = data.size // 2
    indices, values = data[:k], data[k:].view(_TOPK_VALUES)
    if k and (int(indices[-1]) >= count or (k > 1 and bool((indices[1:] <= indices[:-1]).any()))):
        raise _remote(ErrorCode.BAD_TABLE, f"{name}: topk indices must increase and stay below {count}")
    if not is_finite_array(values):
        raise _remote(ErrorCode.NON_FINITE, f"{name}: NaN or infinity")
    out = np.zeros(shape, dtype=np.float32)
    out.reshape(-1)[indices] = values
    return out


def _check_name(name: object, limits: Limits) -> str:
    if type(name) is not str or not name or "\x00" in name:
        raise LocalProtocolError(
            ErrorCode.BAD_TABLE, "tensor names must be non-empty str without NUL"
        )
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise LocalProtocolError(ErrorCode.BAD_TABLE, "tensor name is not valid UTF-8") from None
    if size > limits.max_name_length:
        raise LocalProtocolError(
            ErrorCode.TOO_LARGE, f"tensor name longer than {limits.max_name_length}"
        )
    return name


def _count(shape: tuple[int, ...], limits: Limits, name: str) -> int:
    if len(shape) > limits.max_ndim:
        raise LocalProtocolError(ErrorCode.BAD_SHAPE, f"{name}: more than {limits.max_ndim} dims")
    count = math.prod(shape)
    if count > limits.max_tensor_elements:
        raise LocalProtocolError(ErrorCode.TOO_LARGE, f"{name}: {count} elements > limit")
    return count


def encode_tensors(
    state: Mapping[str, np.ndarray],
    codec: Codec | str = Codec.FLOAT32,
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> EncodedTensors:
    """Lay out ``state`` for the wire (validates; copies nothing yet).

    Raises:
        LocalProtocolError: BAD_TYPE/BAD_DTYPE/BAD_SHAPE/TOO_LARGE for invalid tensors,
            NON_FINITE for NaN/inf or values that overflow float16.
    """
    try:
        codec = Codec(codec)
    except ValueError:
        raise LocalProtocolError(ErrorCode.BAD_TYPE, f"unknown codec {codec!r}") from None
    if codec is Codec.NONE:
        raise LocalProtocolError(ErrorCode.BAD_TYPE, "codec 'none' carries no tensors")
    if not isinstance(state, Mapping):
        raise LocalProtocolError(ErrorCode.BAD_TYPE, "state must be a mapping name -> array")
    if len(state) > limits.max_tensors:
        raise LocalProtocolError(ErrorCode.TOO_LARGE, f"more than {limits.max_tensors} tensors")
    table: list[list[Any]] = []
    sources: list[_Source] = []
    offset = 0
    total = 0
    for name in state:
        _check_name(name, limits)
    for name in sorted(state):
        arr = state[name]
        if not isinstance(arr, np.ndarray):
            raise LocalProtocolError(ErrorCode.BAD_TYPE, f"{name}: not a numpy array")
        count = _count(arr.shape, limits, name)
        total += count
        if total > limits.max_total_elements:
            raise LocalProtocolError(ErrorCode.TOO_LARGE, "total elements exceed the limit")
        scale: float | None = None
        kept: np.ndarray | None = None
        if arr.dtype.kind == "f" and arr.dtype.itemsize in (2, 4, 8):
            lo, hi = (float(arr.min()), float(arr.max())) if count else (0.0, 0.0)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise LocalProtocolError(ErrorCode.NON_FINITE, f"{name}: NaN or infinity")
            amax = max(-lo, hi)
            if codec is Codec.FLOAT16 and amax > _FLOAT16_MAX:
                raise LocalProtocolError(ErrorCode.NON_FINITE, f"{name}: overflows float16")
            if codec is Codec.FLOAT32 and amax > _FLOAT32_MAX:
                raise LocalProtocolError(ErrorCode.NON_FINITE, f"{name}: overflows float32")
            if codec is Codec.INT8:
                scale = int8_scale(amax)
                if not math.isfinite(scale) or scale > _MAX_SCALE:
                    raise LocalProtocolError(ErrorCode.NON_FINITE, f"{name}: overflows float32")
            if codec is Codec.INT4:
                scale = int4_scale(amax)
                if not math.isfinite(scale) or scale > _MAX_SCALE_INT4:
                    raise LocalProtocolError(ErrorCode.NON_FINITE, f"{name}: overflows float32")
            if codec is Codec.TOPK:
                if amax > _FLOAT32_MAX:
                    raise LocalProtocolError(ErrorCode.NON_FINITE, f"{name}: overflows float32")
                if count > _TOPK_MAX_COUNT:
                    raise LocalProtocolError(ErrorCode.TOO_LARGE, f"{name}: topk indices are uint32")
                # non-zero in float32: a float64 value below float32's range is not sent as a 0
                kept = np.flatnonzero(arr.reshape(-1).astype(np.float32, copy=False)).astype(_TOPK_WORDS)
            dtype_name = codec.value
        else:
            maybe = _wire_name(arr.dtype)
            if maybe is None or maybe.startswith("float"):
                raise LocalProtocolError(
                    ErrorCode.BAD_DTYPE, f"{name}: dtype {arr.dtype} not allowed"
                )
            dtype_name = maybe
        packed = dtype_name == INT4
        wire = _NIBBLES if packed else _TOPK_WORDS if kept is not None else WIRE_DTYPES[dtype_name]
        source = _Source(arr, wire, offset, scale, packed, kept)
        table.append([name, dtype_name, list(arr.shape), offset, scale if kept is None else kept.size])
        sources.append(source)
        offset += source.nbytes
    return EncodedTensors(table=table, nbytes=offset, codec=codec, _sources=tuple(sources))


def _remote(code: ErrorCode, message: str) -> RemoteProtocolError:
    return RemoteProtocolError(code, message)


def check_model_dtypes(expected_dtypes: Mapping[str, str]) -> dict[str, np.dtype[Any]]:
    """Validate a model's ``name -> numpy dtype name`` map (local configuration).

    Raises:
        LocalProtocolError: BAD_DTYPE if a name is not a numpy dtype.
    """
    out: dict[str, np.dtype[Any]] = {}
    for name, dtype_name in expected_dtypes.items():
        try:
            out[name] = np.dtype(dtype_name)
        except TypeError:
            raise LocalProtocolError(
                ErrorCode.BAD_DTYPE, f"{name}: {dtype_name!r} is not a numpy dtype"
            ) from None
    return out


def _fits_model(model: np.dtype[Any], dtype_name: str, scale: object) -> bool:
    """True if a table entry ``(dtype_name, scale)`` may carry a model tensor of ``model``.

    A floating model tensor travels as a float codec (``float32``, ``float16``, or
    ``int8`` or ``int4`` with a scale, or ``topk``); an integer or bool model tensor travels in exactly
    its dtype (an ``int8`` entry with a scale is a float and never fits an integer tensor).
    """
    if model.kind == "f":
        return dtype_name in ("float32", "float16", TOPK) or (dtype_name in ("int8", INT4) and scale is not None)
    wire = WIRE_DTYPES.get(dtype_name)
    return (
        scale is None
        and wire is not None
        and wire.kind == model.kind
        and wire.itemsize == model.itemsize
    )


def decode_tensors(
    table: object,
    blob: bytes | bytearray | memoryview,
    *,
    codec: Codec | str,
    limits: Limits = DEFAULT_LIMITS,
    expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
    expected_dtypes: Mapping[str, str] | None = None,
    complete: bool = False,
) -> dict[str, np.ndarray]:
    """Decode a table and blob received from a peer.

    The checks run in the order PROTOCOL.md section 6 lists (the first failure names the
    error code): the table is an array of at most ``max_tensors`` entries, then per
    entry in order: shape of the entry, name, name order, dtype allowlist, dtype vs
    codec, scale, shape, element counts, offset, extent, model name, model shape, model
    dtype, bool bytes, int4 nibbles and topk indices, finiteness; then trailing bytes, then missing
    model tensors.

    Args:
        table: The unpacked msgpack table.
        blob: The raw tensor bytes (not copied; arrays view into it).
        codec: The codec named in the envelope header.
        limits: Size limits.
        expected_shapes: If given, every tensor must be named here with this shape.
        expected_dtypes: If given, tensors named here must fit the model's numpy dtype
            (by name, e.g. ``"float32"``, ``"int64"``, ``"bool"``): a floating model
            tensor must arrive under a float codec, an integer or bool one in exactly
            its dtype (``BAD_DTYPE`` otherwise).
        complete: With ``expected_shapes``, also require every expected tensor.

    Returns:
        name -> read-only array (float32/float16/int/bool; int8- and int4-quantized tensors are
        dequantized to float32, scalars included; topk entries are dense float32 arrays).

    Raises:
        RemoteProtocolError: BAD_TABLE, BAD_DTYPE, BAD_SHAPE, TOO_LARGE, NON_FINITE,
            BAD_TYPE for anything malformed.
        LocalProtocolError: BAD_DTYPE if ``expected_dtypes`` names no numpy dtype.
    """
    try:
        codec = Codec(codec)
    except ValueError:
        raise _remote(ErrorCode.BAD_TYPE, f"unknown codec {codec!r}") from None
    if codec is Codec.NONE:
        raise _remote(ErrorCode.BAD_TYPE, "codec 'none' carries no tensors")
    model_dtypes = check_model_dtypes(expected_dtypes) if expected_dtypes is not None else None
    view = memoryview(blob).cast("B")
    if type(table) is not list:
        raise _remote(ErrorCode.BAD_TABLE, "tensor table must be an array")
    if len(table) > limits.max_tensors:
        raise _remote(ErrorCode.TOO_LARGE, f"more than {limits.max_tensors} tensors")
    out: dict[str, np.ndarray] = {}
    offset = 0
    total = 0
    previous: str | None = None
    for entry in table:
        if type(entry) is not list or len(entry) != 5:
            raise _remote(
                ErrorCode.BAD_TABLE, "table entries are [name, dtype, shape, offset, scale]"
            )
        name, dtype_name, shape_list, entry_offset, scale = entry
        try:
            _check_name(name, limits)
        except LocalProtocolError as exc:
            raise _remote(exc.code, exc.message) from None
        if previous is not None and name <= previous:
            raise _remote(ErrorCode.BAD_TABLE, f"{name!r}: names must be unique and sorted")
        previous = name
        packed = dtype_name == INT4
        sparse = dtype_name == TOPK
        wire = (_NIBBLES if packed else _TOPK_WORDS if sparse
                else WIRE_DTYPES.get(dtype_name) if type(dtype_name) is str else None)
        if wire is None:
            raise _remote(ErrorCode.BAD_DTYPE, f"{name}: dtype {dtype_name!r} not allowed")
        if (wire.kind == "f" or packed or sparse) and dtype_name != codec.value:
            raise _remote(ErrorCode.BAD_DTYPE, f"{name}: {dtype_name} under codec {codec.value}")
        quantized = (codec is Codec.INT8 and dtype_name == "int8") or packed
        kept = scale if sparse else None  # a topk entry's fifth element counts its values
        if sparse:
            if type(kept) is not int or kept < 0:
                raise _remote(ErrorCode.BAD_TABLE, f"{name}: a topk entry's fifth element counts its values (uint)")
            scale = None
        elif scale is not None and not quantized:
            raise _remote(ErrorCode.BAD_TABLE, f"{name}: scale only for int8 and int4 codec tensors")
        if packed and scale is None:
            raise _remote(ErrorCode.BAD_TABLE, f"{name}: an int4 tensor needs a scale")
        max_scale = _MAX_SCALE_INT4 if packed else _MAX_SCALE
        if scale is not None and (type(scale) is not float or not 0.0 <= scale <= max_scale):
            raise _remote(ErrorCode.BAD_TABLE, f"{name}: scale must be a float in [0, max]")
        if type(shape_list) is not list or not all(type(d) is int and d >= 0 for d in shape_list):
            raise _remote(ErrorCode.BAD_SHAPE, f"{name}: shape must be a list of uints")
        if any(d > limits.max_tensor_elements for d in shape_list):
            raise _remote(ErrorCode.TOO_LARGE, f"{name}: dimension exceeds the element limit")
        shape = tuple(shape_list)
        try:
            count = _count(shape, limits, name)
        except LocalProtocolError as exc:
            raise _remote(exc.code, exc.message) from None
        total += count
        if total > limits.max_total_elements:
            raise _remote(ErrorCode.TOO_LARGE, "total elements exceed the limit")
        if kept is not None and kept > min(count, _TOPK_MAX_COUNT):
            raise _remote(ErrorCode.BAD_TABLE, f"{name}: keeps {kept} values of {count}")
        if type(entry_offset) is not int or entry_offset != offset:
            what = (
                "overlaps the previous tensor"
                if (type(entry_offset) is int and entry_offset < offset)
                else "leaves a gap or is not an int"
            )
            raise _remote(ErrorCode.BAD_TABLE, f"{name}: offset {entry_offset!r} {what}")
        nbytes = _topk_bytes(kept) if kept is not None else _entry_bytes(wire, packed, count)
        if offset + nbytes > len(view):
            raise _remote(ErrorCode.BAD_TABLE, f"{name}: runs past the end of the blob")
        if expected_shapes is not None:
            want = expected_shapes.get(name)
            if want is None:
                raise _remote(ErrorCode.BAD_TABLE, f"{name}: not a tensor of this model")
            if tuple(want) != shape:
                raise _remote(ErrorCode.BAD_SHAPE, f"{name}: shape {shape} != model {tuple(want)}")
        if model_dtypes is not None:
            model = model_dtypes.get(name)
            if model is not None and not _fits_model(model, dtype_name, scale):
                what = f"{dtype_name} with a scale" if scale is not None else dtype_name
                raise _remote(ErrorCode.BAD_DTYPE, f"{name}: {what} for a {model} model tensor")
        if packed:
            arr = _read_int4(np.frombuffer(view, dtype=wire, count=nbytes, offset=offset), shape, count, name)
        elif kept is not None:
            arr = _read_topk(np.frombuffer(view, dtype=wire, count=2 * kept, offset=offset), shape, count, name)
        elif count == 0:
            arr = np.empty(shape, dtype=wire)
        else:
            arr = np.frombuffer(view, dtype=wire, count=count, offset=offset).reshape(shape)
        if not packed:
            arr.flags.writeable = False
        if wire.kind == "b" and count and int(arr.view(np.uint8).max()) > 1:
            raise _remote(ErrorCode.BAD_DTYPE, f"{name}: bool bytes must be 0 or 1")
        if scale is not None:
            # an explicit output array: for a 0-d tensor numpy would return a scalar; int4's
            # q values are our own float32 array, scaled where they are
            dequantized = arr if packed else np.empty(shape, dtype=np.float32)
            np.multiply(arr, np.float32(scale), out=dequantized, dtype=np.float32)
            dequantized.flags.writeable = False
            arr = dequantized
        elif kept is None and not is_finite_array(arr):
            raise _remote(ErrorCode.NON_FINITE, f"{name}: NaN or infinity")
        out[name] = arr
        offset += nbytes
    if offset != len(view):
        raise _remote(
            ErrorCode.BAD_TABLE, f"{len(view) - offset} trailing bytes after the last tensor"
        )
    if expected_shapes is not None and complete:
        missing = set(expected_shapes) - set(out)
        if missing:
            raise _remote(ErrorCode.BAD_TABLE, f"missing tensors: {sorted(missing)[:5]}")
    return out


def received_as(
    state: Mapping[str, np.ndarray], codec: Codec | str, *, limits: Limits = DEFAULT_LIMITS
) -> dict[str, np.ndarray]:
    """The tensors a receiver decodes from ``state`` sent under ``codec`` (writable copies).

    A sender that tracks what its neighbour holds (the base of its next delta) applies
    this to what it sends, so that a lossy codec's error is carried into the next delta
    instead of being lost: error feedback.
    """
    encoded = encode_tensors(state, codec, limits=limits)
    blob = encoded.to_bytes()
    decoded = decode_tensors(encoded.table, blob, codec=encoded.codec, limits=limits)
    return {name: np.array(arr) for name, arr in decoded.items()}


def keep_largest(state: Mapping[str, np.ndarray], fraction: float) -> dict[str, np.ndarray]:
    """``state`` with each floating tensor reduced to its ``ceil(fraction * count)`` values of
    largest magnitude, the others set to 0 (a new float32 array; integer and bool tensors
    are passed through): top-k sparsification, what a sender applies to a delta before
    sending it under the ``topk`` codec. Which of equal magnitudes are kept is numpy's
    choice (``argpartition``), the same on every run with the same numpy.

    Raises:
        ValueError: ``fraction`` outside ``(0, 1]``.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    out: dict[str, np.ndarray] = {}
    for name, arr in state.items():
        if arr.dtype.kind != "f":
            out[name] = arr
            continue
        flat = np.asarray(arr, dtype=np.float32).reshape(-1)
        keep = min(flat.size, math.ceil(fraction * flat.size))
        sparse = np.zeros(flat.size, dtype=np.float32)
        if keep == flat.size:
            sparse[:] = flat
        elif keep:
            largest = np.argpartition(np.abs(flat), flat.size - keep)[flat.size - keep:]
            sparse[largest] = flat[largest]
        out[name] = sparse.reshape(arr.shape)
    return out
