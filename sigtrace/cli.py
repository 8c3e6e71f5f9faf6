"""``flask sigtrace`` commands (filled in by the CLI work)."""

from __future__ import annotations

import click

__all__ = ["sigtrace_cli"]


@click.group("sigtrace")
def sigtrace_cli() -> None:
    """Inspect sigtrace's view of this process's signals."""
