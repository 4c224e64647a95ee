"""The ``deltawise`` command line: registers the commands of ``deltawise.commands`` and runs them.

``main`` turns library errors into one red line and exit code 1, SIGTERM into the Ctrl-C path
(an interrupted merge keeps its completed shards), and skips the interpreter's teardown once a
command has finished."""

from __future__ import annotations

import sys

import typer

from deltawise.commands import analyze, delta, merge, repair, report, search, stats, sweep, train
from deltawise.commands import eval as eval_command
from deltawise.commands.console import err, escape
from deltawise.errors import DeltawiseError

app = typer.Typer(
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


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="print the installed version and exit"),
) -> None:
    pass


# registration order = the order of `deltawise --help`
COMMAND_MODULES = (merge, delta, train, eval_command, analyze, report, stats, search, repair, sweep)
for _module in COMMAND_MODULES:
    _module.register(app)


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops a merge like Ctrl-C: completed shards are kept


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
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
