"""The ``deltawise`` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from deltawise.errors import DeltawiseError

app = typer.Typer(
    help="deltawise: merge, compress, transfer and audit weight deltas of pretrained models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# soft_wrap: never insert line breaks into paths, JSON or messages that are piped
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


class _ProgressReporter:
    """Adapts the engine's (stage, done, total) callbacks to a rich progress bar per stage."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.tasks: dict[str, int] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.tasks[stage], completed=done)


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description:<32}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
        console=err, disable=quiet or not err.is_terminal, transient=False,
    )


@app.command()
def merge(
    recipe: Path = typer.Argument(..., help="merge recipe (YAML; mergekit recipes for shared methods work unchanged)"),
    output: Path = typer.Argument(..., help="output folder (created; must not be an input)"),
    device: str = typer.Option("cpu", help="where the arithmetic runs: cpu or cuda"),
    threads: int = typer.Option(2, min=1, help="worker threads reading and merging tensors"),
    shard_size: str = typer.Option("5GB", help="largest output shard, e.g. 5GB, 500MB, 2GiB"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate the recipe and inputs, print the plan, write nothing"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="accept .bin/.pt inputs (loaded with weights_only=True)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output folder once the merge succeeds"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted merge of the same recipe and inputs"),
    restart: bool = typer.Option(False, "--restart", help="discard an interrupted merge and start over"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Merge models as described by RECIPE into OUTPUT.

    An interrupted merge (Ctrl-C, SIGTERM, a crash, a full disk) keeps its completed shards
    beside OUTPUT; rerun with --resume to merge only the rest."""
    from deltawise.io.writer import parse_size
    from deltawise.merge import MergeOptions, build_plan, load_recipe, run_merge
    from deltawise.merge.engine import check_output, dump_plan, to_json

    plan = build_plan(load_recipe(recipe), allow_pickle=allow_pickle)
    for warning in plan.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    if dry_run:
        check_output(plan, output, overwrite)
        print(to_json(dump_plan(plan)))  # plain stdout: the plan must stay valid JSON
        return
    with _progress(quiet) as progress:
        options = MergeOptions(
            device=device, threads=threads, shard_size=parse_size(shard_size), overwrite=overwrite,
            resume=resume, restart=restart, progress=_ProgressReporter(progress),
        )
        result = run_merge(plan, output, options)
    gb = result.bytes_written / 1e9
    out.print(f"merged with {plan.method.name} into {escape(str(result.out))} ({gb:.3f} GB, {result.seconds:.1f} s)", highlight=False)


@app.command()
def verify(folder: Path = typer.Argument(..., help="model folder to check")) -> None:
    """Check a model folder: safetensors structure, the index, and each shard against its manifest."""
    from deltawise.io.verify import verify_folder

    report = verify_folder(folder)
    for name in report.checked:
        out.print(f"[green]ok[/]  {escape(name)}", highlight=False)
    for problem in report.problems:
        err.print(f"[bold red]bad[/] {escape(problem)}", highlight=False)
    scope = "shards, index and manifest checksums" if report.has_manifest else "safetensors structure and index (no manifest)"
    if not report.ok:
        err.print(f"{len(report.problems)} problem(s) in {escape(str(folder))}", highlight=False)
        raise typer.Exit(1)
    out.print(f"{escape(str(folder))}: verified ({scope})", highlight=False)


@app.command()
def methods() -> None:
    """List the merge methods and their parameters."""
    from rich.table import Table

    from deltawise.merge import REGISTRY

    table = Table(title="merge methods", show_lines=True)
    table.add_column("method")
    table.add_column("what it does")
    table.add_column("parameters")
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        table.add_row(name, cls.summary, "\n".join(p.describe() for p in cls.params) or "-")
    out.print(table)


@app.command()
def demo(
    workdir: Optional[Path] = typer.Option(None, help="where to write models (default: a temporary folder)"),
) -> None:
    """Make tiny checkpoints, merge them with every method, check the results load, print a summary."""
    from deltawise.demo import run_demo

    run_demo(workdir, out)


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops a merge like Ctrl-C: completed shards are kept


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except DeltawiseError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]: nothing was written under the output name; "
                  "a merge can be continued with --resume", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
