"""The command line: every command is documented and user mistakes give one clear line."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from silomesh.cli import cli

DESIGN_GROUPS = ["keygen", "peer", "data", "models", "simnet", "audit", "bench", "train"]


def _walk(command: click.Command, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    found = [(path, command)]
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            found.extend(_walk(sub, (*path, name)))
    return found


def test_help_lists_every_command_group_of_the_design() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0, result.output
    for group in DESIGN_GROUPS:
        assert f"  {group}" in result.output


@pytest.mark.parametrize("path", [p for p, _ in _walk(cli)], ids=lambda p: " ".join(p) or "root")
def test_every_command_has_help_text(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    command = dict(_walk(cli))[path]
    assert (command.help or "").strip(), f"'silomesh {' '.join(path)}' has no help text"


def test_user_mistake_is_one_line_error_without_traceback() -> None:
    result = CliRunner().invoke(cli, ["simnet", "run", "--peers", "1"])
    assert result.exit_code != 0
    assert "Error" in result.output
    assert "Traceback" not in result.output


def test_console_script_entry_point_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "silomesh.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "silomesh" in proc.stdout


def test_peer_commands_load_no_layer_above_the_peer() -> None:
    code = ("import sys, silomesh.peer.cli; "
            "print(sorted(m for m in sys.modules if m.startswith(('silomesh.simnet', 'silomesh.cli'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
