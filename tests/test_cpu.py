"""numpy's BLAS on one thread in a peer process (peer/cpu.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from silomesh.peer.cpu import BLAS_THREAD_VARIABLES

PROBE = """
import json
from threadpoolctl import threadpool_info
from silomesh.peer.cpu import single_threaded_blas
applied = single_threaded_blas()
print(json.dumps({"applied": applied,
                  "blas": [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]}))
"""


def _probe(**env: str) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if k not in BLAS_THREAD_VARIABLES}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                         timeout=60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_blas_pool_is_limited_to_one_thread() -> None:
    seen = _probe()
    if not seen["blas"]:
        pytest.skip("this numpy links no BLAS that threadpoolctl can see")
    assert seen == {"applied": True, "blas": [1] * len(seen["blas"])}  # type: ignore[arg-type]


def test_an_operators_thread_count_is_left_as_set() -> None:
    seen = _probe(OPENBLAS_NUM_THREADS="2")
    assert seen["applied"] is True
    assert all(n == 2 for n in seen["blas"])  # type: ignore[attr-defined]
