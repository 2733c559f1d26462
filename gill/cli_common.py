"""What every ``gill`` command module shares: the stderr console and the one way a command fails."""

from __future__ import annotations

import typer
from rich.console import Console

console = Console(stderr=True, soft_wrap=True)  # soft wrap: paths in messages stay whole


def fail(error: Exception) -> None:
    """Print ``error`` as the command's error and exit with status 2 (bad input or a missing file)."""
    console.print(f"[red]error:[/red] {error}")
    raise typer.Exit(2)
