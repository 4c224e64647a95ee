"""``lr-sweep``: short training runs over a learning-rate grid, scored for target gain and retention."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer

from deltawise.commands.console import ProgressReporter, escape, no_transformers_bars, note, out, steps_progress
from deltawise.commands.flags import options
from deltawise.commands.train import DATA_HELP, method_params
from deltawise.options import (
    ONE_PROCESS_JOBS,
    BudgetSearchOptions,
    DataOptions,
    ExecutorOptions,
    IntervalOptions,
    LoadOptions,
    LrSweepOptions,
    MethodChoice,
    RunOptions,
    SplitOptions,
    TrainingOptions,
)

SWEPT = ("lr", "max_steps", "epochs")  # set by the sweep itself


@options("load", LoadOptions)
@options("intervals", IntervalOptions)
@options("split", SplitOptions)
@options("search", BudgetSearchOptions, exclude=("search_param", "refine", "baseline", "most_retentive", "report"), override={
    "retain": {"help": "retention budget SOURCE:MIN (e.g. en.jsonl:0.98; repeatable): the recommended rate keeps "
                       "SOURCE's retention >= MIN"},
    "target": {"help": "data the target gain is measured on (repeatable)"}})
@options("choice", MethodChoice)
@options("training", TrainingOptions, exclude=SWEPT)
@options("sweep", LrSweepOptions)
@options("executor", ExecutorOptions, exclude=ONE_PROCESS_JOBS, override={"jobs": {
    "min": 1, "help": "local executor: runs trained at once, in separate processes (each gets its share of the CPU threads)"}})
@options("data_options", DataOptions, only=("max_examples",), override={
    "max_examples": {"help": "train each short run on the first N items of --data (default: all)"}})
@options("run", RunOptions, exclude=("device",), override={
    "output": {"help": "sweep folder: cached runs, sweep.json and sweep.png (an interrupted sweep resumes from it)"},
    "overwrite": {"help": "discard the runs cached in the sweep folder and train every rate again"},
    "quiet": {"help": "no progress bar or messages"}})
def lr_sweep(
    model: str = typer.Argument(..., help="base model (a Hugging Face folder): each run starts from it"),
    data: Path = typer.Option(..., "--data", help=DATA_HELP),
    run: RunOptions = ...,
    data_options: DataOptions = ...,
    sweep: LrSweepOptions = ...,
    executor: ExecutorOptions = ...,
    training: TrainingOptions = ...,
    choice: MethodChoice = ...,
    search: BudgetSearchOptions = ...,
    split: SplitOptions = ...,
    intervals: IntervalOptions = ...,
    load: LoadOptions = ...,
) -> None:
    """Train MODEL briefly at each of --lrs, score every run for --target gain and --retain retention, plot gain
    against retention, and recommend the largest gain within the budget (docs/repair.md, "Learning-rate sweep").

    Short runs rank the rates by early forgetting; they do not predict a full run's final numbers."""
    from deltawise.adapt.runtime import resolve_device
    from deltawise.eval.runner import EvalOptions
    from deltawise.search.budgeted import RetentionBudget
    from deltawise.search.lr_sweep import SweepOptions, run_lr_sweep

    assert run.output is not None
    no_transformers_bars()
    settings = {k: v for k, v in asdict(training).items() if k not in SWEPT}
    opts = SweepOptions(
        retain=[RetentionBudget.parse(r) for r in search.retain], targets=list(search.target), lrs=sweep.rates(),
        steps=sweep.steps, method=choice.method, method_params=method_params(choice), training=settings,
        max_examples=data_options.max_examples, executor=executor, overwrite=run.overwrite,
        trust_remote_code=load.trust_remote_code, split=split, heldout_retain=list(search.heldout_retain),
        heldout_targets=list(search.heldout_target), intervals=intervals,
        # the runs are scored where they train (--device); a cuda:N index is kept by torch's default device
        eval=EvalOptions(max_length=search.eval_max_length, batch_size=search.eval_batch_size,
                         device="cuda" if resolve_device(training.device).startswith("cuda") else "cpu",
                         trust_remote_code=load.trust_remote_code),
        note=None if run.quiet else note(False))
    with steps_progress(run.quiet) as progress:
        opts.progress = ProgressReporter(progress)
        result = run_lr_sweep(model, data, run.output, opts)
    out.print(sweep_table(result))
    if result.recommended is None:
        from deltawise.errors import DeltawiseError

        raise DeltawiseError("no rate keeps every retention's lower bound above its budget on the selection split; try "
                             f"smaller rates or fewer --steps (runs and plot kept in {run.output})")
    rec = result.points[result.recommended]
    out.print(f"recommended: lr {rec.lr:g} (largest target gain within the budget on the selection split); "
              f"plot {escape(str(result.plot))}", highlight=False)
    level = result.intervals.get("level", 0.95)
    for kind in ("retention", "target"):
        for name, value in rec.heldout[kind].items():
            ci = rec.heldout[f"{kind}_ci"][name]
            shown = f"{value:.4f}" if ci is None else f"{value:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"
            out.print(f"held out: {kind} {escape(name)} {shown}", highlight=False)
    met = all(rec.heldout["retention"][n] >= m for n, m in result.budgets.items())
    out.print(f"held out: lr {rec.lr:g} {'meets' if met else 'does NOT meet'} the budget on data it was not chosen on "
              f"({level:.0%} paired bootstrap intervals); short runs rank rates, check it with a full-length run",
              highlight=False)


def sweep_table(result):
    from rich.table import Table

    table = Table(title="learning-rate sweep: short runs scored on the selection split")
    table.add_column("lr", justify="right")
    for name, minimum in result.budgets.items():
        table.add_column(f"retention {name} \\[lower bound ≥ {minimum:g}]", justify="right")
    for name in result.points[0].selection["target"] if result.points else []:
        table.add_column(f"target {name}", justify="right")
    for col in ("train s", "within budget", "recommended"):
        table.add_column(col, justify="center")
    for i, p in enumerate(result.points):
        sel = p.selection
        table.add_row(f"{p.lr:g}", *[f"{sel['retention'][n]:.4f} [{sel['retention_lower'][n]:.4f}]" for n in result.budgets],
                      *[f"{v:.4f}" for v in sel["target"].values()], f"{p.train_seconds:.1f}",
                      "yes" if p.feasible else "no", "<-" if i == result.recommended else "")
    return table


def register(app: typer.Typer) -> None:
    app.command("lr-sweep")(lr_sweep)
