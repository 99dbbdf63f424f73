"""Task registry: names to :class:`~silomesh.models.task.Task` classes, imported lazily.

Lazy imports keep ``import silomesh.models.registry`` cheap and keep one broken task
module (say, a half-written ``spect``) from breaking the others.
"""

from __future__ import annotations

import importlib
from typing import Any

from silomesh.models.task import Task

#: name -> ("module:Class", constructor defaults)
_TASKS: dict[str, tuple[str, dict[str, Any]]] = {
    "catheter": ("silomesh.models.catheter:CatheterTask", {}),
    "organs": ("silomesh.models.organs:OrgansTask", {}),
    "organs3d": ("silomesh.models.organs:OrgansTask", {"dims": 3}),
    "lesion": ("silomesh.models.lesion:LesionTask", {}),
    "spect": ("silomesh.models.spect:SpectTask", {}),
}


class TaskUnavailableError(RuntimeError):
    """A registered task whose module cannot be imported."""


def task_names() -> list[str]:
    """Registered task names, sorted."""
    return sorted(_TASKS)


def get_task(name: str, **config: Any) -> Task:
    """Instantiate a task by name; ``config`` overrides its configuration fields.

    Example: ``get_task("catheter", image_size=32, holdout_source="clinical")``.

    Raises:
        ValueError: for an unknown name or unknown configuration fields.
        TaskUnavailableError: if the task's module or class cannot be imported.
    """
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(task_names())}")
    target, defaults = _TASKS[name]
    module_name, class_name = target.split(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise TaskUnavailableError(
            f"task {name!r} is unavailable: cannot import {target} ({type(exc).__name__}: {exc})"
        ) from exc
    task = cls(**{**defaults, **config})
    if not isinstance(task, Task):
        raise TaskUnavailableError(f"{target} is not a Task subclass")
    return task
