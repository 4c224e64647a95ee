"""The ``deltawise`` command line: registers the commands of ``deltawise.commands`` and runs them.

A command module is imported when a command of it is needed: ``deltawise merge ...`` imports
``deltawise.commands.merge`` and not the training, evaluation and analysis commands (their option
groups and typer signatures cost 0.1 s, benchmarks/RESULTS.md "Fast start"). ``deltawise --help``, an
unknown command name and ``app`` read from this module register every command, in the order of
``COMMAND_MODULES``.

``main`` turns library errors into one red line and exit code 1, SIGTERM into the Ctrl-C path
(an interrupted merge keeps its completed shards), and skips the interpreter's teardown once a
command has finished."""

from __future__ import annotations

import sys
from typing import Sequence

import typer

from deltawise.commands.console import err, escape
from deltawise.errors import DeltawiseError

_app = typer.Typer(
    help="deltawise: merge, compress, transfer and audit weight deltas of pretrained models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def installed_version() -> str:
    """The version pip installed (``importlib.metadata``), or the source tree's ``__version__`` when run uninstalled."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deltawise")
    except PackageNotFoundError:
        from deltawise import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        print(f"deltawise {installed_version()}")
        raise typer.Exit()


@_app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="print the installed version and exit"),
) -> None:
    pass


# the modules of deltawise.commands; registration order = the order of `deltawise --help`
COMMAND_MODULES = ("merge", "delta", "train", "eval", "analyze", "report", "stats", "search", "repair", "sweep")
_registered: list[str] = []


def _command_names(app: typer.Typer) -> set[str]:
    """The names ``app`` answers to so far, spelled as typer derives them (``get_command_name``)."""
    from typer.main import get_command_name

    names = {info.name or get_command_name(info.callback.__name__) for info in app.registered_commands if info.callback}
    return names | {info.name for info in app.registered_groups if info.name}


def register_commands(command: str | None = None) -> typer.Typer:
    """The command line with the modules of ``COMMAND_MODULES`` registered in order up to the one that provides
    ``command``; every module when ``command`` is None or no module provides it (click then lists the choices)."""
    for name in COMMAND_MODULES:
        if command is not None and command in _command_names(_app):
            break
        if name not in _registered:
            # __import__, not importlib.import_module: `python -X importtime` logs only the former
            __import__(f"deltawise.commands.{name}", fromlist=["register"]).register(_app)
            _registered.append(name)
    return _app


def command_in(args: Sequence[str]) -> str | None:
    """The command that ``args`` (without the program name) run: the first one that is not an option (the group's
    options, ``--help`` and ``--version``, take no value); None for a bare ``deltawise``."""
    return next((arg for arg in args if not arg.startswith("-")), None)


def __getattr__(name: str):
    if name == "app":  # the whole command line, for tests and tools: `from deltawise.cli import app`
        return register_commands()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops a merge like Ctrl-C: completed shards are kept


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    try:
        register_commands(command_in(sys.argv[1:]))()
    except DeltawiseError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        _exit(1)
    except KeyboardInterrupt:
        _interrupted()
    except SystemExit as done:  # typer ends every command this way
        if _caused_by_interrupt(done):  # typer turns Ctrl-C into Exit(130) before we see it
            _interrupted()
        code = done.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        _exit(code or 0)


def _caused_by_interrupt(exc: BaseException) -> bool:
    """True when ``exc`` was raised while handling a KeyboardInterrupt (Ctrl-C, or SIGTERM through ``_terminate``)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _interrupted() -> None:
    err.print("[bold red]interrupted[/]: nothing was written under the output name; "
              "a merge can be continued with --resume", highlight=False)
    sys.exit(130)


def _exit(code: int) -> None:
    """End the process without the interpreter's teardown when nothing is left running.

    With torch imported, finalising every module at exit takes 0.5-0.7 s here, longer than many
    commands' own work. By now a command has written its files (atomically) and joined its
    threads; the atexit handlers (temporary folders, weakref finalizers) still run and the
    streams are flushed. With another thread alive, or without the atexit runner, this is a
    plain exit."""
    import atexit
    import os
    import threading

    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_handlers is None or threading.active_count() > 1:
        sys.exit(code)
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be said
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
