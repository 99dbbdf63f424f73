"""The peer layer's commands: identity, the peer daemon and its operator tools.

``keygen``, ``peer run | status | rounds | dashboard``, ``data``, ``models``,
``neighbours``, ``approvals`` (:mod:`silomesh.peer.cli_ops`), ``study``
(:mod:`silomesh.peer.cli_study`) and ``train`` (:mod:`silomesh.peer.cli_local`). The
``silomesh`` entry point (:mod:`silomesh.cli`) adds these to its root group beside the
other layers' groups; :data:`cli` holds just these (``python -m silomesh.peer.cli``), so
this layer imports nothing above it.

Commands are thin: the library does the work and errors become one clear line with a
non-zero exit code (``click.ClickException``), never a traceback for a user mistake.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from silomesh.peer import cli_ops
from silomesh.peer.cli_local import export_bundle_command, train
from silomesh.peer.cli_study import study
from silomesh.peer.identity import KEY_FILE_NAME, IdentityError, write_key_file

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def configure_logging(verbose: int) -> None:
    """Log at WARNING, or INFO / DEBUG with ``-v`` / ``-vv``; libp2p's chatter stays at WARNING."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("libp2p", "multiaddr", "async_service"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="silomesh")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """silomesh peer tools: a hospital's identity, its peer and the peer's operator commands.

    The full command line (with simnet and audit) is 'silomesh'.

    \b
    Examples:
      silomesh keygen --out /etc/silomesh
      silomesh peer run --config /etc/silomesh/peer.toml
    """
    configure_logging(verbose)


cli.add_command(train)
cli.add_command(export_bundle_command)
cli.add_command(study)


@cli.command(context_settings=CONTEXT)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help=f"Folder for the key file ({KEY_FILE_NAME}); created if missing.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def keygen(out_dir: Path, as_json: bool) -> None:
    """Create a peer identity: a 32-byte Ed25519 seed in OUT/peer.key (mode 0600).

    The seed is the peer's libp2p identity, its signing key and (converted) its
    encryption key. Back it up; an existing key file is never overwritten. Give the
    printed PeerID and public key to the hospitals that will trust this peer.

    \b
    Example:
      silomesh keygen --out /etc/silomesh
    """
    path = out_dir / KEY_FILE_NAME
    try:
        identity = write_key_file(path)
    except IdentityError as exc:
        raise click.ClickException(str(exc)) from None
    info = {"key_file": str(path), "peer_id": identity.peer_id_text, "public_key": identity.public_key.hex()}
    if as_json:
        click.echo(json.dumps(info))
    else:
        for key, value in info.items():
            click.echo(f"{key:<11} {value}")


cli_ops.register(cli)


@click.command(name="run", context_settings=CONTEXT)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default="peer.toml",
    show_default=True,
    envvar="SILOMESH_CONFIG",
    help="The peer's configuration file.",
)
def peer_run(config_path: Path) -> None:
    """Run this hospital's peer until stopped (SIGTERM or Ctrl-C stop it cleanly).

    The peer listens for its trusted neighbours, runs federated rounds, keeps its models,
    rounds and audit log in its store, and serves the local control API used by
    'silomesh peer status', 'silomesh models ...' and the other operator commands.

    \b
    Example:
      silomesh keygen --out /etc/silomesh
      silomesh peer run --config /etc/silomesh/peer.toml
    """
    from silomesh.peer.service import run_service

    code = run_service(config_path)
    if code:
        sys.exit(code)


@cli.command(context_settings=CONTEXT)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default="peer.toml",
    show_default=True,
    envvar="SILOMESH_CONFIG",
    help="The peer's configuration file.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON (for monitoring).")
def doctor(config_path: Path, as_json: bool) -> None:
    """Check this peer's setup and its links: config, key, reachability, relay, each neighbour.

    Every failed check prints one line saying what to do (which port, which address, which
    key). Exits 1 if a check failed. Run it on the peer's host while the peer runs.

    \b
    Example:
      silomesh doctor --config /etc/silomesh/peer.toml
      silomesh doctor --json
    """
    from silomesh.peer.doctor import diagnose, render

    report = diagnose(config_path)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2, sort_keys=True))
    else:
        for line in render(report):
            click.echo(line)
    if not report.ok:
        sys.exit(1)


_peer_group = cli.commands["peer"]
assert isinstance(_peer_group, click.Group)
_peer_group.add_command(peer_run)


def run_group(group: click.Group, argv: list[str] | None = None) -> int:
    """Run a ``silomesh`` command group; returns the process exit code (click's exit turned into it)."""
    try:
        group.main(args=argv, prog_name="silomesh", standalone_mode=True)
    except SystemExit as exc:  # click exits; turn it into a return code for tests
        return int(exc.code or 0)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the peer layer's commands (``python -m silomesh.peer.cli``); returns the exit code."""
    return run_group(cli, argv)


if __name__ == "__main__":
    sys.exit(main())
