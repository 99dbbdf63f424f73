"""``silomesh bench``: run the benchmarks that ship with the source tree (``bench/``)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.command(context_settings={**CONTEXT, "ignore_unknown_options": True})
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
