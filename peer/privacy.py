"""The peer's privacy budget: its settings, its audit entries, and what status shows.

The peer's :class:`~silomesh.models.privacy.DPTrainer` (held by the learner) counts every
DP-SGD step on this silo's data. At the end of each round that spent anything, the round
loop calls :func:`record_round`: one signed ``local`` audit entry with the round's steps,
noise, sampling rate and ε (round and cumulative) that ``silomesh audit privacy``
recomputes (:mod:`silomesh.audit.privacy`). On restart, :func:`spent_history` rebuilds
the accountant from those entries, so a restart never resets the budget.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import Any

from silomesh.audit.privacy import PRIVACY_KIND, SpendingRecord
from silomesh.models.privacy import DPSettings, DPTrainer
from silomesh.peer.audit import AuditLog
from silomesh.peer.config import PrivacyConfig

log = logging.getLogger(__name__)

#: the phase a peer ends in when its budget cannot pay for another round
PHASE_EXHAUSTED = "budget-exhausted"


def dp_settings(config: PrivacyConfig) -> DPSettings | None:
    """The trainer's settings from ``[privacy]`` (None when the section is absent)."""
    if not config.enabled:
        return None
    return DPSettings(
        target_epsilon=config.target_epsilon,
        delta=config.delta,
        max_grad_norm=config.max_grad_norm,
        noise_multiplier=config.noise_multiplier,
        planned_steps=config.planned_steps,
    )


def spent_history(entries: Iterable[Mapping[str, Any]]) -> list[tuple[float, float, int]]:
    """``(noise_multiplier, sample_rate, steps)`` of every logged round, in log order."""
    out = []
    for e in entries:
        if e.get("kind") == PRIVACY_KIND and e.get("direction") == "local":
            rec = SpendingRecord.from_reason(str(e.get("reason", "")))
            out.append((rec.noise_multiplier, rec.sample_rate, rec.steps))
    return out


def record_round(audit_log: AuditLog, dp: DPTrainer | None, round: int) -> SpendingRecord | None:
    """Close the round's accounting period; audit what it spent (nothing when no step ran)."""
    if dp is None or dp.period_steps == 0:
        return None
    # the trainer (layer models) cannot import the audit's record type: same fields, by name
    rec = SpendingRecord(**asdict(dp.close_period()))
    audit_log.append("local", "", PRIVACY_KIND, round=round, reason=rec.to_reason())
    log.info("round %d spent eps %.4f (total %.4f of %.4g)", round, rec.epsilon_round, rec.epsilon_total,
             rec.target_epsilon)
    return rec


def can_afford(dp: DPTrainer | None, steps: int) -> bool:
    """True unless DP-SGD is on and ``steps`` more steps would pass the target, or a
    training was already refused for the budget (FedEFM's distillation, a served request)."""
    return dp is None or (not dp.exhausted and dp.can_train(steps))


def budget_status(dp: DPTrainer | None, exhausted: bool = False) -> dict[str, Any] | None:
    """What ``peer status``, the dashboard and simnet show of the budget (None: no DP).

    ``exhausted``: the round loop stopped for the budget; the status then says why.
    """
    if dp is None:
        return None
    return {
        "exhausted": exhausted,
        "reason": (f"privacy budget spent: eps {dp.epsilon:.3f} of {dp.settings.target_epsilon:g}; another round "
                   "would pass the target, so this peer takes no further part") if exhausted else None,
        "epsilon_spent": round(dp.epsilon, 4),
        "epsilon_target": dp.settings.target_epsilon,
        "epsilon_remaining": round(dp.remaining, 4),
        "delta": dp.settings.delta,
        "noise_multiplier": round(dp.noise_multiplier, 4),
        "max_grad_norm": dp.settings.max_grad_norm,
        "sample_rate": round(dp.sample_rate, 5),
        "steps": sum(n for _, _, n in dp.accountant.history),
    }
