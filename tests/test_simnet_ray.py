"""simnet's Ray backend (``--backend ray``, simnet/raybackend.py).

* unit tests: the scenario's backend fields, the plan laid out on given endpoints, moving a
  plan to another node's folder, and the tar that carries peer folders between nodes
  (it must refuse members that would land outside the destination);
* a slow test: the same scenario on a Ray instance of this machine (bound to 127.0.0.1)
  and in one process gives the same peers the same final metrics and bytes;
* a slow root test: a Ray cluster of two nodes, each in its own network namespace with its
  own address (tests/netbed.py). The run spreads over both; then one node is killed and the
  run must end with that node's peers failed for that reason while the others finish.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from silomesh.simnet.plan import build_plan, share_of
from silomesh.simnet.scenario import ScenarioError, make_scenario

T = TypeVar("T")

SMALL = {"n_train": 16, "n_test": 8, "n_test_source": 8}
BASE: dict[str, Any] = {"peers": 4, "rounds": 2, "size": "tiny", "local_steps": 3, "deadline": 20.0, "seed": 5,
                        "task_options": SMALL, "timeout": 240.0}


# ----------------------------------------------------------------------------- units


def test_backend_is_validated() -> None:
    assert make_scenario({"backend": "ray"}).backend == "ray"
    with pytest.raises(ScenarioError, match="backend: must be one of local, ray"):
        make_scenario({"backend": "cluster"})
    with pytest.raises(ScenarioError, match="ray_address: only with backend"):
        make_scenario({"ray_address": "10.0.0.1:6379"})


def test_share_of_makes_contiguous_balanced_blocks() -> None:
    got = [share_of(i, 10, 3) for i in range(10)]
    assert got == sorted(got) and set(got) == {0, 1, 2}
    assert max(got.count(s) for s in range(3)) - min(got.count(s) for s in range(3)) <= 1


def test_plan_listens_on_given_endpoints(tmp_path: Path) -> None:
    endpoints = [("198.18.0.10", 4001), ("198.18.0.10", 4002), ("198.18.0.20", 4001), ("198.18.0.20", 4002)]
    plan = build_plan(make_scenario(BASE, {"procs": 2, "backend": "ray"}), tmp_path / "run", endpoints)
    configs = [tomllib.loads(p.config_path.read_text(encoding="utf-8")) for p in plan.peers]
    assert [c["listen"] for c in configs] == [f"/ip4/{h}/tcp/{port}" for h, port in endpoints]
    assert [p.share for p in plan.peers] == [0, 0, 1, 1]
    # each peer's neighbours are dialled at the endpoint the plan gave them
    for p, c in zip(plan.peers, configs, strict=True):
        assert {t["peer_id"]: t["address"] for t in c["trusted"]} == {
            plan.peers[j].peer_id: f"/ip4/{endpoints[j][0]}/tcp/{endpoints[j][1]}" for j in p.neighbours}


def test_relocated_plan_points_into_the_new_root(tmp_path: Path) -> None:
    from silomesh.simnet.raybackend import _relocate

    plan = build_plan(make_scenario(BASE), tmp_path / "run")
    moved = _relocate(plan.to_json(), Path("/elsewhere/share1"))
    assert moved["out"] == "/elsewhere/share1"
    assert [p["folder"] for p in moved["peers"]] == [f"/elsewhere/share1/peers/{p.name}" for p in plan.peers]
    assert plan.to_json()["out"] == str(tmp_path / "run")  # the original is untouched


def test_pack_and_unpack_carry_peer_folders(tmp_path: Path) -> None:
    from silomesh.simnet.raybackend import _pack, _unpack

    src = tmp_path / "src"
    (src / "peers" / "p00").mkdir(parents=True)
    (src / "peers" / "p00" / "peer.toml").write_text("x = 1\n", encoding="utf-8")
    (src / "run").mkdir()
    (src / "run" / "worker-0.log").write_text("log\n", encoding="utf-8")
    data = _pack(src, ["peers/p00", "run/worker-0.log", "run/absent.json"])
    dest = tmp_path / "dest"
    _unpack(data, dest)
    assert (dest / "peers" / "p00" / "peer.toml").read_text(encoding="utf-8") == "x = 1\n"
    assert (dest / "run" / "worker-0.log").exists() and not (dest / "run" / "absent.json").exists()


@pytest.mark.parametrize("name", ["../escaped", "peers/../../escaped"])
def test_unpack_refuses_members_outside_the_destination(tmp_path: Path, name: str) -> None:
    from silomesh.simnet.raybackend import _unpack

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(tarfile.FilterError):
        _unpack(buf.getvalue(), dest)
    assert not (tmp_path / "escaped").exists()


def test_unpack_keeps_absolute_members_inside_the_destination(tmp_path: Path) -> None:
    from silomesh.simnet.raybackend import _unpack

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(str(tmp_path / "outside" / "x"))
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    dest = tmp_path / "dest"
    _unpack(buf.getvalue(), dest)
    assert not (tmp_path / "outside").exists()
    assert (dest / str(tmp_path).lstrip("/") / "outside" / "x").read_bytes() == b"bad"


def test_unpack_refuses_links_out_of_the_destination(tmp_path: Path) -> None:
    from silomesh.simnet.raybackend import _unpack

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("peers/p00/store.sqlite")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(tarfile.FilterError):
        _unpack(buf.getvalue(), tmp_path)


# ----------------------------------------------------------------------------- end to end
# Ray listens on its node's own address (it turns 127.0.0.1 into the host's external one), so
# every Ray process here runs inside network namespaces of the test bed; the peers of a Ray
# instance started by simnet itself listen on the namespace's loopback.

ray = pytest.importorskip("ray")
sys.path.insert(0, str(Path(__file__).parent))
from netbed import NetBed, kill_inside, missing_requirements, open_netbed  # noqa: E402

_MISSING = missing_requirements()
needs_netbed = pytest.mark.skipif(_MISSING is not None, reason=f"network test bed unavailable: {_MISSING}")
RAY_BIN = Path(sys.executable).parent / "ray"
SILOMESH_BIN = Path(sys.executable).parent / "silomesh"
RAY_ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def _finals(report: dict[str, Any]) -> dict[str, Any]:
    return {p["name"]: (p["rounds_completed"], p["final_metric"], p["error"]) for p in report["peers_detail"]}


def _simnet_argv(out: Path, settings: dict[str, Any]) -> list[str]:
    argv = [str(SILOMESH_BIN), "simnet", "run", "--quiet", "--out", str(out)]
    for key, value in settings.items():
        if key == "task_options":
            argv += [a for k, v in value.items() for a in ("--task-option", f"{k}={v}")]
        else:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


@pytest.mark.slow
@needs_netbed
@pytest.mark.timeout(600)
def test_ray_instance_on_this_machine_matches_one_process(tmp_path: Path) -> None:
    from silomesh.simnet.coordinator import run_simnet

    one = run_simnet(make_scenario(BASE, {"out": str(tmp_path / "one")}))
    with open_netbed() as bed:
        bed.add_public("solo")
        ran = subprocess.run(bed.command("solo", _simnet_argv(tmp_path / "ray", {**BASE, "procs": 2,
                                                                                   "backend": "ray"})),
                             env=RAY_ENV, capture_output=True, text=True, check=False, timeout=400, cwd=tmp_path)
    assert ran.returncode == 0, (ran.stdout + ran.stderr)[-3000:]
    on_ray = json.loads((tmp_path / "ray" / "report.json").read_text(encoding="utf-8"))
    assert on_ray["round_success_rate"] == 1.0
    assert _finals(on_ray) == _finals(one)
    # the same updates travel; the totals differ by a few dozen bytes of timing-dependent messages
    for a, b in zip(on_ray["peers_detail"], one["peers_detail"], strict=True):
        assert abs(a["bytes_sent"] - b["bytes_sent"]) <= 0.001 * b["bytes_sent"], (a, b)
    nodes = json.loads((tmp_path / "ray" / "run" / "ray-nodes.json").read_text(encoding="utf-8"))
    assert sorted(n["share"] for n in nodes) == [0, 1] and {n["host"] for n in nodes} == {"127.0.0.1"}
    # the stores and audit logs came back from the actors' folders into DIR, and the folders went
    for p in on_ray["peers_detail"]:
        assert Path(p["audit_log"]).is_file() and str(tmp_path / "ray") in p["audit_log"]
    assert (tmp_path / "ray" / "run" / "worker-0.log").is_file()
    assert not any(Path(n["folder"]).exists() for n in nodes)


@pytest.mark.slow
@needs_netbed
@pytest.mark.timeout(600)
def test_faults_run_on_ray_actors(tmp_path: Path) -> None:
    """crash + restart, a partition, an intruder and a byzantine peer, with the peers in two actors.

    Every message waits 1 s, so the rounds the crashes hit (1 or 2, 0.2-1.0 s in) are still
    running when they fire: on a fast machine the tiny rounds took less than that, a peer
    finished its rounds first and its crash was skipped as due after it was done."""
    settings = {**BASE, "peers": 6, "procs": 2, "rounds": 4, "deadline": 10, "seed": 1, "backend": "ray",
                "faults": "crash=0.34,restart=after:1,partition=1-2,intruder=1,byzantine=1:noise,delay=1s"}
    with open_netbed() as bed:
        bed.add_public("solo")
        ran = subprocess.run(bed.command("solo", _simnet_argv(tmp_path / "run", settings)), env=RAY_ENV,
                             capture_output=True, text=True, check=False, timeout=400, cwd=tmp_path)
    assert ran.returncode == 0, (ran.stdout + ran.stderr)[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text(encoding="utf-8"))
    injected, observed = report["faults"]["injected"], report["faults"]["observed"]
    assert injected["crashes"] == 2 and injected["restarts"] == 2 and observed["recovered_peers"] == 2
    assert injected["poisoned_models"] > 0 and injected["intruder_attempts"] > 0
    assert observed["intruder_messages_accepted"] == 0 and observed["refused_from_intruders"] > 0
    assert injected.get("partitioned_messages", 0) > 0
    assert {p["share"] for p in report["peers_detail"]} == {0, 1}
    assert all(p["rounds_completed"] == 4 and p["error"] is None for p in report["peers_detail"])


# ----------------------------------------------------------------------------- two nodes


def _ray_node(bed: NetBed, site: str, args: list[str], temp: Path, log: Path) -> subprocess.Popen[bytes]:
    cmd = [str(RAY_BIN), "start", "--block", f"--node-ip-address={bed.sites[site].address}", "--num-cpus=1",
           "--disable-usage-stats", *args]
    return subprocess.Popen(bed.command(site, cmd), env=RAY_ENV, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            cwd=temp)


def _wait_for(check: Callable[[], T], timeout: float, what: str) -> T:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.slow
@needs_netbed
@pytest.mark.timeout(600)
def test_two_node_cluster_spreads_peers_and_survives_a_killed_node(tmp_path: Path) -> None:
    from silomesh.simnet.coordinator import run_simnet
    from silomesh.simnet.stores import committed_rounds

    one = run_simnet(make_scenario(BASE, {"out": str(tmp_path / "one")}))
    temp = Path(tempfile.mkdtemp(prefix="smray"))  # short: Ray's socket paths must fit 107 bytes
    out = tmp_path / "run"
    placed: list[dict[str, Any]] = []
    with open_netbed() as bed:
        head, worker = bed.add_public("head"), bed.add_public("worker")
        nodes = [
            _ray_node(bed, "head", ["--head", "--port=6379", "--include-dashboard=false", f"--temp-dir={temp}/h"],
                      temp, tmp_path / "head.log"),
        ]
        try:
            def started(log: Path) -> bool:
                return "Ray runtime started" in log.read_text(encoding="utf-8", errors="replace")

            _wait_for(lambda: started(tmp_path / "head.log"), 120, "the head node")
            nodes.append(_ray_node(bed, "worker", [f"--address={head.address}:6379"], temp, tmp_path / "worker.log"))
            _wait_for(lambda: started(tmp_path / "worker.log"), 120, "the worker node")
            address = f"{head.address}:6379"

            # 1. the scenario of the single-process run, across both nodes: the same result
            spread = subprocess.run(bed.command("head", _simnet_argv(tmp_path / "spread", {
                **BASE, "backend": "ray", "ray_address": address, "procs": 2})), env=RAY_ENV, capture_output=True,
                text=True, check=False, timeout=400, cwd=tmp_path)
            assert spread.returncode == 0, (spread.stdout + spread.stderr)[-3000:]
            report = json.loads((tmp_path / "spread" / "report.json").read_text(encoding="utf-8"))
            hosts = json.loads((tmp_path / "spread" / "run" / "ray-nodes.json").read_text(encoding="utf-8"))
            assert {n["host"] for n in hosts} == {head.address, worker.address}, hosts
            assert report["round_success_rate"] == 1.0 and _finals(report) == _finals(one)

            # 2. a longer run; the worker node is killed once its peers have committed a round
            cmd = _simnet_argv(out, {**BASE, "backend": "ray", "ray_address": address, "procs": 2,
                                     "rounds": 6, "deadline": 8, "timeout": 400})
            driver = subprocess.Popen(bed.command("head", cmd), env=RAY_ENV, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, cwd=tmp_path)
            placed = _wait_for(lambda: (out / "run" / "ray-nodes.json").is_file()
                               and json.loads((out / "run" / "ray-nodes.json").read_text(encoding="utf-8")),
                               180, "the actors to be placed")
            assert {n["host"] for n in placed} == {head.address, worker.address}, placed
            lost = next(n for n in placed if n["host"] == worker.address)
            lost_share, lost_folder = lost["share"], Path(lost["folder"])

            def worker_committed() -> bool:
                stores = list(lost_folder.glob("peers/*/store.sqlite"))
                return bool(stores) and all(committed_rounds(s) >= 1 for s in stores)

            _wait_for(worker_committed, 240, "the worker node's peers to commit a round")
            kill_inside(worker.ns)
            stdout, _ = driver.communicate(timeout=420)
            text = stdout.decode(errors="replace")
            assert driver.returncode == 0, text[-3000:]
        finally:
            for p in nodes:
                p.kill()
            for p in nodes:
                p.wait(timeout=30)
            shutil.rmtree(temp, ignore_errors=True)
            for left in Path(tempfile.gettempdir()).glob("silomesh-simnet-share*"):
                if any(left == Path(n.get("folder", "")) for n in placed or []):
                    shutil.rmtree(left, ignore_errors=True)  # the killed node could not clean up
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    detail = report["peers_detail"]
    gone = [p for p in detail if p["share"] == lost_share]
    kept = [p for p in detail if p["share"] != lost_share]
    assert gone and kept
    for p in gone:
        assert p["error"] and "lost with its Ray actor" in p["error"] and worker.address in p["error"], p
        assert p["rounds_completed"] < 6
    for p in kept:
        assert p["error"] is None and p["rounds_completed"] == 6, p
    # the surviving peers' stores came back from the head node and verify
    for p in kept:
        verify = subprocess.run([str(SILOMESH_BIN), "audit", "verify", p["audit_log"]], capture_output=True,
                                text=True, check=False)
        assert verify.returncode == 0, verify.stdout + verify.stderr
