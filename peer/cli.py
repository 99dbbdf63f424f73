"""The ``silomesh`` command line: one entry point for operators, researchers and auditors.

Commands are thin: the library does the work and errors become one clear line with a
non-zero exit code (``click.ClickException``), never a traceback for a user mistake.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from silomesh.audit.cli import audit
from silomesh.peer import cli_ops
from silomesh.peer.cli_local import train
from silomesh.peer.identity import KEY_FILE_NAME, IdentityError, write_key_file
from silomesh.simnet.cli import simnet

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

@click.group(context_settings=CONTEXT)
@click.version_option(package_name="silomesh")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """silomesh: federated learning for medical imaging without a server.

    Every hospital runs a peer that exchanges encrypted, signed weight deltas with the
    neighbours it trusts; every exchange lands in a signed, hash-chained audit log.

    \b
    Examples:
      silomesh train --task catheter --silo 0 --steps 200
      silomesh simnet run --peers 4 --rounds 3
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("libp2p", "multiaddr", "async_service"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


cli.add_command(train)


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


@cli.command(context_settings={**CONTEXT, "ignore_unknown_options": True})
@click.argument("name", required=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(name: str | None, args: tuple[str, ...]) -> None:
    """Run one of the benchmarks in the source tree's bench/ folder; each prints JSON.

    Without NAME, lists the benchmarks. Extra arguments go to the benchmark
    (try 'silomesh bench codec --help').

    \b
    Example:
      silomesh bench codec
      silomesh bench exchange
    """
    import subprocess

    folder = Path(__file__).resolve().parent.parent / "bench"
    available = sorted(p.stem.removeprefix("bench_") for p in folder.glob("bench_*.py"))
    if not available:
        raise click.ClickException(f"no benchmarks found in {folder} (they ship with the source tree, not the wheel)")
    if name is None:
        click.echo("\n".join(available))
        return
    if name not in available:
        raise click.ClickException(f"unknown benchmark {name!r}; choose from {', '.join(available)}")
    code = subprocess.call([sys.executable, str(folder / f"bench_{name}.py"), *args])
    if code:
        sys.exit(code)


cli.add_command(audit)
cli.add_command(simnet)

_peer_group = cli.commands["peer"]
assert isinstance(_peer_group, click.Group)
_peer_group.add_command(peer_run)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the process exit code."""
    try:
        cli.main(args=argv, prog_name="silomesh", standalone_mode=True)
    except SystemExit as exc:  # click exits; turn it into a return code for tests
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
