"""``eval``: perplexity, accuracy and forgetting of one model on the user's data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from deltawise.commands.console import escape, out, stage_factory, steps_progress, warn
from deltawise.commands.flags import options
from deltawise.options import DataOptions, IntervalOptions, LoadOptions, RunOptions

WINDOW_DEFAULTS = {
    "max_length": {"default": None, "help": "tokens per window (default: model context, at most 1024)"},
    "batch_size": {"help": "sequences per forward pass"},
}


@options("intervals", IntervalOptions)
@options("load", LoadOptions)
@options("data_options", DataOptions, only=("max_length", "batch_size"), override=WINDOW_DEFAULTS)
@options("run", RunOptions, exclude=("overwrite",), override={
    "output": {"help": "result JSON to write"}, "device": {"help": "cpu or cuda"}, "quiet": {"help": "no progress bars"}})
def eval_(
    model: str = typer.Argument(..., help="model folder (causal LM for text and choices; classifier for labelled data), "
                                          "or a delta or PEFT adapter folder, evaluated on its base"),
    base_model: Optional[str] = typer.Option(None, "--base", help="MODEL is a delta or adapter: the base to add it to "
                                                                  "(default: the base it records)"),
    source: list[Path] = typer.Option([], "--source", help="data whose performance must be retained (repeatable)"),
    target: list[Path] = typer.Option([], "--target", help="data the adaptation aims at (repeatable)"),
    tasks: list[str] = typer.Option([], "--tasks", help="lm-eval task (needs lm-eval installed, offline data); 'target:NAME' "
                                                        "marks a target"),
    lm_eval_tasks_dir: Optional[Path] = typer.Option(None, "--lm-eval-tasks-dir", help="folder of local lm-eval task YAMLs "
                                                                                       "for --tasks"),
    run: RunOptions = ...,
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="the base model's result JSON: adds forgetting metrics"),
    data_options: DataOptions = ...,
    stride: Optional[int] = typer.Option(None, min=1, help="sliding-window stride (default: max_length/2)"),
    mc_norm: str = typer.Option("total", help="multiple-choice score: total | token | byte (log-likelihood per token/byte)"),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16"),
    intervals: IntervalOptions = ...,
    load: LoadOptions = ...,
) -> None:
    """Evaluate MODEL: perplexity on text, accuracy on labelled or multiple-choice JSONL."""
    from deltawise.eval.forgetting import forgetting
    from deltawise.eval.results import load_result
    from deltawise.eval.runner import EvalOptions, evaluate
    from deltawise.io.output import check_output_file

    assert run.output is not None
    check_output_file(run.output, [("model", Path(model)), ("base", Path(base_model) if base_model else None),
                                   *[("source", p) for p in source], *[("target", p) for p in target],
                                   ("baseline", baseline), ("lm-eval tasks", lm_eval_tasks_dir)])
    if mc_norm not in ("total", "token", "byte"):
        raise typer.BadParameter("--mc-norm must be total, token or byte")
    base = load_result(baseline) if baseline else None  # a bad baseline fails before the long run
    lm_tasks = [("target", t.removeprefix("target:")) if t.startswith("target:") else ("source", t.removeprefix("source:"))
                for t in tasks]
    with steps_progress(run.quiet) as progress:
        eval_options = EvalOptions(max_length=data_options.max_length, stride=stride, batch_size=data_options.batch_size,
                                   mc_norm=mc_norm, dtype=dtype, device=run.device,  # type: ignore[arg-type]
                                   progress=stage_factory(progress), lm_eval_tasks=lm_tasks, lm_eval_tasks_dir=lm_eval_tasks_dir,
                                   trust_remote_code=load.trust_remote_code, base=base_model)
        result = evaluate(model, source, target, eval_options)
    for warning in result.settings.get("warnings", []):  # type: ignore[union-attr]
        warn(warning)
    if base is not None:
        result.forgetting = forgetting(result, base, intervals)
    result.save(run.output)
    for ds in result.datasets:
        out.print(f"{ds.role:<6} {escape(ds.name)}: {ds.metric} = {ds.value:.4g} ({ds.n_items} items, {ds.seconds:.1f} s)",
                  highlight=False)
    if result.forgetting is not None:
        for line in forgetting_lines(result.forgetting, intervals):
            out.print(escape(line), highlight=False)
    out.print(f"wrote {escape(str(run.output))}", highlight=False)


def forgetting_lines(f, intervals: IntervalOptions) -> list[str]:
    """The comparison with the baseline, each number with its interval."""
    lines = []
    for c in f.datasets:
        ratio = with_interval(c.ratio, c.ratio_ci, ".4f")
        line = f"{c.role:<6} {c.name}: {c.metric} {c.base:.4g} -> {c.model:.4g}, ratio {ratio}"
        if c.negative_flips is not None:
            flips = c.negative_flips
            line += f", negative flips {flips.count} ({with_interval(flips.rate, flips.rate_ci, '.1%')})"
        lines.append(line)
    for label, value, ci, spec in (("target gain", f.target_gain, f.target_gain_ci, "+.4f"),
                                   ("source retention", f.source_retention, f.source_retention_ci, ".4f"),
                                   ("forgetting score", f.forgetting_score, f.forgetting_score_ci, ".2f")):
        if value is not None:
            lines.append(f"{label}: {with_interval(value, ci, spec)}")
    lines.append(f"[lo, hi]: {intervals.level:.0%} paired bootstrap intervals over items "
                 f"({intervals.replicates} replicates, seed {intervals.bootstrap_seed})")
    return lines


def with_interval(value: float, bounds, spec: str) -> str:
    text = format(value, spec)
    return text if bounds is None else f"{text} [{format(bounds[0], spec)}, {format(bounds[1], spec)}]"


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_)
