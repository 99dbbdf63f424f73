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
This module is pure Python (no trio/torch) so the CLI can validate specs quickly.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any

KNOWN = ("crash", "restart", "drop", "delay", "partition", "byzantine", "intruder")
BYZANTINE_MODES = ("noise", "scale", "nan")
#: intruder connection attempts per target peer, and target peers per intruder
INTRUDER_ATTEMPTS = 2
INTRUDER_TARGETS = 2

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s)$")


class FaultSpecError(ValueError):
    """A ``--faults`` spec does not follow the grammar; the message names the item."""


@dataclass(frozen=True)
class FaultSpec:
    """A parsed ``--faults`` spec (amounts not yet resolved against a peer count)."""

    crash: float = 0.0
    crash_round: int | None = None
    restart: tuple[str, float] | None = None  # ("rounds", N) or ("seconds", S); None: never
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
        """The canonical spec string (parses back to an equal spec)."""
        items = []
        if self.crash:
            items.append(f"crash={_amount_text(self.crash)}"
                         + (f"@{self.crash_round}" if self.crash_round is not None else ""))
        if self.restart is not None:
            kind, value = self.restart
            items.append(f"restart=after:{int(value)}" if kind == "rounds" else f"restart=after:{value:g}s")
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
    values: dict[str, Any] = {}
    seen: set[str] = set()
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            raise FaultSpecError(f"faults: empty item in {spec!r}")
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not value:
            raise FaultSpecError(f"faults: {item!r}: expected NAME=VALUE (names: {', '.join(KNOWN)})")
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
            if value == "never":
                values["restart"] = None
            elif value.startswith("after:"):
                arg = value[len("after:"):]
                if arg.isdigit():
                    if int(arg) < 1:
                        raise FaultSpecError(f"faults: {item}: restart after at least 1 round")
                    values["restart"] = ("rounds", float(arg))
                else:
                    values["restart"] = ("seconds", _duration(arg, item))
            else:
                raise FaultSpecError(f"faults: {item}: expected restart=never, after:N (rounds) "
                                     "or after:DURATION (e.g. after:5s)")
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
    if "restart" in values and values["restart"] is not None and "crash" not in values:
        raise FaultSpecError("faults: restart=... needs crash=... (nothing to restart)")
    return FaultSpec(**values)


def _count(amount: float, n: int) -> int:
    if amount <= 0:
        return 0
    count = int(amount) if amount >= 1 else max(1, round(amount * n))
    return min(count, n)


@dataclass(frozen=True)
class CrashPlan:
    peer: int
    round: int
    delay: float  # seconds into the round
    restart: tuple[str, float] | None


@dataclass(frozen=True)
class IntruderPlan:
    index: int
    targets: tuple[int, ...]
    attempts: int


@dataclass(frozen=True)
class FaultPlan:
    """A spec resolved for a federation: which peers, rounds and sides, from the seed."""

    spec: str
    crashes: tuple[CrashPlan, ...] = ()
    byzantine: dict[int, str] = field(default_factory=dict)
    drop: float = 0.0
    delay: tuple[float, float] | None = None
    partition: tuple[int, int] | None = None
    partition_side: tuple[int, ...] = ()
    intruders: tuple[IntruderPlan, ...] = ()

    def crash_of(self, peer: int) -> CrashPlan | None:
        return next((c for c in self.crashes if c.peer == peer), None)

    @property
    def never_restarted(self) -> set[int]:
        return {c.peer for c in self.crashes if c.restart is None}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["byzantine"] = {str(k): v for k, v in self.byzantine.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FaultPlan:
        return cls(
            spec=d["spec"],
            crashes=tuple(CrashPlan(c["peer"], c["round"], c["delay"],
                                    tuple(c["restart"]) if c["restart"] else None)
                          for c in d["crashes"]),
            byzantine={int(k): v for k, v in d["byzantine"].items()},
            drop=d["drop"],
            delay=tuple(d["delay"]) if d["delay"] else None,
            partition=tuple(d["partition"]) if d["partition"] else None,
            partition_side=tuple(d["partition_side"]),
            intruders=tuple(IntruderPlan(i["index"], tuple(i["targets"]), i["attempts"]) for i in d["intruders"]),
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
        spec=spec.to_text(),
        crashes=tuple(crashes),
        byzantine={i: spec.byzantine_mode for i in byz},
        drop=spec.drop,
        delay=spec.delay,
        partition=spec.partition,
        partition_side=tuple(range(n // 2)) if spec.partition is not None else (),
        intruders=intruders,
    )
