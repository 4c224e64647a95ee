"""``eval``: perplexity, accuracy and forgetting of one model on the user's data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from deltawise.commands.console import escape, out, stage_factory, steps_progress
from deltawise.commands.flags import options
from deltawise.options import DataOptions, LoadOptions, RunOptions

WINDOW_DEFAULTS = {
    "max_length": {"default": None, "help": "tokens per window (default: model context, at most 1024)"},
    "batch_size": {"help": "sequences per forward pass"},
}


@options("load", LoadOptions)
@options("data_options", DataOptions, only=("max_length", "batch_size"), override=WINDOW_DEFAULTS)
@options("run", RunOptions, exclude=("overwrite",), override={
    "output": {"help": "result JSON to write"}, "device": {"help": "cpu or cuda"}, "quiet": {"help": "no progress bars"}})
def eval_(
    model: str = typer.Argument(..., help="model folder (causal LM for text and choices; classifier for labelled data)"),
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
    load: LoadOptions = ...,
) -> None:
    """Evaluate MODEL: perplexity on text, accuracy on labelled or multiple-choice JSONL."""
    from deltawise.eval.forgetting import forgetting
    from deltawise.eval.results import load_result
    from deltawise.eval.runner import EvalOptions, evaluate
    from deltawise.io.output import check_output_file

    assert run.output is not None
    check_output_file(run.output, [("model", Path(model)), *[("source", p) for p in source], *[("target", p) for p in target],
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
                                   trust_remote_code=load.trust_remote_code)
        result = evaluate(model, source, target, eval_options)
    if base is not None:
        result.forgetting = forgetting(result, base)
    result.save(run.output)
    for ds in result.datasets:
        out.print(f"{ds.role:<6} {escape(ds.name)}: {ds.metric} = {ds.value:.4g} ({ds.n_items} items, {ds.seconds:.1f} s)",
                  highlight=False)
    if result.forgetting is not None and result.forgetting.forgetting_score is not None:
        out.print(f"forgetting score: {result.forgetting.forgetting_score:.2f}", highlight=False)
    out.print(f"wrote {escape(str(run.output))}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_)
