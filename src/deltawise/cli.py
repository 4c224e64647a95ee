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
def train(
    model: Path = typer.Argument(..., help="base model: a Hugging Face folder or a .gguf file (converted once, cached)"),
    data: Path = typer.Option(..., "--data", help="training data: text (documents separated by % lines or blank lines) or JSONL (text | prompt+response | text+label)"),
    output: Path = typer.Option(..., "--output", "-o", help="output folder (written atomically; must not be an input)"),
    method: str = typer.Option("lora", "--method", "-m", help="lora, dora, pissa, lora_fa, fourierft, miss/bone, randlora, full, hft, lift, sorsa, loldu, kasa"),
    task: str = typer.Option("causal_lm", help="causal_lm or classification"),
    epochs: float = typer.Option(1.0, help="passes over the data (ignored when --max-steps > 0)"),
    max_steps: int = typer.Option(-1, help="optimizer steps; overrides --epochs when > 0"),
    lr: float = typer.Option(2e-4, help="peak learning rate"),
    batch_size: int = typer.Option(8, min=1, help="examples per device per step"),
    grad_accum: int = typer.Option(1, min=1, help="gradient accumulation steps"),
    max_length: int = typer.Option(256, min=2, help="truncate examples to this many tokens"),
    seed: int = typer.Option(0, help="random seed (init, data order, random bases and selections)"),
    weight_decay: float = typer.Option(0.0, help="AdamW decoupled weight decay"),
    schedule: str = typer.Option("linear", help="linear, cosine, constant, or cpt (re-warm + cosine to --min-lr-ratio)"),
    warmup: float = typer.Option(0.0, help="warmup: fraction of steps (< 1) or number of steps"),
    min_lr_ratio: float = typer.Option(0.1, help="cpt schedule: final lr as a fraction of --lr"),
    replay: Optional[Path] = typer.Option(None, help="source-domain data mixed into every batch (continual pre-training)"),
    replay_fraction: float = typer.Option(0.25, help="share of each batch taken from --replay"),
    rank: Optional[int] = typer.Option(None, "--rank", "-r", help="adapter rank (lift: LoRA-equivalent budget r_L)"),
    alpha: Optional[float] = typer.Option(None, help="adapter scale numerator (scale = alpha/rank)"),
    dropout: float = typer.Option(0.0, help="adapter dropout (LoRA family)"),
    targets: Optional[str] = typer.Option(None, help="comma-separated module names to adapt (default: PEFT's per-architecture choice)"),
    init: Optional[str] = typer.Option(None, help="init variant: fourierft 'zero'; miss 'bat' or 'mini'"),
    n_frequency: Optional[int] = typer.Option(None, help="fourierft: spectral coefficients per matrix"),
    scaling: Optional[float] = typer.Option(None, help="fourierft: scale of the spectral update"),
    filter_rank: Optional[int] = typer.Option(None, help="lift: rank of the low-rank approximation that picks principal weights"),
    refresh_interval: Optional[int] = typer.Option(None, help="lift: optimizer steps between mask refreshes"),
    ratio: Optional[float] = typer.Option(None, help="hft: fraction of each parameter category that trains"),
    gamma: Optional[float] = typer.Option(None, help="sorsa: orthonormal regularizer weight; kasa: L3 weight"),
    beta: Optional[float] = typer.Option(None, help="kasa: L2 weight on the learned singular values"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output folder once training succeeds"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Fine-tune MODEL on DATA with an adapter, sparse or full method; write the adapter/delta/model to OUTPUT."""
    from deltawise.adapt import MethodOptions, TrainConfig, run_train
    from deltawise.io.gguf import resolve_gguf

    options = MethodOptions(
        rank=rank, alpha=alpha, dropout=dropout, targets=[t.strip() for t in targets.split(",")] if targets else None,
        init=init, n_frequency=n_frequency, scaling=scaling, filter_rank=filter_rank, refresh_interval=refresh_interval,
        ratio=ratio, gamma=gamma, beta=beta,
    )
    cfg = TrainConfig(
        model=model, data=data, output=output, method=method, task=task, epochs=epochs, max_steps=max_steps, lr=lr,
        batch_size=batch_size, grad_accum=grad_accum, max_length=max_length, seed=seed, weight_decay=weight_decay,
        schedule=schedule, warmup=warmup, min_lr_ratio=min_lr_ratio, replay=replay, replay_fraction=replay_fraction,
        overwrite=overwrite, progress=not quiet, options=options,
    )
    result = run_train(cfg, model_path=resolve_gguf(model))
    out.print(
        f"trained {result.method} ({result.trainable_params:,} of {result.total_params:,} parameters) for "
        f"{result.steps} steps in {result.seconds:.1f} s; wrote {escape(str(result.output))}", highlight=False,
    )


@app.command()
def demo(
    workdir: Optional[Path] = typer.Option(None, help="where to write models (default: a temporary folder)"),
) -> None:
    """Make tiny checkpoints, merge them with every method, check the results load, print a summary."""
    from deltawise.demo import run_demo

    run_demo(workdir, out)


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
