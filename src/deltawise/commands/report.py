"""``report``: one self-contained HTML page from the JSON that eval and analyze write."""

from __future__ import annotations

from pathlib import Path

import typer

from deltawise.commands.console import err, escape, out
from deltawise.commands.flags import options
from deltawise.options import RunOptions


@options("run", RunOptions, only=("output",), override={"output": {"help": "HTML file to write"}})
def report(
    runs: list[Path] = typer.Argument(..., help="run folders (every *.json inside) or result JSON files from eval/analyze"),
    run: RunOptions = ...,
    title: str = typer.Option("deltawise audit report", help="page title"),
) -> None:
    """One self-contained HTML page: trade-off plot, interpolation curves, per-layer deltas, intruders, tables."""
    from deltawise.io.output import check_output_file
    from deltawise.report.html import build_report

    assert run.output is not None
    check_output_file(run.output, [("run", path) for path in runs])
    result = build_report(runs, run.output, title)
    for skipped in result.skipped:
        err.print(f"[yellow]skipped:[/] {escape(skipped)}", highlight=False)
    out.print(f"wrote {escape(str(run.output))}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(report)
