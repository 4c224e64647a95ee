"""Speed of the sparsifying merges against linear, before and after a change, and against mergekit.

What it measures
    On the synthetic checkpoints of ``merge_speed.py`` (base + ``--models`` fine-tunes of
    ``--shape``, bfloat16) it runs ``python -m deltawise merge RECIPE OUT`` for each method,
    with the deltawise sources of ``--before`` (a ``src`` folder of another checkout, e.g. the
    main branch) and of this checkout (``after``) back to back, ``--repeat`` times, inputs read
    once right before every run so that each starts page-cache-warm. It reports the median
    wall seconds of each, after/before, after/linear (the same run's linear merge), whether the
    two outputs are the same bits (the shard sha256 sums of the two manifests), and, for ties and
    dare_ties, mergekit-yaml on the same recipe (once; ``--mergekit none`` skips it). A second table
    gives each run's process CPU seconds (user + system, all threads), steadier on a shared machine.

    Recipes: density 0.2 for every sparsifying method (ties, ties with tie_rule index,
    dare_ties, dare_linear, breadcrumbs and breadcrumbs_ties with gamma 0.01, della and
    della_linear with epsilon 0.1), consensus with its defaults, weight 1 (task_arithmetic 0.5).

How to run it (from the repository root)
    .venv/bin/python benchmarks/sparse_speed.py --before /path/to/main/src --shape small --repeat 2
    .venv/bin/python benchmarks/sparse_speed.py --before /path/to/main/src --workdir bench-work/speed

The machine may be shared: the ratios from back-to-back runs are the numbers to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import (  # noqa: E402  (benchmarks/ is not a package)
    GB,
    NAMED_SHAPES,
    build_recipe,
    console,
    ensure_checkpoints,
    host_info,
    read_files,
    recipe_inputs,
    run_measured,
    safetensors_files,
    write_recipe,
)

REPO_SRC = Path(__file__).resolve().parent.parent / "src"
METHODS = ("linear", "ties", "ties_index", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
           "della_linear", "consensus")
MERGEKIT_METHODS = ("ties", "dare_ties")


def recipe_for(name: str, base: Path, models: list[Path]) -> dict:
    if name in ("linear", "task_arithmetic", "ties", "dare_ties"):
        return build_recipe(name, base, models)
    method = {"ties_index": "ties"}.get(name, name)
    params: dict = {"weight": 1.0, "density": 0.2}
    if method.startswith("breadcrumbs"):
        params["gamma"] = 0.01
    if method.startswith("della"):
        params["epsilon"] = 0.1
    if method == "consensus":
        params = {}
    recipe: dict = {"merge_method": method, "base_model": str(base.resolve()),
                    "models": [{"model": str(m.resolve()), "parameters": dict(params)} for m in models],
                    "dtype": "bfloat16"}
    if name == "ties_index":
        recipe["parameters"] = {"tie_rule": "index"}
    return recipe


def shard_sums(out: Path) -> list[str] | None:
    manifest = out / "deltawise_merge.json"  # the merge manifest (io/output.py MANIFEST)
    if not manifest.exists():
        return None
    data = json.loads(manifest.read_text())
    return [s["sha256"] for s in data.get("shards", [])] or None


def run_once(label: str, cmd: list[str], out: Path, inputs: list[Path], env: dict,
             timeout: float) -> tuple[float, list[str] | None, float]:
    if out.exists():
        shutil.rmtree(out)
    read_files(inputs)  # page-cache-warm start, whatever the previous run evicted
    result = run_measured(cmd, out.parent / out.name, timeout_s=timeout, env=env)
    if not result.ok:
        console.print(f"  {label}: failed\n{result.stderr[-2000:]}", markup=False)
        return float("nan"), None, float("nan")
    sums = shard_sums(out) if label != "mergekit" else None
    console.print(f"  {label}: {result.wall_s:.1f} s ({result.cpu_s:.1f} CPU s)", markup=False)
    shutil.rmtree(out, ignore_errors=True)
    return result.wall_s, sums, result.cpu_s


def print_ratios(rows: list[dict], unit: str, suffix: str, *, with_same_bits: bool) -> None:
    """One markdown table of the runs' ``before``/``after``/``mergekit`` figures (keys with ``suffix``: "" wall
    seconds, "_cpu" process CPU seconds) and their ratios to before, to linear and (wall) of mergekit to after."""
    def cell(x, fmt="{:.1f}"):
        return fmt.format(x) if x is not None else "-"

    linear = next((r["after" + suffix] for r in rows if r["method"] == "linear"), None)
    columns = ["method", f"before {unit}", f"after {unit}", "after/before", "after/linear"]
    columns += ["same bits", f"mergekit {unit}", "mergekit/after"] if with_same_bits else [f"mergekit {unit}"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        before, after, mergekit = r.get("before" + suffix), r["after" + suffix], r.get("mergekit" + suffix)
        cells = [r["method"], cell(before), cell(after), cell(after / before if before else None, "{:.2f}"),
                 cell(after / linear if linear else None, "{:.2f}")]
        if with_same_bits:
            cells += [cell(r["same_bits"], "{}"), cell(mergekit), cell(mergekit / after if mergekit else None)]
        else:
            cells += [cell(mergekit)]
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("bench-work/sparse-speed"))
    parser.add_argument("--shape", choices=sorted(NAMED_SHAPES), default="llama-1b")
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--before", type=Path, default=None, help="the src folder of the version to compare against")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mergekit", default=None, help="mergekit-yaml path, or none (default: beside sys.executable)")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    args.workdir.mkdir(parents=True, exist_ok=True)
    shape = NAMED_SHAPES[args.shape]
    base, models = ensure_checkpoints(args.workdir, shape, args.models, 2 * GB)
    mergekit = None
    if args.mergekit != "none":
        mergekit = Path(args.mergekit) if args.mergekit else Path(sys.executable).parent / "mergekit-yaml"
        mergekit = mergekit if mergekit.exists() else None
    versions = ([("before", args.before.resolve())] if args.before else []) + [("after", REPO_SRC)]
    rows = []
    for name in args.methods.split(","):
        recipe = write_recipe(args.workdir / f"recipe_{name}.yaml", recipe_for(name, base, models))
        method = recipe_for(name, base, models)["merge_method"]
        inputs = [f for folder in recipe_inputs(method, base, models) for f in safetensors_files(folder)]
        console.print(f"[bold]{name}[/]")
        times: dict[str, list[float]] = {label: [] for label, _ in versions}
        cpu: dict[str, list[float]] = {label: [] for label, _ in versions}
        sums: dict[str, list[str] | None] = {}
        for _ in range(args.repeat):
            for label, src in versions:
                env = {**os.environ, "PYTHONPATH": str(src), "CUDA_VISIBLE_DEVICES": ""}
                cmd = [sys.executable, "-m", "deltawise", "merge", str(recipe), str(args.workdir / f"out_{label}"),
                       "--shard-size", "2GB", "--threads", str(args.threads)]
                wall, sums[label], cpu_s = run_once(label, cmd, args.workdir / f"out_{label}", inputs, env, args.timeout)
                times[label].append(wall)
                cpu[label].append(cpu_s)
        row = {"method": name, **{label: statistics.median(t) for label, t in times.items()},
               **{f"{label}_cpu": statistics.median(c) for label, c in cpu.items()},
               "runs": times, "cpu_runs": cpu,
               "same_bits": (sums.get("before") == sums.get("after")) if args.before else None}
        if mergekit is not None and name in MERGEKIT_METHODS:
            cmd = [str(mergekit), str(recipe), str(args.workdir / "out_mergekit"), "--out-shard-size", str(2 * GB),
                   "--lazy-unpickle", "--no-copy-tokenizer"]
            row["mergekit"], _, row["mergekit_cpu"] = run_once("mergekit", cmd, args.workdir / "out_mergekit", inputs,
                                                              {**os.environ, "CUDA_VISIBLE_DEVICES": ""}, args.timeout)
        rows.append(row)

    console.print(f"\n{args.shape}, {args.models} models, threads {args.threads}, median of {args.repeat}")
    print_ratios(rows, "s", "", with_same_bits=True)
    # process CPU seconds (user + system, all threads): steadier than wall seconds on a shared machine
    print()
    print_ratios(rows, "CPU s", "_cpu", with_same_bits=False)
    if args.json:
        args.json.write_text(json.dumps({"host": host_info(), "shape": args.shape, "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
