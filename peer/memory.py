"""Keep a long-running peer's resident memory near what it holds (glibc's allocator).

A peer allocates many short-lived buffers of one model's size (sealed envelopes, plaintexts,
decoded tensors, deltas) from the trio thread and from worker threads. With glibc's
defaults their memory stays resident after they are freed: every thread that allocates
may get an arena of its own (up to 8 per core), and freed chunks inside a heap are only
returned when the heap's top is free.

:func:`lean_malloc` caps the arenas at two (unless ``MALLOC_ARENA_MAX`` is set in the
environment); :func:`trim` hands every arena's free pages back (``malloc_trim``; the
round loop calls it after each round). Both do nothing where the C library is not glibc.

Not done: fixing the mmap threshold (``M_MMAP_THRESHOLD``) so that large buffers are
always unmapped when freed. It kept peak memory lower still, but torch's activations
(megabytes per layer) were then mapped and unmapped at every step, and training ran 2.2x
slower (``bench/bench_lean.py``, the floor at N = 8: 22.0 s against 9.8 s a round).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import time

log = logging.getLogger(__name__)

M_ARENA_MAX = -8

#: malloc arenas the process's threads share
ARENA_MAX = 2
#: :func:`trim` runs at most once per this many seconds per process (simnet: many peers, one heap)
TRIM_EVERY = 1.0
_last_trim = 0.0


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None  # not glibc (musl, macOS): nothing to tune
    return libc


@functools.cache
def lean_malloc() -> bool:
    """Cap glibc's malloc arenas (once per process); True if applied or left to the environment."""
    libc = _glibc()
    if libc is None:
        return False
    if "MALLOC_ARENA_MAX" in os.environ:  # the operator's setting stays as set
        return True
    ok = bool(libc.mallopt(M_ARENA_MAX, ARENA_MAX) == 1)
    if not ok:
        log.warning("mallopt refused a setting: resident memory may stay above what the peer holds")
    return ok


def trim() -> None:
    """Return the heap's free memory to the system (glibc ``malloc_trim``), at most once per
    :data:`TRIM_EVERY` seconds in a process."""
    global _last_trim
    libc = _glibc()
    now = time.monotonic()
    if libc is not None and now - _last_trim >= TRIM_EVERY:
        _last_trim = now
        libc.malloc_trim(0)
