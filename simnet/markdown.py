"""``report.md``: the run summarised for a person (settings, results, faults, peers)."""

from __future__ import annotations

from typing import Any


def _f(x: object, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _mb(x: int) -> str:
    return f"{x / 1e6:.2f} MB"


def render_markdown(report: dict[str, Any]) -> str:
    """A short Markdown summary of ``report`` (the dict written to report.json)."""
    m = report["metric"]
    final = report["final"]
    s = report["settings"]
    lines = [
        f"# simnet: {report['strategy']} on {report['task']}, {report['peers']} peers",
        "",
        f"{report['peers']} real peers ({report['topology']} topology, seed {report['seed']}) ran "
        f"{report['rounds']} rounds of {report['strategy']} on the synthetic `{report['task']}` task in "
        f"{report['wall_seconds']:.1f} s. Each peer has its own key, trust list, store and audit "
        f"log under `peers/<name>/` and talked to its neighbours over libp2p on 127.0.0.1.",
        "",
        "## Results",
        "",
        "| | value |",
        "|---|---|",
        f"| round success rate (committed peer-rounds) | {report['round_success_rate']:.3f} |",
        f"| federated {m}, mean over peers | {_f(final['federated_mean'])} |",
    ]
    if "personal_mean" in final:
        lines.append(f"| personal {m} (shared model fine-tuned on each silo), mean over peers | "
                     f"{_f(final['personal_mean'])} |")
    if "local_only_mean" in final:
        lines += [
            f"| local-only {m}, mean over silos ({final.get('local_only_steps')} steps each) | "
            f"{_f(final['local_only_mean'])} |",
            f"| local-only {m}, best silo | {_f(final['local_only_best'])} |",
        ]
    lines += [
        f"| bytes sent, all peers | {_mb(report['bytes_sent_total'])} |",
        f"| wall time | {report['wall_seconds']:.1f} s |",
        f"| memory (RSS per peer) | {report['resources']['rss_per_peer_bytes'] / 2**20:.1f} MiB |",
        "",
        f"Settings: local_steps {s['local_steps']}, batch_size {s['batch_size']}, lr {s['lr']}, "
        f"deadline {s['deadline']} s, model size `{s['size']}`, task options `{s['task_options']}`, "
        f"processes {s['procs']}" + (", keep_unlabelled" if s.get("keep_unlabelled") else "") + ".",
        "",
        "## Rounds",
        "",
        f"| round | peers done | mean {m} | neighbours used / skipped | MB sent | mean s | max s |",
        "|---|---|---|---|---|---|---|",
    ]
    for h in report["history"]:
        neighbours = (f"{h['neighbours_used']} / {h['neighbours_skipped']}" if "neighbours_used" in h else "")
        lines.append(f"| {h['round']} | {h['completed']}/{report['peers']} | {_f(h['metric_mean'])} | {neighbours} | "
                     f"{h['bytes'] / 1e6:.2f} | {_f(h['seconds'], 2)} | {_f(h['seconds_max'], 2)} |")
    alone = isolated_rounds(report)
    if alone:
        lines += ["", f"**No peer used a neighbour's model in round(s) {', '.join(map(str, alone))}**: every "
                  f"neighbour was skipped and each peer kept its own model. Is the round deadline "
                  f"({s['deadline']} s) long enough for this run?"]
    plots = report.get("files", {}).get("plots", [])
    if plots:
        lines += ["", *[f"![{p}]({p})" for p in plots]]
    faults = report["faults"]
    lines += ["", "## Faults", "", f"Spec: `{faults['spec']}`", ""]
    if faults["spec"] != "none" or faults["observed"]["refused_total"]:
        lines += ["| injected | count |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in faults["injected"].items() if v not in (0, [], None)]
        lines += ["", "| observed (peers' stores and audit logs) | count |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in faults["observed"].items() if v not in (0, {}, None)]
        for c in faults.get("crashes", []):
            lines.append("")
            lines.append(f"- {c['name']} crashed in {c['phase']} with {c['committed_before']} rounds "
                         f"committed; " + (f"restarted, resumed at round {c['resumed_round']}, "
                                          f"{c['committed_after']} rounds committed in the end."
                                          if c.get("restarted_at") else "not restarted."))
    lines += ["", "## Peers", "", f"| peer | PeerID | neighbours | rounds | final {m} | sent | audit log |",
              "|---|---|---|---|---|---|---|"]
    for d in report["peers_detail"]:
        flags = (" (crashed)" if d.get("crashed") else "") + (f" (byzantine: {d['byzantine']})"
                                                             if d.get("byzantine") else "")
        lines.append(f"| {d['name']}{flags} | `{d['peer_id'][:12]}…` | {', '.join(d['neighbours'])} | "
                     f"{d['rounds_completed']} | {_f(d['final_metric'])} | {_mb(d.get('bytes_sent', 0))} | "
                     f"`{d['audit_log']}` |")
    lines += ["", "Verify any peer's exchange log with `silomesh audit verify <audit_log>`.", ""]
    spent = [d for d in report["peers_detail"] if d.get("privacy")]
    if spent:
        lines += ["## Privacy budget (DP-SGD)", "",
                  "| peer | epsilon spent | target | remaining | delta | rounds logged | audit |",
                  "|---|---|---|---|---|---|---|"]
        for d in spent:
            p = d["privacy"]
            lines.append(f"| {d['name']} | {_f(p['epsilon_spent'])} | {_f(p['epsilon_target'])} | "
                         f"{_f(p['epsilon_remaining'])} | {p['delta']} | {p['rounds_logged']} | "
                         f"{'ok' if p['audit_ok'] else 'FAILED'} |")
        lines += ["", "Recompute any peer's spending with `silomesh audit privacy <audit_log>`.", ""]
    return "\n".join(lines)


def isolated_rounds(report: dict[str, Any]) -> list[int]:
    """Rounds that peers committed without any neighbour's model: every neighbour was skipped."""
    return [h["round"] for h in report["history"]
            if h.get("completed") and h.get("neighbours_used") == 0 and h.get("neighbours_skipped")]
