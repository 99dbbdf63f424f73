"""Turn a finished run into ``report.json``, ``metrics.sqlite``, plots and ``report.md``.

Everything reported about rounds, metrics, bytes and refusals is read back from the
peers' own stores and audit logs (:mod:`silomesh.simnet.stores`); the shares add what
they injected (faults, intruders) and their resource use. ``report.json`` follows
``report_schema.json`` (a JSON Schema document); :func:`validate_report` checks it
without third-party packages.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from silomesh.audit.privacy import check_spending
from silomesh.simnet.intruder import intruder_identity
from silomesh.simnet.plan import Plan
from silomesh.simnet.results import ShareResult, SlotResult
from silomesh.simnet.stores import PeerRecord, read_store

log = logging.getLogger(__name__)

SCHEMA_NAME = "silomesh.simnet.report/1"


# -- schema ------------------------------------------------------------------------------


def report_schema() -> dict[str, Any]:
    """The JSON Schema of ``report.json`` (``simnet/report_schema.json``)."""
    text = resources.files("silomesh.simnet").joinpath("report_schema.json").read_text(encoding="utf-8")
    return dict(json.loads(text))


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,),
    "integer": (int,), "number": (int, float), "null": (type(None),),
}


def _type_ok(value: object, name: str) -> bool:
    if name in ("integer", "number") and isinstance(value, bool):
        return False
    if name == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _JSON_TYPES[name])


def validate(instance: object, schema: dict[str, Any], path: str = "$") -> list[str]:
    """Check ``instance`` against a JSON Schema subset; returns problems (empty: valid).

    Supported keywords: ``type`` (a name or a list), ``enum``, ``required``,
    ``properties``, ``additionalProperties`` (schema or false), ``items``, ``minimum``,
    ``maximum`` — what ``report_schema.json`` uses.
    """
    problems: list[str] = []
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_type_ok(instance, t) for t in names):
            return [f"{path}: expected {' or '.join(names)}, got {type(instance).__name__}"]
    if "enum" in schema and instance not in schema["enum"]:
        problems.append(f"{path}: {instance!r} is not one of {schema['enum']}")
    if isinstance(instance, int | float) and not isinstance(instance, bool):
        if "minimum" in schema and instance < schema["minimum"]:
            problems.append(f"{path}: {instance} is below the minimum {schema['minimum']}")
        if "maximum" in schema and instance > schema["maximum"]:
            problems.append(f"{path}: {instance} is above the maximum {schema['maximum']}")
        if isinstance(instance, float) and not math.isfinite(instance):
            problems.append(f"{path}: {instance} is not a finite number")
    if isinstance(instance, dict):
        for key in schema.get("required", []):
            if key not in instance:
                problems.append(f"{path}: required field {key!r} is missing")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, value in instance.items():
            if key in props:
                problems.extend(validate(value, props[key], f"{path}.{key}"))
            elif extra is False:
                problems.append(f"{path}: unexpected field {key!r}")
            elif isinstance(extra, dict):
                problems.extend(validate(value, extra, f"{path}.{key}"))
    if isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(instance):
            problems.extend(validate(item, schema["items"], f"{path}[{i}]"))
    return problems


def validate_report(report: dict[str, Any]) -> list[str]:
    """Problems of ``report`` against ``report_schema.json`` (empty list: valid)."""
    return validate(report, report_schema())


# -- building ----------------------------------------------------------------------------


def _category(reason: str) -> str:
    """A short category of a skip/refusal reason: the text before the first colon."""
    return (reason or "unknown").split(":", 1)[0].strip() or "unknown"


def _finite(x: object) -> float | None:
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


def build_report(plan: Plan, shares: list[ShareResult], local: dict[str, Any] | None, *,
                 wall_seconds: float, setup_seconds: float = 0.0) -> dict[str, Any]:
    """Assemble ``report.json`` from the stores, the shares' results and local-only training."""
    from silomesh.models.registry import get_task

    sc = plan.scenario
    metric = get_task(sc.task).metric
    n, rounds = plan.n, plan.rounds
    records: list[PeerRecord] = [read_store(p.store_path) for p in plan.peers]
    names = [p.name for p in plan.peers]
    slots: dict[int, SlotResult] = {}
    injected: Counter[str] = Counter()
    intruders: list[dict[str, Any]] = []
    released = [s.barrier_released_at for s in shares if s.barrier_released_at]
    t_start = max(released) if released else 0.0
    for s in shares:
        slots.update(s.slots)
        injected.update(s.counters)
        intruders.extend(s.intruders)

    history = []
    for r in range(rounds):
        per_peer: dict[str, float] = {}
        seconds: list[float] = []
        nbytes = 0
        completed = used = skipped = 0
        for name, rec in zip(names, records, strict=True):
            row = next((x for x in rec.rounds if x["round"] == r and x["status"] == "done"), None)
            if row is None:
                continue
            completed += 1
            nbytes += int(row["bytes_sent"] or 0)
            used += len(row["contributors"])
            skipped += len(row["skipped"])
            if row["finished_at"] and row["started_at"]:
                seconds.append(row["finished_at"] - max(row["started_at"], t_start))
            value = _finite(rec.metrics.get(r, {}).get(metric))
            if value is not None:
                per_peer[name] = value
        history.append({
            "round": r,
            "metric_mean": sum(per_peer.values()) / len(per_peer) if per_peer else None,
            "metric_per_peer": per_peer,
            "bytes": nbytes,
            "seconds": sum(seconds) / len(seconds) if seconds else None,
            "seconds_max": max(seconds) if seconds else None,
            "completed": completed,
            "neighbours_used": used,
            "neighbours_skipped": skipped,
        })

    done_counts = [sum(1 for x in rec.rounds if x["status"] == "done") for rec in records]
    final_per_peer: dict[str, float] = {}
    for name, rec in zip(names, records, strict=True):
        done = [x["round"] for x in rec.rounds if x["status"] == "done"]
        if done:
            value = _finite(rec.metrics.get(max(done), {}).get(metric))
            if value is not None:
                final_per_peer[name] = value
    final: dict[str, Any] = {
        "federated_mean": sum(final_per_peer.values()) / len(final_per_peer) if final_per_peer else None,
        "federated_per_peer": final_per_peer,
    }
    if sc.personal_steps > 0:  # each peer's newest personal model, on its own test set
        personal: dict[str, float] = {}
        for name, rec in zip(names, records, strict=True):
            tuned = [r for r, m in rec.metrics.items() if f"personal_{metric}" in m]
            value = _finite(rec.metrics[max(tuned)][f"personal_{metric}"]) if tuned else None
            if value is not None:
                personal[name] = value
        final.update(personal_mean=sum(personal.values()) / len(personal) if personal else None,
                     personal_per_peer=personal)
    if local is not None:
        final.update(local_only_mean=local["mean"], local_only_best=local["best"],
                     local_only_per_peer=local["per_peer"], local_only_history=local["history"],
                     local_only_steps=local["steps"])

    faults = _faults(plan, records, slots, injected, intruders, done_counts)
    bytes_total = sum(int(x["bytes_sent"] or 0) for rec in records for x in rec.rounds)
    byz = plan.faults.byzantine
    detail = []
    for p, rec, count in zip(plan.peers, records, done_counts, strict=True):
        slot = slots.get(p.index, SlotResult())
        crash = slot.crash
        detail.append({
            "name": p.name, "index": p.index, "peer_id": p.peer_id,
            "audit_log": str(p.store_path), "config": str(p.config_path),
            "neighbours": [names[j] for j in p.neighbours],
            "rounds_completed": count, "final_metric": final_per_peer.get(p.name),
            "bytes_sent": sum(int(x["bytes_sent"] or 0) for x in rec.rounds),
            "refused": sum(1 for a in rec.audit if a["direction"] == "refused"),
            "crashed": crash is not None, "restarted": bool(crash and crash.restarted_at),
            "byzantine": byz.get(p.index), "share": p.share,
            "mesh": dict(slot.mesh), "error": slot.error,
            "privacy": _privacy(rec.audit) if sc.privacy else None,
        })
    processes: list[dict[str, Any]] = [{"share": s.share, "pid": s.pid, "peers": len(s.peers), "rss_bytes": s.rss_bytes,
                  "peak_rss_bytes": s.peak_rss_bytes, "cpu_seconds": s.cpu_seconds,
                  "cpu_round_marks": {str(r): c for r, c in s.cpu_round_marks.items()},
                  "steady_cpu_seconds_per_round": (None if s.steady_cpu_per_round is None
                                                   else round(s.steady_cpu_per_round, 3))} for s in shares]
    per_share = [s.steady_cpu_per_round for s in shares]
    steady = None if not per_share or None in per_share else sum(x or 0.0 for x in per_share)
    rss_total = sum(x["rss_bytes"] for x in processes)
    peak_total = sum(x["peak_rss_bytes"] for x in processes)
    return {
        "schema": SCHEMA_NAME,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "out": str(plan.out),
        "peers": n, "rounds": rounds, "strategy": sc.strategy, "task": sc.task,
        "topology": sc.topology, "seed": sc.seed, "federation": plan.federation,
        "metric": metric,
        "round_success_rate": sum(min(c, rounds) for c in done_counts) / (n * rounds),
        "wall_seconds": round(wall_seconds, 3),
        "setup_seconds": round(setup_seconds, 3),
        "bytes_sent_total": bytes_total,
        "timed_out": any(s.timed_out for s in shares),
        "history": history,
        "final": final,
        "faults": faults,
        "peers_detail": detail,
        "graph": plan.topology.to_json(),
        "settings": sc.to_settings(),
        "resources": {"processes": processes, "rss_total_bytes": rss_total,
                      "rss_per_peer_bytes": rss_total // n, "peak_rss_total_bytes": peak_total,
                      "cpu_seconds": round(sum(x["cpu_seconds"] for x in processes), 3),
                      "steady_cpu_seconds_per_round": None if steady is None else round(steady, 3)},
        "files": {},
    }


def _faults(plan: Plan, records: list[PeerRecord], slots: dict[int, SlotResult],
            injected: Counter[str], intruders: list[dict[str, Any]], done_counts: list[int]) -> dict[str, Any]:
    """Injected counts (from the shares) beside what the peers' stores show."""
    seed = plan.scenario.seed
    rounds = plan.rounds
    id_of = {p.peer_id: p.index for p in plan.peers}
    intruder_ids = {intruder_identity(seed, ip.index).peer_id_text for ip in plan.faults.intruders}
    byz_ids = {plan.peers[i].peer_id for i in plan.faults.byzantine}
    refused_by: Counter[str] = Counter()
    skipped_by: Counter[str] = Counter()
    from_byz: Counter[str] = Counter()
    intruder_refused = intruder_accepted = refused_at_source = partition_skips = partition_undelivered = byz_used = 0
    side = set(plan.faults.partition_side)
    part = plan.faults.partition

    def across_the_cut(i: int, entry: dict[str, Any], round: int) -> bool:
        """Whether a skipped or undelivered ``entry`` of peer ``i``'s round names a peer across the partition."""
        j = id_of.get(entry.get("peer", ""))
        return part is not None and j is not None and part[0] <= round <= part[1] and (i in side) != (j in side)

    for i, rec in enumerate(records):
        for a in rec.audit:
            if a["direction"] == "refused":
                refused_by[_category(a["reason"])] += 1
                intruder_refused += a["peer"] in intruder_ids
            elif a["peer"] in intruder_ids:
                intruder_accepted += a["direction"] == "received"
        for row in rec.rounds:
            if plan.peers[i].peer_id in byz_ids:  # its own sealing refused its poisoned model
                refused_at_source += sum("NON_FINITE" in u.get("reason", "") for u in row["undelivered"])
            # a sender records each of its updates the cut dropped
            partition_undelivered += sum(across_the_cut(i, u, row["round"]) for u in row["undelivered"])
            intruder_accepted += sum(1 for c in row["contributors"] if c in intruder_ids)
            byz_used += sum(1 for c in row["contributors"] if c in byz_ids)
            for s in row["skipped"]:
                cat = _category(s.get("reason", ""))
                skipped_by[cat] += 1
                if s.get("peer") in byz_ids:
                    from_byz[cat] += 1
                partition_skips += across_the_cut(i, s, row["round"])
    events = [v.crash for _, v in sorted(slots.items()) if v.crash is not None]
    crashes = [{**c.to_json(), "name": plan.peers[c.peer].name} for c in events]
    crashed = {c.peer for c in events}
    live = [i for i in range(plan.n) if i not in crashed]
    mesh: Counter[str] = Counter()
    for v in slots.values():
        mesh.update(v.mesh)
    inj: dict[str, Any] = {k: int(v) for k, v in sorted(injected.items())}
    inj["crashes_planned"] = len(plan.faults.crashes)
    inj["byzantine_peers"] = [plan.peers[i].name for i in sorted(plan.faults.byzantine)]
    inj["intruders"] = len(plan.faults.intruders)
    for key in ("attempts", "connections", "stream_attempts", "streams", "frames", "answers"):
        inj[f"intruder_{key}"] = sum(int(x.get(key, 0)) for x in intruders)
    observed: dict[str, Any] = {
        "refused_total": sum(refused_by.values()),
        "refused_by_reason": dict(refused_by),
        "refused_from_intruders": intruder_refused,
        "intruder_messages_accepted": intruder_accepted,
        "mesh_refused_connections": mesh["refused_connections"],
        "mesh_refused_streams": mesh["refused_streams"],
        "handler_errors": mesh["handler_errors"],
        "skipped_neighbours": sum(skipped_by.values()),
        "skipped_by_reason": dict(skipped_by),
        "skipped_byzantine_by_reason": dict(from_byz),
        "byzantine_contributions_used": byz_used,
        "poisoned_refused_at_source": refused_at_source,
        "partition_skips": partition_skips,
        "partition_undelivered": partition_undelivered,
        "crashed_peers": len(events),
        "restarted_peers": sum(1 for c in events if c.restarted_at),
        "recovered_peers": sum(1 for c in events if c.restarted_at and done_counts[c.peer] >= rounds),
        "resumed_from_store": sum(1 for c in events if c.resumed_round is not None
                                  and c.resumed_round == c.committed_before),
        "round_success_rate_excluding_crashed":
            (sum(min(done_counts[i], rounds) for i in live) / (len(live) * rounds)) if live else None,
        "peer_errors": sum(1 for v in slots.values() if v.error),
    }
    return {"spec": plan.faults.spec.to_text(), "injected": inj, "observed": observed, "crashes": crashes,
            "intruders": intruders}


# -- writing -----------------------------------------------------------------------------


def write_metrics_db(plan: Plan, report: dict[str, Any], path: Path) -> None:
    """``metrics.sqlite``: one row per peer-round, all metrics, local-only results."""
    import sqlite_utils

    path.unlink(missing_ok=True)
    db = sqlite_utils.Database(path)
    rows: list[dict[str, Any]] = []
    metric_rows: list[dict[str, Any]] = []
    metric = report["metric"]
    for p in plan.peers:
        rec = read_store(p.store_path)
        for r in rec.rounds:
            seconds = (r["finished_at"] - r["started_at"]) if r["finished_at"] and r["started_at"] else None
            rows.append({"peer": p.name, "peer_id": p.peer_id, "round": r["round"], "status": r["status"],
                         "started_at": r["started_at"], "finished_at": r["finished_at"], "seconds": seconds,
                         "bytes_sent": r["bytes_sent"], "contributors": len(r["contributors"]),
                         "skipped": len(r["skipped"]), "undelivered": len(r["undelivered"]),
                         "metric": rec.metrics.get(r["round"], {}).get(metric)})
        for rnd, values in rec.metrics.items():
            metric_rows.extend({"peer": p.name, "round": rnd, "name": k, "value": v} for k, v in values.items())
    db.table("peer_rounds").insert_all(rows, pk=("peer", "round"), columns={"metric": float, "seconds": float})
    db.table("metrics").insert_all(metric_rows, pk=("peer", "round", "name"))
    local = report["final"].get("local_only_history")
    if local:
        db.table("local_only").insert_all(({"peer": name, "round": h["round"], "metric": v}
                                     for h in local for name, v in h["per_peer"].items()),
                                    pk=("peer", "round"))
    db.table("run").insert({k: report[k] for k in ("peers", "rounds", "strategy", "task", "topology", "seed",
                                             "metric", "round_success_rate", "wall_seconds",
                                             "bytes_sent_total")})
    db.close()


def write_outputs(plan: Plan, report: dict[str, Any]) -> None:
    """Write ``report.json``, ``metrics.sqlite``, the PNG plots and ``report.md``."""
    from silomesh.simnet.markdown import render_markdown
    from silomesh.simnet.plots import write_plots

    out = plan.out
    write_metrics_db(plan, report, out / "metrics.sqlite")
    plots = write_plots(plan, report, out)
    report["files"] = {"report": "report.json", "metrics": "metrics.sqlite", "markdown": "report.md",
                       "plots": [p.name for p in plots], "plan": "plan.json"}
    problems = validate_report(report)
    if problems:  # our own bug: say so loudly, but keep the data
        log.error("report.json does not match its schema: %s", "; ".join(problems[:5]))
    (out / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    (out / "report.md").write_text(render_markdown(report), encoding="utf-8")


def _privacy(audit: list[dict[str, Any]]) -> dict[str, Any]:
    """A peer's DP spending as its audit log has it, recomputed (``silomesh audit privacy``)."""
    report = check_spending(audit)
    target = report.target_epsilon
    return {
        "epsilon_spent": report.epsilon_total,
        "epsilon_target": target,
        "epsilon_remaining": None if target is None else max(0.0, target - report.epsilon_total),
        "delta": report.delta,
        "rounds_logged": len(report.rounds),
        "audit_ok": report.ok,
    }
