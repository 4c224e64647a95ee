"""What every command prints with: the two consoles, progress bars, the stage reporter, warnings.

Results go to ``out`` (stdout); progress, warnings and errors to ``err`` (stderr), so a command's
stdout can be piped. Both soft-wrap: never a line break inside a path, JSON or message.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

__all__ = ["ProgressReporter", "bytes_progress", "err", "escape", "no_transformers_bars", "note", "out", "quiet_libraries",
           "stage_factory", "steps_progress", "warn"]


class ProgressReporter:
    """Adapts the library's (stage, done, total) callbacks to a rich progress bar per stage."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.tasks: dict[str, int] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.tasks[stage], completed=done)


def bytes_progress(quiet: bool) -> Progress:
    """A progress bar counting bytes (merge, extract, apply, compress)."""
    return Progress(
        TextColumn("{task.description:<32}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
        console=err, disable=quiet or not err.is_terminal, transient=False,
    )


def steps_progress(quiet: bool) -> Progress:
    """A progress bar counting steps (batches, tensors, interpolation points) rather than bytes."""
    from rich.progress import MofNCompleteColumn

    return Progress(
        TextColumn("{task.description:<32}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=err, disable=quiet or not err.is_terminal, transient=False,
    )


def stage_factory(progress: Progress) -> Callable[[str], Callable[[int, int], None]]:
    """Stage name -> (done, total) callback drawing one bar per stage."""
    reporter = ProgressReporter(progress)
    return lambda stage: (lambda done, total: reporter(stage, done, total))


def warn(message: str) -> None:
    """One warning line on stderr."""
    err.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)


def note(quiet: bool) -> Callable[[str], None]:
    """A callback printing the library's progress notes on stderr, or nothing when quiet."""
    return (lambda msg: None) if quiet else (lambda msg: err.print(escape(msg), highlight=False))


def no_transformers_bars() -> None:
    """Commands that load and save many models (bam, budget search) draw their own bars; the
    per-model load/save bars of transformers would drown them."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@contextmanager
def quiet_libraries(quiet: bool) -> Iterator[None]:
    """For a command that draws its own progress (train): no transformers / huggingface_hub bars, and
    when ``quiet`` none of their log messages or Python warnings either (deprecation notices meant for
    library developers, never): restored afterwards."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    verbosity, bars_were_off = hf_logging.get_verbosity(), are_progress_bars_disabled()
    hf_bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning):
                warnings.simplefilter("ignore", category)
            if quiet:
                warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if hf_bars_were_on:
            hf_logging.enable_progress_bar()
        if not bars_were_off:
            enable_progress_bars()
