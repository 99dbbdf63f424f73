"""The contract every imaging task implements.

A task bundles what one of the project's seed problems needs: a seeded synthetic
generator shaped like the published data, the way that data is split across silos
(its *federation layout*), a model factory, the training loss and the evaluation
metrics. Peers, strategies and simnet only talk to tasks through this interface.

Data travels as :class:`ArrayDataset` — a dict of equally long numpy arrays — so it
can be made, saved and loaded without torch; batches become tensors only inside the
training loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class ArrayDataset:
    """A dict of numpy arrays that share their first dimension.

    Keys are task specific; ``"image"`` is always present (float32, ``(N, C, H, W)``
    or ``(N, C, D, H, W)``). Segmentation tasks add ``"mask"`` (int64, ``(N, H, W)``),
    weakly supervised silos add e.g. ``"box"`` or ``"present"``.
    """

    arrays: Mapping[str, np.ndarray]
    label_kind: str = "mask"

    def __post_init__(self) -> None:
        if "image" not in self.arrays:
            raise ValueError("an ArrayDataset needs an 'image' array")
        lengths = {k: len(v) for k, v in self.arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"arrays differ in length: {lengths}")

    def __len__(self) -> int:
        return len(self.arrays["image"])

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def subset(self, index: np.ndarray) -> ArrayDataset:
        return ArrayDataset({k: v[index] for k, v in self.arrays.items()}, self.label_kind)

    def batches(
        self, batch_size: int, rng: np.random.Generator, *, shuffle: bool = True
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield one pass over the data as dicts of tensors."""
        order = rng.permutation(len(self)) if shuffle else np.arange(len(self))
        for start in range(0, len(self), batch_size):
            idx = order[start : start + batch_size]
            yield {k: torch.from_numpy(np.ascontiguousarray(v[idx])) for k, v in self.arrays.items()}


@dataclass(frozen=True)
class Silo:
    """One hospital's share of a federation: its training data and its own test data."""

    name: str
    train: ArrayDataset
    test: ArrayDataset
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Federation:
    """A reproducible split of a task's data over silos.

    ``tests`` holds named evaluation sets shared by all silos (e.g. ``"all"``, or one per
    source for ``catheter`` so unseen-source performance can be measured).
    """

    task: str
    seed: int
    silos: list[Silo]
    tests: dict[str, ArrayDataset]


class Task(ABC):
    """Base class of the four imaging tasks (catheter, organs, lesion, spect)."""

    #: registry name, e.g. ``"catheter"``
    name: str = ""
    #: headline metric reported by simnet; higher is better (e.g. ``"dice"``, ``"psnr"``)
    metric: str = ""
    #: whether :meth:`loss` uses ``batch["teacher_logits"]`` when the batch carries it: the
    #: outputs of a frozen earlier model (``train_local(teacher=...)``), kept as soft targets
    #: for what the batch's own labels leave unannotated (learning without forgetting)
    distills: bool = False

    @abstractmethod
    def make_federation(self, n_silos: int, seed: int, **options: Any) -> Federation:
        """Generate data and split it over ``n_silos`` following the task's layout."""

    @abstractmethod
    def make_model(self, size: str = "tiny", seed: int = 0) -> nn.Module:
        """Build a freshly initialised model (deterministic for a given seed)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training loss of ``model`` on one batch of this task's data."""

    @abstractmethod
    def evaluate(self, model: nn.Module, data: ArrayDataset) -> dict[str, float]:
        """Metrics of ``model`` on ``data``; must contain :attr:`metric`."""

    def check_data(self, data: ArrayDataset) -> None:
        """Raise ``ValueError`` if this task's model cannot take ``data`` (checked at start-up).

        The built-in tasks' models take whatever their generators and loaders produce;
        a task with a hospital's own network checks it (see ``ModelTask``).
        """
        return


class SplitModel(nn.Module):
    """A model with a named split between a shared body and a task head.

    Subclasses set :attr:`head_prefixes` (state-dict name prefixes of the task head —
    SegViz keeps these local) and implement :meth:`forward_features`, returning the
    output together with an intermediate feature map ``(B, C, h, w)`` (FedEFM's EMD is
    computed between students' and experts' feature maps).
    """

    head_prefixes: tuple[str, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def split_names(self) -> tuple[list[str], list[str]]:
        """Return (body, head) lists of state-dict keys."""
        body: list[str] = []
        head: list[str] = []
        for name in self.state_dict():
            (head if name.startswith(self.head_prefixes) else body).append(name)
        return body, head
