"""Lay out a simnet run on disk: one real peer folder per peer, and ``plan.json``.

Each peer gets ``DIR/peers/<name>/peer.key`` (a seeded 32-byte Ed25519 seed, mode 0600)
and ``DIR/peers/<name>/peer.toml`` (federation, 127.0.0.1 listen port, task with its
silo index, strategy, rounds, and its topology neighbours as ``[[trusted]]``) — files a
person could also start by hand with ``silomesh peer run --config``. Workers load them
with the production :func:`~silomesh.peer.config.load_config`. ``plan.json`` adds what
only the harness needs (which process runs which peer, the resolved fault plan).

A :class:`Plan` holds the :class:`~silomesh.simnet.scenario.Scenario` itself, the
:class:`~silomesh.simnet.topology.Topology`, the resolved
:class:`~silomesh.simnet.faultspec.FaultPlan` and one :class:`PeerPlan` per peer. Worker
processes read it back with :meth:`Plan.load` (``to_json`` / ``from_json`` on each
dataclass), so every process sees the same typed objects.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from silomesh.simnet.faultspec import FaultPlan, FaultSpecError, plan_faults
from silomesh.simnet.scenario import Scenario, ScenarioError
from silomesh.simnet.topology import Topology, TopologyError, build_topology

PLAN_FILE = "plan.json"
PLAN_SCHEMA = "silomesh.simnet.plan/1"


@dataclass(frozen=True)
class PeerPlan:
    """One simulated peer: its identity, port, neighbours and folder (key, config, store)."""

    index: int
    name: str
    peer_id: str
    share: int  # which process runs it
    port: int
    neighbours: tuple[int, ...]
    folder: Path  # DIR/peers/<name>: peer.key, peer.toml, store.sqlite (the peer's data_dir)

    @property
    def config_path(self) -> Path:
        return self.folder / "peer.toml"

    @property
    def key_path(self) -> Path:
        return self.folder / "peer.key"

    @property
    def store_path(self) -> Path:
        return self.folder / "store.sqlite"

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "peer_id": self.peer_id, "share": self.share,
                "port": self.port, "neighbours": list(self.neighbours), "folder": str(self.folder)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PeerPlan:
        return cls(int(d["index"]), str(d["name"]), str(d["peer_id"]), int(d["share"]), int(d["port"]),
                   tuple(int(j) for j in d["neighbours"]), Path(d["folder"]))


@dataclass(frozen=True)
class Plan:
    """A laid-out run: the scenario, its graph and fault plan, and every peer's place."""

    out: Path
    scenario: Scenario
    topology: Topology
    peers: tuple[PeerPlan, ...]
    faults: FaultPlan

    @property
    def n(self) -> int:
        return len(self.peers)

    @property
    def rounds(self) -> int:
        return self.scenario.rounds

    @property
    def federation(self) -> str:
        return self.scenario.federation

    @property
    def shares(self) -> int:
        """Processes the peers are spread over (``procs``)."""
        return self.scenario.procs

    @property
    def run_dir(self) -> Path:
        """Harness bookkeeping: barrier files, stop file, worker results and logs."""
        return self.out / "run"

    @property
    def path(self) -> Path:
        return self.out / PLAN_FILE

    def to_json(self) -> dict[str, Any]:
        return {"schema": PLAN_SCHEMA, "out": str(self.out), "scenario": self.scenario.to_json(),
                "topology": self.topology.to_json(), "peers": [p.to_json() for p in self.peers],
                "faults": self.faults.to_json()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Plan:
        """The plan of :meth:`to_json`.

        Raises:
            ValueError: if ``d`` is not a plan of this version.
        """
        if d.get("schema") != PLAN_SCHEMA:
            raise ValueError(f"not a {PLAN_SCHEMA} plan (schema {d.get('schema')!r})")
        return cls(Path(d["out"]), Scenario.from_json(d["scenario"]), Topology.from_json(d["topology"]),
                   tuple(PeerPlan.from_json(p) for p in d["peers"]), FaultPlan.from_json(d["faults"]))

    def save(self) -> Path:
        self.path.write_text(json.dumps(self.to_json(), indent=1), encoding="utf-8")
        return self.path

    @classmethod
    def load(cls, path: Path) -> Plan:
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")))


def peer_seed(seed: int, index: int) -> bytes:
    """The 32-byte identity seed of simulated peer ``index`` (reproducible per run seed)."""
    return hashlib.sha256(f"silomesh-simnet/{seed}/peer/{index}".encode()).digest()


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports free on ``host`` right now (held open together)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def toml_dumps(data: dict[str, Any]) -> str:
    """A small TOML writer for config dicts (scalars, lists of scalars, tables, arrays of tables)."""

    def value(v: object) -> str:
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


def _is_table_list(v: object) -> TypeGuard[list[dict[str, Any]]]:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _write_key(path: Path, seed: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, seed)
    finally:
        os.close(fd)


def share_of(index: int, n: int, shares: int) -> int:
    """The share (worker process or Ray actor) that runs peer ``index`` of ``n``: contiguous blocks."""
    return index * shares // n


def peer_name(index: int, n: int) -> str:
    return f"p{index:0{max(2, len(str(n - 1)))}d}"


def _topk_settings(scenario: Scenario) -> dict[Any, Any]:
    """The ``[rounds]`` topk keys of a peer.toml: only under codec topk (peers refuse them otherwise)."""
    if scenario.codec != "topk":
        return {}
    step: dict[str, Any] = {} if scenario.topk_step is None else {"topk_step": float(scenario.topk_step)}
    return {"topk": float(scenario.topk), **step}


def build_plan(scenario: Scenario, out: Path, endpoints: Sequence[tuple[str, int]] | None = None) -> Plan:
    """Write every peer's key and config under ``out/peers`` and return the plan.

    Peers listen on free ports of 127.0.0.1 unless ``endpoints`` gives each peer's
    ``(IPv4 address, port)``: the Ray backend's peers listen on their node's address.

    Raises:
        ScenarioError: if ``out`` already holds a run, or the topology/faults are invalid
            for this scenario.
    """
    from silomesh.peer.identity import PeerIdentity

    try:
        topology = build_topology(scenario.topology, scenario.peers, scenario.seed)
        faults = plan_faults(scenario.faults, scenario.peers, scenario.rounds, scenario.seed)
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
    if endpoints is None:
        hosts, ports = ["127.0.0.1"] * n, free_ports(n)
    else:
        if len(endpoints) != n:
            raise ScenarioError(f"{len(endpoints)} endpoints for {n} peers")
        hosts, ports = [h for h, _ in endpoints], [p for _, p in endpoints]
    names = [peer_name(i, n) for i in range(n)]
    nbrs = topology.neighbours
    options = scenario.effective_task_options
    params = dict(scenario.strategy_params)
    if scenario.strategy == "cyclic" and "order" not in params:  # the ring: the peers in index order
        missing = [i for i in range(n) if (i + 1) % n not in nbrs[i]]
        if n < 2 or missing:
            raise ScenarioError(f"strategy cyclic passes the model from peer i to peer i+1: topology "
                                f"{scenario.topology} does not connect peer {missing[0] if missing else 0} to the next")
        params["order"] = [ids[i].peer_id_text for i in range(n)]
    if scenario.strategy == "fedavg" and params.get("reduce") == "tree" and "order" not in params:
        fanout = params.get("fanout", 2)  # the tree: the peers in index order, parent (i - 1) // fanout
        fanout = fanout if isinstance(fanout, int) and fanout >= 2 else 2  # a bad one: the strategy says why
        cut = [i for i in range(1, n) if (i - 1) // fanout not in nbrs[i]]
        if cut:
            raise ScenarioError(f"fedavg with reduce = 'tree' exchanges between peer i and peer (i - 1) // {fanout}: "
                                f"topology {scenario.topology} does not connect peer {cut[0]} to its parent "
                                f"{(cut[0] - 1) // fanout} (use topology full)")
        params["order"] = [ids[i].peer_id_text for i in range(n)]
    plans = []
    for i in range(n):
        pp = PeerPlan(index=i, name=names[i], peer_id=ids[i].peer_id_text, share=share_of(i, n, scenario.procs),
                      port=ports[i], neighbours=tuple(nbrs[i]), folder=(peers_dir / names[i]).resolve())
        pp.folder.mkdir(mode=0o700)
        _write_key(pp.key_path, peer_seed(scenario.seed, i))
        config = {
            "federation": scenario.federation,
            "key_file": pp.key_path.name,
            "listen": f"/ip4/{hosts[i]}/tcp/{ports[i]}",
            "data_dir": ".",
            "participation": "auto",
            "task": {"name": scenario.task, "size": scenario.size,
                     "options": {"silos": n, "silo": i, "seed": scenario.seed, **options}},
            "strategy": {"name": scenario.strategy, "params": params},
            "rounds": {"count": scenario.rounds, "deadline_seconds": float(scenario.deadline),
                       "local_steps": scenario.local_steps, "batch_size": scenario.batch_size,
                       "lr": float(scenario.lr), "codec": scenario.codec,
                       **_topk_settings(scenario),
                       "keep_unlabelled": scenario.keep_unlabelled},
            "personal": {"steps": scenario.personal_steps, "method": scenario.personal_method,
                         "ditto_lambda": float(scenario.personal_lambda)},
            **({"privacy": dict(scenario.privacy)} if scenario.privacy else {}),
            "control": {"host": "127.0.0.1", "port": 0},
            "trusted": [{"name": names[j], "peer_id": ids[j].peer_id_text,
                         "address": f"/ip4/{hosts[j]}/tcp/{ports[j]}"} for j in nbrs[i]],
        }
        pp.config_path.write_text(toml_dumps(config), encoding="utf-8")
        plans.append(pp)
    plan = Plan(out.resolve(), scenario, topology, tuple(plans), faults)
    plan.save()
    return plan
