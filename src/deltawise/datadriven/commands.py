"""CLI commands of the data-driven methods: fisher, gram, soup, atlas (registered in cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

TASK_HELP = "auto (classification when the data has 'label', else causal_lm), classification or causal_lm"


def _ui():
    from deltawise import cli

    return cli


def fisher_cmd(
    model: str = typer.Argument(..., help="model folder (a sequence classifier for labelled data, else a causal LM)"),
    data: Path = typer.Option(..., "--data", help="text, JSONL (text | text+label) or a datasets folder saved with save_to_disk"),
    output: Path = typer.Option(..., "--output", "-o", help="Fisher file to write (.safetensors, same tensor names as the model)"),
    task: str = typer.Option("auto", help=TASK_HELP),
    variant: str = typer.Option("auto", help="classification: exact (default), sampled or empirical; causal LM: empirical (default) or sampled"),
    max_examples: Optional[int] = typer.Option(None, min=1, help="use the first N examples (official Fisher merging: 4096)"),
    max_length: int = typer.Option(256, min=2, help="truncate examples to this many tokens"),
    seed: int = typer.Option(0, help="seed of the sampled variant"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output file"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Diagonal Fisher information of MODEL on DATA (one backward pass per example; per class for the exact variant)."""
    from deltawise.stats.collect import CollectOptions
    from deltawise.stats.fisher import compute_fisher

    ui = _ui()
    with ui._steps_progress(quiet) as progress:
        opts = CollectOptions(task=task, max_examples=max_examples, max_length=max_length, seed=seed, device=device,
                              overwrite=overwrite, progress=ui._stage_factory(progress)("examples"))
        result = compute_fisher(model, data, output, opts, variant=variant)
    ui.out.print(f"{result.variant} Fisher of {ui.escape(model)} ({result.task}) on {result.examples} examples, "
                 f"{result.tensors} tensors, {result.seconds:.1f} s; wrote {ui.escape(str(result.out))}", highlight=False)


def gram_cmd(
    model: str = typer.Argument(..., help="model folder"),
    data: Path = typer.Option(..., "--data", help="text, JSONL (text | text+label) or a datasets folder saved with save_to_disk"),
    output: Path = typer.Option(..., "--output", "-o", help="Gram file to write (.safetensors: <layer>.gram, in x in, float32)"),
    task: str = typer.Option("auto", help=TASK_HELP),
    max_examples: Optional[int] = typer.Option(None, min=1, help="use the first N examples"),
    max_length: int = typer.Option(256, min=2, help="truncate examples to this many tokens"),
    batch_size: int = typer.Option(8, min=1, help="examples per forward pass (padding is excluded from the Grams)"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output file"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Input Gram matrices X^T X / n of every linear layer of MODEL on DATA, for the regmean merge."""
    from deltawise.stats.collect import CollectOptions
    from deltawise.stats.gram import compute_grams

    ui = _ui()
    with ui._steps_progress(quiet) as progress:
        opts = CollectOptions(task=task, max_examples=max_examples, max_length=max_length, batch_size=batch_size,
                              device=device, overwrite=overwrite, progress=ui._stage_factory(progress)("examples"))
        result = compute_grams(model, data, output, opts)
    ui.out.print(f"Gram matrices of {result.layers} linear layers of {ui.escape(model)} on {result.examples} examples, "
                 f"{result.seconds:.1f} s; wrote {ui.escape(str(result.out))}", highlight=False)


def soup_cmd(
    models: list[str] = typer.Argument(..., help="ingredient models (fine-tuned from one init, same architecture)"),
    data: Path = typer.Option(..., "--data", help="held-out data: JSONL text+label (classifiers) or text (causal LMs)"),
    output: Path = typer.Option(..., "--output", "-o", help="soup model folder to create (written by the merge engine)"),
    metric: str = typer.Option("auto", help="auto (accuracy for labelled data, loss for text), accuracy, loss or perplexity"),
    accept_ties: bool = typer.Option(False, "--accept-ties", help="keep an ingredient that leaves the score unchanged (default: strictly better only)"),
    task: str = typer.Option("auto", help=TASK_HELP),
    max_examples: Optional[int] = typer.Option(None, min=1, help="score on the first N examples"),
    max_length: int = typer.Option(256, min=2, help="tokens per example / window"),
    batch_size: int = typer.Option(8, min=1, help="sequences per forward pass"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output folder once the soup is written"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar or table"),
) -> None:
    """Greedy soup: add ingredients best-first, keeping each only if the averaged soup scores better on DATA."""
    from rich.table import Table

    from deltawise.search.soup import SoupOptions, greedy_soup

    ui = _ui()
    with ui._steps_progress(quiet) as progress:
        opts = SoupOptions(metric=metric, accept_ties=accept_ties, task=task, max_examples=max_examples, max_length=max_length,
                           batch_size=batch_size, device=device, overwrite=overwrite, progress=ui._stage_factory(progress)("evaluations"))
        result = greedy_soup(models, data, output, opts)
    if not quiet:
        table = Table(title=f"greedy soup ({result.metric}, {'higher' if result.metric == 'accuracy' else 'lower'} is better)")
        for col in ("rank", "ingredient", "alone", "soup with it", "decision"):
            table.add_column(col, justify="left" if col in ("ingredient", "decision") else "right", overflow="fold")
        for rank, step in enumerate(result.steps, 1):
            with_it = "-" if step.candidate_value is None else f"{step.candidate_value:.6g}"
            table.add_row(str(rank), step.model, f"{step.ingredient_value:.6g}", with_it, "accepted" if step.accepted else "rejected")
        ui.out.print(table)
    for warning in result.warnings:
        ui.err.print(f"[yellow]warning:[/] {ui.escape(warning)}", highlight=False)
    ui.out.print(f"soup of {len(result.members)} of {len(models)} models, {result.metric} = {result.value:.6g}; "
                 f"wrote {ui.escape(str(result.out))} (decisions in soup.json)", highlight=False)


def atlas_cmd(
    base: str = typer.Argument(..., help="the pre-trained model the others were fine-tuned from"),
    models: list[str] = typer.Argument(..., help="fine-tuned models (one task vector each)"),
    data: list[Path] = typer.Option(..., "--data", help="training data: once for all tasks, or once per model in order (repeatable)"),
    output: Path = typer.Option(..., "--output", "-o", help="merged model folder to create (atlas.json inside holds the coefficients)"),
    val: list[Path] = typer.Option([], "--val", help="validation data (once, or once per model): keep the best coefficients"),
    objective: str = typer.Option("auto", help="auto, ce (labelled classification), lm (text) or entropy (unlabelled: test-time adaptation)"),
    task: str = typer.Option("auto", help=TASK_HELP),
    epochs: int = typer.Option(1, min=0, help="passes over the largest task's data"),
    steps: Optional[int] = typer.Option(None, min=0, help="optimizer steps; overrides --epochs (0: the base model)"),
    lr: float = typer.Option(1e-3, help="AdamW learning rate"),
    weight_decay: float = typer.Option(0.1, help="AdamW weight decay"),
    batch_size: int = typer.Option(8, min=1, help="examples per task per step"),
    max_length: int = typer.Option(256, min=2, help="truncate examples to this many tokens"),
    max_examples: Optional[int] = typer.Option(None, min=1, help="use the first N examples of each training set"),
    seed: int = typer.Option(0, help="data order"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output folder once the merge is written"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """aTLAS: learn one coefficient per (task vector, tensor) on DATA and write BASE + sum of scaled task vectors."""
    from deltawise.search.atlas import AtlasOptions, run_atlas

    ui = _ui()
    with ui._steps_progress(quiet) as progress:
        opts = AtlasOptions(objective=objective, task=task, epochs=epochs, steps=steps, lr=lr, weight_decay=weight_decay,
                            batch_size=batch_size, max_length=max_length, max_examples=max_examples, seed=seed, device=device,
                            overwrite=overwrite, progress=ui._stage_factory(progress)("steps"))
        result = run_atlas(base, models, data, output, opts, val or None)
    last = result.history[-1] if result.history else {}
    summary = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k != "step")
    ui.out.print(f"aTLAS ({result.objective}) learned {len(result.models)} x {len(result.blocks)} coefficients"
                 f"{'; ' + summary if summary else ''}; best at step {result.best_step}; wrote {ui.escape(str(result.out))}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("fisher")(fisher_cmd)
    app.command("gram")(gram_cmd)
    app.command("soup")(soup_cmd)
    app.command("atlas")(atlas_cmd)
