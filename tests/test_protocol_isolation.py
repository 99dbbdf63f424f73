"""silomesh.protocol must stay sans-I/O: importing it loads no trio, libp2p, torch or sqlite3.

Every module of the package is imported, not only those ``__init__`` re-exports (secagg and
fixedpoint are imported by name).
"""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("trio", "libp2p", "torch", "sqlite3", "_sqlite3")

CHECK = (
    "import sys; {pre}import importlib, pkgutil, silomesh.protocol, sys; "
    "[importlib.import_module('silomesh.protocol.' + m.name) "
    "for m in pkgutil.iter_modules(silomesh.protocol.__path__)]; "
    f"bad = sorted(m for m in {FORBIDDEN!r} if m in sys.modules); "
    "print(','.join(bad)); sys.exit(3 if bad else 0)"
)


def _run(pre: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHECK.format(pre=pre)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_importing_protocol_loads_none_of_trio_libp2p_torch_sqlite3() -> None:
    result = _run()
    assert result.returncode == 0, f"forbidden modules loaded: {result.stdout} {result.stderr}"


def test_isolation_check_detects_a_forbidden_module_when_one_is_loaded() -> None:
    result = _run(pre="import sqlite3; ")
    assert result.returncode == 3
    assert "sqlite3" in result.stdout
