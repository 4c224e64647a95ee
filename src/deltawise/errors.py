"""Errors meant for the user: each carries a message that says what is wrong and what to do."""

import os
import stat


class DeltawiseError(Exception):
    """Base class of every error deltawise reports to the user (the CLI prints it without a traceback)."""


class RecipeError(DeltawiseError):
    """The recipe cannot run: every problem found while planning (unknown method or parameter,
    bad value, wrong number of models, and inputs that are missing, corrupt, refused or
    mismatched), reported together in one message."""


class InputError(DeltawiseError):
    """An input cannot be used, found outside planning: by a reader directly, or while the merge
    streams (NaN/inf values, files changing under it)."""


class OutputError(DeltawiseError):
    """The output location cannot be written safely."""


def bullet_list(problems: list[str], limit: int = 20) -> str:
    """Format problems as an indented list, eliding the tail so one message stays readable."""
    shown = [f"  - {p}" for p in problems[:limit]]
    if len(problems) > limit:
        shown.append(f"  - ... and {len(problems) - limit} more")
    return "\n".join(shown)


def require_regular_file(path: str | os.PathLike, what: str) -> None:
    """Raise InputError unless ``path`` (after symlinks) is a regular file.

    Opening a FIFO blocks until some other process writes to it, and a device or socket is no
    checkpoint either, so every input file is checked with ``os.stat`` before it is opened."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise InputError(f"{what} {str(path)!r} cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "not a regular file")
        raise InputError(f"{what} {str(path)!r} is {kind}, not a regular file; refusing to read it")
