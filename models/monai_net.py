"""Any MONAI network as a task's model.

``[task] model = "monai.networks.nets.BasicUNet"`` with ``[task.model_args]`` replaces the
task's own network; the task keeps its data, loss and metrics. :func:`check_spec` resolves
the name and binds the arguments to the constructor's signature at start-up, so a typo is
an error that names the field, not a crash in the first round. :class:`ModelTask` is the
task with its model swapped; peers, ``silomesh train`` and strategies see an ordinary
:class:`~silomesh.models.task.Task`.

The network is the bare MONAI module, so its state-dict keys are the ones a MONAI bundle's
``models/model.pt`` holds (see :mod:`silomesh.models.bundle`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from silomesh.models.architecture import MONAI_NETS, ModelSpec
from silomesh.models.task import ArrayDataset, Federation, Task


class ModelSpecError(ValueError):
    """A model name or argument that cannot be used; the message names the config field."""


def resolve_network(name: str, *, field: str = "task.model") -> type[nn.Module]:
    """The class ``name`` names: ``monai.networks.nets.X`` or just ``X``.

    Raises:
        ModelSpecError: outside ``monai.networks.nets``, unknown, or not a torch module.
    """
    short = name.removeprefix(MONAI_NETS + ".")
    if "." in short or not short.isidentifier():
        raise ModelSpecError(f"{field}: expected a network of {MONAI_NETS} (e.g. {MONAI_NETS}.BasicUNet), got {name!r}")
    module = importlib.import_module(MONAI_NETS)
    cls = getattr(module, short, None)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise ModelSpecError(f"{field}: {MONAI_NETS} has no network {short!r}")
    return cls


def check_spec(
    name: str, args: Mapping[str, Any], *, field: str = "task.model", args_field: str | None = None
) -> ModelSpec:
    """Resolve ``name`` and check ``args`` against its constructor; return the normalised spec.

    Raises:
        ModelSpecError: naming ``field`` (``task.model``) or ``args_field.<key>``
            (default ``task.model_args.<key>``).
    """
    args_field = args_field or f"{field}_args"
    cls = resolve_network(name, field=field)
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in args.items():
        if key not in params and not takes_any:
            known = ", ".join(p for p in params if p not in ("self", "args", "kwargs"))
            raise ModelSpecError(f"{args_field}.{key}: {cls.__name__} takes no argument {key!r} (it takes {known})")
        try:
            ModelSpec(MONAI_NETS, {key: value}).canonical_args()
        except ValueError as exc:
            raise ModelSpecError(f"{args_field}.{key}: {exc}") from None
    missing = [
        p.name for p in list(params.values())[1:]
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and p.name not in args
    ]
    if missing:
        raise ModelSpecError(f"{args_field}: {cls.__name__} needs {', '.join(missing)}")
    return ModelSpec(f"{MONAI_NETS}.{cls.__name__}", dict(args))


def build_network(spec: ModelSpec, seed: int = 0, *, weights: Path | None = None) -> nn.Module:
    """Instantiate ``spec`` with torch seeded by ``seed``; load ``weights`` if given.

    ``weights`` is a local file the hospital trusts (a bundle's ``models/model.pt``); it is
    read with ``torch.load(weights_only=True)``, never bytes from the network.

    Raises:
        ModelSpecError: the arguments are rejected by the constructor (``task.model_args``).
        ValueError: the weights file cannot be read or does not fit the network.
    """
    cls = resolve_network(spec.name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            net = cls(**_as_call_args(spec.args))
        except (TypeError, ValueError, AssertionError) as exc:
            raise ModelSpecError(f"task.model_args: {spec.short_name} rejects them ({exc})") from exc
    if weights is not None:
        net.load_state_dict(load_weights(weights, net))
    return net


def _as_call_args(args: Mapping[str, Any]) -> dict[str, Any]:
    # MONAI takes sequences as tuples in many places (features, act=("name", {...}))
    def conv(v: object) -> object:
        if isinstance(v, list):
            return tuple(conv(x) for x in v)
        if isinstance(v, Mapping):
            return {k: conv(x) for k, x in v.items()}
        return v

    return {k: conv(v) for k, v in args.items()}


def load_weights(path: Path, net: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict from a local ``.pt`` file, checked against ``net``'s names and shapes.

    Accepts a bare state dict or a checkpoint dict holding one under ``"model"`` or
    ``"state_dict"`` (MONAI's CheckpointSaver writes ``{"model": ...}``).

    Raises:
        ValueError: naming the file, for an unreadable file or one that does not fit.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise ValueError(f"{path}: not a readable torch state dict ({exc})") from exc
    if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        state = state.get("model", state.get("state_dict", state))
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    ours = net.state_dict()
    missing = sorted(set(ours) - set(state))
    extra = sorted(set(state) - set(ours))
    if missing or extra:
        raise ValueError(f"{path}: does not fit the network (missing {missing[:3]}, unexpected {extra[:3]})")
    for key, tensor in ours.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            got, want = tuple(state[key].shape), tuple(tensor.shape)
            raise ValueError(f"{path}: {key} has shape {got}, the network's is {want}")
    return state


class ModelTask(Task):
    """``task`` with its network replaced by the MONAI network ``spec``.

    Data, loss, evaluation and any other method come from ``task``; only
    :meth:`make_model` differs (``size`` is ignored: the arguments say the size). With
    ``weights``, every model starts from that file, so all peers start from one
    pre-trained point.
    """

    def __init__(self, task: Task, spec: ModelSpec, weights: Path | None = None) -> None:
        self.inner = task
        self.spec = spec
        self.weights = weights
        self.name = task.name
        self.metric = task.metric
        self.distills = task.distills

    def make_federation(self, n_silos: int, seed: int, **options: Any) -> Federation:
        return self.inner.make_federation(n_silos, seed, **options)

    def make_model(self, size: str = "tiny", seed: int = 0) -> nn.Module:
        return build_network(self.spec, seed, weights=self.weights)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.inner.loss(model, batch)

    def evaluate(self, model: nn.Module, data: ArrayDataset) -> dict[str, float]:
        return self.inner.evaluate(model, data)

    def check_data(self, data: ArrayDataset) -> None:
        """Run the network on one sample of ``data``; where the task's own network also
        takes it, the two outputs must have one shape (the loss and metrics expect it).

        Raises:
            ModelSpecError: naming ``task.model_args``, with both shapes.
        """
        x = torch.from_numpy(np.ascontiguousarray(data["image"][:1]))
        net = build_network(self.spec, 0)
        with torch.no_grad():
            try:
                got = tuple(net.eval()(x).shape)
            except (RuntimeError, ValueError) as exc:
                raise ModelSpecError(
                    f"task.model_args: {self.spec.short_name} cannot take this data's images {tuple(x.shape)} ({exc})"
                ) from None
            try:
                want: tuple[int, ...] | None = tuple(self.inner.make_model("tiny", 0).eval()(x).shape)
            except (RuntimeError, ValueError):  # e.g. volumes for a task whose own network is 2D
                want = None
        if want is not None and got != want:
            raise ModelSpecError(
                f"task.model_args: {self.spec.short_name} gives outputs {got}, the {self.name} task needs {want} "
                "(check in_channels/out_channels)"
            )

    def __getattr__(self, name: str) -> object:  # task-specific extras (predict, downstream_split...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
