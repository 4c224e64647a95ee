"""The ``deltawise`` console entry point: overlaps ``import torch`` with the rest of the start.

``import torch`` takes 1.6-2.2 s on 2 cores (benchmarks/RESULTS.md, "Fast start"), longer than the
command line's own imports (typer, rich, pydantic, the option groups) and a merge's recipe parsing
together. A command that will need torch therefore starts importing it in a background thread
before anything else, and the main thread builds the command line meanwhile; the first module of the
command that imports torch waits for that import (Python's per-module import lock) instead of
starting its own. ``--help``, ``--version`` and a bare ``deltawise`` import no torch at all.

Only torch is imported early: it imports no deltawise, transformers or peft module, so the two
threads never wait on each other's import locks."""

from __future__ import annotations

import sys
import threading
from typing import Sequence

NO_TORCH_FLAGS = frozenset({"--help", "-h", "--version"})
EARLY_IMPORTS = ("torch",)


def needs_torch(args: Sequence[str]) -> bool:
    """Whether the command line ``args`` (without the program name) runs a command, as opposed to printing help or the
    version. Every command reads or writes tensors; help and the version never do."""
    return bool(args) and not any(arg in NO_TORCH_FLAGS for arg in args)


def _import_early() -> None:
    import importlib

    for name in EARLY_IMPORTS:
        try:
            importlib.import_module(name)
        except BaseException:  # noqa: BLE001  the command's own import of it reports the problem
            return


def start_early_imports(args: Sequence[str]) -> threading.Thread | None:
    """Start importing torch in a daemon thread when ``args`` run a command; returns the thread, or None."""
    if not needs_torch(args):
        return None
    thread = threading.Thread(target=_import_early, name="deltawise-early-imports", daemon=True)
    thread.start()
    return thread


def main() -> None:
    start_early_imports(sys.argv[1:])
    from deltawise.cli import main as run_command_line

    run_command_line()


if __name__ == "__main__":
    main()
