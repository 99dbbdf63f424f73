"""``silomesh simnet``: start N real peers on 127.0.0.1 and study a federation.

Register with ``cli.add_command(simnet)``. Heavy imports (torch, libp2p, trio) happen
inside the command so ``silomesh --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

log = logging.getLogger(__name__)


def _key_values(pairs: tuple[str, ...], what: str) -> dict[str, Any]:
    """``KEY=VALUE`` options; values parsed as JSON when they are JSON (numbers, true, lists)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, raw = pair.partition("=")
        if not eq or not key.strip():
            raise click.ClickException(f"{what}: expected KEY=VALUE, got {pair!r}")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        out[key.strip()] = value
    return out


@click.group(context_settings=CONTEXT)
def simnet() -> None:
    """Simulate a federation: many real peers on this machine.

    \b
    Examples:
      silomesh simnet run
      silomesh simnet run --peers 16 --topology smallworld --strategy fedefm --rounds 5
      silomesh simnet run scenario.toml --faults crash=0.1,restart=after:2,intruder=1
    """


@simnet.command("run", context_settings=CONTEXT)
@click.argument("scenario_file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--peers", "-n", type=int, help="Number of peers (default 4).")
@click.option("--topology", "-t", help="ring | regular:K | smallworld[:K[:P]] | full | tree[:K] | FILE (default ring).")
@click.option("--strategy", "-s", help="fedavg | fedefm | segviz | fedmix | cyclic (default fedavg).")
@click.option("--task", help="catheter | organs | lesion | spect (default catheter).")
@click.option("--size", help="Model size (default small; tiny is faster but learns little in a few rounds).")
@click.option("--rounds", "-r", type=int, help="Rounds per peer (default 3).")
@click.option("--seed", type=int, help="Seed for keys, data split, topology and faults (default 0).")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path),
              help="Run folder (default runs/simnet-<timestamp>); must not hold a previous run.")
@click.option("--faults", "-f", help="Fault spec, e.g. crash=0.1,restart=after:2,drop=0.05 (see docs/SIMNET.md).")
@click.option("--compare-local/--no-compare-local", default=None,
              help="Also train every silo alone on the same budget and report both.")
@click.option("--procs", "-p", type=int,
              help="Spread the peers over P worker processes (default 1), or P Ray actors with --backend ray.")
@click.option("--backend", type=click.Choice(["local", "ray"]),
              help="local: this machine (default); ray: the shares run as Ray actors across a Ray cluster.")
@click.option("--ray-address", help="With --backend ray: HOST:PORT of the Ray head to join (default: a new "
                                    "Ray instance on this machine).")
@click.option("--local-steps", type=int, help="Optimiser steps per round (default 40).")
@click.option("--deadline", type=float, help="Seconds a peer waits for neighbours per round (default 30).")
@click.option("--batch-size", type=int, help="Batch size (default 8).")
@click.option("--lr", type=float, help="Learning rate (default 0.001).")
@click.option("--codec", type=click.Choice(["float32", "float16", "int8", "int4", "topk"]),
              help="How updates travel (default float32; float16, int8, int4 and topk are lossy, with error "
                   "feedback).")
@click.option("--topk", type=float, help="With --codec topk: the share of each tensor's delta values sent "
                                         "(default 0.1, at most 0.5).")
@click.option("--topk-step", type=float,
              help="With --codec topk: how far a round moves each model towards its neighbours' (CHOCO's "
                   "consensus step, default 2 x --topk, at most 1).")
@click.option("--keep-unlabelled/--no-keep-unlabelled", default=None,
              help="Partial labels (organs, lesion): every peer's training keeps what its silo does not "
                   "annotate (other organs; what boxes and image labels leave open) as the model knew it, "
                   "instead of letting it drift (default off).")
@click.option("--personal-steps", type=int,
              help="Each peer also keeps a personal model, trained K steps on its data after every round (default 0).")
@click.option("--personal-method", type=click.Choice(["finetune", "head", "ditto"]),
              help="finetune: the shared model fine-tuned each round (default); head: only its task head "
                   "fine-tuned; ditto: one personal model across rounds, pulled towards the shared one.")
@click.option("--personal-lambda", type=float, help="Ditto's pull towards the shared model (default 0.1).")
@click.option("--timeout", type=float, help="Stop the whole run after this many seconds.")
@click.option("--task-option", "task_options", multiple=True, metavar="KEY=VALUE",
              help="Task data option, e.g. --task-option image_size=48 (repeatable).")
@click.option("--strategy-param", "strategy_params", multiple=True, metavar="KEY=VALUE",
              help="Strategy parameter, e.g. --strategy-param robust=median (repeatable).")
@click.option("--scale", type=int, default=1, show_default=True,
              help="Experiment files only: multiply what the file's experiment.scale names by N.")
@click.option("--seeds", help="Experiment files only: comma-separated seeds instead of the file's.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json instead of a summary.")
def run(scenario_file: Path | None, task_options: tuple[str, ...], strategy_params: tuple[str, ...],
        quiet: bool, as_json: bool, scale: int, seeds: str | None, **flags: Any) -> None:
    """Run a simnet: start peers, run the rounds, write DIR/report.json, metrics, plots.

    Every peer is a real silomesh peer with its own key, trust list (its neighbours
    in the topology), SQLite store and audit log under DIR/peers/<name>/, talking
    over libp2p on 127.0.0.1. Settings come from defaults, then SCENARIO_FILE
    (TOML), then these flags. With no arguments: 4 peers on a ring, fedavg, catheter
    at 32x32, 3 rounds — about a minute on a laptop.

    \b
    Examples:
      silomesh simnet run
      silomesh simnet run --peers 8 --topology regular:4 --strategy fedefm --compare-local
      silomesh simnet run --task organs --strategy segviz --rounds 5 --out runs/segviz
      silomesh simnet run --peers 48 --procs 2 --faults drop=0.05,delay=100ms-300ms
      silomesh simnet run --peers 100 --procs 4 --backend ray --ray-address 10.0.0.1:6379
      silomesh simnet run scenario.toml --seed 3
      silomesh simnet run experiments/fedefm_unseen.toml --scale 2 --out runs/fedefm

    A file with an [experiment] table runs every arm x seed and writes
    DIR/results.json and DIR/results.md (see docs/SIMNET.md, Experiments).
    """
    from silomesh.simnet.scenario import ScenarioError, SimnetError, load_scenario, make_scenario

    if scenario_file is not None:
        from silomesh.simnet.experiment import has_experiment

        if has_experiment(scenario_file):
            _run_experiment(scenario_file, task_options, strategy_params, scale, seeds, as_json, flags)
            return
    if scale != 1 or seeds is not None:
        raise click.ClickException("--scale and --seeds apply to experiment files (with an [experiment] table)")
    layers: list[dict[str, Any]] = []
    try:
        if scenario_file is not None:
            layers.append(load_scenario(scenario_file))
        overrides = dict(flags)
        overrides["task_options"] = _key_values(task_options, "--task-option") or None
        overrides["strategy_params"] = _key_values(strategy_params, "--strategy-param") or None
        scenario = make_scenario(*layers, overrides)
        _check_names(scenario.task, scenario.strategy, scenario.size)
    except ScenarioError as exc:
        raise click.ClickException(str(exc)) from None

    from silomesh.simnet.coordinator import run_simnet

    progress = None if quiet or as_json else _RichProgress(scenario.rounds)
    try:
        if progress is not None:
            with progress:
                report = run_simnet(scenario, progress=progress.update)
        else:
            report = run_simnet(scenario)
    except (ScenarioError, SimnetError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    _summary(report)


def _run_experiment(path: Path, task_options: tuple[str, ...], strategy_params: tuple[str, ...], scale: int,
                    seeds: str | None, as_json: bool, flags: dict[str, Any]) -> None:
    import time

    from silomesh.simnet.experiment import command_line, load_experiment, run_experiment
    from silomesh.simnet.scenario import ScenarioError, SimnetError

    try:
        exp = load_experiment(path)
        seed_list = None
        if seeds is not None:
            try:
                seed_list = tuple(int(s) for s in seeds.split(",") if s.strip())
            except ValueError:
                raise ScenarioError(f"--seeds: expected comma-separated integers, got {seeds!r}") from None
            if not seed_list:
                raise ScenarioError("--seeds: no seed given")
        if flags.get("seed") is not None:
            raise ScenarioError("--seed: an experiment runs its own seeds; use --seeds")
        out = flags.pop("out") or Path("runs") / time.strftime(f"{exp.name}-%Y%m%d-%H%M%S")
        overrides = dict(flags)
        overrides["task_options"] = _key_values(task_options, "--task-option") or None
        overrides["strategy_params"] = _key_values(strategy_params, "--strategy-param") or None
        overrides = {k: v for k, v in overrides.items() if v is not None}
        command = command_line(path, scale, seed_list, None, overrides)
        results = run_experiment(exp, out, scale=scale, seeds=seed_list, overrides=overrides, command=command,
                                 echo=None if as_json else lambda line: click.echo(line, err=True))
    except (ScenarioError, SimnetError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(results, indent=1))
        return
    click.echo(f"experiment {exp.name}: {len(results['arms'])} arms x {len(results['seeds'])} seeds "
               f"in {results['wall_seconds']:.0f} s -> {out / 'results.md'}")


def _check_names(task: str, strategy: str, size: str) -> None:
    from silomesh.models.registry import get_task, task_names
    from silomesh.simnet.scenario import ScenarioError
    from silomesh.strategies import available_strategies

    if task not in task_names():
        raise ScenarioError(f"task: unknown task {task!r}; choose from {', '.join(task_names())}")
    if strategy not in available_strategies():
        raise ScenarioError(f"strategy: unknown strategy {strategy!r}; "
                            f"choose from {', '.join(available_strategies())}")
    try:
        get_task(task).make_model(size)
    except (ValueError, KeyError) as exc:
        raise ScenarioError(f"size: {exc}") from None


class _RichProgress:
    """A rich progress bar of committed peer-rounds (on stderr)."""

    def __init__(self, rounds: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.rounds = rounds
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                            console=Console(stderr=True))
        self.task_id = self.bar.add_task("peer-rounds", total=None, status="starting peers")

    def __enter__(self) -> _RichProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)  # type: ignore[arg-type]

    def update(self, done: int, total: int, counts: list[int]) -> None:
        slowest, fastest = min(counts, default=0), max(counts, default=0)
        status = f"rounds done per peer: {slowest}..{fastest} of {self.rounds}"
        self.bar.update(self.task_id, completed=done, total=total, status=status)


def _summary(report: dict[str, Any]) -> None:
    final = report["final"]
    m = report["metric"]
    click.echo(f"simnet {report['strategy']}/{report['task']}: {report['peers']} peers, "
               f"{report['topology']}, {report['rounds']} rounds in {report['wall_seconds']:.1f} s")
    click.echo(f"  round success rate  {report['round_success_rate']:.3f}")
    mean = final["federated_mean"]
    click.echo(f"  federated {m:<9} {mean:.4f}" if mean is not None else f"  federated {m}: no rounds")
    if final.get("personal_mean") is not None:
        hows = {"ditto": "Ditto, pulled towards the shared model", "head": "shared model, head fine-tuned on each silo"}
        how = hows.get(report.get("settings", {}).get("personal_method", ""), "shared model fine-tuned on each silo")
        click.echo(f"  personal {m:<10} {final['personal_mean']:.4f} ({how})")
    if "local_only_mean" in final:
        click.echo(f"  local-only {m:<8} {final['local_only_mean']:.4f} (best silo "
                   f"{final['local_only_best']:.4f})")
    click.echo(f"  bytes sent          {report['bytes_sent_total'] / 1e6:.2f} MB")
    spent = [d["privacy"] for d in report["peers_detail"] if d.get("privacy")]
    if spent:
        click.echo(f"  privacy             eps spent {max(p['epsilon_spent'] for p in spent):.3f} (most), "
                   f"{min(p['epsilon_remaining'] or 0.0 for p in spent):.3f} left (least), "
                   f"audit {'ok' if all(p['audit_ok'] for p in spent) else 'FAILED'}")
    if report["faults"]["spec"] != "none":
        obs = report["faults"]["observed"]
        click.echo(f"  faults              {report['faults']['spec']}: {obs['refused_total']} refused, "
                   f"{obs['skipped_neighbours']} skipped neighbour-rounds, "
                   f"{obs['recovered_peers']}/{obs['crashed_peers']} crashed peers recovered")
    click.echo(f"  report              {Path(report['out']) / 'report.md'}")
    if report.get("timed_out"):
        click.echo(f"warning: the run hit its timeout ({report['settings']['timeout'] or 'derived'}); "
                   "some peers did not finish", err=True)
    errors = [d for d in report["peers_detail"] if d.get("error")]
    if errors:
        click.echo(f"warning: {len(errors)} peer(s) failed, e.g. {errors[0]['name']}: {errors[0]['error']}", err=True)
    from silomesh.simnet.markdown import isolated_rounds

    alone = isolated_rounds(report)
    if alone:
        deadline = report.get("settings", {}).get("deadline")
        click.echo(f"warning: in round(s) {', '.join(map(str, alone))} no peer used a neighbour's model (all "
                   f"skipped; see report.md's Rounds): is the round deadline ({deadline} s) long enough?", err=True)


if __name__ == "__main__":
    simnet()
