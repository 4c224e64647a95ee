"""``extract``, ``apply`` and ``compress``: deltas out of models, into models, and smaller."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from deltawise.commands.console import ProgressReporter, bytes_progress, escape, out, warn
from deltawise.commands.flags import options
from deltawise.errors import DeltawiseError
from deltawise.options import AdapterOutputOptions, EngineOptions, RunOptions

REPORT = typer.Option(None, "--report", help="write the per-tensor report as JSON here")
QUIET = {"help": "no progress bars or tables"}
OVERWRITE = {"help": "replace a non-empty output folder once the new one is complete"}


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


def check_report(report: Optional[Path], output: Optional[Path], inputs: list[tuple[str, Optional[str]]]) -> None:
    """Refuse a --report path that is an input, inside an input's folder, or the output folder itself,
    before the work starts rather than after it."""
    if report is None:
        return
    from deltawise.io.output import check_output_file

    check_output_file(report, [(label, Path(ref) if ref else None) for label, ref in inputs], outputs=[output])


def _finish(result, report: Optional[Path], what: str) -> None:
    import json

    for warning in result.warnings:
        warn(warning)
    if report is not None:
        from deltawise.io.writer import write_json_atomic

        write_json_atomic(report, result.to_json())
    out.print(f"{what} {escape(str(result.out))}: {len(result.rows)} tensors, {result.stored_bytes} bytes stored "
              f"({size_versus_dense(result.dense_bytes, result.stored_bytes)}); "
              f"{escape(json.dumps(result.summary, default=str))}", highlight=False)


def size_versus_dense(dense_bytes: int, stored_bytes: int) -> str:
    """Stored size against the dense size, in the direction it goes: "4.00x smaller than dense" or "2.00x larger than
    dense" (never a ratio below 1 called smaller)."""
    if stored_bytes == 0:
        return "nothing stored"
    if stored_bytes <= dense_bytes:
        return f"{dense_bytes / stored_bytes:.2f}x smaller than dense"
    return f"{stored_bytes / dense_bytes:.2f}x larger than dense" if dense_bytes else "dense size 0"


@options("adapter", AdapterOutputOptions, only=("adapter_embeddings",), override={"adapter_embeddings": {
    "help": "LoRA: changed embedding tables (token, position, token-type) saved whole (modules_to_save, the default) or "
            "as PEFT LoRA-embedding factors at --rank/--energy (lora)"}})
@options("run", RunOptions, exclude=("device",), override={
    "output": {"help": "delta folder (or PEFT adapter folder with --lora) to create"}, "quiet": QUIET, "overwrite": OVERWRITE})
def extract(
    finetuned: str = typer.Argument(..., help="fine-tuned model (folder or hub id)"),
    base: str = typer.Option(..., "--base", help="the model it was fine-tuned from"),
    run: RunOptions = ...,
    lora: bool = typer.Option(False, "--lora", help="write a PEFT LoRA adapter (SVD of each linear weight delta)"),
    rank: Optional[int] = typer.Option(None, "--rank", min=1, help="LoRA rank (with --energy: the largest rank allowed)"),
    energy: Optional[float] = typer.Option(None, "--energy", min=0, max=1,
                                           help="LoRA: smallest rank keeping this fraction of spectral energy"),
    non_linear: str = typer.Option("save", "--non-linear", help="LoRA: changed biases, norms (and embeddings saved "
                                                                "whole): save (biases as lora_B.bias, the rest in "
                                                                "modules_to_save) or skip (left out)"),
    adapter: AdapterOutputOptions = ...,
    dtype: str = typer.Option("auto", help="dense delta dtype: auto (exact: one step wider than the weights), float32, "
                                           "bfloat16, ..."),
    report: Optional[Path] = REPORT,
) -> None:
    """Extract FINETUNED − BASE as a delta folder, or as a PEFT LoRA adapter with --lora."""
    if non_linear not in ("save", "skip"):
        raise DeltawiseError(f"--non-linear must be save or skip, got {non_linear!r}")
    check_report(report, run.output, [("fine-tuned model", finetuned), ("base", base)])
    with bytes_progress(run.quiet) as progress:
        reporter = ProgressReporter(progress)
        if lora:
            from deltawise.delta.lora_extract import extract_lora

            result = extract_lora(finetuned, base, run.output, rank=rank, energy=energy, non_linear=non_linear,  # type: ignore[arg-type]
                                  embeddings=adapter.adapter_embeddings, overwrite=run.overwrite, progress=reporter)
        else:
            if rank is not None or energy is not None or adapter.adapter_embeddings is not None:
                raise DeltawiseError("--rank/--energy/--adapter-embeddings need --lora")
            from deltawise.delta.extract import extract_delta

            result = extract_delta(finetuned, base, run.output, dtype=dtype, overwrite=run.overwrite, progress=reporter)  # type: ignore[arg-type]
    if lora and not run.quiet:
        out.print(_rows_table("LoRA extraction (error = discarded spectral energy, as a norm ratio)", result))
    _finish(result, report, "PEFT adapter" if lora else "delta")


@options("engine", EngineOptions, only=("shard_size",), override={"shard_size": {"help": "largest output shard"}})
@options("run", RunOptions, exclude=("device",), override={"output": {"help": "model folder to create"}, "quiet": QUIET,
                                                           "overwrite": OVERWRITE})
def apply(
    delta: str = typer.Argument(..., help="delta folder or PEFT adapter folder"),
    base: str = typer.Option(..., "--base", help="the model to apply it to (its own base, or a new version: patch transfer)"),
    run: RunOptions = ...,
    scale: float = typer.Option(1.0, "--scale", help="multiplier of the delta; -1 removes it"),
    task: Optional[str] = typer.Option(None, "--task", help="TALL folders: which task to reconstruct (name or index)"),
    original_base: Optional[str] = typer.Option(None, "--original-base", help="the model the delta was made from: report how "
                                                                              "far BASE is from it"),
    engine: EngineOptions = ...,
    report: Optional[Path] = typer.Option(None, "--report", help="write the report (and drift table) as JSON here"),
) -> None:
    """Write BASE + scale * DELTA as a model folder."""
    from deltawise.delta.apply import apply_delta
    from deltawise.io.writer import parse_size

    check_report(report, run.output, [("delta", delta), ("base", base), ("original base", original_base)])
    with bytes_progress(run.quiet) as progress:
        result = apply_delta(delta, base, run.output, scale=scale, task=task, original_base=original_base,  # type: ignore[arg-type]
                             overwrite=run.overwrite, shard_size=parse_size(engine.shard_size),
                             progress=ProgressReporter(progress))
    if result.drift and not run.quiet:
        from rich.table import Table

        table = Table(title=f"how far {base} is from {original_base} (tensors the delta changes)")
        for col in ("tensor", "cosine", "‖new − original‖ / ‖original‖"):
            table.add_column(col, justify="left" if col == "tensor" else "right", overflow="fold")
        for d in result.drift:
            table.add_row(d.name, f"{d.cosine:.6f}", f"{d.relative_distance:.4g}")
        out.print(table)
    for warning in result.warnings:
        warn(warning)
    if report is not None:
        from deltawise.io.writer import write_json_atomic

        write_json_atomic(report, result.to_json())
    out.print(f"applied {escape(delta)} x {scale:g} to {escape(base)} into {escape(str(result.out))} "
              f"({len(result.rows)} tensors changed)", highlight=False)


@options("run", RunOptions, exclude=("device",), override={"output": {"help": "compressed delta folder to create"},
                                                           "quiet": QUIET,
                                                           "overwrite": OVERWRITE})
def compress(
    deltas: list[str] = typer.Argument(..., help="delta folder(s) or PEFT adapter(s); several for --method tall"),
    method: str = typer.Option("compeft", "--method", "-m", help="compeft (top-k signs x one scale), topk (top-k exact "
                                                                 "values) or tall"),
    run: RunOptions = ...,
    density: float = typer.Option(0.1, "--density", min=0, max=1, help="compeft/topk: fraction of entries kept per tensor"),
    alpha: float = typer.Option(1.0, "--alpha", help="compeft: scale multiplier (scale = alpha * std of the dense delta)"),
    lam: Optional[list[float]] = typer.Option(None, "--lam", min=0, help="tall: mask threshold lambda (once, or once per task)"),
    names: Optional[str] = typer.Option(None, "--names", help="tall: comma-separated task names (default: folder names)"),
    base: Optional[str] = typer.Option(None, "--base", help="base model, needed for PEFT adapters that store full values"),
    report: Optional[Path] = REPORT,
) -> None:
    """Compress deltas: ComPEFT ternary, top-k sparse, or TALL masks (several deltas of one base)."""
    check_report(report, run.output, [*[("delta", d) for d in deltas], ("base", base)])
    with bytes_progress(run.quiet) as progress:
        reporter = ProgressReporter(progress)
        if method == "tall":
            from deltawise.delta.tall_compress import compress_tall

            task_names = [n.strip() for n in names.split(",")] if names else None
            result = compress_tall(deltas, run.output, lambdas=lam, names=task_names, base=base, overwrite=run.overwrite,  # type: ignore[arg-type]
                                   progress=reporter)
        else:
            if len(deltas) != 1:
                raise DeltawiseError(f"--method {method} compresses one delta; got {len(deltas)} (several are for --method tall)")
            from deltawise.delta.compress import compress_delta

            result = compress_delta(deltas[0], run.output, method=method, density=density, alpha=alpha, base=base,  # type: ignore[arg-type]
                                    overwrite=run.overwrite, progress=reporter)
    if not run.quiet:
        label = "worst task's rel. error" if method == "tall" else "rel. error"
        out.print(_rows_table(f"{method} compression", result, error_label=label))
    _finish(result, report, "compressed delta")


def register(app: typer.Typer) -> None:
    app.command()(extract)
    app.command()(apply)
    app.command()(compress)
