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
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Merge models as described by RECIPE into OUTPUT."""
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
            progress=_ProgressReporter(progress),
        )
        result = run_merge(plan, output, options)
    gb = result.bytes_written / 1e9
    out.print(f"merged with {plan.method.name} into {escape(str(result.out))} ({gb:.3f} GB, {result.seconds:.1f} s)", highlight=False)


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


def _steps_progress(quiet: bool) -> Progress:
    """A progress bar counting steps (batches, tensors, interpolation points) rather than bytes."""
    from rich.progress import MofNCompleteColumn

    return Progress(
        TextColumn("{task.description:<32}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=err, disable=quiet or not err.is_terminal, transient=False,
    )


def _stage_factory(progress: Progress):
    """Stage name -> (done, total) callback drawing one bar per stage."""
    reporter = _ProgressReporter(progress)
    return lambda stage: (lambda done, total: reporter(stage, done, total))


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="model folder (causal LM for text and choices; classifier for labelled data)"),
    source: list[Path] = typer.Option([], "--source", help="data whose performance must be retained (repeatable)"),
    target: list[Path] = typer.Option([], "--target", help="data the adaptation aims at (repeatable)"),
    tasks: list[str] = typer.Option([], "--tasks", help="lm-eval task (needs lm-eval installed, offline data); 'target:NAME' marks a target"),
    output: Path = typer.Option(..., "--output", "-o", help="result JSON to write"),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="the base model's result JSON: adds forgetting metrics"),
    max_length: Optional[int] = typer.Option(None, min=2, help="tokens per window (default: model context, at most 1024)"),
    stride: Optional[int] = typer.Option(None, min=1, help="sliding-window stride (default: max_length/2)"),
    batch_size: int = typer.Option(8, min=1, help="sequences per forward pass"),
    mc_norm: str = typer.Option("total", help="multiple-choice score: total | token | byte (log-likelihood per token/byte)"),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Evaluate MODEL: perplexity on text, accuracy on labelled or multiple-choice JSONL."""
    from deltawise.eval.forgetting import forgetting
    from deltawise.eval.results import load_result
    from deltawise.eval.runner import EvalOptions, evaluate

    if mc_norm not in ("total", "token", "byte"):
        raise typer.BadParameter("--mc-norm must be total, token or byte")
    base = load_result(baseline) if baseline else None  # a bad baseline fails before the long run
    lm_tasks = [("target", t.removeprefix("target:")) if t.startswith("target:") else ("source", t.removeprefix("source:")) for t in tasks]
    with _steps_progress(quiet) as progress:
        options = EvalOptions(max_length=max_length, stride=stride, batch_size=batch_size, mc_norm=mc_norm,  # type: ignore[arg-type]
                              dtype=dtype, device=device, progress=_stage_factory(progress), lm_eval_tasks=lm_tasks)
        result = evaluate(model, source, target, options)
    if base is not None:
        result.forgetting = forgetting(result, base)
    result.save(output)
    for ds in result.datasets:
        out.print(f"{ds.role:<6} {escape(ds.name)}: {ds.metric} = {ds.value:.4g} ({ds.n_items} items, {ds.seconds:.1f} s)", highlight=False)
    if result.forgetting is not None and result.forgetting.forgetting_score is not None:
        out.print(f"forgetting score: {result.forgetting.forgetting_score:.2f}", highlight=False)
    out.print(f"wrote {escape(str(output))}", highlight=False)


analyze_app = typer.Typer(help="Weight-space analyses: delta norms, intruder dimensions, sign conflicts, masks, interpolation curves.",
                          no_args_is_help=True)
app.add_typer(analyze_app, name="analyze")


@analyze_app.command("weights")
def analyze_weights_cmd(
    base: str = typer.Argument(..., help="base (pre-trained) model folder"),
    models: list[str] = typer.Argument(..., help="fine-tuned model folders (two or more add sign conflicts and mask overlaps)"),
    output: Path = typer.Option(..., "--output", "-o", help="analysis JSON to write"),
    k: int = typer.Option(10, min=1, help="top singular vectors of each fine-tuned matrix searched for intruders"),
    eps: float = typer.Option(0.5, min=0.0, max=1.0, help="intruder threshold on max |cos| with the base's singular vectors"),
    side: str = typer.Option("left", help="singular vectors compared: left (U) or right (V)"),
    tall_lambda: float = typer.Option(0.4, min=0.0, help="TALL mask threshold lambda (one value for every task)"),
    no_intruders: bool = typer.Option(False, "--no-intruders", help="skip the SVDs (norms, conflicts and masks only)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Per-tensor delta norms, spectra and intruder dimensions, sign conflicts and TALL mask overlaps, streamed."""
    from deltawise.analyze.weights import WeightsOptions, analyze_weights

    if side not in ("left", "right"):
        raise typer.BadParameter("--side must be left or right")
    with _steps_progress(quiet) as progress:
        opts = WeightsOptions(k=k, eps=eps, side=side, tall_lambda=tall_lambda, intruders=not no_intruders,  # type: ignore[arg-type]
                              progress=_stage_factory(progress)("tensors"))
        result = analyze_weights(base, models, opts)
    result.save(output)
    for m in result.summary.models:
        out.print(f"{escape(m.model)}: |delta| = {m.delta_norm:.4g} (relative {m.relative or 0:.3g}), "
                  f"{m.intruders} intruder dimension(s) in {m.matrices} matrices", highlight=False)
    if result.summary.sign_conflict_rate is not None:
        out.print(f"sign conflicts: {result.summary.sign_conflict_rate:.3%} of entries; selfish {result.summary.selfish_rate:.3%}, "
                  f"catastrophic {result.summary.catastrophic_rate:.3%}", highlight=False)
    out.print(f"wrote {escape(str(output))}", highlight=False)


@analyze_app.command("interpolate")
def analyze_interpolate_cmd(
    model_a: str = typer.Argument(..., help="first model (lambda = 0)"),
    model_b: str = typer.Argument(..., help="second model (lambda = 1)"),
    data: Path = typer.Option(..., "--data", help="text data to measure loss on"),
    output: Path = typer.Option(..., "--output", "-o", help="curve JSON to write"),
    points: int = typer.Option(11, min=2, help="number of lambdas in linspace(0, 1, points)"),
    max_length: Optional[int] = typer.Option(None, min=2, help="tokens per window"),
    batch_size: int = typer.Option(8, min=1),
    device: str = typer.Option("cpu"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Loss and perplexity along the straight line between two models, and the loss barrier."""
    from deltawise.analyze.interpolate import InterpolationOptions, interpolation_curve

    with _steps_progress(quiet) as progress:
        opts = InterpolationOptions(points=points, max_length=max_length, batch_size=batch_size, device=device,
                                    progress=_stage_factory(progress)("interpolation points"))
        result = interpolation_curve(model_a, model_b, data, opts)
    result.save(output)
    out.print(f"loss barrier {result.barrier:.4g} nats/token at lambda = {result.barrier_lambda:.2f}; wrote {escape(str(output))}", highlight=False)


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="run folders (every *.json inside) or result JSON files from eval/analyze"),
    output: Path = typer.Option(..., "--output", "-o", help="HTML file to write"),
    title: str = typer.Option("deltawise audit report", help="page title"),
) -> None:
    """One self-contained HTML page: trade-off plot, interpolation curves, per-layer deltas, intruders, tables."""
    from deltawise.report.html import build_report

    result = build_report(runs, output, title)
    for skipped in result.skipped:
        err.print(f"[yellow]skipped:[/] {escape(skipped)}", highlight=False)
    out.print(f"wrote {escape(str(output))}", highlight=False)


def main() -> None:
    try:
        app()
    except DeltawiseError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]: no output was written under the final name")
        sys.exit(130)


if __name__ == "__main__":
    main()
