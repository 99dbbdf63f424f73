"""`silomesh peer run` as a service: kill -9 and restart resume, SIGTERM exits 0, status works."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from peerkit import TINY_CATHETER, free_port

from silomesh.audit.verify import verify_chain
from silomesh.peer.cli import cli
from silomesh.peer.identity import load_key_file

pytestmark = pytest.mark.slow


def _write_peers(tmp_path: Path) -> list[Path]:
    runner = CliRunner()
    dirs = [tmp_path / "a", tmp_path / "b"]
    ids = []
    for d in dirs:
        assert runner.invoke(cli, ["keygen", "--out", str(d)]).exit_code == 0
        ids.append(load_key_file(d / "peer.key").peer_id_text)
    ports = [free_port() for _ in dirs]
    paths = []
    for i, d in enumerate(dirs):
        j = 1 - i
        options = ", ".join(f"{k} = {v}" for k, v in {**TINY_CATHETER, "silos": 2, "silo": i, "seed": 0}.items())
        (d / "peer.toml").write_text(f"""
federation = "svc-test"
key_file = "peer.key"
listen = "/ip4/127.0.0.1/tcp/{ports[i]}"
data_dir = "state"

[task]
name = "catheter"
size = "tiny"
options = {{ {options} }}

[rounds]
count = 0
deadline_seconds = 5
local_steps = 2
batch_size = 8

[control]
port = {free_port()}

[[trusted]]
name = "{"ab"[j]}"
peer_id = "{ids[j]}"
address = "/ip4/127.0.0.1/tcp/{ports[j]}"
""")
        paths.append(d / "peer.toml")
    return paths


def _start(config: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "silomesh.peer.cli", "peer", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _done_rounds(config: Path) -> list[int]:
    db = config.parent / "state" / "store.sqlite"
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return [r[0] for r in conn.execute("SELECT round FROM rounds WHERE status = 'done' ORDER BY round")]
    except sqlite3.OperationalError:
        return []


def _wait_rounds(config: Path, at_least: int, timeout: float = 120) -> list[int]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done = _done_rounds(config)
        if len(done) >= at_least:
            return done
        time.sleep(0.2)
    raise AssertionError(f"{config}: fewer than {at_least} rounds after {timeout} s: {_done_rounds(config)}")


def test_killed_peer_restarts_resumes_and_sigterm_stops_cleanly(tmp_path: Path) -> None:
    a, b = _write_peers(tmp_path)
    procs = [_start(a), _start(b)]
    try:
        before = _wait_rounds(a, 2)
        procs[0].send_signal(signal.SIGKILL)  # mid-round, at whatever instant
        procs[0].wait(timeout=30)
        procs[0] = _start(a)
        after = _wait_rounds(a, len(before) + 2)
        # no committed round lost, none repeated; the restarted peer may jump ahead to its
        # neighbour's round (which kept going alone) instead of running the gap alone
        assert before == list(range(len(before))) and after[: len(before)] == before, (before, after)
        assert after == sorted(set(after)), after

        status = CliRunner().invoke(cli, ["peer", "status", "--config", str(a), "--json"])
        assert status.exit_code == 0, status.output
        assert json.loads(status.output)["status"]["federation"] == "svc-test"

        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=60) for p in procs]
        assert codes == [0, 0], [p.stdout.read() if p.stdout else "" for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    from silomesh.peer.audit import AuditLog
    from silomesh.peer.store import Store

    for config in (a, b):
        store = Store(config.parent / "state" / "store.sqlite")
        entries = AuditLog(store, None).entries()  # type: ignore[arg-type]  # reading only
        assert entries, "no audit entries"
        assert verify_chain(entries, load_key_file(config.parent / "peer.key").public_key) == []
        store.close()


def test_bad_config_is_one_line_error_and_exit_1(tmp_path: Path) -> None:
    config = tmp_path / "peer.toml"
    config.write_text('federation = "x"\nkey_file = "absent.key"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "silomesh.peer.cli", "peer", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "absent.key" in proc.stderr and "silomesh keygen" in proc.stderr
    assert "Traceback" not in proc.stderr
