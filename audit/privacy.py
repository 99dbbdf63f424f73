"""Recompute a peer's differential-privacy spending from its audit log, without trusting it.

A peer that trains with DP-SGD appends, after each round that touched its data, one
``local`` entry of kind :data:`PRIVACY_KIND` whose ``reason`` is the canonical JSON of
:class:`SpendingRecord`: the round's steps, noise multiplier and sampling rate, and the
ε it claims for the round and in total. The entry is signed and hash-chained like every
other, so the peer cannot rewrite it later; :func:`check_spending` recomputes every
cumulative ε from the logged ``(noise_multiplier, sample_rate, steps)`` triples with the
same RDP analysis the peer's accountant uses (Opacus's ``accountants/analysis/rdp.py``,
loaded by file so that no torch is imported), and checks that it never passes the target.

What this proves: the logged steps add up to the logged ε, and that ε stays within the
budget. What it cannot prove: that the peer logged every step it took, or that it added
the noise it claims (docs/PRIVACY.md, "The auditor").
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

from silomesh.audit.entries import AuditError

#: audit entry kind of a round's privacy spending (direction ``local``)
PRIVACY_KIND = "privacy-spent"
#: the RDP orders Opacus's ``RDPAccountant`` uses by default (opacus/accountants/rdp.py)
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
#: recomputed and logged ε may differ by this much (relative) from float formatting
TOLERANCE = 1e-6


@dataclass(frozen=True)
class SpendingRecord:
    """One round's privacy spending as the peer logs it (the entry's ``reason``)."""

    steps: int
    noise_multiplier: float
    sample_rate: float
    epsilon_round: float
    epsilon_total: float
    delta: float
    target_epsilon: float

    def to_reason(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_reason(cls, text: str) -> SpendingRecord:
        """Parse an entry's ``reason``.

        Raises:
            ValueError: if it is not a spending record.
        """
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(raw, dict) or set(raw) != set(cls.__dataclass_fields__):
            raise ValueError(f"expected the fields {sorted(cls.__dataclass_fields__)}")
        try:
            rec = cls(int(raw["steps"]), *(float(raw[k]) for k in (
                "noise_multiplier", "sample_rate", "epsilon_round", "epsilon_total", "delta", "target_epsilon")))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad field: {exc}") from None
        if rec.steps < 0 or not rec.noise_multiplier > 0 or not 0 < rec.sample_rate <= 1 or not 0 < rec.delta < 1:
            raise ValueError("steps, noise_multiplier, sample_rate or delta out of range")
        if not all(math.isfinite(v) and v >= 0 for v in (rec.epsilon_round, rec.epsilon_total, rec.target_epsilon)) \
                or not rec.target_epsilon > 0:
            # an infinite target would make every spending pass; JSON parsing accepts Infinity and NaN
            raise ValueError("target_epsilon, epsilon_round and epsilon_total must be finite (target > 0)")
        return rec


@lru_cache(maxsize=1)
def _rdp_analysis() -> ModuleType:
    """Opacus's RDP analysis module, loaded from its file (it needs numpy and scipy only)."""
    spec = importlib.util.find_spec("opacus")
    if spec is None or spec.origin is None:
        raise AuditError("checking privacy spending needs the opacus package installed")
    path = Path(spec.origin).parent / "accountants" / "analysis" / "rdp.py"
    mod_spec = importlib.util.spec_from_file_location("silomesh_audit_opacus_rdp", path)
    if mod_spec is None or mod_spec.loader is None:
        raise AuditError(f"cannot load {path}")
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """ε at ``delta`` of the composed ``(noise_multiplier, sample_rate, steps)`` triples (0 if none)."""
    history = [h for h in history if h[2] > 0]
    if not history:
        return 0.0
    rdp = _rdp_analysis()
    total = sum(rdp.compute_rdp(q=q, noise_multiplier=s, steps=n, orders=RDP_ORDERS) for s, q, n in history)
    eps, _ = rdp.get_privacy_spent(orders=RDP_ORDERS, rdp=total, delta=delta)
    return float(eps)


@dataclass
class PrivacyReport:
    """What :func:`check_spending` found."""

    rounds: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    epsilon_total: float = 0.0
    target_epsilon: float | None = None
    delta: float | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "epsilon_total": self.epsilon_total, "target_epsilon": self.target_epsilon,
                "delta": self.delta, "rounds": self.rounds, "problems": self.problems}


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=1e-9)


def check_spending(entries: Iterable[Mapping[str, Any]]) -> PrivacyReport:
    """Recompute each logged round's ε and the cumulative ε; report every disagreement.

    Checks, per :data:`PRIVACY_KIND` entry in log order: the record parses; δ and the
    target do not change; the recomputed round ε and cumulative ε equal the logged ones;
    the cumulative ε never exceeds the target.
    """
    report = PrivacyReport()
    history: list[tuple[float, float, int]] = []
    for e in entries:
        if e.get("kind") != PRIVACY_KIND:
            continue
        seq = e.get("seq")
        if e.get("direction") != "local":
            report.problems.append(f"entry {seq}: a privacy entry must be local, not {e.get('direction')!r}")
            continue
        try:
            rec = SpendingRecord.from_reason(str(e.get("reason", "")))
        except ValueError as exc:
            report.problems.append(f"entry {seq}: unreadable spending record: {exc}")
            continue
        if report.delta is None:
            report.delta, report.target_epsilon = rec.delta, rec.target_epsilon
        elif rec.delta != report.delta or rec.target_epsilon != report.target_epsilon:
            report.problems.append(
                f"entry {seq}: delta/target changed from {report.delta:g}/{report.target_epsilon:g} "
                f"to {rec.delta:g}/{rec.target_epsilon:g} (a new budget needs a new study)")
        step = (rec.noise_multiplier, rec.sample_rate, rec.steps)
        history.append(step)
        eps_round = epsilon([step], rec.delta)
        eps_total = epsilon(history, rec.delta)
        row = {"seq": seq, "round": e.get("round"), "steps": rec.steps, "noise_multiplier": rec.noise_multiplier,
               "sample_rate": rec.sample_rate, "epsilon_round": eps_round, "epsilon_total": eps_total,
               "logged_epsilon_total": rec.epsilon_total}
        report.rounds.append(row)
        if not _close(eps_round, rec.epsilon_round):
            report.problems.append(f"entry {seq}: round epsilon logged {rec.epsilon_round:.6g}, "
                                   f"recomputed {eps_round:.6g}")
        if not _close(eps_total, rec.epsilon_total):
            report.problems.append(f"entry {seq}: cumulative epsilon logged {rec.epsilon_total:.6g}, "
                                   f"recomputed {eps_total:.6g}")
        if eps_total > rec.target_epsilon * (1 + TOLERANCE):
            report.problems.append(f"entry {seq}: cumulative epsilon {eps_total:.4g} exceeds the target "
                                   f"{rec.target_epsilon:g}")
        report.epsilon_total = eps_total
    return report
