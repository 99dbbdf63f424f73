"""The model architecture neighbours must agree on, named in the hello's ``model`` string.

Pure (no torch, no MONAI), so the peer can compare two hellos cheaply. A built-in task's
model is named ``TASK/SIZE`` (``catheter/tiny``); a MONAI network chosen in ``[task]``
is named ``TASK/NETWORK/ARGS``, where ARGS is the first 16 hex digits of a BLAKE2b digest
over the network's keyword arguments in canonical JSON, e.g.
``catheter/BasicUNet/1f0c9a5e3b7d2c44``. The hello's ``model`` field holds at most
128 bytes, so the arguments travel as a digest; a mismatch names the field that differs
(``task.name``, ``task.size``, ``task.model`` or ``task.model_args``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: the hello's ``model`` field limit (PROTOCOL.md section 5)
MAX_MODEL_ID_BYTES = 128
#: the package MONAI networks are taken from
MONAI_NETS = "monai.networks.nets"


@dataclass(frozen=True)
class ModelSpec:
    """A network by its import name and keyword arguments (JSON values only)."""

    #: fully qualified class name, e.g. ``"monai.networks.nets.BasicUNet"``
    name: str
    #: keyword arguments of the constructor, e.g. ``{"spatial_dims": 3, "out_channels": 3}``
    args: Mapping[str, Any] = field(default_factory=dict)

    @property
    def short_name(self) -> str:
        """The class name without its package (``BasicUNet``)."""
        return self.name.rsplit(".", 1)[-1]

    def canonical_args(self) -> str:
        """The arguments as canonical JSON (sorted keys, tuples as lists, no spaces)."""
        return json.dumps(_jsonable(self.args), sort_keys=True, separators=(",", ":"))

    @property
    def args_digest(self) -> str:
        """First 16 hex digits of BLAKE2b-256 over :meth:`canonical_args`."""
        return hashlib.blake2b(self.canonical_args().encode(), digest_size=32).hexdigest()[:16]


def _jsonable(value: object) -> object:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ValueError(f"not a JSON value: {value!r} ({type(value).__name__})")


def model_id(task: str, size: str, spec: ModelSpec | None = None) -> str:
    """The hello's ``model`` string for a task and its model.

    Raises:
        ValueError: if the string would exceed :data:`MAX_MODEL_ID_BYTES`.
    """
    ident = f"{task}/{size}" if spec is None else f"{task}/{spec.short_name}/{spec.args_digest}"
    if len(ident.encode()) > MAX_MODEL_ID_BYTES:
        raise ValueError(f"model id {ident[:40]!r}... exceeds {MAX_MODEL_ID_BYTES} bytes")
    return ident


def model_difference(ours: str, theirs: str) -> str | None:
    """Which field of two model ids differs, in words; ``None`` if they agree.

    A peer always names its model. A hello whose model id is empty ("unspecified" on the
    wire) agrees only with an empty id of ours: otherwise weights of a model nobody named
    could be averaged into ours when they merely have the same shapes.
    """
    if ours == theirs:
        return None
    if not theirs:
        return f"the neighbour names no model (an empty id); ours is {ours!r}"
    if not ours:
        return f"we name no model; the neighbour's is {theirs!r}"
    a, b = ours.split("/"), theirs.split("/")
    if a[0] != b[0]:
        return f"task.name differs: ours {a[0]!r}, theirs {b[0]!r}"
    if len(a) != len(b):
        kind = {2: "a built-in network", 3: "a MONAI network"}
        return (
            f"task.model differs: ours is {kind.get(len(a), ours)} ({'/'.join(a[1:])}), "
            f"theirs is {kind.get(len(b), theirs)} ({'/'.join(b[1:])})"
        )
    if len(a) == 2:
        return f"task.size differs: ours {a[1]!r}, theirs {b[1]!r}"
    if a[1] != b[1]:
        return f"task.model differs: ours {a[1]!r}, theirs {b[1]!r}"
    return f"task.model_args differ (argument digest ours {a[-1]}, theirs {b[-1]})"
