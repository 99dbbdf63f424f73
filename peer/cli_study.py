"""``silomesh study create | show | approve``: propose, review and approve a signed study manifest.

``create`` and ``show`` work on files only; ``approve`` asks the running peer (control
API) to record its operator's approval. docs/PRIVACY.md, "The study manifest".
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from silomesh.peer.cli_ops import CONTEXT, _client, _config_option, _json_option
from silomesh.peer.config import ConfigError, load_config
from silomesh.peer.identity import IdentityError, load_key_file
from silomesh.peer.study import config_differences, manifest_for
from silomesh.protocol import Identity
from silomesh.protocol.study import SignedStudy, StudyError, read_study


def _read(path: Path) -> SignedStudy:
    try:
        return read_study(path.read_bytes())
    except OSError as exc:
        raise click.ClickException(f"cannot read {path}: {exc.strerror}") from None
    except StudyError as exc:
        raise click.ClickException(f"{path}: {exc}") from None


def review_lines(study: SignedStudy) -> list[str]:
    """The study as an operator reviews it: every field the digest covers, and who proposed it."""
    m = study.manifest
    lines = [
        f"study      {m.name} version {m.version}",
        f"digest     {study.digest_hex}",
        f"proposer   {study.proposer} (signature verified)",
        f"federation {m.federation}",
        f"task       {m.task}",
        f"model      {m.model}",
        f"strategy   {m.strategy} {json.dumps(dict(m.strategy_params), sort_keys=True)}",
        "rounds     " + ", ".join(f"{k} {v}" for k, v in m.rounds.items()),
        "privacy    " + ("none (no DP-SGD)" if m.privacy is None else
                         ", ".join(f"{k} {v}" for k, v in m.privacy.items())),
        f"members    {len(m.members)}",
    ]
    lines.extend(f"  {member}" for member in m.members)
    return lines


@click.group("study", context_settings=CONTEXT)
def study() -> None:
    """The signed study manifest every hospital approves before its peer trains.

    \b
    Example:
      silomesh study create --name cardio-2026 --out study.json
      silomesh study show study.json
      silomesh study approve study.json
    """


@study.command("create", context_settings=CONTEXT)
@click.option("--name", required=True, help="The study's name (1-64 letters, digits, '-', '_', '.').")
@click.option("--version", "version", type=int, default=1, show_default=True,
              help="Bump it for each changed manifest.")
@click.option("--member", "members", multiple=True, metavar="PEERID",
              help="A member's PeerID (repeat); default: this peer and its trusted neighbours.")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the signed study file (never overwritten).")
@_config_option
def study_create(name: str, version: int, members: tuple[str, ...], out: Path, config_path: Path) -> None:
    """Write the study this peer.toml describes, signed with this peer's key.

    Task, model (architecture digest), strategy and parameters, rounds and [privacy] are
    taken from --config; send the file to every member hospital, whose operators review
    it with 'silomesh study show' and name it in their peer.toml's [study] manifest.

    \b
    Example:
      silomesh study create --config /etc/silomesh/peer.toml --name cardio-2026 --out study.json
    """
    try:
        config = load_config(config_path)
        identity = load_key_file(config.key_file)
    except (ConfigError, IdentityError) as exc:
        raise click.ClickException(str(exc)) from None
    me = identity.peer_id_text
    chosen = set(members) if members else {me, *(t.peer_id for t in config.trusted)}
    try:
        signed = manifest_for(config, name=name, version=version, members=chosen | {me}).sign(
            Identity.from_seed(identity.seed)
        )
    except StudyError as exc:
        raise click.ClickException(str(exc)) from None
    if out.exists():
        raise click.ClickException(f"{out} exists; a study file is never overwritten (choose another name)")
    out.write_bytes(signed.to_bytes())
    click.echo(f"wrote {out}: {signed.label}, {len(signed.manifest.members)} members")
    click.echo(f"digest {signed.digest_hex}")


@study.command("show", context_settings=CONTEXT)
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also compare the study with this peer.toml and list every field that differs.")
@_json_option
def study_show(file: Path, config_path: Path | None, as_json: bool) -> None:
    """Review a study file: verify its signature, print every field and its digest.

    Exits 1 when --config is given and the peer's configuration differs from the study.

    \b
    Example:
      silomesh study show study.json
      silomesh study show study.json --config /etc/silomesh/peer.toml
    """
    signed = _read(file)
    differs: list[str] = []
    if config_path is not None:
        try:
            config = load_config(config_path)
            peer_id = load_key_file(config.key_file).peer_id_text
        except (ConfigError, IdentityError) as exc:
            raise click.ClickException(str(exc)) from None
        differs = config_differences(config, signed, peer_id)
    if as_json:
        click.echo(json.dumps({**signed.manifest.to_json(), "digest": signed.digest_hex,
                               "proposer": signed.proposer, "differences": differs}, indent=2))
    else:
        for line in review_lines(signed):
            click.echo(line)
        if config_path is not None:
            click.echo("peer.toml  " + ("matches the study" if not differs else "DIFFERS:"))
            for line in differs:
                click.echo(f"  {line}")
    if differs:
        raise SystemExit(1)


@study.command("approve", context_settings=CONTEXT)
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@_config_option
@_json_option
def study_approve(file: Path, config_path: Path, as_json: bool) -> None:
    """Approve the study in FILE on the running peer: it then trains and talks to members.

    The peer accepts only the digest of the manifest its own [study] names, and records
    the approval as a signed 'study-approved' entry in its audit log. Review the file
    with 'silomesh study show' first.

    \b
    Example:
      silomesh study approve study.json --config /etc/silomesh/peer.toml
    """
    signed = _read(file)
    with _client(config_path) as client:
        record = client.approve_study(signed.digest_hex)
    if as_json:
        click.echo(json.dumps(record, indent=2))
    else:
        click.echo(f"approved {signed.label}")
