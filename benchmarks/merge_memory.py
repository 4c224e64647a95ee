"""Peak memory of ``deltawise merge`` on checkpoints bigger than 1 GB.

What it measures
    For each merge method (linear, task_arithmetic, ties, dare_ties by default) the
    script runs ``python -m deltawise merge RECIPE OUT --shard-size 500MB`` as a
    subprocess over a synthetic base checkpoint plus N fine-tuned checkpoints
    (Llama-shaped, bfloat16, sharded safetensors, about ``--size-gb`` each) and samples
    the subprocess's resident set size (RSS, children included) every 50 ms. It
    reports wall time, peak RSS, peak RSS as a share of one model's size and the
    output size, then says whether peak RSS stayed under one model's size for every
    method -- the point of a streaming merge is that it never needs a whole model in
    memory.

    RSS also counts file-backed pages (shared libraries, anything memory-mapped). deltawise
    reads inputs with pread, so input pages stay in the page cache and out of its RSS; the
    "anon RSS" column is RSS minus file-backed/shared pages, i.e. the memory the merge
    really allocated.

How to run it (from the repository root)
    .venv/bin/python benchmarks/merge_memory.py
    .venv/bin/python benchmarks/merge_memory.py --size-gb 2 --models 4 --methods ties --json out.json
    .venv/bin/python benchmarks/merge_memory.py --workdir /tmp/dw-bench --keep   # reuse checkpoints

Sizes use decimal units (1 GB = 10**9 bytes, 1 MB = 10**6 bytes), like ``--shard-size``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import (  # noqa: E402  (benchmarks/ is not a package)
    ALL_METHODS,
    GB,
    MB,
    LlamaShape,
    add_workdir_options,
    build_recipe,
    choose_shape,
    console,
    ensure_checkpoints,
    host_info,
    parse_methods,
    parse_shard_size,
    recipe_inputs,
    run_measured,
    safetensors_bytes,
    work_dir,
    write_recipe,
)


# --------------------------------------------------------------------------- measuring


@dataclass
class MergeResult:
    method: str
    models: int
    model_bytes: int
    input_bytes: int
    wall_s: float
    peak_rss_bytes: int
    peak_anon_rss_bytes: int
    output_bytes: int
    returncode: int
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def rss_over_model(self) -> float:
        return self.peak_rss_bytes / self.model_bytes


def run_merge(recipe: Path, out_dir: Path, shard_size: str, log_dir: Path) -> tuple[int, float, int, int, str]:
    """Run the merge CLI; returns (returncode, wall seconds, peak RSS, peak anon RSS, stderr)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    cmd = [sys.executable, "-m", "deltawise", "merge", str(recipe), str(out_dir), "--shard-size", shard_size]
    run = run_measured(cmd, log_dir / out_dir.name)
    return run.returncode, run.wall_s, run.peak_rss_bytes, run.peak_anon_rss_bytes, run.stderr


def measure_method(method: str, base: Path, models: list[Path], workdir: Path, shard_size: str, keep: bool) -> MergeResult:
    recipe = write_recipe(workdir / f"recipe_{method}.yaml", build_recipe(method, base, models))
    inputs = recipe_inputs(method, base, models)
    out_dir = workdir / f"out_{method}"
    returncode, wall, peak_rss, peak_anon, stderr = run_merge(recipe, out_dir, shard_size, workdir)
    output_bytes = safetensors_bytes(out_dir) if out_dir.is_dir() else 0
    if not keep and out_dir.exists():
        shutil.rmtree(out_dir)
    return MergeResult(
        method=method,
        models=len(models),
        model_bytes=safetensors_bytes(models[0]),
        input_bytes=sum(safetensors_bytes(f) for f in inputs),
        wall_s=wall,
        peak_rss_bytes=peak_rss,
        peak_anon_rss_bytes=peak_anon,
        output_bytes=output_bytes,
        returncode=returncode,
        stderr=stderr,
    )


# --------------------------------------------------------------------------- reporting


def results_table(results: list[MergeResult]) -> Table:
    table = Table(title="deltawise merge: peak memory")
    for header in ("method", "models", "input GB / model", "total input GB", "wall s",
                   "peak RSS MB", "peak RSS / one model", "peak anon RSS MB", "output GB"):
        table.add_column(header, justify="left" if header == "method" else "right")
    for r in results:
        if not r.ok:
            table.add_row(r.method, str(r.models), f"{r.model_bytes / GB:.2f}", f"{r.input_bytes / GB:.2f}",
                          f"{r.wall_s:.1f}", "[red]FAILED", f"exit {r.returncode}", "-", "-")
            continue
        table.add_row(
            r.method, str(r.models), f"{r.model_bytes / GB:.2f}", f"{r.input_bytes / GB:.2f}", f"{r.wall_s:.1f}",
            f"{r.peak_rss_bytes / MB:,.0f}", f"{100 * r.rss_over_model:.1f}%",
            f"{r.peak_anon_rss_bytes / MB:,.0f}", f"{r.output_bytes / GB:.2f}",
        )
    return table


def verdict(results: list[MergeResult]) -> str:
    failed = [r.method for r in results if not r.ok]
    over = [f"{r.method} ({100 * r.rss_over_model:.0f}%)" for r in results if r.ok and r.rss_over_model >= 1]
    if failed:
        return f"Cannot tell whether peak RSS stayed under one model's size: failed: {', '.join(failed)}."
    if over:
        return f"Peak RSS did NOT stay under one model's size for every method: over for {', '.join(over)}."
    worst = max(results, key=lambda r: r.rss_over_model)
    return (f"Peak RSS stayed under one model's size for every method "
            f"(worst: {worst.method}, {100 * worst.rss_over_model:.1f}% of {worst.model_bytes / GB:.2f} GB).")


def write_json(path: Path, results: list[MergeResult], shape: LlamaShape, args: argparse.Namespace) -> None:
    payload = {
        "benchmark": "merge_memory",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model_shape": asdict(shape),
        "host": host_info(),
        "results": [{**asdict(r), "ok": r.ok, "rss_over_model": r.rss_over_model} for r in results],
        "verdict": verdict(results),
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workdir_options(parser, "checkpoints, recipes and outputs", "keep the work dir and every merge output")
    parser.add_argument("--size-gb", type=float, default=1.1, help="size of each checkpoint in GB (default 1.1)")
    parser.add_argument("--models", type=int, default=3, help="number of fine-tuned checkpoints to merge (default 3)")
    parser.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated merge methods")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--shard-size", default="500MB", help="--shard-size passed to the merge, also used for the "
                                                              "synthetic checkpoints (default 500MB)")
    args = parser.parse_args(argv)
    args.methods = parse_methods(parser, args.methods)
    if args.models < 1 or args.size_gb <= 0:
        parser.error("--models must be >= 1 and --size-gb > 0")
    args.shard_bytes = parse_shard_size(parser, args.shard_size)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with work_dir(args.workdir, "deltawise-merge-bench-", args.keep) as workdir:
        shape = choose_shape(int(args.size_gb * GB))
        console.print(f"work dir {workdir}; model shape {shape} = {shape.total_bytes() / GB:.2f} GB per checkpoint")
        base, models = ensure_checkpoints(workdir, shape, args.models, args.shard_bytes)
        results = [measure_method(m, base, models, workdir, args.shard_size, args.keep) for m in args.methods]
        for r in results:
            if not r.ok:
                console.print(f"[red]{r.method}: merge exited with {r.returncode}; its stderr:")
                console.print(r.stderr, markup=False, highlight=False)
        console.print(results_table(results))
        console.print(verdict(results))
        if args.json:
            write_json(args.json, results, shape, args)
            console.print(f"wrote {args.json}")
        return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
