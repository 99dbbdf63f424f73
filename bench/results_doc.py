"""Fill docs/RESULTS.md's generated blocks from experiment results (no hand-edited numbers).

A block in the doc looks like::

    <!-- results: NAME [columns=a,b,c] [digits=3] [persilo=1] -->
    ... (replaced) ...
    <!-- /results -->

and is replaced by the regenerating command, seeds, the table (mean ± std over seeds,
rendered by ``silomesh.simnet.experiment.render_table``) and the experiment's wall time,
read from ``RUNS/NAME/results.json``. ``persilo=1`` adds the per-silo gains table of a
``per_silo`` experiment. ``include=PATH`` pastes a Markdown file a probe wrote instead (its
first heading dropped), e.g.
``<!-- results: training_catheter include=bench/results/training/catheter-4/probe_training.md -->``.
``--only PREFIX`` regenerates only the blocks whose NAME starts
with PREFIX (and not the wall-time table), so one experiment can be rerun on its own.

Usage::

    python bench/results_doc.py [--runs runs/results] [--doc docs/RESULTS.md] [--only PREFIX]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from silomesh.simnet.experiment import per_silo_table, render_table

BLOCK = re.compile(r"<!-- results: (?P<args>[^>]*?) -->\n.*?<!-- /results -->", re.S)


ROOT = Path(__file__).resolve().parents[1]


def _not_run(args: str, source: object) -> str:
    return f"<!-- results: {args} -->\n_(not run yet: {source})_\n<!-- /results -->"


def render_block(runs: Path, args: str) -> str:
    parts = args.split()
    name, opts = parts[0], dict(p.split("=", 1) for p in parts[1:])
    if "include" in opts:
        source = ROOT / opts["include"]
        if not source.exists():
            return _not_run(args, opts["include"])
        body = [line for line in source.read_text(encoding="utf-8").splitlines() if not line.startswith("# ")]
        return "\n".join([f"<!-- results: {args} -->", *body, "<!-- /results -->"])
    path = runs / name / "results.json"
    if not path.exists():
        return _not_run(args, path)
    results = json.loads(path.read_text(encoding="utf-8"))
    columns = opts["columns"].split(",") if "columns" in opts else None
    table = render_table(results, columns, int(opts.get("digits", 3)))
    lines = [f"<!-- results: {args} -->", "```", results["command"], "```", "",
             f"Seeds {', '.join(str(s) for s in results['seeds'])} (n per row); mean ± sample std over seeds; "
             f"whole experiment {results['wall_seconds']:.0f} s wall on the 2-core machine.", "", table]
    if opts.get("persilo") == "1":
        lines += ["", *per_silo_table(results)]
    lines += ["<!-- /results -->"]
    return "\n".join(lines)


WALL = re.compile(r"<!-- walltime -->\n.*?<!-- /walltime -->", re.S)


def render_walltime(runs: Path) -> str:
    """A table of each experiment's runs and total wall time."""
    lines = ["<!-- walltime -->", "| experiment | arms x seeds | wall s | mean s per run |", "|---|---|---|---|"]
    total = 0.0
    for path in sorted(runs.glob("*/results.json")):
        r = json.loads(path.read_text(encoding="utf-8"))
        n = len(r["arms"]) * len(r["seeds"])
        total += r["wall_seconds"]
        lines.append(f"| {r['name']} | {len(r['arms'])} x {len(r['seeds'])} | {r['wall_seconds']:.0f} | "
                     f"{r['wall_seconds'] / max(1, n):.0f} |")
    lines += [f"| total | | {total:.0f} | |", "<!-- /walltime -->"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=Path("runs/results"))
    ap.add_argument("--doc", type=Path, default=Path("docs/RESULTS.md"))
    ap.add_argument("--only", help="regenerate only the blocks whose experiment name starts with this")
    a = ap.parse_args()
    text = a.doc.read_text(encoding="utf-8")

    def block(m: re.Match[str]) -> str:
        if a.only and not m.group("args").startswith(a.only):
            return m.group(0)
        return render_block(a.runs, m.group("args"))

    text = BLOCK.sub(block, text)
    if not a.only:
        text = WALL.sub(lambda m: render_walltime(a.runs), text)
    a.doc.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
