"""``peer.toml``: what a hospital's peer needs to run, validated with errors that name the field.

Example (relative paths are resolved against the folder holding the file)::

    federation = "cardio-xray-2026"
    key_file = "peer.key"                  # from 'silomesh keygen'
    listen = "/ip4/0.0.0.0/tcp/4001"
    data_dir = "state"                     # store, model files, control token
    participation = "auto"                 # or "manual": operator approves rounds

    [task]
    name = "catheter"                      # catheter | organs | lesion | spect
    size = "small"
    dataset = "/srv/xray/labelled"         # optional; synthetic data when absent

    [strategy]
    name = "fedavg"                        # fedavg | fedefm | segviz | fedmix
    params = { weighting = "samples" }

    [rounds]
    count = 0                              # 0: run until stopped
    deadline_seconds = 600
    local_steps = 50

    [relay]                                # optional: see docs/PEER.md section 5
    serve = false                          # true: relay for trusted neighbours behind NAT
    via = []                               # relays to reserve a slot on, with their /p2p/ id

    [study]                                # optional: see docs/PRIVACY.md, "The study manifest"
    manifest = "study.json"                # from 'silomesh study create'; the operator approves it

    [[trusted]]
    name = "st-elsewhere"
    peer_id = "12D3KooW..."
    address = "/ip4/10.1.2.3/tcp/4001"     # or <relay address>/p2p/<relay id>/p2p-circuit
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, overload

from silomesh.models.architecture import ModelSpec, model_id
from silomesh.models.preprocess import Preprocess
from silomesh.protocol.peerid import PeerIdError, public_key_from_peer_id

PARTICIPATION_POLICIES = ("auto", "manual")

T = TypeVar("T")
D = TypeVar("D")


class ConfigError(ValueError):
    """The configuration is unreadable or a field is missing or invalid; the message names it."""


@dataclass(frozen=True)
class TrustedPeer:
    """A neighbour this peer accepts connections and messages from."""

    peer_id: str
    address: str
    name: str
    public_key: bytes


@dataclass(frozen=True)
class TaskConfig:
    name: str = "catheter"
    size: str = "tiny"
    dataset: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)
    #: a MONAI network replacing the task's own (``model`` + ``model_args``, or a bundle's network_def)
    spec: ModelSpec | None = None
    #: starting weights: ``weights``, or the bundle's models/model.pt (a local trusted file)
    weights: Path | None = None
    #: MONAI bundle folder the network, weights and pre-processing came from
    bundle: Path | None = None
    #: how NIfTI/DICOM folders are resampled and windowed (``[task.preprocess]`` over the bundle's)
    preprocess: Preprocess | None = None

    @property
    def model_id(self) -> str:
        """The model neighbours must agree on, as named in our hello."""
        return model_id(self.name, self.size, self.spec)


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "fedavg"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundConfig:
    count: int = 0
    deadline_seconds: float = 600.0
    local_steps: int = 50
    batch_size: int = 8
    lr: float = 1e-3
    #: a neighbour's model further from ours than this many times our norm is dropped (0: no check)
    max_update_ratio: float = 10.0
    #: a neighbour's weight beyond this many times our largest weight is dropped (0: no check)
    max_weight_factor: float = 1e4
    #: a neighbour's model further than this many times its usual distance is dropped (0: no check)
    max_update_growth: float = 20.0
    #: how updates travel (PEER.md section 3): float32 (exact), float16 (deltas in half
    #: precision), int8 (deltas and snapshots quantized per tensor), int4 (deltas in 4 bits,
    #: snapshots as int8) or topk (each tensor's largest :attr:`topk` share of a delta, as
    #: float32 values and their indices; snapshots as int8); lossy codecs carry their error
    #: into the next delta, which is always made against what the neighbour holds
    codec: str = "float32"
    #: under ``codec = "topk"``: the share of each tensor's values a delta keeps (0 < topk <= 0.5;
    #: a kept value takes 8 bytes, twice float32's 4)
    topk: float = 0.1
    #: under ``codec = "topk"``: how far a round moves our model towards the neighbours' (the
    #: consensus step of CHOCO-gossip, 0 < topk_step <= 1; PEER.md section 3); None: ``2 * topk``
    topk_step: float | None = None

    @property
    def consensus_step(self) -> float:
        """:attr:`topk_step`, or ``min(1, 2 * topk)`` when unset: sparser deltas need smaller
        steps, or the models drift apart (tests/test_update_codecs.py)."""
        return self.topk_step if self.topk_step is not None else min(1.0, 2.0 * self.topk)
    #: every training on this silo's data also trains what its labels leave unannotated
    #: (another silo's organs, a box's rim) towards the model as that training began, instead of leaving it
    #: to drift (tasks that :attr:`~Task.distills`: organs, lesion; docs/STRATEGIES.md "Partial labels")
    keep_unlabelled: bool = False


UPDATE_CODECS = ("float32", "float16", "int8", "int4", "topk")


@dataclass(frozen=True)
class NetworkConfig:
    """How long a neighbour may stay silent, and which rounds and clocks we accept (PROTOCOL.md 9-12)."""

    #: tensor messages of rounds outside ``current +- round_window`` are refused (BAD_ROUND)
    round_window: int = 2
    #: envelopes whose timestamp is further than this from our clock are refused (STALE); 0: no check
    max_clock_skew_seconds: float = 900.0
    #: a dialer's hello must arrive this soon after it opens a stream
    hello_timeout_seconds: float = 30.0
    #: a frame in progress must deliver bytes at least this often
    stall_timeout_seconds: float = 60.0
    #: an open stream with no message in progress is closed after this long
    idle_timeout_seconds: float = 300.0
    #: we wait this long for the answer to an update (the listener acknowledges without training)
    reply_timeout_seconds: float = 120.0
    #: every connected neighbour is pinged this often; three unanswered pings in a row close the
    #: connection so the connect loop redials it (a link that went down without a reset)
    ping_interval_seconds: float = 15.0
    #: updates with at least this many MB (10^6 bytes) of tensors are streamed to neighbours
    #: that speak /silomesh/exchange/1.2.0: sealed in 64 KiB chunks while they travel, so no
    #: sealed copy of the model is held (PROTOCOL.md 4.2); 0: always seal whole
    stream_threshold_mb: float = 1.0


@dataclass(frozen=True)
class RelaySettings:
    """Circuit relay v2 and hole punching (``[relay]``; docs/PEER.md section 5).

    A peer with a reachable address may ``serve`` as a relay for its trusted neighbours
    (only they can connect to it at all); a peer behind NAT reserves a slot on the relays
    in ``via`` so that neighbours can dial it at ``<relay>/p2p/<relay id>/p2p-circuit``.
    """

    #: relay circuits between trusted neighbours (needs an address they can reach)
    serve: bool = False
    #: relays to keep a reservation on: full multiaddrs ending in /p2p/<relay PeerID>
    via: tuple[str, ...] = ()
    #: try DCUtR hole punching to turn a relayed connection into a direct one
    hole_punch: bool = True
    #: served relays: reservations held at once, and each circuit's limits
    max_reservations: int = 64
    max_circuit_seconds: int = 24 * 3600
    max_circuit_bytes: int = 1 << 40

    @property
    def enabled(self) -> bool:
        return self.serve or bool(self.via)


@dataclass(frozen=True)
class PersonalConfig:
    """A personal model beside the shared one (docs/PEER.md, "Personal models").

    After every committed round a copy of the shared model is fine-tuned ``steps`` steps on
    this silo's own data and stored as the round's personal model: what the hospital uses
    on its own patients. It never leaves the peer. ``steps = 0``: no personal model.
    """

    steps: int = 0
    #: learning rate of the fine-tune (default: ``[rounds] lr``)
    lr: float | None = None
    #: ``finetune``: each round's personal model is the shared one fine-tuned ``steps`` steps;
    #: ``head``: the same with only the task head trained (the body stays the shared one);
    #: ``ditto``: one personal model lives across rounds, trained ``steps`` steps after each
    #: round on its own data with a pull of ``ditto_lambda`` towards the shared model
    method: str = "finetune"
    #: Ditto's lambda: ``ditto_lambda / 2 * ||personal - shared||^2`` is added to the loss
    ditto_lambda: float = 0.1


#: ``[personal] method`` values
PERSONAL_METHODS = ("finetune", "head", "ditto")


@dataclass(frozen=True)
class PrivacyConfig:
    """``[privacy]``: DP-SGD on this peer's data and its budget (docs/PRIVACY.md).

    ``enabled`` is true when the section is present. ``noise_multiplier`` or
    ``planned_steps`` fixes the noise; with neither, the noise is calibrated so that
    ``rounds.count * rounds.local_steps`` steps spend ``target_epsilon``.
    """

    enabled: bool = False
    target_epsilon: float = 3.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    planned_steps: int = 0


@dataclass(frozen=True)
class StudyConfig:
    """``[study]``: the signed study manifest this peer takes part in (docs/PRIVACY.md).

    Absent: no study; the peer works as before (its hello names only the model). Present:
    the peer checks at start that this file matches its own configuration, trains nothing
    until the operator approved its digest, and talks only to members of the same study.
    """

    manifest: Path | None = None


@dataclass(frozen=True)
class ControlConfig:
    host: str = "127.0.0.1"
    port: int = 8787


@dataclass(frozen=True)
class PeerConfig:
    """A validated ``peer.toml``."""

    path: Path
    federation: str
    key_file: Path
    listen: str
    data_dir: Path
    store: Path
    participation: str
    task: TaskConfig
    strategy: StrategyConfig
    rounds: RoundConfig
    control: ControlConfig
    trusted: tuple[TrustedPeer, ...]
    network: NetworkConfig = field(default_factory=NetworkConfig)
    relay: RelaySettings = field(default_factory=RelaySettings)
    personal: PersonalConfig = field(default_factory=PersonalConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    study: StudyConfig = field(default_factory=StudyConfig)


@overload
def _get(table: Mapping[str, Any], key: str, where: str, kind: type[T]) -> T: ...
@overload
def _get(table: Mapping[str, Any], key: str, where: str, kind: type[T], default: D) -> T | D: ...
def _get(table: Mapping[str, Any], key: str, where: str, kind: type[T], default: object = ...) -> object:
    """``table[key]`` checked to be a ``kind`` (an int is taken as a float); ``default`` when absent.

    Raises:
        ConfigError: naming the field, if it is required and missing or of the wrong type.
    """
    name = f"{where}{key}"
    if key not in table:
        if default is ...:
            raise ConfigError(f"{name}: required field is missing")
        return default
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{name}: expected {_kind_name(kind)}, got a boolean")
    if not isinstance(value, kind):
        raise ConfigError(f"{name}: expected {_kind_name(kind)}, got {type(value).__name__} {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", float: "a number", bool: "true/false", dict: "a table", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def topk_refusal(strategy: StrategyConfig, rounds: RoundConfig) -> str | None:
    """Why ``codec = "topk"`` does not fit this strategy, or None.

    A topk neighbour holds only part of our model; the exchange round's mean makes up for
    that (consensus views, PEER.md section 3). A model passed along a ring (cyclic), a
    subtree mean (``reduce = "tree"``) or a model sent to be trained (fedefm) has nothing to
    make up for it: those would work on models missing most of their last changes.
    """
    if rounds.codec != "topk":
        return None
    if strategy.name in ("cyclic", "fedefm"):
        return f"topk is for strategies that average their neighbours' models each round, not {strategy.name!r}"
    if strategy.params.get("reduce") == "tree":
        return "topk does not fit reduce = \"tree\" (a subtree's mean must arrive whole); use int4 or int8"
    return None


def _secure_aggregation_refusal(strategy: StrategyConfig, neighbours: int) -> str | None:
    """Why ``secure_aggregation`` cannot run with this strategy and neighbourhood, or None.

    The strategy's own parameter check (robust rules, weighting) runs when the peer builds it.
    """
    if strategy.params.get("secure_aggregation") is not True:
        return None
    if strategy.name == "fedefm":
        return ("fedefm's train-request round returns the peer's own model trained on a neighbour's data: "
                "it is not an aggregation, and secure aggregation does not cover it (DP-SGD does what can "
                "be done there)")
    if strategy.name not in ("fedavg", "segviz", "fedmix"):
        return f"implemented for fedavg, segviz and fedmix, not for {strategy.name!r}"
    if neighbours < 2 and strategy.params.get("secure_fallback") is not True:
        return (f"needs at least 2 trusted neighbours, got {neighbours}: the sum of one neighbour's model "
                "is that model. Set strategy.params.secure_fallback = true to run plain rounds instead")
    return None


def _check_unknown(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}{unknown[0]}: unknown field (allowed: {', '.join(sorted(allowed))})")


_PREPROCESS_FIELDS: dict[str, type] = {"orientation": str, "spacing": list, "window": list, "spatial_size": list}


def _task_config(t: Mapping[str, Any], base_dir: Path) -> TaskConfig:
    """``[task]``: the task, its data, and optionally a MONAI network or bundle (docs/TASKS.md).

    Raises:
        ConfigError: naming the field (``task.model``, ``task.model_args.features``...).
    """
    _check_unknown(
        t, {"name", "size", "dataset", "options", "model", "model_args", "weights", "bundle", "preprocess"}, "task."
    )
    dataset = _get(t, "dataset", "task.", str, None)
    model = _get(t, "model", "task.", str, None)
    model_args = dict(_get(t, "model_args", "task.", dict, {}))
    weights_name = _get(t, "weights", "task.", str, None)
    bundle_name = _get(t, "bundle", "task.", str, None)
    if model is not None and bundle_name is not None:
        raise ConfigError("task.model: give either model (with model_args) or bundle, not both")
    if model is None and (model_args or weights_name is not None):
        raise ConfigError(f"task.{'model_args' if model_args else 'weights'}: needs task.model")
    raw_pre = dict(_get(t, "preprocess", "task.", dict, {}))
    _check_unknown(raw_pre, set(_PREPROCESS_FIELDS), "task.preprocess.")
    for key, kind in _PREPROCESS_FIELDS.items():
        _get(raw_pre, key, "task.preprocess.", kind, None)
    spec: ModelSpec | None = None
    weights = _path(base_dir, weights_name) if weights_name else None
    bundle = _path(base_dir, bundle_name) if bundle_name else None
    base_pre: Preprocess | None = None
    if model is not None or bundle is not None:
        from silomesh.models.bundle import BundleError, read_bundle
        from silomesh.models.monai_net import ModelSpecError, check_spec

        try:
            if bundle is not None:
                read = read_bundle(bundle)
                spec, weights, base_pre = read.spec, read.weights, read.preprocess
            else:
                spec = check_spec(str(model), model_args)
        except ModelSpecError as exc:
            raise ConfigError(str(exc)) from None
        except BundleError as exc:
            raise ConfigError(f"task.bundle: {exc}") from None
        if weights is not None and not weights.is_file():
            raise ConfigError(f"task.weights: {weights} is not a file")
    preprocess = base_pre
    if raw_pre:
        merged = {**(base_pre.to_dict() if base_pre is not None else {}), **raw_pre}
        try:
            values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()}
            preprocess = Preprocess(**values)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"task.preprocess.{exc}") from None
    return TaskConfig(
        name=_get(t, "name", "task.", str, "catheter"),
        size=_get(t, "size", "task.", str, "tiny"),
        dataset=_path(base_dir, dataset) if dataset else None,
        options=dict(_get(t, "options", "task.", dict, {})),
        spec=spec,
        weights=weights,
        bundle=bundle,
        preprocess=preprocess,
    )


def _path(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def _multiaddr(value: str, name: str, *, circuit: bool = False, p2p: bool = False) -> str:
    """A TCP multiaddr; with ``circuit``, optionally ``.../p2p/<relay id>/p2p-circuit``; with
    ``p2p``, one that must end in ``/p2p/<PeerID>``."""
    parts = value.split("/")
    tail = parts[5:]
    if circuit and tail[-1:] == ["p2p-circuit"]:
        if len(tail) != 3 or tail[0] != "p2p":
            raise ConfigError(
                f"{name}: a relayed address is <relay address>/p2p/<relay PeerID>/p2p-circuit, got {value!r}"
            )
        _peer_id(tail[1], name)
        parts = parts[:5]
    elif p2p:
        if len(tail) != 2 or tail[0] != "p2p":
            raise ConfigError(f"{name}: expected a relay address ending in /p2p/<relay PeerID>, got {value!r}")
        _peer_id(tail[1], name)
        parts = parts[:5]
    elif tail:
        raise ConfigError(f"{name}: expected a multiaddr like /ip4/10.0.0.2/tcp/4001, got {value!r}")
    if (
        not value.startswith("/")
        or len(parts) < 5
        or parts[1] not in ("ip4", "ip6", "dns", "dns4", "dns6")
        or parts[3] != "tcp"
    ):
        raise ConfigError(f"{name}: expected a multiaddr like /ip4/10.0.0.2/tcp/4001, got {value!r}")
    if not parts[4].isdigit() or not 0 <= int(parts[4]) <= 65535:
        raise ConfigError(f"{name}: {parts[4]!r} is not a TCP port")
    return value


def _peer_id(value: str, name: str) -> None:
    try:
        public_key_from_peer_id(value)
    except PeerIdError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _relay(table: Mapping[str, Any]) -> RelaySettings:
    defaults = RelaySettings()
    _check_unknown(table, set(defaults.__dataclass_fields__), "relay.")
    via = _get(table, "via", "relay.", list, [])
    for i, addr in enumerate(via):
        if not isinstance(addr, str):
            raise ConfigError(f"relay.via[{i}]: expected a string, got {type(addr).__name__}")
        _multiaddr(addr, f"relay.via[{i}]", p2p=True)
    relay = RelaySettings(
        serve=_get(table, "serve", "relay.", bool, defaults.serve),
        via=tuple(via),
        hole_punch=_get(table, "hole_punch", "relay.", bool, defaults.hole_punch),
        max_reservations=_get(table, "max_reservations", "relay.", int, defaults.max_reservations),
        max_circuit_seconds=_get(table, "max_circuit_seconds", "relay.", int, defaults.max_circuit_seconds),
        max_circuit_bytes=_get(table, "max_circuit_bytes", "relay.", int, defaults.max_circuit_bytes),
    )
    for limit in ("max_reservations", "max_circuit_seconds", "max_circuit_bytes"):
        if getattr(relay, limit) < 1:
            raise ConfigError(f"relay.{limit}: must be >= 1, got {getattr(relay, limit)}")
    return relay


def parse_config(data: Mapping[str, Any], base_dir: Path, path: Path | None = None) -> PeerConfig:
    """Validate a parsed TOML document.

    Raises:
        ConfigError: naming the first bad field.
    """
    top = {
        "federation",
        "key_file",
        "listen",
        "data_dir",
        "store",
        "participation",
        "task",
        "strategy",
        "rounds",
        "control",
        "network",
        "relay",
        "personal",
        "privacy",
        "study",
        "trusted",
    }
    _check_unknown(data, top, "")
    federation = _get(data, "federation", "", str)
    if not federation or len(federation) > 64 or not all(c.isalnum() or c in "-_." for c in federation):
        raise ConfigError("federation: use 1-64 letters, digits, '-', '_' or '.'")
    data_dir = _path(base_dir, _get(data, "data_dir", "", str, "silomesh-data"))
    key_file = _path(base_dir, _get(data, "key_file", "", str))
    listen = _multiaddr(_get(data, "listen", "", str, "/ip4/0.0.0.0/tcp/4001"), "listen")
    store = _path(data_dir, _get(data, "store", "", str, "store.sqlite"))
    participation = _get(data, "participation", "", str, "auto")
    if participation not in PARTICIPATION_POLICIES:
        raise ConfigError(f"participation: expected one of {', '.join(PARTICIPATION_POLICIES)}, got {participation!r}")

    task = _task_config(_get(data, "task", "", dict, {}), base_dir)

    s = _get(data, "strategy", "", dict, {})
    _check_unknown(s, {"name", "params"}, "strategy.")
    strategy = StrategyConfig(
        _get(s, "name", "strategy.", str, "fedavg"), dict(_get(s, "params", "strategy.", dict, {}))
    )
    if task.spec is not None:  # a MONAI network has no forward_features and no named head
        if strategy.name == "fedefm":
            raise ConfigError("strategy.name: fedefm needs the task's own network (feature maps); "
                              "with task.model use fedavg, fedmix or segviz")
        if strategy.name == "segviz" and not strategy.params.get("head_prefixes"):
            raise ConfigError("strategy.params.head_prefixes: segviz with task.model must name the network's "
                              'head, e.g. ["final_conv."] for BasicUNet')

    r = _get(data, "rounds", "", dict, {})
    _check_unknown(
        r,
        {
            "count", "deadline_seconds", "local_steps", "batch_size", "lr",
            "max_update_ratio", "max_weight_factor", "max_update_growth", "codec", "topk", "topk_step",
            "keep_unlabelled",
        },
        "rounds.",
    )
    rounds = RoundConfig(
        count=_get(r, "count", "rounds.", int, 0),
        deadline_seconds=_get(r, "deadline_seconds", "rounds.", float, 600.0),
        local_steps=_get(r, "local_steps", "rounds.", int, 50),
        batch_size=_get(r, "batch_size", "rounds.", int, 8),
        lr=_get(r, "lr", "rounds.", float, 1e-3),
        max_update_ratio=_get(r, "max_update_ratio", "rounds.", float, 10.0),
        max_weight_factor=_get(r, "max_weight_factor", "rounds.", float, 1e4),
        max_update_growth=_get(r, "max_update_growth", "rounds.", float, 20.0),
        codec=_get(r, "codec", "rounds.", str, "float32"),
        topk=_get(r, "topk", "rounds.", float, 0.1),
        topk_step=_get(r, "topk_step", "rounds.", float, None),
        keep_unlabelled=_get(r, "keep_unlabelled", "rounds.", bool, False),
    )
    if rounds.codec not in UPDATE_CODECS:
        raise ConfigError(f"rounds.codec: must be one of {', '.join(UPDATE_CODECS)}, got {rounds.codec!r}")
    if not 0.0 < rounds.topk <= 0.5:
        raise ConfigError(f"rounds.topk: the share of a delta's values kept, must be in (0, 0.5], got {rounds.topk}")
    if rounds.topk_step is not None and not 0.0 < rounds.topk_step <= 1.0:
        raise ConfigError(f"rounds.topk_step: the consensus step, must be in (0, 1], got {rounds.topk_step}")
    for key in ("topk", "topk_step"):
        if key in r and rounds.codec != "topk":  # set, but it would change nothing
            raise ConfigError(f'rounds.{key}: applies only with codec = "topk" (codec is {rounds.codec!r})')
    for name, value in (
        ("count", rounds.count),
        ("local_steps", rounds.local_steps),
        ("batch_size", rounds.batch_size),
    ):
        if value < (0 if name == "count" else 1):
            raise ConfigError(f"rounds.{name}: must be {'>= 0' if name == 'count' else '>= 1'}, got {value}")
    if not rounds.deadline_seconds > 0:
        raise ConfigError(f"rounds.deadline_seconds: must be > 0, got {rounds.deadline_seconds}")
    if not rounds.lr > 0:
        raise ConfigError(f"rounds.lr: must be > 0, got {rounds.lr}")
    for bound_name, bound in (
        ("max_update_ratio", rounds.max_update_ratio),
        ("max_weight_factor", rounds.max_weight_factor),
        ("max_update_growth", rounds.max_update_growth),
    ):
        if not bound >= 0 or math.isinf(bound):
            raise ConfigError(f"rounds.{bound_name}: must be a number >= 0 (0: no check), got {bound}")

    network = _network(_get(data, "network", "", dict, {}))
    relay = _relay(_get(data, "relay", "", dict, {}))
    personal = _personal(_get(data, "personal", "", dict, {}))
    if task.spec is not None and personal.method == "head":  # a MONAI network names no head
        raise ConfigError('personal.method: "head" needs the task\'s own network (a named head); '
                          'with task.model use "finetune" or "ditto"')
    privacy = parse_privacy(data.get("privacy"), rounds)
    st = _get(data, "study", "", dict, {})
    _check_unknown(st, {"manifest"}, "study.")
    manifest = _get(st, "manifest", "study.", str, None)
    if "study" in data and not manifest:
        raise ConfigError("study.manifest: required field is missing (the study file from 'silomesh study create')")
    study = StudyConfig(_path(base_dir, manifest) if manifest else None)

    c = _get(data, "control", "", dict, {})
    _check_unknown(c, {"host", "port"}, "control.")
    control = ControlConfig(_get(c, "host", "control.", str, "127.0.0.1"), _get(c, "port", "control.", int, 8787))
    if control.host not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError(f"control.host: the control API only listens on loopback, got {control.host!r}")
    if not 0 <= control.port <= 65535:
        raise ConfigError(f"control.port: {control.port} is not a TCP port")

    trusted_list = _get(data, "trusted", "", list, [])
    trusted: list[TrustedPeer] = []
    seen: set[str] = set()
    for i, entry in enumerate(trusted_list):
        where = f"trusted[{i}]."
        if not isinstance(entry, dict):
            raise ConfigError(f"trusted[{i}]: expected a table with peer_id and address")
        _check_unknown(entry, {"peer_id", "address", "name"}, where)
        peer_id = _get(entry, "peer_id", where, str)
        try:
            public_key = public_key_from_peer_id(peer_id)
        except PeerIdError as exc:
            raise ConfigError(f"{where}peer_id: {exc}") from None
        if peer_id in seen:
            raise ConfigError(f"{where}peer_id: {peer_id} is listed twice")
        seen.add(peer_id)
        address = _multiaddr(_get(entry, "address", where, str), f"{where}address", circuit=True)
        trusted.append(TrustedPeer(peer_id, address, _get(entry, "name", where, str, peer_id[-8:]), public_key))

    why = _secure_aggregation_refusal(strategy, len(trusted))
    if why:
        raise ConfigError(f"strategy.params.secure_aggregation: {why}")
    why = topk_refusal(strategy, rounds)
    if why:
        raise ConfigError(f"rounds.codec: {why}")

    return PeerConfig(
        path=path or base_dir / "peer.toml",
        federation=federation,
        key_file=key_file,
        listen=listen,
        data_dir=data_dir,
        store=store,
        participation=participation,
        task=task,
        strategy=strategy,
        rounds=rounds,
        control=control,
        trusted=tuple(trusted),
        network=network,
        relay=relay,
        personal=personal,
        privacy=privacy,
        study=study,
    )


def _personal(table: Mapping[str, Any]) -> PersonalConfig:
    _check_unknown(table, {"steps", "lr", "method", "ditto_lambda"}, "personal.")
    steps = _get(table, "steps", "personal.", int, 0)
    if steps < 0:
        raise ConfigError(f"personal.steps: must be >= 0 (0: no personal model), got {steps}")
    lr = _get(table, "lr", "personal.", float, None)
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"personal.lr: must be > 0, got {lr}")
    method = _get(table, "method", "personal.", str, PersonalConfig.method)
    if method not in PERSONAL_METHODS:
        raise ConfigError(f"personal.method: one of {', '.join(PERSONAL_METHODS)}, got {method!r}")
    lam = _get(table, "ditto_lambda", "personal.", float, PersonalConfig.ditto_lambda)
    if not (lam >= 0 and math.isfinite(lam)):
        raise ConfigError(f"personal.ditto_lambda: must be finite and >= 0, got {lam}")
    return PersonalConfig(steps=steps, lr=lr, method=method, ditto_lambda=lam)


def parse_privacy(table: object, rounds: RoundConfig) -> PrivacyConfig:
    """``[privacy]`` (``None``: absent, no DP); simnet checks a scenario's table with it too.

    Raises:
        ConfigError: naming the field.
    """
    if table is None:
        return PrivacyConfig()
    if not isinstance(table, dict):
        raise ConfigError("privacy: expected a table")
    _check_unknown(table, {"target_epsilon", "delta", "max_grad_norm", "noise_multiplier", "planned_steps"},
                   "privacy.")
    eps = _get(table, "target_epsilon", "privacy.", float, 3.0)
    delta = _get(table, "delta", "privacy.", float, 1e-5)
    clip = _get(table, "max_grad_norm", "privacy.", float, 1.0)
    sigma = _get(table, "noise_multiplier", "privacy.", float, None)
    planned = _get(table, "planned_steps", "privacy.", int, 0)
    for name, value in (("target_epsilon", eps), ("max_grad_norm", clip), ("noise_multiplier", sigma)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"privacy.{name}: must be a number > 0, got {value}")
    if not 0 < delta < 1:
        raise ConfigError(f"privacy.delta: must be in (0, 1), got {delta}")
    if planned < 0:
        raise ConfigError(f"privacy.planned_steps: must be >= 0, got {planned}")
    if sigma is None and planned == 0:
        if rounds.count == 0:
            raise ConfigError("privacy.noise_multiplier: set it, or privacy.planned_steps, or rounds.count "
                              "(the noise is calibrated to spend target_epsilon over the planned steps)")
        planned = rounds.count * rounds.local_steps
    return PrivacyConfig(True, float(eps), float(delta), float(clip), None if sigma is None else float(sigma), planned)


def _network(table: Mapping[str, Any]) -> NetworkConfig:
    defaults = NetworkConfig()
    _check_unknown(table, set(defaults.__dataclass_fields__), "network.")
    window = _get(table, "round_window", "network.", int, defaults.round_window)
    if window < 0:
        raise ConfigError(f"network.round_window: must be >= 0, got {window}")
    seconds: dict[str, float] = {}
    for name in defaults.__dataclass_fields__:
        if name == "round_window":
            continue
        value = _get(table, name, "network.", float, getattr(defaults, name))
        positive = name not in ("max_clock_skew_seconds", "stream_threshold_mb")
        if not (value > 0 if positive else value >= 0) or value != value:
            raise ConfigError(f"network.{name}: must be {'> 0' if positive else '>= 0'}, got {value}")
        seconds[name] = float(value)
    return NetworkConfig(round_window=window, **seconds)


def load_config(path: Path) -> PeerConfig:
    """Read and validate ``peer.toml``.

    Raises:
        ConfigError: if the file is missing, not TOML, or a field is invalid.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return parse_config(data, path.parent.resolve(), path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
