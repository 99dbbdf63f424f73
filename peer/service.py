"""Running a peer as a service: configuration, logging, signals, exit status.

``silomesh peer run`` calls :func:`run_service`. SIGTERM or SIGINT cancel the peer; its
shutdown is shielded (leave the topics, disconnect, close the store), so a stopped peer
restarts from its last committed round. SIGUSR1 writes what every task awaits to the log
(:mod:`silomesh.peer.taskdump`) and changes nothing. User mistakes (bad config, missing
key file, port in use) become one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:  # trio-typing's stubs, when installed, shadow trio's own TaskStatus
    from trio_typing import TaskStatus

from silomesh.peer.config import ConfigError, load_config
from silomesh.peer.identity import IdentityError, load_key_file
from silomesh.peer.operator import OperatorError

log = logging.getLogger(__name__)


async def _serve(config_path: Path) -> None:
    from silomesh.peer.daemon import Peer

    config = load_config(config_path)
    identity = load_key_file(config.key_file)
    peer = Peer(config, identity=identity)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def run_then_stop(*, task_status: TaskStatus[Peer] = trio.TASK_STATUS_IGNORED) -> None:
                await peer.run(task_status=task_status)
                log.info("all %d rounds done: stopping", config.rounds.count)
                nursery.cancel_scope.cancel()

            await nursery.start(run_then_stop)
            log.info(
                "peer %s running: federation %s, listening on %s, control API on 127.0.0.1:%s",
                peer.peer_id,
                config.federation,
                ", ".join(peer.transport.addrs),
                peer.control_port,
            )

            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("received %s: stopping after a clean shutdown", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            nursery.start_soon(_dump_tasks_on_signal)


async def _dump_tasks_on_signal() -> None:
    """SIGUSR1 writes every task and what it awaits to the log (peer/taskdump.py)."""
    from silomesh.peer.taskdump import task_tree

    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            lines = task_tree()
            log.warning("SIGUSR1: %d tasks\n%s", len(lines), "\n".join(lines))


def run_service(config_path: Path) -> int:
    """Run the peer described by ``config_path`` until a signal; return the exit status."""
    import torch

    from silomesh.peer.cpu import single_threaded_blas
    from silomesh.peer.memory import lean_malloc

    lean_malloc()  # before the threads and buffers it governs
    single_threaded_blas()  # numpy's BLAS threads would spin between the peer's small calls
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        trio.run(_serve, config_path)
    except (ConfigError, IdentityError, OperatorError, OSError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        user_errors = group.subgroup((ConfigError, IdentityError, OperatorError, OSError))
        if (
            user_errors is None
            or group.subgroup(
                lambda e: not isinstance(e, ConfigError | IdentityError | OperatorError | OSError | BaseExceptionGroup)
            )
            is not None
        ):
            raise
        first = user_errors.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        print(f"Error: {first}", file=sys.stderr)
        return 1
    return 0
