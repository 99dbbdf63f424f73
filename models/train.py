"""Generic local training and evaluation loops, and checkpoints.

Training is deterministic for a given seed on a given machine: ``torch.manual_seed``
seeds dropout and friends, a ``numpy`` Generator orders the batches. The number of torch
threads is left as the caller set it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from silomesh.models.segmentation import model_device
from silomesh.models.task import ArrayDataset, Task

logger = logging.getLogger(__name__)


def batch_stream(data: ArrayDataset, batch_size: int, rng: np.random.Generator) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches: one shuffled pass after another."""
    while True:
        yield from data.batches(batch_size, rng, shuffle=True)


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int, label: str) -> Iterator[Callable[[float], None]]:
    """A rich progress bar on stderr; a no-op callback when disabled."""
    if not enabled:
        yield lambda loss: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task_id = bar.add_task(label, total=total, loss=float("nan"))
        yield lambda loss: bar.update(task_id, advance=1, loss=loss)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode, to serve as ``train_local``'s ``teacher``."""
    return copy.deepcopy(model).eval()


def with_teacher(batch: Mapping[str, torch.Tensor], teacher: nn.Module | None) -> dict[str, torch.Tensor]:
    """``batch`` as a dict, with ``teacher_logits`` (the frozen teacher's outputs) when there is a teacher."""
    out = dict(batch)
    if teacher is not None:
        with torch.no_grad():
            out["teacher_logits"] = teacher(out["image"])
    return out


def train_local(
    task: Task,
    model: nn.Module,
    data: ArrayDataset,
    steps: int,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = False,
    *,
    weight_decay: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    label: str = "train",
    anchor: Mapping[str, torch.Tensor] | None = None,
    anchor_weight: float = 0.0,
    teacher: nn.Module | None = None,
) -> list[float]:
    """Train ``model`` on ``data`` with ``task.loss`` for ``steps`` optimiser steps.

    Args:
        task: defines the loss.
        model: trained in place (moved nowhere; batches follow the model's device).
        data: training data; batches cycle through shuffled passes.
        steps: number of optimiser steps.
        batch_size: samples per step (the last batch of a pass may be smaller).
        lr: AdamW learning rate (ignored when ``optimizer`` is given).
        seed: seeds ``torch`` and the batch order.
        progress: show a rich progress bar on stderr.
        weight_decay: AdamW weight decay.
        optimizer: use this optimiser instead of a fresh AdamW (e.g. to keep its state
            across federated rounds).
        label: progress-bar label.
        anchor: parameter name -> tensor; with ``anchor_weight`` > 0 the loss gets the
            proximal term ``anchor_weight / 2 * sum ||p - anchor||^2`` over the model's
            parameters named in it (Ditto's personal objective, Li et al. 2021).
        anchor_weight: the proximal term's weight (lambda).
        teacher: a frozen model (in eval mode, never updated) whose outputs on each batch
            go to the loss as ``batch["teacher_logits"]``; only for tasks that
            :attr:`~Task.distills` (their loss keeps the teacher's outputs where the
            batch's labels say nothing).

    Returns:
        The loss of every step.

    Raises:
        ValueError: for empty data, non-positive batch size, or a teacher for a task
            that does not distill.
        FloatingPointError: if the loss becomes NaN or infinite.
    """
    if len(data) == 0:
        raise ValueError("cannot train on an empty dataset")
    if batch_size < 1 or steps < 0:
        raise ValueError(f"need batch_size >= 1 and steps >= 0, got {batch_size} and {steps}")
    if anchor_weight < 0 or not math.isfinite(anchor_weight):
        raise ValueError(f"anchor_weight must be finite and >= 0, got {anchor_weight}")
    if teacher is not None and not task.distills:
        raise ValueError(f"task {task.name!r} does not learn from a teacher's outputs")
    if teacher is not None:
        teacher.eval()
    pulled = [(p, anchor[name].detach()) for name, p in model.named_parameters()
              if anchor is not None and name in anchor] if anchor_weight > 0 else []
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = optimizer or torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    device = model_device(model)
    model.train()
    losses: list[float] = []
    batches = batch_stream(data, batch_size, rng)
    with _progress_bar(progress, steps, label) as advance:
        for step in range(steps):
            batch = with_teacher({k: v.to(device) for k, v in next(batches).items()}, teacher)
            loss = task.loss(model, batch)
            if pulled:
                loss = loss + 0.5 * anchor_weight * sum(((p - a) ** 2).sum() for p, a in pulled)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            advance(losses[-1])
    if losses:
        logger.debug("trained %d steps: loss %.4f -> %.4f", steps, losses[0], losses[-1])
    return losses


def evaluate(task: Task, model: nn.Module, sets: ArrayDataset | Mapping[str, ArrayDataset]) -> dict[str, Any]:
    """``task.evaluate`` on one dataset, or on each of a named mapping of datasets.

    Returns:
        The metric dict, or ``{name: metric dict}`` for a mapping.
    """
    if isinstance(sets, ArrayDataset):
        return task.evaluate(model, sets)
    return {name: task.evaluate(model, data) for name, data in sets.items()}


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_checkpoint(path: str | Path, model: nn.Module, *, task: str, size: str, round: int = 0, **extra: Any) -> None:
    """Write the state dict as safetensors with the config and round as metadata."""
    config = getattr(model, "config", None)
    meta = {
        "task": task,
        "size": size,
        "round": str(round),
        "model": type(model).__name__,
        "config": json.dumps(asdict(config) if is_dataclass(config) else {}),  # type: ignore[arg-type]
        "extra": json.dumps(extra),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=meta)


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`: (state dict, metadata).

    Never unpickles anything (safetensors).
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    meta: dict[str, Any] = dict(raw)
    for key in ("config", "extra"):
        if key in meta:
            meta[key] = json.loads(meta[key])
    if "round" in meta:
        meta["round"] = int(meta["round"])
    return load_file(str(path)), meta
