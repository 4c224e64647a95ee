"""``soup`` and ``atlas``: merges whose members or coefficients are chosen on data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from deltawise.commands.console import escape, out, stage_factory, steps_progress, warn
from deltawise.commands.flags import options
from deltawise.options import DataOptions, IntervalOptions, LoadOptions, RunOptions, SplitOptions


@options("load", LoadOptions)
@options("intervals", IntervalOptions)
@options("split", SplitOptions, override={"heldout_fraction": {
    "help": "share of --data's items held out: ingredients are chosen on the rest, the soup is reported on these "
            "(0: in-sample, with a warning)"}})
@options("data_options", DataOptions, override={"max_examples": {"help": "score on the first N examples"},
                                                "max_length": {"help": "tokens per example / window"},
                                                "batch_size": {"help": "sequences per forward pass"}})
@options("run", RunOptions, override={
    "output": {"help": "soup model folder to create (written by the merge engine)"}, "device": {"help": "cpu or cuda"},
    "overwrite": {"help": "replace a non-empty output folder once the soup is written"},
    "quiet": {"help": "no progress bar or table"}})
def soup(
    models: list[str] = typer.Argument(..., help="ingredient models (fine-tuned from one init, same architecture)"),
    data: Path = typer.Option(..., "--data", help="validation data: JSONL text+label (classifiers) or text (causal LMs)"),
    heldout: Optional[Path] = typer.Option(None, "--heldout", help="data to report the soup on, instead of cutting --data"),
    run: RunOptions = ...,
    metric: str = typer.Option("auto", help="auto (accuracy for labelled data, loss for text), accuracy, loss or perplexity"),
    accept_ties: bool = typer.Option(False, "--accept-ties", help="keep an ingredient that leaves the score unchanged "
                                                                  "(default: strictly better only)"),
    data_options: DataOptions = ...,
    split: SplitOptions = ...,
    intervals: IntervalOptions = ...,
    load: LoadOptions = ...,
) -> None:
    """Greedy soup: add ingredients best-first, keeping each only if the averaged soup scores better on DATA.

    The choices are made on a selection split of DATA; the soup is reported on the held-out split."""
    from rich.table import Table

    from deltawise.search.soup import SoupOptions, greedy_soup

    with steps_progress(run.quiet) as progress:
        opts = SoupOptions(metric=metric, accept_ties=accept_ties, task=data_options.task, max_examples=data_options.max_examples,
                           max_length=data_options.max_length, batch_size=data_options.batch_size, device=run.device,
                           overwrite=run.overwrite, split=split, heldout=heldout, intervals=intervals,
                           progress=stage_factory(progress)("evaluations"), trust_remote_code=load.trust_remote_code)
        result = greedy_soup(models, data, run.output, opts)
    if not run.quiet:
        table = Table(title=f"greedy soup ({result.metric}, {'higher' if result.metric == 'accuracy' else 'lower'} is better)")
        for col in ("rank", "ingredient", "alone", "soup with it", "decision"):
            table.add_column(col, justify="left" if col in ("ingredient", "decision") else "right", overflow="fold")
        for rank, step in enumerate(result.steps, 1):
            with_it = "-" if step.candidate_value is None else f"{step.candidate_value:.6g}"
            decision = "accepted" if step.accepted else "rejected"
            table.add_row(str(rank), step.model, f"{step.ingredient_value:.6g}", with_it, decision)
        out.print(table)
    for warning in result.warnings:
        warn(warning)
    out.print(f"soup of {len(result.members)} of {len(models)} models, {result.metric} = {result.value:.6g} on the "
              f"selection split; wrote {escape(str(result.out))} (decisions in soup.json)", highlight=False)
    if result.heldout is not None:
        h = result.heldout
        ci = h["ratio_ci"]
        shown = f"{h['ratio_to_best_ingredient']:.4f}" + ("" if ci is None else f" [{ci[0]:.4f}, {ci[1]:.4f}]")
        out.print(f"held out ({h['items']} items): soup {h['metric']} {h['soup']:.6g}, best ingredient "
                  f"{h['best_ingredient']['value']:.6g}; soup relative to it {shown} "
                  f"({h['intervals']['level']:.0%} paired bootstrap)", highlight=False)


@options("intervals", IntervalOptions)
@options("load", LoadOptions)
@options("data_options", DataOptions, override={"max_examples": {"help": "use the first N examples of each training set"},
                                                "batch_size": {"help": "examples per task per step"}})
@options("run", RunOptions, override={
    "output": {"help": "merged model folder to create (atlas.json inside holds the coefficients)"},
    "overwrite": {"help": "replace a non-empty output folder once the merge is written"},
    "quiet": {"help": "no progress bar"}, "device": {"help": "cpu or cuda"}})
def atlas(
    base: str = typer.Argument(..., help="the pre-trained model the others were fine-tuned from"),
    models: list[str] = typer.Argument(..., help="fine-tuned models (one task vector each)"),
    data: list[Path] = typer.Option(..., "--data", help="training data: once for all tasks, or once per model in order "
                                                        "(repeatable)"),
    run: RunOptions = ...,
    val: list[Path] = typer.Option([], "--val", help="validation data (once, or once per model): keep the best coefficients"),
    test: list[Path] = typer.Option([], "--test", help="test data (repeatable), used for nothing but the report: the "
                                                       "chosen coefficients against the base, with intervals"),
    objective: str = typer.Option("auto", help="auto, ce (labelled classification), lm (text) or entropy (unlabelled: "
                                               "test-time adaptation)"),
    data_options: DataOptions = ...,
    epochs: int = typer.Option(1, min=0, help="passes over the largest task's data"),
    steps: Optional[int] = typer.Option(None, min=0, help="optimizer steps; overrides --epochs (0: the base model)"),
    lr: float = typer.Option(1e-3, min=0, help="AdamW learning rate"),
    weight_decay: float = typer.Option(0.1, min=0, help="AdamW weight decay"),
    seed: int = typer.Option(0, help="data order"),
    intervals: IntervalOptions = ...,
    load: LoadOptions = ...,
) -> None:
    """aTLAS: learn one coefficient per (task vector, tensor) on DATA and write BASE + sum of scaled task vectors."""
    from deltawise.search.atlas import AtlasOptions, run_atlas

    with steps_progress(run.quiet) as progress:
        opts = AtlasOptions(objective=objective, task=data_options.task, epochs=epochs, steps=steps, lr=lr,
                            weight_decay=weight_decay,
                            batch_size=data_options.batch_size, max_length=data_options.max_length,
                            max_examples=data_options.max_examples, seed=seed, device=run.device, overwrite=run.overwrite,
                            progress=stage_factory(progress)("steps"), trust_remote_code=load.trust_remote_code)
        result = run_atlas(base, models, data, run.output, opts, val or None, test or None, intervals)
    last = result.history[-1] if result.history else {}
    summary = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k != "step")
    out.print(f"aTLAS ({result.objective}) learned {len(result.models)} x {len(result.blocks)} coefficients"
              f"{'; ' + summary if summary else ''}; best at step {result.best_step}; wrote {escape(str(result.out))}",
              highlight=False)
    for name, t in (result.test or {}).get("tasks", {}).items():
        ci = t["ratio_ci"]
        shown = f"{t['ratio']:.4f}" + ("" if ci is None else f" [{ci[0]:.4f}, {ci[1]:.4f}]")
        out.print(f"test {escape(name)} ({t['items']} items): {t['metric']} {t['base']:.4g} (base) -> {t['atlas']:.4g}, "
                  f"ratio {shown}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(soup)
    app.command()(atlas)
