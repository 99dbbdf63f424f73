"""What every task of a running peer is waiting on, for an operator chasing a stuck peer.

``kill -USR1 <pid>`` makes ``silomesh peer run`` write the tree of its trio tasks to its
log: each task's name and the innermost lines it awaits on. A network thread that
sits idle while a transfer stalls shows here which lock, channel or read holds it.
"""

from __future__ import annotations

import os

import trio

#: innermost awaited frames shown per task, trio's own left out (the outer ones are the
#: task's entry points)
FRAMES_PER_TASK = 6
_TRIO = os.path.dirname(trio.__file__)


def _frames(task: trio.lowlevel.Task) -> str:
    frames = [
        f"{os.path.basename(frame.f_code.co_filename)}:{lineno} {frame.f_code.co_name}"
        for frame, lineno in task.iter_await_frames()
        if not frame.f_code.co_filename.startswith(_TRIO)
    ]
    return " <- ".join(reversed(frames[-FRAMES_PER_TASK:])) or "(not started)"


def task_tree(root: trio.lowlevel.Task | None = None) -> list[str]:
    """One line per task under ``root`` (default: the run's root task), indented by depth."""
    lines: list[str] = []

    def walk(task: trio.lowlevel.Task, depth: int) -> None:
        lines.append(f"{'  ' * depth}{task.name}: {_frames(task)}")
        for nursery in task.child_nurseries:
            for child in sorted(nursery.child_tasks, key=lambda t: t.name):
                walk(child, depth + 1)

    walk(root or trio.lowlevel.current_root_task(), 0)
    return lines
