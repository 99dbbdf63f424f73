"""silomesh.audit is for auditors: importing any of it loads no torch, trio, libp2p or peer code.

An auditor verifies logs on a machine that runs no peer, so the package may depend only
on silomesh.protocol (and the small libraries that needs: pynacl, msgpack, numpy for the
tensor codec), plus click and rich for its CLI.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import silomesh.audit

FORBIDDEN = ("torch", "trio", "libp2p")
#: not imported by the audit code itself; loaded only because silomesh.protocol's tensor codec needs it
NOT_IN_SOURCE = (*FORBIDDEN, "numpy")
FORBIDDEN_SILOMESH = ("silomesh.peer", "silomesh.models", "silomesh.strategies", "silomesh.simnet")
ALLOWED_SILOMESH = ("silomesh.audit", "silomesh.protocol")
MODULES = sorted(f"silomesh.audit.{m.name}" for m in pkgutil.iter_modules(silomesh.audit.__path__))
PACKAGE_DIR = Path(silomesh.audit.__file__).resolve().parent

CHECK = """
import importlib, json, sys
{pre}
for name in {modules!r}:
    importlib.import_module(name)
loaded = sorted(sys.modules)
bad = [m for m in loaded if m.split(".")[0] in {forbidden!r}]
bad += [m for m in loaded if any(m == p or m.startswith(p + ".") for p in {forbidden_silomesh!r})]
print(json.dumps({{"bad": sorted(set(bad)), "silomesh": [m for m in loaded if m.startswith("silomesh.")]}}))
sys.exit(3 if bad else 0)
"""


def _run(pre: str = "") -> tuple[int, dict[str, list[str]], str]:
    code = CHECK.format(
        pre=pre,
        modules=["silomesh.audit", *MODULES],
        forbidden=FORBIDDEN,
        forbidden_silomesh=FORBIDDEN_SILOMESH,
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    report = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {}
    return result.returncode, report, result.stderr


def test_the_package_has_the_modules_this_test_imports() -> None:
    assert {"silomesh.audit.cli", "silomesh.audit.entries", "silomesh.audit.logfile"} <= set(MODULES)
    assert {"silomesh.audit.verify", "silomesh.audit.proofs", "silomesh.audit.reconcile"} <= set(MODULES)


def test_importing_every_audit_module_loads_no_torch_trio_libp2p_or_peer_code() -> None:
    code, report, stderr = _run()
    assert code == 0, f"forbidden modules loaded: {report.get('bad')} {stderr}"


def test_importing_audit_loads_silomesh_protocol_and_itself_only() -> None:
    code, report, stderr = _run()
    assert code == 0, stderr
    others = [m for m in report["silomesh"] if not m.startswith(tuple(p + "." for p in ALLOWED_SILOMESH))]
    others = [m for m in others if m not in ALLOWED_SILOMESH]
    assert others == []


def test_audit_source_imports_from_silomesh_only_protocol_and_itself_and_no_numpy() -> None:
    found = []
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top == "silomesh" and not any(name == p or name.startswith(p + ".") for p in ALLOWED_SILOMESH):
                    found.append(f"{path.name}: {name}")
                if top in NOT_IN_SOURCE:
                    found.append(f"{path.name}: {name}")
    assert found == []


def test_isolation_check_detects_a_forbidden_module_when_one_is_loaded() -> None:
    code, report, _ = _run(pre="import trio")
    assert code == 3
    assert "trio" in report["bad"]


def test_isolation_check_detects_peer_code_when_it_is_loaded() -> None:
    code, report, _ = _run(pre="import silomesh.peer.store")
    assert code == 3
    assert "silomesh.peer.store" in report["bad"]
