"""``repair``: cheap weight-space edits of a delta that forgot, chosen under a retention budget."""

from __future__ import annotations

from pathlib import Path

import typer

from deltawise.commands.console import ProgressReporter, escape, no_transformers_bars, note, out, steps_progress
from deltawise.commands.flags import options
from deltawise.options import BudgetSearchOptions, IntervalOptions, LoadOptions, RepairSearchOptions, RunOptions, SplitOptions


@options("load", LoadOptions)
@options("intervals", IntervalOptions)
@options("split", SplitOptions)
@options("edits", RepairSearchOptions)
@options("search", BudgetSearchOptions, exclude=("search_param", "refine", "baseline"), override={
    "target": {"help": "data whose gain the repair keeps as much of as the budget allows (repeatable)"},
    "report": {"help": "also write the search (every point, Pareto front, choice) as JSON here "
                       "(OUTPUT/deltawise_repair.json is always written)"}})
@options("run", RunOptions, override={
    "output": {"help": "repaired model folder to create"}, "quiet": {"help": "no progress bar or messages"},
    "overwrite": {"help": "replace a non-empty output folder once the repaired model is written"}})
def repair(
    delta: str = typer.Argument(..., help="the delta that forgot: a delta folder, a PEFT adapter or a fine-tuned model"),
    base: str = typer.Option(..., "--base", help="the model the delta belongs to; retention is measured against it"),
    run: RunOptions = ...,
    search: BudgetSearchOptions = ...,
    edits: RepairSearchOptions = ...,
    split: SplitOptions = ...,
    intervals: IntervalOptions = ...,
    load: LoadOptions = ...,
) -> None:
    """Repair a delta that forgot: search global scales, intruder-dimension removal and per-group scales for the
    best --target gain that keeps each --retain SOURCE's retention >= MIN, and write that model (docs/repair.md).

    Points are chosen on a selection split of the data; the written model is reported on the held-out split."""
    from deltawise.eval.runner import EvalOptions
    from deltawise.io.output import check_output_file
    from deltawise.io.writer import write_json_atomic
    from deltawise.search.budget import BudgetNotMet, RetentionBudget, heldout_lines
    from deltawise.search.repair import RepairOptions, describe, repair_table, run_repair

    assert run.output is not None
    retain = [RetentionBudget.parse(r) for r in search.retain]
    if search.report is not None:
        check_output_file(search.report, [("delta", Path(delta)), ("base", Path(base)),
                                          *[("retain source", b.data) for b in retain],
                                          *[("target", t) for t in search.target]], outputs=[run.output])
    no_transformers_bars()
    opts = RepairOptions(
        retain=retain, targets=list(search.target),
        scales=edits.values(edits.scales, "--scales"),
        intruder_levels=edits.values(edits.intruder_levels, "--intruder-levels"),
        group_scales=edits.values(edits.group_scales, "--group-scales"), rounds=edits.rounds,
        intruder_k=edits.intruder_k, intruder_eps=edits.intruder_eps, most_retentive=search.most_retentive,
        overwrite=run.overwrite, split=split, heldout_retain=list(search.heldout_retain),
        heldout_targets=list(search.heldout_target), intervals=intervals,
        eval=EvalOptions(max_length=search.eval_max_length, batch_size=search.eval_batch_size, device=run.device,
                         trust_remote_code=load.trust_remote_code),
        note=None if run.quiet else note(False),
    )
    with steps_progress(run.quiet) as progress:
        opts.progress = ProgressReporter(progress)
        try:
            result = run_repair(delta, base, run.output, opts)
        except BudgetNotMet as exc:
            out.print(repair_table(exc.result))
            if search.report is not None:
                write_json_atomic(search.report, exc.result.to_json())
            raise
    out.print(repair_table(result))
    if search.report is not None:
        write_json_atomic(search.report, result.to_json())
    chosen = describe(result.candidates[result.chosen].params)
    out.print(f"chose {escape(chosen)} on the selection split; wrote {escape(str(run.output))}", highlight=False)
    for line in heldout_lines(result):
        out.print(escape(line), highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(repair)
