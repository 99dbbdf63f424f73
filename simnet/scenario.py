"""A simnet scenario: what to run, from defaults, a TOML file and command-line flags.

Scenario files hold the same settings as the flags (flags override the file)::

    # scenario.toml
    peers = 8
    topology = "smallworld"       # ring | regular:K | smallworld[:K[:P]] | full | FILE
    strategy = "fedavg"           # fedavg | fedefm | segviz | fedmix
    task = "catheter"             # catheter | organs | lesion | spect
    size = "small"                # model size (tiny | small | ...)
    rounds = 5
    seed = 1
    out = "runs/sw8"
    compare_local = true
    procs = 1
    local_steps = 40
    deadline = 30.0               # seconds per round before late neighbours are skipped
    batch_size = 8
    lr = 0.001
    codec = "float32"             # how updates travel: float32|float16|int8|int4|topk (peer.toml [rounds] codec)
    topk = 0.1                    # codec topk: the share of each tensor's delta values sent (peer.toml [rounds])
    topk_step = 0.2               # codec topk: the consensus step, default 2 x topk (peer.toml [rounds])
    keep_unlabelled = false       # organs, lesion: keep what a silo does not annotate (peer.toml [rounds])
    faults = "drop=0.05,intruder=1"   # or a table, see below

    [faults]                      # alternative to the string form
    crash = 0.25
    restart = "after:1"

    [task_options]                # passed to the task's federation generator
    image_size = 32
    n_train = 32

    [strategy_params]             # the [strategy] params of every peer
    robust = "median"

Relative paths (``out``, a topology FILE) are resolved against the scenario file's folder.

Settings are merged and validated once by :func:`make_scenario` into a frozen
:class:`Scenario` (faults parsed into a :class:`~silomesh.simnet.faultspec.FaultSpec`);
from there on the harness passes the object itself, and ``plan.json`` carries it as
:meth:`Scenario.to_json`.
"""

from __future__ import annotations

import dataclasses
import math
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from silomesh.peer.config import PERSONAL_METHODS, UPDATE_CODECS, PersonalConfig
from silomesh.simnet.faultspec import FaultSpec, FaultSpecError, parse_fault_table, parse_faults
from silomesh.simnet.topology import BUILTIN

#: small data per task so that a simnet of a few peers runs in about a minute on a laptop
SMALL_TASK_OPTIONS: dict[str, dict[str, Any]] = {
    "catheter": {"image_size": 32, "n_train": 32, "n_test": 16, "n_test_source": 16},
    "organs": {"image_size": 32, "n_train": 32, "n_test": 16},
    "lesion": {"image_size": 32, "n_train": 32, "n_test": 16},
    "spect": {"size": 32, "n_train": 32, "n_silo_test": 16, "n_test": 16},
}
MAX_PEERS = 256
BACKENDS = ("local", "ray")


class ScenarioError(ValueError):
    """A scenario setting is missing or invalid; the message names it."""


class SimnetError(RuntimeError):
    """The run could not be carried out (no peer could start, a worker failed, ...)."""


@dataclass(frozen=True)
class Scenario:
    """Everything a simnet run needs (see the module docstring for the meaning of fields)."""

    peers: int = 4
    topology: str = "ring"
    strategy: str = "fedavg"
    task: str = "catheter"
    size: str = "small"  # "tiny" trains faster but barely learns catheter in 100 steps
    rounds: int = 3
    seed: int = 0
    out: Path | None = None
    faults: FaultSpec = field(default_factory=FaultSpec)
    compare_local: bool = False
    procs: int = 1
    #: where the shares run: "local" (this machine: one process, or ``procs`` worker processes)
    #: or "ray" (one Ray actor per share, placed across the nodes of a Ray cluster)
    backend: str = "local"
    #: the Ray cluster to join (``HOST:PORT`` of its head); None: start a Ray instance on this machine
    ray_address: str | None = None
    local_steps: int = 40
    deadline: float = 30.0
    batch_size: int = 8
    lr: float = 1e-3
    #: every peer's ``[rounds] codec``: float32, float16, int8, int4 or topk (lossy ones with error feedback)
    codec: str = "float32"
    #: every peer's ``[rounds] topk``: under codec topk, the share of each tensor's delta values sent
    topk: float = 0.1
    #: every peer's ``[rounds] topk_step``: under codec topk, the consensus step (CHOCO's gamma);
    #: None: the peers' default, ``2 * topk``
    topk_step: float | None = None
    #: every peer's ``[rounds] keep_unlabelled`` (partial labels: keep what a silo does not annotate)
    keep_unlabelled: bool = False
    #: fine-tune steps of each peer's personal model after every round (0: none; peer.toml [personal])
    personal_steps: int = 0
    #: peer.toml ``[personal] method``: ``finetune`` (each round's shared model fine-tuned),
    #: ``head`` (only its task head fine-tuned) or ``ditto`` (one personal model across
    #: rounds, pulled towards the shared one)
    personal_method: str = PersonalConfig.method
    #: peer.toml ``[personal] ditto_lambda``: the weight of Ditto's pull
    personal_lambda: float = PersonalConfig.ditto_lambda
    timeout: float | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    strategy_params: dict[str, Any] = field(default_factory=dict)
    #: every peer's peer.toml ``[privacy]`` table (DP-SGD and its budget); empty: no DP
    privacy: dict[str, Any] = field(default_factory=dict)

    @property
    def federation(self) -> str:
        return f"simnet-{self.seed}"

    @property
    def effective_task_options(self) -> dict[str, Any]:
        """The task's small defaults overridden by ``task_options``."""
        return {**SMALL_TASK_OPTIONS.get(self.task, {}), **self.task_options}

    @property
    def personal_total_steps(self) -> int:
        """Steps a peer's newest personal model has been trained on its own data beyond the
        shared model's: ``personal_steps`` for a fine-tune, every round's for Ditto (the silo
        alone gets as many more, so that the pair costs the same compute)."""
        return self.personal_steps * (self.rounds if self.personal_method == "ditto" else 1)

    @property
    def effective_timeout(self) -> float:
        """Wall-clock limit of the whole run (rounds plus start-up and restarts)."""
        if self.timeout is not None:
            return self.timeout
        return 120.0 + self.peers * 2.0 + self.rounds * (self.deadline * 2 + 30.0)

    def to_settings(self) -> dict[str, Any]:
        """The settings as ``report.json`` and ``results.json`` show them.

        Faults as their canonical spec text, ``out`` as a string, task options with the
        task's defaults filled in. For people; :meth:`to_json` is the faithful form.
        """
        d = self.to_json()
        d["faults"] = self.faults.to_text()
        d["task_options"] = self.effective_task_options
        return d

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict that :meth:`from_json` turns back into an equal scenario."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["out"] = str(self.out) if self.out is not None else None
        d["faults"] = self.faults.to_json()
        d["task_options"] = dict(self.task_options)
        d["strategy_params"] = dict(self.strategy_params)
        d["privacy"] = dict(self.privacy)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Scenario:
        values = dict(d)
        values["out"] = Path(d["out"]) if d["out"] is not None else None
        values["faults"] = FaultSpec.from_json(d["faults"])
        return cls(**values)


FIELDS = {f.name: f for f in dataclasses.fields(Scenario)}
_TYPES: dict[str, tuple[type, ...]] = {
    "peers": (int,), "topology": (str,), "strategy": (str,), "task": (str,), "size": (str,),
    "rounds": (int,), "seed": (int,), "out": (str, Path), "faults": (str, dict, FaultSpec),
    "compare_local": (bool,),
    "procs": (int,), "backend": (str,), "ray_address": (str,),
    "local_steps": (int,), "deadline": (int, float), "batch_size": (int,),
    "lr": (int, float), "codec": (str,), "topk": (int, float), "topk_step": (int, float),
    "keep_unlabelled": (bool,), "personal_steps": (int,),
    "personal_method": (str,), "personal_lambda": (int, float), "timeout": (int, float), "task_options": (dict,),
    "strategy_params": (dict,), "privacy": (dict,),
}


def load_scenario(path: Path, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a scenario TOML file into settings (validated by :func:`make_scenario`).

    Top-level keys in ``ignore`` (e.g. an experiment file's ``experiment`` table) are
    skipped.

    Raises:
        ScenarioError: if the file is missing, not TOML, or names an unknown setting.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such scenario file") from None
    except OSError as exc:
        raise ScenarioError(f"{path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from None
    if isinstance(data.get("simnet"), dict) and len(data) == 1:
        data = data["simnet"]  # a [simnet] table is accepted too
    data = {k: v for k, v in data.items() if k not in ignore}
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ScenarioError(f"{path}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(FIELDS))})")
    base = path.parent
    if isinstance(data.get("out"), str) and not Path(data["out"]).is_absolute():
        data["out"] = str(base / data["out"])
    topo = data.get("topology")
    if isinstance(topo, str) and topo.partition(":")[0] not in BUILTIN and not Path(topo).is_absolute():
        data["topology"] = str(base / topo)
    return data


def _fault_spec(value: str | dict[str, Any] | FaultSpec) -> FaultSpec:
    """The faults setting in any of its forms, parsed (once) into a spec.

    Raises:
        ScenarioError: with the grammar's message.
    """
    if isinstance(value, FaultSpec):
        return value
    try:
        return parse_fault_table(value) if isinstance(value, dict) else parse_faults(value)
    except FaultSpecError as exc:
        raise ScenarioError(str(exc)) from None


def make_scenario(*layers: Mapping[str, Any]) -> Scenario:
    """Merge settings (later layers win; ``None`` values are ignored) and validate them.

    ``faults`` may be spec text (``--faults``), a table (a scenario file's ``[faults]``)
    or a :class:`~silomesh.simnet.faultspec.FaultSpec`.

    Raises:
        ScenarioError: naming the first invalid setting.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if value is None:
                continue
            if key not in FIELDS:
                raise ScenarioError(f"unknown setting {key!r}")
            if key in ("task_options", "strategy_params", "privacy") and key in merged:
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    for key, value in merged.items():
        kinds = _TYPES[key]
        if isinstance(value, bool) and bool not in kinds:
            raise ScenarioError(f"{key}: expected {kinds[0].__name__}, got a boolean")
        if not isinstance(value, kinds):
            raise ScenarioError(f"{key}: expected {kinds[0].__name__}, got {type(value).__name__} {value!r}")
    if "faults" in merged:
        merged["faults"] = _fault_spec(merged["faults"])
    if "out" in merged:
        merged["out"] = Path(merged["out"])
    for key in ("deadline", "lr", "timeout"):
        if key in merged:
            merged[key] = float(merged[key])
    s = Scenario(**merged)
    if not 1 <= s.peers <= MAX_PEERS:
        raise ScenarioError(f"peers: must be between 1 and {MAX_PEERS}, got {s.peers}")
    if s.rounds < 1:
        raise ScenarioError(f"rounds: must be >= 1, got {s.rounds}")
    if not 1 <= s.procs <= s.peers:
        raise ScenarioError(f"procs: must be between 1 and the number of peers ({s.peers}), got {s.procs}")
    if s.backend not in BACKENDS:
        raise ScenarioError(f"backend: must be one of {', '.join(BACKENDS)}, got {s.backend!r}")
    if s.ray_address is not None and s.backend != "ray":
        raise ScenarioError("ray_address: only with backend = \"ray\"")
    for key in ("local_steps", "batch_size"):
        if getattr(s, key) < 1:
            raise ScenarioError(f"{key}: must be >= 1, got {getattr(s, key)}")
    if not s.deadline > 0:
        raise ScenarioError(f"deadline: must be > 0 seconds, got {s.deadline}")
    if not s.lr > 0:
        raise ScenarioError(f"lr: must be > 0, got {s.lr}")
    if s.codec not in UPDATE_CODECS:
        raise ScenarioError(f"codec: must be one of {', '.join(UPDATE_CODECS)}, got {s.codec!r}")
    if not 0 < s.topk <= 0.5:
        raise ScenarioError(f"topk: the share of a delta's values kept, must be in (0, 0.5], got {s.topk}")
    if s.topk_step is not None and not 0 < s.topk_step <= 1:
        raise ScenarioError(f"topk_step: the consensus step, must be in (0, 1], got {s.topk_step}")
    for key in ("topk", "topk_step"):
        if key in merged and s.codec != "topk":  # set, but it would change nothing
            raise ScenarioError(f'{key}: applies only with codec = "topk" (codec is {s.codec!r})')
    if s.personal_steps < 0:
        raise ScenarioError(f"personal_steps: must be >= 0 (0: no personal models), got {s.personal_steps}")
    if s.personal_method not in PERSONAL_METHODS:
        raise ScenarioError(f"personal_method: one of {', '.join(PERSONAL_METHODS)}, got {s.personal_method!r}")
    if not (s.personal_lambda >= 0 and math.isfinite(s.personal_lambda)):
        raise ScenarioError(f"personal_lambda: must be finite and >= 0, got {s.personal_lambda}")
    if s.timeout is not None and not s.timeout > 0:
        raise ScenarioError(f"timeout: must be > 0 seconds, got {s.timeout}")
    if s.privacy:
        from silomesh.peer.config import ConfigError, RoundConfig, parse_privacy

        try:
            parse_privacy(s.privacy, RoundConfig(count=s.rounds, local_steps=s.local_steps))
        except ConfigError as exc:
            raise ScenarioError(str(exc)) from None
    if s.codec == "topk":
        from silomesh.peer.config import RoundConfig, StrategyConfig, topk_refusal

        why = topk_refusal(StrategyConfig(s.strategy, dict(s.strategy_params)), RoundConfig(codec=s.codec))
        if why:
            raise ScenarioError(f"codec: {why}")
    return s


def default_out_dir() -> Path:
    """``runs/simnet-YYYYmmdd-HHMMSS`` under the current folder."""
    return Path("runs") / time.strftime("simnet-%Y%m%d-%H%M%S")
