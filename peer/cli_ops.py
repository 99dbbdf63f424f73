"""Operator commands that talk to a running peer through its local control API.

Exported click objects, to be registered in the main ``silomesh`` CLI:

- :data:`peer_status` -> ``silomesh peer status``
- :data:`peer_rounds` -> ``silomesh peer rounds``
- :data:`peer_dashboard` -> ``silomesh peer dashboard``
- :data:`neighbours` -> ``silomesh neighbours list | select``
- :data:`data` -> ``silomesh data add | list``
- :data:`models` -> ``silomesh models list | rename | delete | export | import``
- :data:`approvals` -> ``silomesh approvals list | approve | decline``

:func:`register` does all of it for a root group. Every command takes ``--config``
(default ``peer.toml`` or ``$SILOMESH_CONFIG``) and turns every failure into one line
(``click.ClickException``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from silomesh.peer.control_client import ControlClient, ControlError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
F = TypeVar("F", bound=Callable[..., Any])
Columns = Sequence[tuple[str, str]]


# --------------------------------------------------------------------------- shared pieces


def _config_option(func: F) -> F:
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default="peer.toml",
        show_default=True,
        envvar="SILOMESH_CONFIG",
        show_envvar=True,
        help="The peer's configuration (finds its control API and token).",
    )(func)


def _json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(
        func
    )


@contextmanager
def _client(config_path: Path) -> Iterator[ControlClient]:
    """A client for the configured peer; every ControlError becomes one ClickException line."""
    try:
        with ControlClient.from_config(config_path) as client:
            yield client
    except ControlError as exc:
        raise click.ClickException(str(exc)) from None


def _echo_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def _cell(key: str, value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float) and key.endswith(("_at", "_seen")) and value > 0:
        return datetime.fromtimestamp(value).isoformat(sep=" ", timespec="seconds")
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, list | tuple):
        return ", ".join(_cell(key, v) for v in value) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(str(k), v)}" for k, v in value.items()) or "-"
    text = str(value)
    if key in ("digest", "parent") and len(text) > 16:
        return text[:12]
    return text


def _print_table(title: str, rows: list[dict[str, Any]], columns: Columns) -> None:
    """Rows as a rich table: the known columns first, then any other keys the peer sent."""
    console = Console(soft_wrap=False)
    if not rows:
        console.print(f"{title}: none")
        return
    known = {key for key, _ in columns}
    extra = sorted({k for row in rows for k in row} - known)
    table = Table(title=title, title_justify="left")
    keys = [key for key, _ in columns] + extra
    for _, header in columns:
        table.add_column(header, overflow="fold")  # PeerIDs must stay copyable
    for key in extra:
        table.add_column(key.replace("_", " "), overflow="fold")
    for row in rows:
        table.add_row(*(_cell(k, row.get(k)) for k in keys))
    console.print(table)


def _print_record(title: str, record: dict[str, Any]) -> None:
    console = Console(soft_wrap=False)
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in record.items():
        table.add_row(key.replace("_", " "), _cell(key, value))
    console.print(table)


def _output(as_json: bool, value: object, show: Callable[[], None]) -> None:
    if as_json:
        _echo_json(value)
    else:
        show()


MODEL_COLUMNS: Columns = [
    ("digest", "digest"),
    ("name", "name"),
    ("round", "round"),
    ("parent", "parent"),
    ("origin", "origin"),
    ("created_at", "created"),
]
NEIGHBOUR_COLUMNS: Columns = [
    ("name", "name"),
    ("peer_id", "peer id"),
    ("connected", "connected"),
    ("selected", "selected"),
    ("last_seen", "last seen"),
    ("samples", "samples"),
    ("refused", "we refused"),
    ("refused_by", "refused ours"),
    ("last_refused_by", "last refusal of ours"),
]
ROUND_COLUMNS: Columns = [
    ("round", "round"),
    ("status", "status"),
    ("started_at", "started"),
    ("finished_at", "finished"),
    ("contributors", "contributors"),
    ("bytes_sent", "bytes sent"),
    ("bytes_received", "bytes received"),
]
DATASET_COLUMNS: Columns = [("id", "id"), ("path", "path"), ("count", "samples")]
APPROVAL_COLUMNS: Columns = [
    ("id", "id"),
    ("kind", "kind"),
    ("status", "status"),
    ("round", "round"),
    ("peer", "peer"),
    ("created_at", "asked"),
]


# --------------------------------------------------------------------------- peer


@click.command("status", context_settings=CONTEXT)
@_config_option
@_json_option
def peer_status(config_path: Path, as_json: bool) -> None:
    """Show a running peer's state: identity, round, phase, health, privacy budget and neighbours.

    \b
    Example:
      silomesh peer status --config /etc/silomesh/peer.toml
      silomesh peer status --json
    """
    with _client(config_path) as client:
        status = client.status()
        neighbours_ = client.neighbours()
    if as_json:
        _echo_json({"status": status, "neighbours": neighbours_})
        return
    budget = status.pop("privacy", None)
    study = status.pop("study", None)
    _print_record("peer", status)
    if study:  # docs/PRIVACY.md, "The study manifest"
        verdict = "approved" if study["approved"] else "NOT APPROVED: review it, then 'silomesh study approve FILE'"
        click.echo(f"study: {study['name']} v{study['version']} {study['digest']} {verdict}")
    if budget:  # docs/PRIVACY.md
        click.echo(f"privacy: eps {budget['epsilon_spent']:.3f} of {budget['epsilon_target']:g} spent, "
                   f"{budget['epsilon_remaining']:.3f} left (delta {budget['delta']:g}, {budget['steps']} DP-SGD steps)"
                   + (f"; {budget['reason']}" if budget.get("reason") else ""))
    _print_table("neighbours", neighbours_, NEIGHBOUR_COLUMNS)


@click.command("dashboard", context_settings=CONTEXT)
@_config_option
@click.option("--open", "open_browser", is_flag=True, help="Also open the URL in this machine's web browser.")
def peer_dashboard(config_path: Path, open_browser: bool) -> None:
    """Print a one-time URL that logs a browser into a running peer's dashboard.

    The URL works once, for two minutes; opening it sets a session cookie for this peer's
    address and shows the overview. Run it as the user that runs the peer (it reads the
    control token). See docs/DASHBOARD.md.

    \b
    Example:
      silomesh peer dashboard --config /etc/silomesh/peer.toml
      silomesh peer dashboard --open
    """
    with _client(config_path) as client:
        url = client.dashboard_login_url()
    click.echo(url)
    if open_browser:
        import webbrowser

        if not webbrowser.open(url):
            click.echo("could not start a browser here; open the URL above yourself", err=True)


@click.command("rounds", context_settings=CONTEXT)
@_config_option
@_json_option
def peer_rounds(config_path: Path, as_json: bool) -> None:
    """List a running peer's rounds: status, contributors, traffic.

    \b
    Example:
      silomesh peer rounds --json
    """
    with _client(config_path) as client:
        rows = client.rounds()
    _output(as_json, rows, lambda: _print_table("rounds", rows, ROUND_COLUMNS))


# --------------------------------------------------------------------------- neighbours


@click.group("neighbours", context_settings=CONTEXT)
def neighbours() -> None:
    """See the trusted peers and choose which take part in the next round.

    \b
    Example:
      silomesh neighbours list
      silomesh neighbours select 12D3KooWA... 12D3KooWB...
    """


@neighbours.command("list", context_settings=CONTEXT)
@_config_option
@_json_option
def neighbours_list(config_path: Path, as_json: bool) -> None:
    """List the trusted peers: connected, last seen, samples announced, selected.

    \b
    Example:
      silomesh neighbours list --json
    """
    with _client(config_path) as client:
        rows = client.neighbours()
    _output(as_json, rows, lambda: _print_table("neighbours", rows, NEIGHBOUR_COLUMNS))


@neighbours.command("select", context_settings=CONTEXT)
@click.argument("peer_ids", nargs=-1, required=True)
@_config_option
@_json_option
def neighbours_select(peer_ids: tuple[str, ...], config_path: Path, as_json: bool) -> None:
    """Choose the trusted peers (PEER_IDS) that take part in the next round.

    \b
    Example:
      silomesh neighbours select 12D3KooWA... 12D3KooWB...
    """
    with _client(config_path) as client:
        rows = client.select_neighbours(list(peer_ids))
    _output(as_json, rows, lambda: _print_table("neighbours", rows, NEIGHBOUR_COLUMNS))


# --------------------------------------------------------------------------- data


@click.group("data", context_settings=CONTEXT)
def data() -> None:
    """Register local datasets with the running peer and list them.

    \b
    Example:
      silomesh data add /srv/xray/labelled
      silomesh data list
    """


@data.command("add", context_settings=CONTEXT)
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_config_option
@_json_option
def data_add(path: Path, config_path: Path, as_json: bool) -> None:
    """Validate the dataset folder PATH and register it; the peer announces its size.

    The images never leave this machine: neighbours only learn the sample count.

    \b
    Example:
      silomesh data add /srv/xray/labelled --config peer.toml
    """
    with _client(config_path) as client:
        record = client.register_dataset(path)
    _output(as_json, record, lambda: _print_record(f"registered {path}", record))


@data.command("list", context_settings=CONTEXT)
@_config_option
@_json_option
def data_list(config_path: Path, as_json: bool) -> None:
    """List the datasets registered with the running peer.

    \b
    Example:
      silomesh data list --json
    """
    with _client(config_path) as client:
        rows = client.datasets()
    _output(as_json, rows, lambda: _print_table("datasets", rows, DATASET_COLUMNS))


# --------------------------------------------------------------------------- models


@click.group("models", context_settings=CONTEXT)
def models() -> None:
    """List, name, delete, export and import the peer's model versions.

    A model version is named by REF: its digest, a unique digest prefix, or its name.

    \b
    Example:
      silomesh models list
      silomesh models export 3f2a9c --out model.pt
    """


@models.command("list", context_settings=CONTEXT)
@_config_option
@_json_option
def models_list(config_path: Path, as_json: bool) -> None:
    """List the model versions: digest, name, round, parent, origin.

    \b
    Example:
      silomesh models list --json
    """
    with _client(config_path) as client:
        rows = client.models()
    _output(as_json, rows, lambda: _print_table("models", rows, MODEL_COLUMNS))


@models.command("rename", context_settings=CONTEXT)
@click.argument("ref")
@click.argument("name")
@_config_option
@_json_option
def models_rename(ref: str, name: str, config_path: Path, as_json: bool) -> None:
    """Give the model version REF the name NAME.

    \b
    Example:
      silomesh models rename 3f2a9c baseline-2026-03
    """
    with _client(config_path) as client:
        record = client.rename_model(ref, name)
    _output(as_json, record, lambda: click.echo(f"model {ref} is now named {name!r}"))


@models.command("delete", context_settings=CONTEXT)
@click.argument("ref")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@_config_option
@_json_option
def models_delete(ref: str, yes: bool, config_path: Path, as_json: bool) -> None:
    """Delete the weights of model version REF; its record stays in the history.

    \b
    Example:
      silomesh models delete 3f2a9c --yes
    """
    if not yes:
        click.confirm(
            f"Delete the weights of model {ref}? The record stays in the history.", abort=True
        )
    with _client(config_path) as client:
        record = client.delete_model(ref)
    _output(as_json, record, lambda: click.echo(f"deleted the weights of model {ref}"))


def _export_format(fmt: str | None, out: Path) -> str:
    if fmt is not None:
        return fmt
    suffix = out.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in (".pt", ".pth"):
        return "pt"
    raise click.UsageError("cannot tell the format from the file name; give --format")


@models.command("export", context_settings=CONTEXT)
@click.argument("ref")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["pt", "safetensors"]),
    default=None,
    help="pt: a plain torch state dict (torch.load); safetensors. Default: from --out's suffix.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="File to write (atomically).",
)
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@_config_option
@_json_option
def models_export(
    ref: str, fmt: str | None, out: Path, force: bool, config_path: Path, as_json: bool
) -> None:
    """Write model version REF to a file: a torch state dict (.pt) or safetensors.

    The peer writes the file; this command downloads it into --out.

    \b
    Example:
      silomesh models export 3f2a9c --format pt --out model.pt
      silomesh models export baseline-2026-03 --out model.safetensors
    """
    fmt = _export_format(fmt, out)
    with _client(config_path) as client:
        size = client.export_model(ref, fmt, out, overwrite=force)
    record = {"ref": ref, "format": fmt, "path": str(out), "bytes": size}
    _output(as_json, record, lambda: click.echo(f"wrote {out} ({fmt}, {size} bytes)"))


@models.command("import", context_settings=CONTEXT)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_config_option
@_json_option
def models_import(file: Path, config_path: Path, as_json: bool) -> None:
    """Import FILE (safetensors) as the peer's initial model.

    The peer checks it like received weights: tensor names and shapes of its task's model,
    dtypes and finite values.

    \b
    Example:
      silomesh models import pretrained.safetensors
    """
    with _client(config_path) as client:
        record = client.import_model(file)
    _output(as_json, record, lambda: _print_record(f"imported {file.name}", record))


# --------------------------------------------------------------------------- approvals


@click.group("approvals", context_settings=CONTEXT)
def approvals() -> None:
    """Consent to rounds and training requests (participation policy "manual").

    \b
    Example:
      silomesh approvals list
      silomesh approvals approve 7
    """


@approvals.command("list", context_settings=CONTEXT)
@_config_option
@_json_option
def approvals_list(config_path: Path, as_json: bool) -> None:
    """List pending and decided approval requests.

    \b
    Example:
      silomesh approvals list --json
    """
    with _client(config_path) as client:
        rows = client.approvals()
    _output(as_json, rows, lambda: _print_table("approvals", rows, APPROVAL_COLUMNS))


def _decide(approval_id: int, approve: bool, config_path: Path, as_json: bool) -> None:
    with _client(config_path) as client:
        record = client.decide(approval_id, approve)
    verb = "approved" if approve else "declined"
    _output(as_json, record, lambda: click.echo(f"{verb} request {approval_id}"))


@approvals.command("approve", context_settings=CONTEXT)
@click.argument("approval_id", metavar="ID", type=int)
@_config_option
@_json_option
def approvals_approve(approval_id: int, config_path: Path, as_json: bool) -> None:
    """Approve the pending request ID.

    \b
    Example:
      silomesh approvals approve 7
    """
    _decide(approval_id, True, config_path, as_json)


@approvals.command("decline", context_settings=CONTEXT)
@click.argument("approval_id", metavar="ID", type=int)
@_config_option
@_json_option
def approvals_decline(approval_id: int, config_path: Path, as_json: bool) -> None:
    """Decline the pending request ID.

    \b
    Example:
      silomesh approvals decline 7
    """
    _decide(approval_id, False, config_path, as_json)


# --------------------------------------------------------------------------- registration

#: top-level groups this module provides
GROUPS: tuple[click.Group, ...] = (neighbours, data, models, approvals)
#: commands that belong in ``silomesh peer``
PEER_COMMANDS: tuple[click.Command, ...] = (peer_status, peer_rounds, peer_dashboard)


def register(root: click.Group) -> None:
    """Add these commands to ``root``, replacing placeholders of the same names.

    ``peer status`` and ``peer rounds`` go into ``root``'s ``peer`` group (created if
    missing); the groups replace any top-level command of the same name.
    """
    for group in GROUPS:
        root.add_command(group)
    peer = root.commands.get("peer")
    if not isinstance(peer, click.Group):
        peer = click.Group("peer", help="Run a peer and look at it.", context_settings=CONTEXT)
        root.add_command(peer)
    for command in PEER_COMMANDS:
        peer.add_command(command)
