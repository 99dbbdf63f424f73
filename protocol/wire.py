"""Strict msgpack helpers and field validators shared by all message types.

Packing is deterministic (maps keep the key order they were built in, ``bytes`` become
msgpack ``bin``, ``str`` become ``str``, Python ``float`` always becomes ``float 64``).
Unpacking is strict: exactly one object, valid UTF-8 strings, ``str`` map keys, no duplicate
keys, no extension types (the timestamp extension included), nesting at most
:data:`~.limits.MAX_MSGPACK_DEPTH` deep, bounded sizes. Every failure becomes a
:class:`RemoteProtocolError` with :attr:`ErrorCode.BAD_MSGPACK`.

The ``check_*`` validators raise :class:`LocalProtocolError`; decoders wrap them with
:func:`~silomesh.protocol.errors.as_remote` so the same rules serve both directions.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any, NoReturn

import msgpack

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .limits import MAX_MSGPACK_DEPTH

__all__ = [
    "U64_MAX",
    "check_bytes",
    "check_federation",
    "check_float",
    "check_keys",
    "check_optional_bytes",
    "check_str",
    "check_uint",
    "packb",
    "unpack_map",
]

U64_MAX = 2**64 - 1
_FEDERATION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class _NotStrict(Exception):
    """Valid msgpack that the wire conventions forbid."""


def _pairs_no_duplicates(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    for key, _ in pairs:
        if type(key) is not str:
            raise _NotStrict(f"map key of type {type(key).__name__}, not str")
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _NotStrict("duplicate map key")
    return out


def _check_tree(obj: object) -> None:
    """Refuse nesting deeper than :data:`MAX_MSGPACK_DEPTH` and timestamp extensions.

    msgpack decodes the timestamp extension (type -1) itself, without calling
    ``ext_hook``, so it is caught here. The top-level object has depth 1.
    """
    stack: list[tuple[object, int]] = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, msgpack.Timestamp):
            raise _NotStrict("extension type -1 (timestamp) not allowed")
        if isinstance(item, list | dict):
            if depth > MAX_MSGPACK_DEPTH:
                raise _NotStrict(f"nested deeper than {MAX_MSGPACK_DEPTH} maps or arrays")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def _refuse_ext(code: int, data: bytes) -> NoReturn:
    raise ValueError(f"extension type {code} not allowed")


def packb(obj: object) -> bytes:
    """Pack ``obj`` with the wire conventions (bin for bytes, str for str, float 64 for float)."""
    data: bytes = msgpack.packb(obj, use_bin_type=True, strict_types=True)
    return data


def unpack_map(data: bytes | bytearray | memoryview, *, what: str, max_size: int) -> dict[str, Any]:
    """Unpack one msgpack map occupying all of ``data``.

    Strict (PROTOCOL.md section 2): bytes after the map, invalid UTF-8, a non-``str`` or
    repeated map key, an extension type or nesting deeper than
    :data:`~.limits.MAX_MSGPACK_DEPTH` are ``BAD_MSGPACK``.

    Args:
        data: The encoded bytes.
        what: Name used in error messages ("header", "body", ...).
        max_size: Largest accepted encoding; larger is ``TOO_LARGE``.

    Raises:
        RemoteProtocolError: TOO_LARGE, BAD_MSGPACK, or BAD_TYPE if not a map.
    """
    if len(data) > max_size:
        raise RemoteProtocolError(ErrorCode.TOO_LARGE, f"{what} is {len(data)} bytes > {max_size}")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            object_pairs_hook=_pairs_no_duplicates,
            ext_hook=_refuse_ext,
        )
        _check_tree(obj)
    except (ValueError, msgpack.UnpackException, _NotStrict) as exc:
        raise RemoteProtocolError(
            ErrorCode.BAD_MSGPACK, f"{what}: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError(ErrorCode.BAD_TYPE, f"{what} is not a msgpack map")
    return obj


def check_keys(
    what: str, obj: Mapping[str, Any], required: Collection[str], optional: Collection[str] = ()
) -> None:
    """Require exactly ``required`` keys plus any of ``optional``; nothing else."""
    keys = set(obj)
    missing = set(required) - keys
    if missing:
        raise LocalProtocolError(ErrorCode.BAD_TYPE, f"{what}: missing {sorted(missing)}")
    extra = keys - set(required) - set(optional)
    if extra:
        raise LocalProtocolError(
            ErrorCode.BAD_TYPE, f"{what}: unexpected {sorted(map(str, extra))}"
        )


def check_uint(name: str, value: object, maximum: int = U64_MAX) -> int:
    """Return ``value`` if it is an ``int`` (not bool) in ``[0, maximum]``."""
    if type(value) is not int or not 0 <= value <= maximum:
        raise LocalProtocolError(ErrorCode.BAD_TYPE, f"{name} must be an int in [0, {maximum}]")
    return value


def check_float(name: str, value: object) -> float:
    """Return ``value`` if it is a finite ``float``."""
    if type(value) is not float or value != value or value in (float("inf"), float("-inf")):
        raise LocalProtocolError(ErrorCode.BAD_TYPE, f"{name} must be a finite float")
    return value


def check_bytes(name: str, value: object, size: int) -> bytes:
    """Return ``value`` if it is ``bytes`` of exactly ``size`` bytes."""
    if type(value) is not bytes or len(value) != size:
        raise LocalProtocolError(ErrorCode.BAD_TYPE, f"{name} must be {size} bytes")
    return value


def check_optional_bytes(name: str, value: object, size: int) -> bytes | None:
    """Like :func:`check_bytes` but also accepts ``None``."""
    return None if value is None else check_bytes(name, value, size)


def check_str(name: str, value: object, max_bytes: int) -> str:
    """Return ``value`` if it is a ``str`` of at most ``max_bytes`` UTF-8 bytes."""
    if type(value) is not str:
        raise LocalProtocolError(ErrorCode.BAD_TYPE, f"{name} must be a str")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates
        raise LocalProtocolError(ErrorCode.BAD_TYPE, f"{name} is not valid UTF-8") from None
    if size > max_bytes:
        raise LocalProtocolError(ErrorCode.TOO_LARGE, f"{name} longer than {max_bytes} bytes")
    return value


def check_federation(value: object) -> str:
    """Federation ids: 1-64 of ``[A-Za-z0-9._-]``, starting alphanumeric (topic-safe)."""
    if type(value) is not str or _FEDERATION_RE.fullmatch(value) is None:
        raise LocalProtocolError(
            ErrorCode.BAD_TYPE, "federation must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}"
        )
    return value
