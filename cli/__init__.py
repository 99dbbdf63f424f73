"""The ``silomesh`` command line: one entry point for operators, researchers and auditors.

This package sits above every layer and only assembles: the root group takes the
commands each layer defines — the peer's (``keygen``, ``peer``, ``data``, ``models``,
``neighbours``, ``approvals``, ``train``: :mod:`silomesh.peer.cli`), ``simnet``
(:mod:`silomesh.simnet.cli`), ``audit`` (:mod:`silomesh.audit.cli`) — plus ``bench``
(:mod:`silomesh.cli.bench`), so no layer has to import a layer above it.

Commands are thin: the library does the work and errors become one clear line with a
non-zero exit code (``click.ClickException``), never a traceback for a user mistake.
"""

from __future__ import annotations

import click

from silomesh.audit.cli import audit
from silomesh.cli.bench import bench
from silomesh.peer.cli import CONTEXT, configure_logging, run_group
from silomesh.peer.cli import cli as peer_commands
from silomesh.simnet.cli import simnet

__all__ = ["cli", "main"]


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
    configure_logging(verbose)


for _command in (*peer_commands.commands.values(), bench, simnet, audit):
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the process exit code."""
    return run_group(cli, argv)
