"""Keep a peer's CPU for its own work: numpy's BLAS on one thread.

A peer calls BLAS (numpy's dot products: the update bound's norms, :mod:`.safety`; the
strategies' matrix work) from the trio thread and from worker threads, a few milliseconds
at a time. The OpenBLAS that numpy's wheels bundle runs each such call on every core by
default, and its threads spin while they wait for the next one. With many small calls
that spinning cost more than the calls: in ``bench/bench_lean.py``'s tree round (N = 8,
one process, 2 cores) the rounds after the first took 3.6 to 3.9 CPU-s each with
OpenBLAS's default threads and 2.85 to 3.0 with one (docs/SIMNET.md, "Lean peers").

:func:`single_threaded_blas` caps the BLAS thread pools at one (threadpoolctl), once per
process, unless the operator chose a count in the environment (``OPENBLAS_NUM_THREADS``,
``MKL_NUM_THREADS``, ``OMP_NUM_THREADS``). torch's own threads are set apart from it.
"""

from __future__ import annotations

import functools
import logging
import os

log = logging.getLogger(__name__)

#: environment variables with which an operator sets the BLAS thread count themselves
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")


@functools.cache
def single_threaded_blas() -> bool:
    """Limit numpy's BLAS to one thread for the rest of the process; True if it is limited
    (or left to the environment), False if threadpoolctl found nothing it could limit."""
    if any(v in os.environ for v in BLAS_THREAD_VARIABLES):
        return True
    import numpy  # noqa: F401 - the BLAS it loads is what gets limited
    from threadpoolctl import threadpool_info, threadpool_limits

    if not any(p.get("user_api") == "blas" for p in threadpool_info()):
        log.debug("no BLAS thread pool found to limit")
        return False
    threadpool_limits(limits=1, user_api="blas")  # stays in effect: not used as a context manager
    return True
