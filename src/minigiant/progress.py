"""One progress-bar style for every long loop: description, bar, count, rate, elapsed and ETA."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .hardware import process_rank

console = Console(stderr=True)


def _quiet() -> bool:
    """MINIGIANT_QUIET=1, or a process other than the first of a distributed launch (they all do the same)."""
    return os.environ.get("MINIGIANT_QUIET") == "1" or process_rank() != 0


def progress(transient: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=_quiet(),
        refresh_per_second=2,
    )


def log(message: str) -> None:
    if not _quiet():
        console.print(message)


def quiet_transformers() -> None:
    """Silence transformers' own progress bars and advisory warnings: minigiant reports progress itself, and
    a stray bar on stderr would bury the one-line error a failed command prints."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
