"""The ``--faults`` grammar and the seeded plan of which peers and rounds it hits.

Grammar (comma-separated items, each at most once; ``none`` or empty means no faults)::

    crash=AMOUNT[@ROUND]        crash AMOUNT peers in the middle of round ROUND
                                (default: a seeded round in 1 .. rounds-2)
    restart=never|after:N|after:DURATION
                                bring crashed peers back (same key, same store) once the
                                others have completed N more rounds, or after DURATION;
                                default: never
    drop=P                      drop each message with probability P (0 <= P <= 1)
    delay=DURATION[-DURATION]   delay every message by DURATION (or uniformly in a range)
    partition=A-B               cut the graph in two halves for rounds A..B (inclusive)
    byzantine=AMOUNT[:MODE]     AMOUNT peers send poisoned models; MODE is noise (default),
                                scale or nan
    intruder=N                  N untrusted hosts try to connect to peers and send frames

    AMOUNT    a fraction 0 < x < 1 of the peers (at least one), or a count >= 1
    DURATION  a number with a unit: 200ms, 1.5s
    rounds    numbered from 0, as in report.json

Example: ``crash=0.1,restart=after:2,drop=0.05,delay=200ms,partition=3-5,byzantine=2:scale,intruder=1``.
The same items may come as a TOML table (``[faults]`` with ``crash = 0.25``,
``restart = "after:1"``, ...): :func:`parse_fault_table`. Either way the spec is parsed
once into a :class:`FaultSpec`; :func:`plan_faults` resolves it into a :class:`FaultPlan`
for a federation, and both cross process boundaries (``plan.json``) as JSON through their
``to_json`` / ``from_json`` pairs, never as spec text. This module is pure Python (no
trio/torch) so the CLI can validate specs quickly.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

T = TypeVar("T")

KNOWN = ("crash", "restart", "drop", "delay", "partition", "byzantine", "intruder")
BYZANTINE_MODES = ("noise", "scale", "nan")
#: intruder connection attempts per target peer, and target peers per intruder
INTRUDER_ATTEMPTS = 2
INTRUDER_TARGETS = 2

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s)$")


class FaultSpecError(ValueError):
    """A ``--faults`` spec does not follow the grammar; the message names the item."""


def _pair(value: Sequence[T] | None) -> tuple[T, T] | None:
    return None if value is None else (value[0], value[1])


@dataclass(frozen=True)
class Restart:
    """When a crashed peer comes back (same key, same store).

    ``kind == "rounds"``: once the other peers have completed ``after`` more rounds;
    ``kind == "seconds"``: ``after`` seconds after the crash.
    """

    kind: Literal["rounds", "seconds"]
    after: float

    def to_text(self) -> str:
        return f"after:{int(self.after)}" if self.kind == "rounds" else f"after:{self.after:g}s"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "after": self.after}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Restart:
        kind = d["kind"]
        if kind not in ("rounds", "seconds"):
            raise ValueError(f"restart kind must be rounds or seconds, got {kind!r}")
        return cls(kind, float(d["after"]))


@dataclass(frozen=True)
class FaultSpec:
    """A parsed ``--faults`` spec (amounts not yet resolved against a peer count)."""

    crash: float = 0.0
    crash_round: int | None = None
    restart: Restart | None = None  # None: never
    drop: float = 0.0
    delay: tuple[float, float] | None = None  # seconds (low, high)
    partition: tuple[int, int] | None = None  # rounds (first, last)
    byzantine: float = 0.0
    byzantine_mode: str = "noise"
    intruders: int = 0

    @property
    def empty(self) -> bool:
        return self == FaultSpec()

    def to_text(self) -> str:
        """The canonical spec string (parses back to an equal spec); for people and reports."""
        items = []
        if self.crash:
            items.append(f"crash={_amount_text(self.crash)}"
                         + (f"@{self.crash_round}" if self.crash_round is not None else ""))
        if self.restart is not None:
            items.append(f"restart={self.restart.to_text()}")
        if self.drop:
            items.append(f"drop={self.drop:g}")
        if self.delay is not None:
            lo, hi = self.delay
            items.append(f"delay={lo * 1000:g}ms" + (f"-{hi * 1000:g}ms" if hi != lo else ""))
        if self.partition is not None:
            items.append(f"partition={self.partition[0]}-{self.partition[1]}")
        if self.byzantine:
            items.append(f"byzantine={_amount_text(self.byzantine)}:{self.byzantine_mode}")
        if self.intruders:
            items.append(f"intruder={self.intruders}")
        return ",".join(items) or "none"

    def to_json(self) -> dict[str, Any]:
        return {
            "crash": self.crash, "crash_round": self.crash_round,
            "restart": self.restart.to_json() if self.restart is not None else None,
            "drop": self.drop,
            "delay": list(self.delay) if self.delay is not None else None,
            "partition": list(self.partition) if self.partition is not None else None,
            "byzantine": self.byzantine, "byzantine_mode": self.byzantine_mode, "intruders": self.intruders,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FaultSpec:
        return cls(
            crash=float(d["crash"]),
            crash_round=d["crash_round"],
            restart=Restart.from_json(d["restart"]) if d["restart"] is not None else None,
            drop=float(d["drop"]),
            delay=_pair(d["delay"]),
            partition=_pair(d["partition"]),
            byzantine=float(d["byzantine"]),
            byzantine_mode=d["byzantine_mode"],
            intruders=int(d["intruders"]),
        )


def _amount_text(x: float) -> str:
    return str(int(x)) if x >= 1 else f"{x:g}"


def _duration(text: str, item: str) -> float:
    m = _DURATION.match(text.strip())
    if not m:
        raise FaultSpecError(f"faults: {item}: {text!r} is not a duration; give a unit, e.g. 200ms or 1.5s")
    value = float(m.group(1))
    return value / 1000.0 if m.group(2) == "ms" else value


def _amount(text: str, item: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise FaultSpecError(f"faults: {item}: {text!r} is not a number") from None
    if value <= 0 or (value >= 1 and not value.is_integer()):
        raise FaultSpecError(f"faults: {item}: give a fraction 0 < x < 1 of the peers or a whole count >= 1")
    return value


def _int(text: str, item: str) -> int:
    if not text.strip().isdigit():
        raise FaultSpecError(f"faults: {item}: {text!r} is not a whole number >= 0")
    return int(text)


def parse_faults(spec: str | None) -> FaultSpec:
    """Parse a ``--faults`` spec (see the module docstring).

    Raises:
        FaultSpecError: naming the first item that does not follow the grammar.
    """
    if spec is None or spec.strip().lower() in ("", "none"):
        return FaultSpec()
    items: list[tuple[str, str, str]] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            raise FaultSpecError(f"faults: empty item in {spec!r}")
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not value:
            raise FaultSpecError(f"faults: {item!r}: expected NAME=VALUE (names: {', '.join(KNOWN)})")
        items.append((key, value, item))
    return _parse_items(items)


def parse_fault_table(table: Mapping[str, Any]) -> FaultSpec:
    """Parse the table form of a spec (a scenario file's ``[faults]``: ``crash = 0.25``, ...).

    Each value follows the grammar of its item in the string form (numbers may be TOML
    numbers). An empty table means no faults.

    Raises:
        FaultSpecError: naming the first key whose value does not follow the grammar.
    """
    items: list[tuple[str, str, str]] = []
    for key, value in table.items():
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            got = "a boolean" if isinstance(value, bool) else f"{type(value).__name__} {value!r}"
            raise FaultSpecError(f"faults.{key}: expected a number or string, got {got}")
        text = str(value).strip()
        if not text:
            raise FaultSpecError(f"faults.{key}: empty value")
        items.append((key, text, f"{key}={text}"))
    return _parse_items(items)


def _parse_items(items: Iterable[tuple[str, str, str]]) -> FaultSpec:
    """Build a spec from ``(name, value, item text)`` triples (the item text names errors)."""
    values: dict[str, Any] = {}
    seen: set[str] = set()
    for key, value, item in items:
        if key not in KNOWN:
            raise FaultSpecError(f"faults: unknown fault {key!r} (known: {', '.join(KNOWN)})")
        if key in seen:
            raise FaultSpecError(f"faults: {key} is given twice")
        seen.add(key)
        if key == "crash":
            amount, at, rnd = value.partition("@")
            values["crash"] = _amount(amount, item)
            if at:
                values["crash_round"] = _int(rnd, item)
        elif key == "restart":
            values["restart"] = _restart(value, item)
        elif key == "drop":
            try:
                p = float(value)
            except ValueError:
                raise FaultSpecError(f"faults: {item}: {value!r} is not a probability") from None
            if not 0.0 <= p <= 1.0:
                raise FaultSpecError(f"faults: {item}: a probability must be in [0, 1]")
            values["drop"] = p
        elif key == "delay":
            lo_text, dash, hi_text = value.partition("-")
            lo = _duration(lo_text, item)
            hi = _duration(hi_text, item) if dash else lo
            if hi < lo:
                raise FaultSpecError(f"faults: {item}: the range's upper end is below its lower end")
            values["delay"] = (lo, hi)
        elif key == "partition":
            a, dash, b = value.partition("-")
            if not dash:
                raise FaultSpecError(f"faults: {item}: expected a round range A-B, e.g. partition=1-2")
            first, last = _int(a, item), _int(b, item)
            if last < first:
                raise FaultSpecError(f"faults: {item}: the last round is before the first")
            values["partition"] = (first, last)
        elif key == "byzantine":
            amount, colon, mode = value.partition(":")
            values["byzantine"] = _amount(amount, item)
            if colon:
                if mode not in BYZANTINE_MODES:
                    raise FaultSpecError(f"faults: {item}: mode must be one of {', '.join(BYZANTINE_MODES)}")
                values["byzantine_mode"] = mode
        elif key == "intruder":
            n = _int(value, item)
            if n > 16:
                raise FaultSpecError(f"faults: {item}: at most 16 intruders")
            values["intruders"] = n
    if values.get("restart") is not None and "crash" not in values:
        raise FaultSpecError("faults: restart=... needs crash=... (nothing to restart)")
    return FaultSpec(**values)


def _restart(value: str, item: str) -> Restart | None:
    if value == "never":
        return None
    if value.startswith("after:"):
        arg = value[len("after:"):]
        if arg.isdigit():
            if int(arg) < 1:
                raise FaultSpecError(f"faults: {item}: restart after at least 1 round")
            return Restart("rounds", float(arg))
        return Restart("seconds", _duration(arg, item))
    raise FaultSpecError(f"faults: {item}: expected restart=never, after:N (rounds) "
                         "or after:DURATION (e.g. after:5s)")


def _count(amount: float, n: int) -> int:
    if amount <= 0:
        return 0
    count = int(amount) if amount >= 1 else max(1, round(amount * n))
    return min(count, n)


@dataclass(frozen=True)
class CrashPlan:
    """Peer ``peer`` is cancelled ``delay`` seconds into round ``round``."""

    peer: int
    round: int
    delay: float  # seconds into the round
    restart: Restart | None

    def to_json(self) -> dict[str, Any]:
        return {"peer": self.peer, "round": self.round, "delay": self.delay,
                "restart": self.restart.to_json() if self.restart is not None else None}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CrashPlan:
        return cls(int(d["peer"]), int(d["round"]), float(d["delay"]),
                   Restart.from_json(d["restart"]) if d["restart"] is not None else None)


@dataclass(frozen=True)
class IntruderPlan:
    """Intruder ``index`` attacks the peers ``targets``, ``attempts`` times each."""

    index: int
    targets: tuple[int, ...]
    attempts: int

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "targets": list(self.targets), "attempts": self.attempts}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> IntruderPlan:
        return cls(int(d["index"]), tuple(int(t) for t in d["targets"]), int(d["attempts"]))


@dataclass(frozen=True)
class FaultPlan:
    """A spec resolved for a federation: which peers, rounds and sides, from the seed."""

    spec: FaultSpec = field(default_factory=FaultSpec)
    crashes: tuple[CrashPlan, ...] = ()
    byzantine: dict[int, str] = field(default_factory=dict)  # peer index -> byzantine mode
    partition_side: tuple[int, ...] = ()  # peer indices on one side of the partition
    intruders: tuple[IntruderPlan, ...] = ()

    @property
    def drop(self) -> float:
        return self.spec.drop

    @property
    def delay(self) -> tuple[float, float] | None:
        return self.spec.delay

    @property
    def partition(self) -> tuple[int, int] | None:
        return self.spec.partition

    def crash_of(self, peer: int) -> CrashPlan | None:
        return next((c for c in self.crashes if c.peer == peer), None)

    @property
    def never_restarted(self) -> set[int]:
        return {c.peer for c in self.crashes if c.restart is None}

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_json(),
            "crashes": [c.to_json() for c in self.crashes],
            "byzantine": {str(k): v for k, v in sorted(self.byzantine.items())},
            "partition_side": list(self.partition_side),
            "intruders": [i.to_json() for i in self.intruders],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FaultPlan:
        return cls(
            spec=FaultSpec.from_json(d["spec"]),
            crashes=tuple(CrashPlan.from_json(c) for c in d["crashes"]),
            byzantine={int(k): str(v) for k, v in d["byzantine"].items()},
            partition_side=tuple(int(i) for i in d["partition_side"]),
            intruders=tuple(IntruderPlan.from_json(i) for i in d["intruders"]),
        )


def plan_faults(spec: FaultSpec, n: int, rounds: int, seed: int) -> FaultPlan:
    """Resolve ``spec`` for ``n`` peers and ``rounds`` rounds, reproducibly from ``seed``.

    Raises:
        FaultSpecError: if a round named in the spec does not exist.
    """
    rng = random.Random(f"silomesh-simnet-faults/{seed}/{n}/{rounds}/{spec.to_text()}")
    if spec.crash_round is not None and spec.crash_round >= rounds:
        raise FaultSpecError(f"faults: crash=...@{spec.crash_round}: rounds are 0..{rounds - 1}")
    if spec.partition is not None and spec.partition[0] >= rounds:
        raise FaultSpecError(f"faults: partition={spec.partition[0]}-{spec.partition[1]}: "
                             f"rounds are 0..{rounds - 1}")
    crashed = sorted(rng.sample(range(n), _count(spec.crash, n)))
    crashes = []
    for p in crashed:
        if spec.crash_round is not None:
            r = spec.crash_round
        else:
            r = rng.randint(1, max(1, rounds - 2)) if rounds >= 2 else 0
        crashes.append(CrashPlan(p, r, round(rng.uniform(0.2, 1.0), 3), spec.restart))
    pool = [i for i in range(n) if i not in crashed] or list(range(n))
    byz = sorted(rng.sample(pool, min(_count(spec.byzantine, n), len(pool))))
    intruders = tuple(
        IntruderPlan(k, tuple(sorted(rng.sample(range(n), min(INTRUDER_TARGETS, n)))), INTRUDER_ATTEMPTS)
        for k in range(spec.intruders)
    )
    return FaultPlan(
        spec=spec,
        crashes=tuple(crashes),
        byzantine=dict.fromkeys(byz, spec.byzantine_mode),
        partition_side=tuple(range(n // 2)) if spec.partition is not None else (),
        intruders=intruders,
    )
