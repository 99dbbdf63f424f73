"""SIGUSR1 makes a running peer log what each of its tasks awaits (peer/taskdump.py)."""

from __future__ import annotations

import logging
import os
import signal

import pytest
import trio

from silomesh.peer import service
from silomesh.peer.taskdump import task_tree


async def _park_here(event: trio.Event) -> None:
    await event.wait()


def test_the_tree_names_each_task_and_the_line_it_waits_on() -> None:
    async def main() -> list[str]:
        event = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_park_here, event, name="waiter")
            await trio.lowlevel.checkpoint()  # let the waiter start and park
            lines = task_tree()
            event.set()
        return lines

    lines = trio.run(main)
    waiter = [line for line in lines if line.lstrip().startswith("waiter:")]
    assert len(waiter) == 1, lines
    assert "_park_here" in waiter[0], waiter  # our frame, not trio's internals
    assert "_traps.py" not in waiter[0] and "_sync.py" not in waiter[0], waiter
    # children are indented under their parent
    main_line = next(i for i, line in enumerate(lines) if ".main:" in line)
    assert lines.index(waiter[0]) > main_line
    assert len(waiter[0]) - len(waiter[0].lstrip()) > len(lines[main_line]) - len(lines[main_line].lstrip())


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="needs SIGUSR1")
def test_sigusr1_logs_the_tree_and_the_peer_keeps_running(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=service.__name__)

    dumps: list[str] = []

    async def main() -> None:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(service._dump_tasks_on_signal)
                await trio.sleep(0.05)  # the receiver is installed
                for _ in range(2):
                    os.kill(os.getpid(), signal.SIGUSR1)
                    while not any("SIGUSR1" in r.getMessage() for r in caplog.records[-1:]):  # noqa: ASYNC110 - a log record, not an event we own
                        await trio.sleep(0.01)
                    dumps.append(caplog.records[-1].getMessage())
                    caplog.clear()
                nursery.cancel_scope.cancel()

    trio.run(main)  # a second signal is answered too: the dump changes nothing and ends nothing
    assert len(dumps) == 2
    for dump in dumps:
        assert "_dump_tasks_on_signal: " in dump and ".main: " in dump, dump
