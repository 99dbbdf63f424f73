"""Process-wide set-up shared by every simnet process (coordinator, workers, evaluations).

Imports nothing of simnet, so the coordinator, :mod:`~silomesh.simnet.local`,
:mod:`~silomesh.simnet.worker` and :mod:`~silomesh.simnet.evaluations` can all use it
without importing each other.
"""

from __future__ import annotations

import contextlib
import logging

#: written into ``DIR/run/`` by the coordinator when worker processes should stop
STOP_FILE = "stop"


def quiet_expected_dial_errors() -> None:
    """Silence libp2p's own error logs during a simnet (unless debugging).

    A simnet dials peers that are still starting, crashes peers mid-stream and runs
    intruders that victims cut off: libp2p logs each of these at ERROR, some with
    tracebacks. The peers log what matters to them at INFO and the report counts it
    from their stores, so libp2p is set to CRITICAL unless the root logger is at DEBUG.
    """
    import libp2p  # noqa: F401 - its import resets the "libp2p" logger; quiet it afterwards

    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("libp2p").setLevel(logging.CRITICAL)


def limit_torch_threads() -> None:
    """One torch thread per process: many peers share few cores (measured ~100x faster).

    Also tunes the C allocator and numpy's BLAS threads as a peer service does
    (:func:`silomesh.peer.memory.lean_malloc`, :func:`silomesh.peer.cpu.single_threaded_blas`).
    """
    import torch

    from silomesh.peer.cpu import single_threaded_blas
    from silomesh.peer.memory import lean_malloc

    lean_malloc()
    single_threaded_blas()

    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # already set, or parallel work already started
        torch.set_num_interop_threads(1)
