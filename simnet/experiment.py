"""Experiment files: a simnet scenario plus an ``[experiment]`` table of arms and seeds.

An experiment runs every arm x seed as an ordinary simnet run (real peers, each run in
its own folder ``DIR/<arm>/seed<S>/``), then evaluates the peers' final stored models
(see :mod:`silomesh.simnet.evaluations`) and writes ``DIR/results.json`` and
``DIR/results.md`` (mean ± sample std over seeds)::

    # experiments/example.toml -- the scenario settings every arm starts from
    task = "catheter"
    size = "tiny"
    rounds = 3

    [experiment]
    name = "example"                  # default: the file's stem
    seeds = [0, 1, 2]
    evaluate = ["vs_best_silo"]       # evaluations applied to every run
    scale = ["rounds", "task_options.n_train", "options.finetune_steps"]  # what --scale N multiplies
    columns = ["fed_common", "local_common_best"]   # optional: table columns, in order

    [experiment.options]              # evaluation options (finetune_steps, mlem_iterations, ...)
    finetune_steps = 40

    [[experiment.arms]]               # each arm overrides scenario settings
    name = "fedavg-4"
    peers = 4
    strategy = "fedavg"
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from silomesh.simnet.scenario import FIELDS, Scenario, ScenarioError, load_scenario, make_scenario

log = logging.getLogger(__name__)

SCHEMA = "silomesh.simnet.experiment/1"
#: scenario fields an experiment fixes per run (the harness chooses them)
_PER_RUN = ("seed", "out")
_EXPERIMENT_KEYS = {"name", "seeds", "evaluate", "scale", "columns", "options", "arms", "description"}


class ExperimentError(ScenarioError):
    """An ``[experiment]`` setting is invalid; the message names it."""


@dataclass(frozen=True)
class Arm:
    """One configuration compared in an experiment: scenario settings over the base."""

    name: str
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Experiment:
    """A parsed experiment file (see the module docstring)."""

    name: str
    path: Path
    base: dict[str, Any]
    arms: tuple[Arm, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    evaluate: tuple[str, ...] = ()
    scale: tuple[str, ...] = ("rounds",)
    columns: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""


def has_experiment(path: Path) -> bool:
    """True if the TOML file at ``path`` holds an ``[experiment]`` table."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return False  # load_scenario reports the error
    return isinstance(data.get("experiment"), dict)


def _int_list(value: object, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ExperimentError(f"{where}: expected a non-empty list of integers, got {value!r}")
    if len(set(value)) != len(value):
        raise ExperimentError(f"{where}: seeds repeat: {value!r}")
    return tuple(value)


def _str_list(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ExperimentError(f"{where}: expected a list of strings, got {value!r}")
    return tuple(value)


def parse_experiment(data: dict[str, Any], path: Path, base: dict[str, Any]) -> Experiment:
    """Validate an ``[experiment]`` table (``data``) over the scenario settings ``base``.

    Raises:
        ExperimentError: naming the first invalid field (``experiment.arms[1].peers: ...``).
    """
    from silomesh.simnet.evaluations import EVALUATIONS

    unknown = sorted(set(data) - _EXPERIMENT_KEYS)
    if unknown:
        known = ", ".join(sorted(_EXPERIMENT_KEYS))
        raise ExperimentError(f"experiment: unknown field {unknown[0]!r} (known: {known})")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name or "/" in name:
        raise ExperimentError(f"experiment.name: expected a plain name, got {name!r}")
    seeds = _int_list(data.get("seeds", [0, 1, 2]), "experiment.seeds")
    evaluate = _str_list(data.get("evaluate", []), "experiment.evaluate")
    for ev in evaluate:
        if ev not in EVALUATIONS:
            raise ExperimentError(f"experiment.evaluate: unknown evaluation {ev!r} (known: {', '.join(EVALUATIONS)})")
    scale = _str_list(data.get("scale", ["rounds"]), "experiment.scale")
    for item in scale:
        head, _, sub = item.partition(".")
        ok = (head in ("rounds", "local_steps", "peers") and not sub) or (head in ("task_options", "options") and sub)
        if not ok:
            raise ExperimentError(f"experiment.scale: cannot scale {item!r}; use rounds, local_steps, "
                                  "task_options.KEY or options.KEY")
    columns = _str_list(data.get("columns", []), "experiment.columns")
    options = data.get("options", {})
    if not isinstance(options, dict):
        raise ExperimentError(f"experiment.options: expected a table, got {options!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ExperimentError("experiment.description: expected a string")
    raw_arms = data.get("arms")
    if not isinstance(raw_arms, list) or not raw_arms:
        raise ExperimentError("experiment.arms: expected at least one [[experiment.arms]] table")
    arms: list[Arm] = []
    for i, raw in enumerate(raw_arms):
        where = f"experiment.arms[{i}]"
        if not isinstance(raw, dict):
            raise ExperimentError(f"{where}: expected a table")
        arm_name = raw.get("name")
        if not isinstance(arm_name, str) or not arm_name or "/" in arm_name:
            raise ExperimentError(f"{where}.name: expected a plain name, got {arm_name!r}")
        if arm_name in {a.name for a in arms}:
            raise ExperimentError(f"{where}.name: {arm_name!r} is used twice")
        settings = {k: v for k, v in raw.items() if k != "name"}
        for key in settings:
            if key not in FIELDS or key in _PER_RUN:
                raise ExperimentError(f"{where}.{key}: not a setting an arm can change")
        try:
            make_scenario(base, settings)
        except ScenarioError as exc:
            raise ExperimentError(f"{where} ({arm_name}): {exc}") from None
        arms.append(Arm(arm_name, settings))
    return Experiment(name, path, base, tuple(arms), seeds, evaluate, scale, columns, options, description)


def load_experiment(path: Path) -> Experiment:
    """Read an experiment file.

    Raises:
        ScenarioError: for a bad file or base setting; ExperimentError for the table.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such scenario file") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from None
    table = data.get("experiment")
    if not isinstance(table, dict):
        raise ExperimentError(f"{path}: no [experiment] table")
    base = load_scenario(path, ignore=("experiment",))
    make_scenario(base)  # validate the shared settings once
    return parse_experiment(table, path, base)


def scaled(settings: dict[str, Any], options: dict[str, Any], items: tuple[str, ...],
           factor: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Multiply the integer settings named in ``items`` by ``factor``.

    Raises:
        ExperimentError: if ``factor < 1`` or a named setting is not an integer.
    """
    if factor < 1:
        raise ExperimentError(f"--scale: must be >= 1, got {factor}")
    settings = {**settings, "task_options": dict(settings.get("task_options", {}))}
    options = dict(options)
    if factor == 1:
        return settings, options
    for item in items:
        head, _, sub = item.partition(".")
        target = settings if head in ("rounds", "local_steps", "peers") else (
            settings["task_options"] if head == "task_options" else options)
        key = sub or head
        if key not in target:
            continue  # nothing set here: the default stays
        value = target[key]
        if not isinstance(value, int) or isinstance(value, bool):
            raise ExperimentError(f"experiment.scale: {item} is not an integer ({value!r})")
        target[key] = value * factor
    return settings, options


def run_scenario(exp: Experiment, arm: Arm, seed: int, scale: int, out: Path,
                 overrides: dict[str, Any] | None = None) -> tuple[Scenario, dict[str, Any]]:
    """The scenario of one run (base, then arm, then command-line overrides; scaled)."""
    base = {**exp.base}
    merged = dict(base)
    for layer in (arm.settings, overrides or {}):
        for key, value in layer.items():
            if value is None:
                continue
            if key in ("task_options", "strategy_params"):
                merged[key] = {**merged.get(key, {}), **value}
            else:
                merged[key] = value
    defaults = {k: getattr(Scenario(), k) for k in ("rounds", "local_steps", "peers")}
    merged = {**{k: v for k, v in defaults.items() if k not in merged}, **merged}
    if "task_options" in merged or any(i.startswith("task_options.") for i in exp.scale):
        from silomesh.simnet.scenario import SMALL_TASK_OPTIONS
        task = merged.get("task", Scenario().task)
        merged["task_options"] = {**SMALL_TASK_OPTIONS.get(task, {}), **merged.get("task_options", {})}
    merged, options = scaled(merged, exp.options, exp.scale, scale)
    merged["seed"] = seed
    merged["out"] = out
    return make_scenario(merged), options


# -- statistics and tables ------------------------------------------------------------------


def summarise(values: list[float]) -> dict[str, float | int | None]:
    """Mean and sample standard deviation (ddof=1; 0 for one value) of the finite values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return {"mean": None, "std": None, "n": 0}
    arr = np.array(finite, dtype=float)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std, "n": len(arr)}


def _fmt(summary: dict[str, Any], digits: int) -> str:
    if summary["mean"] is None:
        return "–"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def render_table(results: dict[str, Any], columns: list[str] | None = None, digits: int = 3) -> str:
    """A markdown table: one row per arm, one column per metric (mean ± std, n seeds)."""
    arms = results["arms"]
    if columns is None:
        columns = list(results.get("columns") or [])
    if not columns:
        seen: list[str] = []
        for arm in arms.values():
            for key in arm["summary"]:
                if key not in seen:
                    seen.append(key)
        columns = seen
    lines = ["| arm | n | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for name, arm in arms.items():
        ns = [arm["summary"][c]["n"] for c in columns if c in arm["summary"]]
        n = max(ns) if ns else 0
        cells = [_fmt(arm["summary"][c], digits) if c in arm["summary"] else "–" for c in columns]
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(results: dict[str, Any]) -> str:
    """``results.md``: the command, settings, the table and wall times."""
    lines = [f"# Experiment `{results['name']}`", "", "Regenerate with:", "", "```",
             results["command"], "```", ""]
    if results.get("description"):
        lines += [results["description"], ""]
    lines += [f"Seeds: {', '.join(str(s) for s in results['seeds'])}; scale {results['scale']}; "
              f"evaluations: {', '.join(results['evaluate']) or 'none'}.",
              "Cells are mean ± sample standard deviation over seeds; n is the number of seeds.", "",
              render_table(results), ""]
    lines += ["| arm | settings |", "|---|---|"]
    for name, arm in results["arms"].items():
        s = arm["settings"]
        desc = (f"{s['peers']} peers, {s['topology']}, {s['strategy']} {json.dumps(s['strategy_params'])}, "
                f"{s['task']}/{s['size']}, {s['rounds']} rounds x {s['local_steps']} steps, "
                f"lr {s['lr']}, batch {s['batch_size']}, data {json.dumps(s['task_options'])}"
                + (", keep_unlabelled" if s.get("keep_unlabelled") else ""))
        lines.append(f"| {name} | {desc} |")
    lines += _per_silo_section(results)
    lines += ["", f"Total wall time: {results['wall_seconds']:.0f} s "
              f"({len(results['arms'])} arms x {len(results['seeds'])} seeds).", ""]
    return "\n".join(lines)


def _per_silo_section(results: dict[str, Any]) -> list[str]:
    """The ``per_silo`` gains under a heading, if any arm has them."""
    table = per_silo_table(results)
    if not table:
        return []
    return ["", "## Each silo, federated minus alone", "", *table]


def per_silo_table(results: dict[str, Any]) -> list[str]:
    """The ``per_silo`` gains as a table (one row per arm and silo); empty if none."""
    from silomesh.simnet.plots import GAIN_KINDS, per_silo_gains

    gains = per_silo_gains(results)
    if not gains:
        return []
    kinds_shown = [k for k in GAIN_KINDS if any(k in kinds for kinds in gains.values())]
    lines = ["Paired per silo: its peer's final model minus the same silo trained alone on the same "
             "budget (a personal model, trained on the silo's own data as `personal_method` says, against "
             "the silo alone with as many more steps as it had), mean ± std over seeds (n). "
             "Plot: `per_silo_gains.png`.", "",
             "| arm | silo | " + " | ".join(GAIN_KINDS[k] for k in kinds_shown) + " |",
             "|---|---|" + "---|" * len(kinds_shown)]
    for name, kinds in gains.items():
        silos = sorted({r["silo"] for rows in kinds.values() for r in rows})
        for i in silos:
            cells = []
            for kind in kinds_shown:
                row = next((r for r in kinds.get(kind, []) if r["silo"] == i), None)
                cells.append("–" if row is None else f"{row['mean']:+.3f} ± {row['std']:.3f} ({row['n']})")
            lines.append(f"| {name} | {i} | " + " | ".join(cells) + " |")
    return lines


# -- running -------------------------------------------------------------------------------


def command_line(path: Path, scale: int, seeds: tuple[int, ...] | None, out: Path | None,
                 overrides: Mapping[str, Any] | None = None) -> str:
    """The command that regenerates an experiment (printed at the top of results.md), with the
    command-line ``overrides`` of every arm as the flags that set them (``personal_method`` is
    ``--personal-method``; task options and strategy parameters one ``KEY=VALUE`` each)."""
    parts = ["silomesh", "simnet", "run", str(path)]
    if scale != 1:
        parts += ["--scale", str(scale)]
    if seeds is not None:
        parts += ["--seeds", ",".join(str(s) for s in seeds)]
    for key, value in sorted((overrides or {}).items()):
        flag = "--" + key.replace("_", "-")
        if key in ("task_options", "strategy_params"):
            each = "--task-option" if key == "task_options" else "--strategy-param"
            for k, v in value.items():
                parts += [each, f"{k}={v if isinstance(v, str) else json.dumps(v)}"]
        elif isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        else:
            parts += [flag, str(value)]
    if out is not None:
        parts += ["--out", str(out)]
    return shlex.join(parts)


def run_experiment(exp: Experiment, out: Path, *, scale: int = 1, seeds: tuple[int, ...] | None = None,
                   overrides: dict[str, Any] | None = None, command: str | None = None,
                   echo: Callable[[str], object] | None = None) -> dict[str, Any]:
    """Run every arm x seed, evaluate, write ``results.json`` and ``results.md`` under ``out``.

    Raises:
        ExperimentError: if ``out`` already holds results or a setting is invalid.
        SimnetError: if a run could not complete.
    """
    from silomesh.simnet.coordinator import run_simnet
    from silomesh.simnet.evaluations import evaluate_run

    if (out / "results.json").exists():
        raise ExperimentError(f"--out: {out} already holds experiment results")
    seeds = seeds if seeds is not None else exp.seeds
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results: dict[str, Any] = {
        "schema": SCHEMA, "name": exp.name, "file": str(exp.path), "description": exp.description,
        "command": command or command_line(exp.path, scale, None if seeds == exp.seeds else seeds, None, overrides),
        "seeds": list(seeds), "scale": scale, "evaluate": list(exp.evaluate), "columns": list(exp.columns),
        "arms": {},
    }
    # lay out (and validate) every run before starting any
    plans = {(arm.name, seed): run_scenario(exp, arm, seed, scale, out / arm.name / f"seed{seed}", overrides)
             for arm in exp.arms for seed in seeds}
    for arm in exp.arms:
        runs: dict[str, dict[str, float]] = {}
        scenario = plans[(arm.name, seeds[0])][0]
        for seed in seeds:
            sc, options = plans[(arm.name, seed)]
            t_run = time.time()
            report = run_simnet(sc)
            metrics = evaluate_run(exp.evaluate, sc, report, options)
            metrics["wall_seconds"] = time.time() - t_run
            runs[str(seed)] = metrics
            if echo is not None:
                echo(f"{exp.name}: {arm.name} seed {seed}: " + ", ".join(
                    f"{k}={v:.4g}" for k, v in metrics.items() if k in (exp.columns or metrics)))
        keys: list[str] = []
        for m in runs.values():
            keys += [k for k in m if k not in keys]
        settings = scenario.to_settings()
        settings.pop("seed")
        settings.pop("out")
        results["arms"][arm.name] = {
            "settings": settings,
            "runs": runs,
            "summary": {k: summarise([m.get(k, math.nan) for m in runs.values()]) for k in keys},
        }
        _write(out, results, t0)
    _write(out, results, t0)
    return results


def _write(out: Path, results: dict[str, Any], t0: float) -> None:
    results["wall_seconds"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float), encoding="utf-8")
    (out / "results.md").write_text(render_markdown(results), encoding="utf-8")
    from silomesh.simnet.plots import write_per_silo_plot

    write_per_silo_plot(results, out / "per_silo_gains.png")
