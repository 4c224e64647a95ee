"""``fisher`` and ``gram``: per-tensor statistics of a model on data, for the data-driven merges."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import typer

from deltawise.commands.console import escape, out, stage_factory, steps_progress
from deltawise.commands.flags import options
from deltawise.options import DataOptions, LoadOptions, RunOptions

DATA_HELP = "text, JSONL (text | text+label) or a datasets folder saved with save_to_disk"
FILE_OUTPUT = {"overwrite": {"help": "replace an existing output file"}, "quiet": {"help": "no progress bar"},
               "device": {"help": "cpu or cuda"}}


def _collect(model: str, data: Path, run: RunOptions, data_options: DataOptions, load: LoadOptions,
             compute: Callable[[Any], Any], **collect: Any) -> Any:
    """Checks the output file (never an input), then ``compute(CollectOptions)`` under a progress bar; ``collect``:
    the command's own CollectOptions fields."""
    from deltawise.io.output import check_output_file
    from deltawise.stats.collect import CollectOptions

    assert run.output is not None
    check_output_file(run.output, [("model", Path(model)), ("data", data)], overwrite=run.overwrite)
    with steps_progress(run.quiet) as progress:
        return compute(CollectOptions(task=data_options.task, max_examples=data_options.max_examples,
                                      max_length=data_options.max_length, device=run.device, overwrite=run.overwrite,
                                      progress=stage_factory(progress)("examples"), trust_remote_code=load.trust_remote_code,
                                      **collect))


@options("load", LoadOptions)
@options("data_options", DataOptions, exclude=("batch_size",),
         override={"max_examples": {"help": "use the first N examples (official Fisher merging: 4096)"}})
@options("run", RunOptions, override={
    **FILE_OUTPUT, "output": {"help": "Fisher file to write (.safetensors, same tensor names as the model)"}})
def fisher(
    model: str = typer.Argument(..., help="model folder (a sequence classifier for labelled data, else a causal LM)"),
    data: Path = typer.Option(..., "--data", help=DATA_HELP),
    run: RunOptions = ...,
    data_options: DataOptions = ...,
    variant: str = typer.Option("auto", help="classification: exact (default), sampled or empirical; causal LM: empirical "
                                             "(default) or sampled"),
    seed: int = typer.Option(0, help="seed of the sampled variant"),
    load: LoadOptions = ...,
) -> None:
    """Diagonal Fisher information of MODEL on DATA (one backward pass per example; per class for the exact variant)."""
    from deltawise.stats.fisher import compute_fisher

    result = _collect(model, data, run, data_options, load,
                      lambda opts: compute_fisher(model, data, run.output, opts, variant=variant), seed=seed)
    out.print(f"{result.variant} Fisher of {escape(model)} ({result.task}) on {result.examples} examples, "
              f"{result.tensors} tensors, {result.seconds:.1f} s; wrote {escape(str(result.out))}", highlight=False)


@options("load", LoadOptions)
@options("data_options", DataOptions,
         override={"batch_size": {"help": "examples per forward pass (padding is excluded from the Grams)"}})
@options("run", RunOptions, override={
    **FILE_OUTPUT, "output": {"help": "Gram file to write (.safetensors: <layer>.gram, in x in, float32)"}})
def gram(
    model: str = typer.Argument(..., help="model folder"),
    data: Path = typer.Option(..., "--data", help=DATA_HELP),
    run: RunOptions = ...,
    data_options: DataOptions = ...,
    load: LoadOptions = ...,
) -> None:
    """Input Gram matrices X^T X / n of every linear layer of MODEL on DATA, for the regmean merge."""
    from deltawise.stats.gram import compute_grams

    result = _collect(model, data, run, data_options, load, lambda opts: compute_grams(model, data, run.output, opts),
                      batch_size=data_options.batch_size)
    out.print(f"Gram matrices of {result.layers} linear layers of {escape(model)} on {result.examples} examples, "
              f"{result.seconds:.1f} s; wrote {escape(str(result.out))}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(fisher)
    app.command()(gram)
