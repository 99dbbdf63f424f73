"""Task registry: names, configuration, lazily imported and unavailable tasks."""

from __future__ import annotations

import pytest

from silomesh.models import registry
from silomesh.models.catheter import CatheterTask
from silomesh.models.organs import OrgansTask
from silomesh.models.registry import TaskUnavailableError, get_task, task_names
from silomesh.models.task import Task


def test_task_names_list_every_seed_task() -> None:
    assert {"catheter", "organs", "organs3d", "lesion", "spect"} <= set(task_names())


@pytest.mark.parametrize("name", ["catheter", "organs", "organs3d", "lesion"])
def test_get_task_returns_a_task_with_name_and_metric(name: str) -> None:
    task = get_task(name)
    assert isinstance(task, Task)
    assert task.name == name.removesuffix("3d") and task.metric == "dice"


def test_organs3d_is_the_volumetric_organs_task() -> None:
    task = get_task("organs3d")
    assert isinstance(task, OrgansTask) and task.config.dims == 3


def test_get_task_passes_configuration() -> None:
    task = get_task("catheter", image_size=32, holdout_source="animal")
    assert isinstance(task, CatheterTask)
    assert task.config.image_size == 32 and task.config.holdout_source == "animal"


def test_unknown_task_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown task 'brain'; choose from catheter"):
        get_task("brain")


def test_a_task_whose_module_fails_to_import_is_unavailable_without_breaking_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broken = {**registry._TASKS, "spect": ("silomesh.models.no_such_module:SpectTask", {})}
    monkeypatch.setattr(registry, "_TASKS", broken)
    with pytest.raises(TaskUnavailableError, match="task 'spect' is unavailable"):
        get_task("spect")
    assert isinstance(get_task("catheter"), CatheterTask)
