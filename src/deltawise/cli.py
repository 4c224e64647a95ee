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
    fsync: bool = typer.Option(False, "--fsync", help="flush each shard to disk before it counts as done (survives a power "
                                                      "loss; slower: waits for the disk)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    retain: Optional[list[str]] = typer.Option(None, "--retain", help="retention budget SOURCE:MIN (e.g. en.jsonl:0.98; repeatable): search the method's parameters for the best --target score keeping SOURCE's retention >= MIN"),
    target: Optional[list[Path]] = typer.Option(None, "--target", help="with --retain: data whose score the search maximises (repeatable)"),
    search_param: Optional[list[str]] = typer.Option(None, "--search-param", help="with --retain: NAME=v1,v2,... values to try (repeatable; default: lambda or t at 0.2,0.4,...,1.0)"),
    refine: int = typer.Option(0, min=0, help="with --retain: successive refinement rounds (midpoints around the best feasible value)"),
    most_retentive: bool = typer.Option(False, "--most-retentive", help="with --retain: when no point meets the budget, write the most retentive one instead of nothing"),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="with --retain: the model retention is measured against (default: base_model)"),
    report: Optional[Path] = typer.Option(None, "--report", help="with --retain: write the search (every point, Pareto front, choice) as JSON here (default: OUTPUT/deltawise_budget.json)"),
    eval_max_length: Optional[int] = typer.Option(None, min=2, help="with --retain: tokens per evaluation window"),
    eval_batch_size: int = typer.Option(8, min=1, help="with --retain: sequences per evaluation forward pass"),
) -> None:
    """Merge models as described by RECIPE into OUTPUT.

    An interrupted merge (Ctrl-C, SIGTERM, a crash, a full disk) keeps its completed shards
    beside OUTPUT; rerun with --resume to merge only the rest. With --retain and --target the
    method's parameters are searched first (retention-budget merging, docs/merging.md)."""
    from deltawise.io.writer import parse_size
    from deltawise.merge import MergeOptions, build_plan, load_recipe, run_merge
    from deltawise.merge.engine import check_output, dump_plan, to_json

    if (retain or target or search_param) and not dry_run:
        from deltawise.eval.runner import EvalOptions
        from deltawise.search.budget import BudgetOptions, RetentionBudget, run_budget

        _no_transformers_bars()
        with _steps_progress(quiet) as progress:
            options = BudgetOptions(
                retain=[RetentionBudget.parse(r) for r in retain or []], targets=list(target or []), grid=_search_grid(search_param),
                refine=refine, most_retentive=most_retentive, baseline=baseline, allow_pickle=allow_pickle,
                eval=EvalOptions(max_length=eval_max_length, batch_size=eval_batch_size, device=device),
                merge=MergeOptions(device=device, threads=threads, shard_size=parse_size(shard_size), overwrite=overwrite),
                note=None if quiet else (lambda msg: err.print(escape(msg), highlight=False)), progress=_ProgressReporter(progress),
            )
            _budget_report(lambda: run_budget(load_recipe(recipe), output, options), report, output)
        return
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
            resume=resume, restart=restart, fsync=fsync, progress=_ProgressReporter(progress),
        )
        result = run_merge(plan, output, options)
    gb = result.bytes_written / 1e9
    out.print(f"merged with {plan.method.name} into {escape(str(result.out))} ({gb:.3f} GB, {result.seconds:.1f} s)", highlight=False)


def _no_transformers_bars() -> None:
    """Commands that load and save many models (bam, budget search) draw their own bars; the
    per-model load/save bars of transformers would drown them."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _search_grid(items: Optional[list[str]]) -> dict[str, list]:
    from deltawise.options import parse_assignments, scalar

    return {k: [scalar(v.strip()) for v in text.split(",")] for k, text in parse_assignments(items, "--search-param").items()}


def _budget_report(search, report: Optional[Path], output: Path) -> None:
    """Run the budget search; print its table and write its JSON whether or not a point met the budget."""
    from deltawise.io.writer import write_json_atomic
    from deltawise.search.budget import BudgetNotMet, budget_table

    try:
        result = search()
    except BudgetNotMet as exc:
        out.print(budget_table(exc.result))
        if report is not None:
            write_json_atomic(report, exc.result.to_json())
        raise
    out.print(budget_table(result))
    write_json_atomic(report or output / "deltawise_budget.json", result.to_json())
    chosen = result.candidates[result.chosen]
    out.print(f"chose {escape(str(chosen.params))}: retention {chosen.retention_min:.4f}, target {chosen.target_score:.4f}; "
              f"wrote {escape(str(output))}", highlight=False)


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


def _rows_table(title: str, result, *, limit: int = 30, error_label: str = "rel. error"):
    """Per-tensor rows of a delta result, worst reconstruction error first."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("tensor", "kind", "dense bytes", "stored bytes", "ratio", error_label):
        table.add_column(col, justify="left" if col in ("tensor", "kind") else "right", overflow="fold")
    rows = sorted(result.rows, key=lambda r: -(r.error or 0.0))
    for r in rows[:limit]:
        error = "-" if r.error is None else f"{r.error:.4g}"
        table.add_row(r.name, r.kind, str(r.dense_bytes), str(r.stored_bytes), f"{r.ratio:.1f}x", error)
    if len(rows) > limit:
        table.caption = f"{len(rows) - limit} more tensors in the JSON report (--report)"
    return table


def _finish_delta_command(result, report: Optional[Path], what: str) -> None:
    import json

    for warning in result.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    if report is not None:
        from deltawise.io.writer import write_json_atomic

        write_json_atomic(report, result.to_json())
    ratio = result.dense_bytes / result.stored_bytes if result.stored_bytes else float("inf")
    out.print(f"{what} {escape(str(result.out))}: {len(result.rows)} tensors, {result.stored_bytes} bytes stored "
              f"({ratio:.2f}x smaller than dense); {escape(json.dumps(result.summary, default=str))}", highlight=False)


@app.command()
def extract(
    finetuned: str = typer.Argument(..., help="fine-tuned model (folder or hub id)"),
    base: str = typer.Option(..., "--base", help="the model it was fine-tuned from"),
    output: Path = typer.Option(..., "--output", "-o", help="delta folder (or PEFT adapter folder with --lora) to create"),
    lora: bool = typer.Option(False, "--lora", help="write a PEFT LoRA adapter (SVD of each linear weight delta)"),
    rank: Optional[int] = typer.Option(None, "--rank", help="LoRA rank (with --energy: the largest rank allowed)"),
    energy: Optional[float] = typer.Option(None, "--energy", help="LoRA: smallest rank keeping this fraction of spectral energy"),
    non_linear: str = typer.Option("save", "--non-linear", help="LoRA: changed norms/biases/embeddings: save (modules_to_save) or skip"),
    dtype: str = typer.Option("auto", help="dense delta dtype: auto (exact: one step wider than the weights), float32, bfloat16, ..."),
    report: Optional[Path] = typer.Option(None, "--report", help="write the per-tensor report as JSON here"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output folder once the new one is complete"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars or tables"),
) -> None:
    """Extract FINETUNED − BASE as a delta folder, or as a PEFT LoRA adapter with --lora."""
    if non_linear not in ("save", "skip"):
        raise DeltawiseError(f"--non-linear must be save or skip, got {non_linear!r}")
    with _progress(quiet) as progress:
        reporter = _ProgressReporter(progress)
        if lora:
            from deltawise.delta.lora_extract import extract_lora

            result = extract_lora(finetuned, base, output, rank=rank, energy=energy, non_linear=non_linear,  # type: ignore[arg-type]
                                  overwrite=overwrite, progress=reporter)
        else:
            if rank is not None or energy is not None:
                raise DeltawiseError("--rank/--energy need --lora")
            from deltawise.delta.extract import extract_delta

            result = extract_delta(finetuned, base, output, dtype=dtype, overwrite=overwrite, progress=reporter)
    if lora and not quiet:
        out.print(_rows_table("LoRA extraction (error = discarded spectral energy, as a norm ratio)", result))
    _finish_delta_command(result, report, "PEFT adapter" if lora else "delta")


@app.command()
def apply(
    delta: str = typer.Argument(..., help="delta folder or PEFT adapter folder"),
    base: str = typer.Option(..., "--base", help="the model to apply it to (its own base, or a new version: patch transfer)"),
    output: Path = typer.Option(..., "--output", "-o", help="model folder to create"),
    scale: float = typer.Option(1.0, "--scale", help="multiplier of the delta; -1 removes it"),
    task: Optional[str] = typer.Option(None, "--task", help="TALL folders: which task to reconstruct (name or index)"),
    original_base: Optional[str] = typer.Option(None, "--original-base", help="the model the delta was made from: report how far BASE is from it"),
    shard_size: str = typer.Option("5GB", help="largest output shard"),
    report: Optional[Path] = typer.Option(None, "--report", help="write the report (and drift table) as JSON here"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output folder once the new one is complete"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars or tables"),
) -> None:
    """Write BASE + scale * DELTA as a model folder."""
    from deltawise.delta.apply import apply_delta
    from deltawise.io.writer import parse_size

    with _progress(quiet) as progress:
        result = apply_delta(delta, base, output, scale=scale, task=task, original_base=original_base, overwrite=overwrite,
                             shard_size=parse_size(shard_size), progress=_ProgressReporter(progress))
    if result.drift and not quiet:
        from rich.table import Table

        table = Table(title=f"how far {base} is from {original_base} (tensors the delta changes)")
        for col in ("tensor", "cosine", "‖new − original‖ / ‖original‖"):
            table.add_column(col, justify="left" if col == "tensor" else "right", overflow="fold")
        for d in result.drift:
            table.add_row(d.name, f"{d.cosine:.6f}", f"{d.relative_distance:.4g}")
        out.print(table)
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    if report is not None:
        from deltawise.io.writer import write_json_atomic

        write_json_atomic(report, result.to_json())
    out.print(f"applied {escape(delta)} x {scale:g} to {escape(base)} into {escape(str(result.out))} "
              f"({len(result.rows)} tensors changed)", highlight=False)


@app.command()
def compress(
    deltas: list[str] = typer.Argument(..., help="delta folder(s) or PEFT adapter(s); several for --method tall"),
    method: str = typer.Option("compeft", "--method", help="compeft (top-k signs x one scale), topk (top-k exact values) or tall"),
    output: Path = typer.Option(..., "--output", "-o", help="compressed delta folder to create"),
    density: float = typer.Option(0.1, "--density", help="compeft/topk: fraction of entries kept per tensor"),
    alpha: float = typer.Option(1.0, "--alpha", help="compeft: scale multiplier (scale = alpha * std of the dense delta)"),
    lam: Optional[list[float]] = typer.Option(None, "--lam", help="tall: mask threshold lambda (once, or once per task)"),
    names: Optional[str] = typer.Option(None, "--names", help="tall: comma-separated task names (default: folder names)"),
    base: Optional[str] = typer.Option(None, "--base", help="base model, needed for PEFT adapters that store full values"),
    report: Optional[Path] = typer.Option(None, "--report", help="write the per-tensor report as JSON here"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output folder once the new one is complete"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars or tables"),
) -> None:
    """Compress deltas: ComPEFT ternary, top-k sparse, or TALL masks (several deltas of one base)."""
    with _progress(quiet) as progress:
        reporter = _ProgressReporter(progress)
        if method == "tall":
            from deltawise.delta.tall_compress import compress_tall

            task_names = [n.strip() for n in names.split(",")] if names else None
            result = compress_tall(deltas, output, lambdas=lam, names=task_names, base=base, overwrite=overwrite, progress=reporter)
        else:
            if len(deltas) != 1:
                raise DeltawiseError(f"--method {method} compresses one delta; got {len(deltas)} (several are for --method tall)")
            from deltawise.delta.compress import compress_delta

            result = compress_delta(deltas[0], output, method=method, density=density, alpha=alpha, base=base,  # type: ignore[arg-type]
                                    overwrite=overwrite, progress=reporter)
    if not quiet:
        label = "worst task's rel. error" if method == "tall" else "rel. error"
        out.print(_rows_table(f"{method} compression", result, error_label=label))
    _finish_delta_command(result, report, "compressed delta")


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
    dropout: Optional[float] = typer.Option(None, help="adapter dropout (LoRA family; default 0)"),
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
    from deltawise.adapt import TrainConfig, run_train
    from deltawise.io.gguf import resolve_gguf

    given = dict(rank=rank, alpha=alpha, dropout=dropout, targets=targets, init=init, n_frequency=n_frequency, scaling=scaling,
                 filter_rank=filter_rank, refresh_interval=refresh_interval, ratio=ratio, gamma=gamma, beta=beta)
    method_params = {name: value for name, value in given.items() if value is not None}  # the method checks and completes them
    cfg = TrainConfig(
        model=model, data=data, output=output, method=method, task=task, epochs=epochs, max_steps=max_steps, lr=lr,
        batch_size=batch_size, grad_accum=grad_accum, max_length=max_length, seed=seed, weight_decay=weight_decay,
        schedule=schedule, warmup=warmup, min_lr_ratio=min_lr_ratio, replay=replay, replay_fraction=replay_fraction,
        overwrite=overwrite, progress=not quiet, method_params=method_params,
    )
    result = run_train(cfg, model_path=resolve_gguf(model))
    if not result.is_main_process:
        return  # torchrun / accelerate launch: rank 0 reports
    out.print(
        f"trained {result.method} ({result.trainable_params:,} of {result.total_params:,} parameters) for "
        f"{result.steps} steps in {result.seconds:.1f} s; wrote {escape(str(result.output))}", highlight=False,
    )


@app.command()
def bam(
    model: Path = typer.Argument(..., help="base model: a Hugging Face folder or a .gguf file"),
    data: Path = typer.Option(..., "--data", help="training data (as for train); shuffled with --seed and cut into branches x rounds disjoint slices"),
    output: Path = typer.Option(..., "--output", "-o", help="final model folder (written atomically at the end, with bam.json)"),
    branches: int = typer.Option(2, "--branches", "-k", min=1, help="K: models trained from the same start per round"),
    rounds: int = typer.Option(1, "--rounds", "-r", min=1, help="R: branch-then-merge rounds"),
    merge_method: Optional[str] = typer.Option(None, "--merge", help="merge method (default: slerp t=0.5 for K=2, linear average for K>2); any name from `deltawise methods`"),
    merge_param: Optional[list[str]] = typer.Option(None, "--merge-param", help="merge parameter NAME=VALUE (repeatable), e.g. t=0.4 or lambda=0.8"),
    work: Optional[Path] = typer.Option(None, "--work", help="work folder for slices, branches and round merges (default: OUTPUT.work beside OUTPUT)"),
    restart: bool = typer.Option(False, "--restart", help="discard a work folder left by a run with other options or data"),
    branch_index: Optional[int] = typer.Option(None, "--branch-index", help="train only branch K of the first unmerged round, then exit (one process per branch, for parallel runs)"),
    merge_only: bool = typer.Option(False, "--merge-only", help="train nothing: merge the rounds whose branches are finished (after --branch-index runs); write OUTPUT once all are"),
    method: str = typer.Option("full", "--method", "-m", help="training method of each branch (as for train); adapters are folded into the weights before merging"),
    task: str = typer.Option("causal_lm", help="causal_lm or classification"),
    epochs: float = typer.Option(1.0, help="passes over the branch's slice (ignored when --max-steps > 0)"),
    max_steps: int = typer.Option(-1, help="optimizer steps per branch; overrides --epochs when > 0"),
    lr: float = typer.Option(5e-5, help="peak learning rate of each branch"),
    batch_size: int = typer.Option(8, min=1, help="examples per device per step"),
    grad_accum: int = typer.Option(1, min=1, help="gradient accumulation steps"),
    max_length: int = typer.Option(256, min=2, help="truncate examples to this many tokens"),
    seed: int = typer.Option(0, help="seed of the data shuffle; branch i (1-based over all rounds) trains with seed + i - 1"),
    weight_decay: float = typer.Option(0.0, help="AdamW decoupled weight decay"),
    schedule: str = typer.Option("cpt", help="LR schedule restarted in every branch: cpt (re-warm + cosine to --min-lr-ratio), linear, cosine, constant"),
    warmup: float = typer.Option(0.01, help="warmup per branch: fraction of its steps (< 1) or a number of steps"),
    min_lr_ratio: float = typer.Option(0.1, help="cpt schedule: final lr as a fraction of --lr"),
    replay: Optional[Path] = typer.Option(None, help="replay data mixed into every batch of every branch"),
    replay_fraction: float = typer.Option(0.25, help="share of each batch taken from --replay"),
    rank: Optional[int] = typer.Option(None, "--rank", help="adapter rank"),
    alpha: Optional[float] = typer.Option(None, help="adapter scale numerator"),
    targets: Optional[str] = typer.Option(None, help="comma-separated module names to adapt"),
    method_option: Optional[list[str]] = typer.Option(None, "--method-option", help="any other method option of train, NAME=VALUE (repeatable), e.g. ratio=0.5"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty OUTPUT once the run succeeds"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars or messages"),
) -> None:
    """Branch-and-Merge: per round, train K branches from the current model on disjoint data slices and merge them.

    Rerunning the same command continues an interrupted run: finished branches and rounds are skipped."""
    from deltawise.adapt import TrainConfig
    from deltawise.adapt.bam import BamConfig, run_bam
    from deltawise.io.gguf import resolve_gguf
    from deltawise.options import parse_assignments, scalar

    flags = {name: value for name, value in dict(rank=rank, alpha=alpha, targets=targets).items() if value is not None}
    method_params = {**flags, **parse_assignments(method_option, "--method-option")}  # the method checks and completes them
    train_cfg = TrainConfig(
        model=model, data=data, output=output, method=method, task=task, epochs=epochs, max_steps=max_steps, lr=lr,
        batch_size=batch_size, grad_accum=grad_accum, max_length=max_length, seed=seed, weight_decay=weight_decay,
        schedule=schedule, warmup=warmup, min_lr_ratio=min_lr_ratio, replay=replay, replay_fraction=replay_fraction,
        overwrite=overwrite, progress=False, method_params=method_params,
    )
    params = {k: scalar(v) for k, v in parse_assignments(merge_param, "--merge-param").items()}
    cfg = BamConfig(train=train_cfg, branches=branches, rounds=rounds, merge=merge_method, merge_params=params, work=work,
                    restart=restart, branch_index=branch_index, merge_only=merge_only)
    _no_transformers_bars()
    with _steps_progress(quiet) as progress:
        note = (lambda msg: None) if quiet else (lambda msg: err.print(escape(msg), highlight=False))
        result = run_bam(cfg, model_path=resolve_gguf(model), progress=_ProgressReporter(progress), note=note)
    if result.output is not None:
        out.print(f"BaM: {rounds} round(s) x {branches} branch(es) merged with {result.log['merge']['method']}; "
                  f"wrote {escape(str(result.output))} ({result.log['seconds']:.1f} s)", highlight=False)


# data-driven merging (fisher, gram, soup, atlas): commands live in deltawise.datadriven.commands
from deltawise.datadriven.commands import register as _register_datadriven  # noqa: E402

_register_datadriven(app)


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops a merge like Ctrl-C: completed shards are kept


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
    lm_eval_tasks_dir: Optional[Path] = typer.Option(None, "--lm-eval-tasks-dir", help="folder of local lm-eval task YAMLs for --tasks"),
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
                              dtype=dtype, device=device, progress=_stage_factory(progress), lm_eval_tasks=lm_tasks,
                              lm_eval_tasks_dir=lm_eval_tasks_dir)
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
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except DeltawiseError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        _exit(1)
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]: nothing was written under the output name; "
                  "a merge can be continued with --resume", highlight=False)
        sys.exit(130)
    except SystemExit as done:  # typer ends every command this way
        code = done.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        _exit(code or 0)


def _exit(code: int) -> None:
    """End the process without the interpreter's teardown when nothing is left running.

    With torch imported, finalising every module at exit takes 0.5-0.7 s here, longer than many
    commands' own work. By now a command has written its files (atomically) and joined its
    threads; the atexit handlers (temporary folders, weakref finalizers) still run and the
    streams are flushed. With another thread alive, or without the atexit runner, this is a
    plain exit."""
    import atexit
    import os
    import threading

    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_handlers is None or threading.active_count() > 1:
        sys.exit(code)
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be said
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
