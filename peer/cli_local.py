"""``silomesh train``: train one silo alone on its own data (the "local only" baseline).

Thin on purpose: the task registry makes the data and model, ``train_local`` trains,
``task.evaluate`` scores; this module only parses options and prints.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from silomesh.models.architecture import ModelSpec
    from silomesh.models.preprocess import Preprocess

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _parse_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``("image_size=32", "arch=vit")`` -> ``{"image_size": 32, "arch": "vit"}``.

    Values are read as JSON when they parse (numbers, booleans, lists), else as strings.
    """
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise click.ClickException(f"--option expects KEY=VALUE, got {pair!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        options[key.strip()] = tuple(value) if isinstance(value, list) else value
    return options


def _round(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in metrics.items()}


@click.command("train", context_settings=CONTEXT)
@click.option(
    "--task",
    "task_name",
    required=True,
    help="Task name: catheter, organs, organs3d, lesion, spect.",
)
@click.option("--silos", default=4, show_default=True, help="Silos in the federation layout.")
@click.option("--silo", "silo_index", default=0, show_default=True, help="Which silo trains (0-based).")
@click.option("--steps", default=200, show_default=True, help="Optimiser steps.")
@click.option("--seed", default=0, show_default=True, help="Seed of data, model and batch order.")
@click.option("--size", default="tiny", show_default=True, help="Model size: tiny, small or base.")
@click.option("--batch-size", default=16, show_default=True, help="Samples per step.")
@click.option("--lr", default=3e-3, show_default=True, help="AdamW learning rate.")
@click.option(
    "-o",
    "--option",
    "options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Task configuration, repeatable (e.g. -o image_size=32 -o arch=vit).",
)
@click.option("--model", default=None, help="A MONAI network in place of the task's (e.g. BasicUNet).")
@click.option(
    "--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
    help="Keyword argument of --model, repeatable (e.g. --model-arg spatial_dims=2).",
)
@click.option(
    "--bundle", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
    help="A MONAI bundle folder: its network, weights (starting point) and pre-processing.",
)
@click.option(
    "--dataset", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
    help="Train on this folder (images/, masks/; docs/TASKS.md) instead of synthetic data.",
)
@click.option(
    "--export-bundle", type=click.Path(path_type=Path), default=None,
    help="Write the trained MONAI network as a bundle to this new folder.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def train(
    task_name: str,
    silos: int,
    silo_index: int,
    steps: int,
    seed: int,
    size: str,
    batch_size: int,
    lr: float,
    options: tuple[str, ...],
    model: str | None,
    model_args: tuple[str, ...],
    bundle: Path | None,
    dataset: Path | None,
    export_bundle: Path | None,
    as_json: bool,
) -> None:
    """Train one silo alone on its own data and report its metrics (local-only baseline).

    The task's synthetic federation is generated from the seed; silo SILO trains for
    STEPS steps and is evaluated on its own test set and on every shared test set (for
    catheter: one per source, so seen and unseen sources can be compared).

    \b
    Examples:
      silomesh train --task catheter --silos 4 --silo 0 --steps 200 --seed 0
      silomesh train --task lesion --silo 2 --steps 100 --json
      silomesh train --task catheter -o holdout_source=clinical -o arch=vit --size small
      silomesh train --task catheter --model BasicUNet --model-arg spatial_dims=2 \\
          --model-arg out_channels=3 --model-arg 'features=[4,4,8,8,16,4]' -o image_size=32
      silomesh train --task catheter --bundle my_bundle --dataset /srv/ct --export-bundle out_bundle
    """
    from silomesh.models.monai_net import ModelTask
    from silomesh.models.registry import TaskUnavailableError, get_task
    from silomesh.models.task import ArrayDataset
    from silomesh.models.train import count_parameters, evaluate, train_local
    from silomesh.peer.config import TaskConfig
    from silomesh.peer.learner import load_silo

    if silos < 1 or not 0 <= silo_index < silos:
        raise click.ClickException(f"--silo must be in 0..{silos - 1}, got {silo_index}")
    if steps < 0 or batch_size < 1:
        raise click.ClickException("--steps must be >= 0 and --batch-size >= 1")
    if model is not None and bundle is not None:
        raise click.ClickException("give either --model or --bundle, not both")
    if model_args and model is None:
        raise click.ClickException("--model-arg needs --model")
    try:
        own = _own_model(model, _parse_options(model_args), bundle)
        task = get_task(task_name, **_parse_options(options))
        if own.spec is not None:
            task = ModelTask(task, own.spec, own.weights)
        if dataset is not None:
            silo = load_silo(TaskConfig(task_name, dataset=dataset, preprocess=own.preprocess))
            tests: dict[str, ArrayDataset] = {}
        else:
            federation = task.make_federation(silos, seed)
            silo, tests = federation.silos[silo_index], federation.tests
        net = task.make_model(size, seed)
        task.check_data(silo.train)
    except (ValueError, TypeError, TaskUnavailableError) as exc:
        raise click.ClickException(str(exc)) from None
    if export_bundle is not None and (own.spec is None or export_bundle.exists()):
        raise click.ClickException("--export-bundle needs --model or --bundle, and a folder that does not exist")
    started = time.perf_counter()
    try:
        losses = train_local(
            task, net, silo.train, steps, batch_size, lr, seed,
            progress=not as_json, label=f"{task_name} {silo.name}",
        )  # fmt: skip
    except FloatingPointError as exc:
        raise click.ClickException(f"training diverged: {exc}; try a lower --lr") from None
    seconds = time.perf_counter() - started
    results = evaluate(task, net, {"own": silo.test, **tests})
    report = {
        "task": task_name,
        "silo": silo.name,
        "silos": silos,
        "steps": steps,
        "seed": seed,
        "size": size,
        "parameters": count_parameters(net),
        "model": own.spec.name if own.spec is not None else None,
        "train_samples": len(silo.train),
        "label_kind": silo.train.label_kind,
        "info": silo.info,
        "train_seconds": round(seconds, 2),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "metric": task.metric,
        "results": {name: _round(m) for name, m in results.items()},
    }
    if export_bundle is not None and own.spec is not None:
        from silomesh.models.bundle import export_bundle as write_bundle

        write_bundle(net, own.spec, export_bundle, input_shape=silo.train["image"].shape[1:],
                     preprocess=own.preprocess, description=f"{task_name}, trained alone by silomesh train")
        report["bundle"] = str(export_bundle)
    if as_json:
        click.echo(json.dumps(report, default=str))
        return
    _print_table(report)
    if export_bundle is not None:
        click.echo(f"wrote MONAI bundle {export_bundle}")


@dataclass(frozen=True)
class _OwnModel:
    spec: ModelSpec | None = None
    weights: Path | None = None
    preprocess: Preprocess | None = None


def _own_model(model: str | None, args: dict[str, Any], bundle: Path | None) -> _OwnModel:
    """The MONAI network (and a bundle's weights and pre-processing) given on the command line."""
    if bundle is not None:
        from silomesh.models.bundle import read_bundle

        read = read_bundle(bundle)
        return _OwnModel(read.spec, read.weights, read.preprocess)
    if model is not None:
        from silomesh.models.monai_net import check_spec

        return _OwnModel(check_spec(model, args, field="--model", args_field="--model-arg"))
    return _OwnModel()


@click.command("export-bundle", context_settings=CONTEXT)
@click.option(
    "--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
    help="The peer.toml whose [task] names the MONAI network and pre-processing.",
)
@click.option(
    "--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
    help="The model as a torch state dict, from 'silomesh models export REF --out model.pt'.",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="New bundle folder to write.")
def export_bundle_command(config_path: Path, weights: Path, out: Path) -> None:
    """Write a peer's model as a MONAI bundle (network_def, weights, pre-processing).

    The network and pre-processing come from the peer's [task]; the weights from a state
    dict the peer exported. MONAI's own tools (monai.bundle) read the result.

    \b
    Example:
      silomesh models export 3f2a9c01 --out model.pt
      silomesh export-bundle --config peer.toml --weights model.pt --out federated_bundle
    """
    from silomesh.models.bundle import export_bundle
    from silomesh.models.monai_net import build_network
    from silomesh.peer.config import ConfigError, load_config
    from silomesh.peer.learner import load_silo

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    spec = config.task.spec
    if spec is None:
        raise click.ClickException("task.model: the peer runs a built-in network; a bundle needs a MONAI one")
    if out.exists():
        raise click.ClickException(f"{out}: already exists; give a new folder")
    try:
        net = build_network(spec, weights=weights)
        shape = load_silo(config.task).train["image"].shape[1:]
        export_bundle(net, spec, out, input_shape=shape, preprocess=config.task.preprocess,
                      description=f"{config.task.name}, federation {config.federation}")
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote MONAI bundle {out}")


def _table_columns(results: dict[str, dict[str, float]], metric: str) -> list[tuple[str, str]]:
    """(key, header) pairs: the headline metric, its per-class values, then other means.

    Per-class values of secondary metrics (``iou_liver``...) stay in ``--json`` only, so
    the table fits a terminal.
    """
    keys = list(dict.fromkeys(k for m in results.values() for k in m))  # first-seen order
    per_class = [k for k in keys if k.startswith(f"{metric}_")]
    others = [k for k in keys if k != metric and "_" not in k]
    columns = [(metric, metric)] if metric in keys else []
    columns += [(k, k.removeprefix(f"{metric}_")) for k in per_class]
    return columns + [(k, k) for k in others]


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    results: dict[str, dict[str, float]] = report["results"]
    table = Table(
        title=(
            f"{report['task']} · {report['silo']} alone · {report['steps']} steps · "
            f"{report['parameters']:,} params · {report['train_seconds']:.1f} s"
        )
    )
    table.add_column("test set", no_wrap=True)
    columns = _table_columns(results, report["metric"])
    for _, header in columns:
        table.add_column(header, justify="right")
    for name, metrics in results.items():
        table.add_row(name, *(f"{metrics[k]:.3f}" if k in metrics else "" for k, _ in columns))
    console = Console()
    console.print(table)
    info = ", ".join(f"{k}={v}" for k, v in report["info"].items() if not isinstance(v, dict))
    if info:
        console.print(f"[dim]{report['silo']}: {info}[/dim]")
