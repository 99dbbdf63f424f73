"""Lay out a simnet run on disk: one real peer folder per peer, and ``plan.json``.

Each peer gets ``DIR/peers/<name>/peer.key`` (a seeded 32-byte Ed25519 seed, mode 0600)
and ``DIR/peers/<name>/peer.toml`` (federation, 127.0.0.1 listen port, task with its
silo index, strategy, rounds, and its topology neighbours as ``[[trusted]]``) — files a
person could also start by hand with ``silomesh peer run --config``. Workers load them
with the production :func:`~silomesh.peer.config.load_config`. ``plan.json`` adds what
only the harness needs (which process runs which peer, the resolved fault plan).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from silomesh.simnet.faultspec import FaultPlan, plan_faults
from silomesh.simnet.scenario import Scenario, ScenarioError
from silomesh.simnet.topology import Topology, build_topology

PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class PeerPlan:
    index: int
    name: str
    peer_id: str
    share: int  # which process runs it
    port: int
    neighbours: tuple[int, ...]
    data_dir: str
    config_path: str
    key_path: str

    @property
    def store_path(self) -> Path:
        return Path(self.data_dir) / "store.sqlite"


@dataclass(frozen=True)
class Plan:
    out: str
    scenario: dict[str, Any]
    federation: str
    topology: dict[str, Any]
    peers: tuple[PeerPlan, ...]
    faults: FaultPlan
    shares: int

    @property
    def n(self) -> int:
        return len(self.peers)

    @property
    def rounds(self) -> int:
        return int(self.scenario["rounds"])

    @property
    def run_dir(self) -> Path:
        """Harness bookkeeping: barrier files, stop file, worker results and logs."""
        return Path(self.out) / "run"

    def to_dict(self) -> dict[str, Any]:
        return {"out": self.out, "scenario": self.scenario, "federation": self.federation,
                "topology": self.topology, "peers": [asdict(p) for p in self.peers],
                "faults": self.faults.to_dict(), "shares": self.shares}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        peers = tuple(PeerPlan(**{**p, "neighbours": tuple(p["neighbours"])}) for p in d["peers"])
        return cls(d["out"], d["scenario"], d["federation"], d["topology"], peers,
                   FaultPlan.from_dict(d["faults"]), d["shares"])

    def save(self) -> Path:
        path = Path(self.out) / PLAN_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: Path) -> Plan:
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))


def peer_seed(seed: int, index: int) -> bytes:
    """The 32-byte identity seed of simulated peer ``index`` (reproducible per run seed)."""
    return hashlib.sha256(f"silomesh-simnet/{seed}/peer/{index}".encode()).digest()


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now (held open together)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def toml_dumps(data: dict[str, Any]) -> str:
    """A small TOML writer for config dicts (scalars, lists of scalars, tables, arrays of tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    def table(prefix: str, d: dict[str, Any], out: list[str]) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict) and not _is_table_list(v)}
        for k, v in scalars.items():
            out.append(f"{k} = {value(v)}")
        for k, v in d.items():
            if isinstance(v, dict):
                out.append(f"\n[{prefix}{k}]")
                table(f"{prefix}{k}.", v, out)
            elif _is_table_list(v):
                for item in v:
                    out.append(f"\n[[{prefix}{k}]]")
                    table(f"{prefix}{k}.", item, out)

    lines: list[str] = []
    table("", data, lines)
    text = "\n".join(lines) + "\n"
    if tomllib.loads(text) != json.loads(json.dumps(data)):  # tuples become lists in both
        raise ValueError("toml_dumps could not represent the config faithfully")
    return text


def _is_table_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _write_key(path: Path, seed: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, seed)
    finally:
        os.close(fd)


def peer_name(index: int, n: int) -> str:
    return f"p{index:0{max(2, len(str(n - 1)))}d}"


def build_plan(scenario: Scenario, out: Path) -> Plan:
    """Write every peer's key and config under ``out/peers`` and return the plan.

    Raises:
        ScenarioError: if ``out`` already holds a run, or the topology/faults are invalid
            for this scenario.
    """
    from silomesh.peer.identity import PeerIdentity
    from silomesh.simnet.faultspec import FaultSpecError
    from silomesh.simnet.topology import TopologyError

    try:
        topology: Topology = build_topology(scenario.topology, scenario.peers, scenario.seed)
        faults = plan_faults(scenario.fault_spec, scenario.peers, scenario.rounds, scenario.seed)
    except (TopologyError, FaultSpecError) as exc:
        raise ScenarioError(str(exc)) from None
    if topology.n != scenario.peers:
        raise ScenarioError(f"topology {scenario.topology} has {topology.n} peers, --peers is {scenario.peers}")
    peers_dir = out / "peers"
    if peers_dir.exists() and any(peers_dir.iterdir()):
        raise ScenarioError(f"{out} already holds a simnet run; choose another --out or remove it")
    peers_dir.mkdir(parents=True, exist_ok=True)
    (out / "run").mkdir(exist_ok=True)
    n = scenario.peers
    ids = [PeerIdentity.from_seed(peer_seed(scenario.seed, i)) for i in range(n)]
    ports = free_ports(n)
    names = [peer_name(i, n) for i in range(n)]
    nbrs = topology.neighbours
    options = scenario.effective_task_options
    plans = []
    for i in range(n):
        folder = (peers_dir / names[i]).resolve()
        folder.mkdir(mode=0o700)
        _write_key(folder / "peer.key", peer_seed(scenario.seed, i))
        config = {
            "federation": scenario.federation,
            "key_file": "peer.key",
            "listen": f"/ip4/127.0.0.1/tcp/{ports[i]}",
            "data_dir": ".",
            "participation": "auto",
            "task": {"name": scenario.task, "size": scenario.size,
                     "options": {"silos": n, "silo": i, "seed": scenario.seed, **options}},
            "strategy": {"name": scenario.strategy, "params": dict(scenario.strategy_params)},
            "rounds": {"count": scenario.rounds, "deadline_seconds": float(scenario.deadline),
                       "local_steps": scenario.local_steps, "batch_size": scenario.batch_size,
                       "lr": float(scenario.lr)},
            "control": {"host": "127.0.0.1", "port": 0},
            "trusted": [{"name": names[j], "peer_id": ids[j].peer_id_text,
                         "address": f"/ip4/127.0.0.1/tcp/{ports[j]}"} for j in nbrs[i]],
        }
        config_path = folder / "peer.toml"
        config_path.write_text(toml_dumps(config), encoding="utf-8")
        plans.append(PeerPlan(index=i, name=names[i], peer_id=ids[i].peer_id_text,
                              share=i * scenario.procs // n, port=ports[i], neighbours=tuple(nbrs[i]),
                              data_dir=str(folder), config_path=str(config_path),
                              key_path=str(folder / "peer.key")))
    plan = Plan(str(out.resolve()), scenario.to_dict(), scenario.federation, topology.to_dict(),
                tuple(plans), faults, scenario.procs)
    plan.save()
    return plan
