"""Time of a 2-branch BaM round: the branches one after the other against the executors (issue 20).

What it measures
    One BaM round of 2 branches, ``python -m deltawise bam BASE --data DATA -k 2 --rounds 1 --max-steps N``, run
    as a user runs it (a subprocess through the product's CLI entry, so start-up, data, training, folding, the
    merge and writing OUT all count), once with each executor:

    * ``inline``: both branches in the bam process, one after the other (torch's default threads: all cores);
    * ``local --jobs 2``: both at once, each in a spawned process with cores/2 torch threads;
    * ``ray``: both at once as tasks of a local Ray instance that the command starts and stops itself
      (``RAY_ADDRESS`` is removed from its environment), each asking for ``--branch-cpus`` = cores/2 (and its
      threads); with ``--device cuda`` also ``--branch-gpus 0.5``, so the two branches share the one GPU;
    * ``inline-1`` (a control, only when named in ``--executors``): inline with 1 torch thread (OMP_NUM_THREADS=1),
      the thread count a branch job gets on 2 cores, to tell running the branches at once from the thread count.

    Per run: wall seconds; CPU seconds of the whole process tree, twice: summed over every process seen by sampling
    the tree every 50 ms (``synthetic.PeakRssSampler``; it misses each process's last 50 ms), and as RUSAGE_CHILDREN
    before and after, which can miss Ray's workers: the raylet ignores SIGCHLD, so the kernel reaps its workers
    without adding their times to any parent's; the peak RSS of the tree; the branches' own training seconds from
    ``bam.json``. Processes that outlive the command (this script is their subreaper, so they come back here) are
    waited for up to 60 s, then ended and named. Per executor: the median of the ``--repeat`` runs and its ratio to
    inline's median. The executors take turns (inline, local, ray, inline, ...) so a change in the machine's load
    hits each alike; the load average is printed at the start and the end, and recorded before every run.

    Equality: each merged model is compared with every executor's first merged model (the largest absolute
    difference over all tensors), beside the size of the round's change (the largest |merged - base|). The
    branches see the same slices, seeds and schedule under every executor; what differs is the torch thread count
    (inline: all cores; a branch job: cores/2), which changes how a matrix product splits its sums, so the float32
    results differ in the last bits and the training steps carry that on: expect a difference far below the change,
    not 0. Runs with the same thread count (inline against inline, local against ray and, on 2 cores, inline-1
    against both) are expected to be equal; on a GPU, kernels that are not deterministic can add differences.

How to run it (from the repository root)
    # CPU: SmolLM2-135M (examples/demo.py fetches and converts it once), the German fortunes the demo trains on
    PYTHONPATH=src .venv/bin/python benchmarks/bam_round_speed.py --repeat 2
    # one GPU: the same round with --device cuda (the default when torch sees a GPU)
    PYTHONPATH=src .venv/bin/python benchmarks/bam_round_speed.py --device cuda --repeat 3
    # the control: the sequential round on 1 torch thread, taking turns with the others
    PYTHONPATH=src .venv/bin/python benchmarks/bam_round_speed.py --executors inline,inline-1,local,ray --repeat 2
    # pipeline check: a tiny random Llama (tests/tiny_models.py) and 2 steps (seconds a run)
    PYTHONPATH=src .venv/bin/python benchmarks/bam_round_speed.py --quick
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]

EXECUTORS = ("inline", "local", "ray")
# not run by default: the sequential round with the thread count a branch job gets, to tell the two apart
CONTROLS = ("inline-1",)
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def executor_args(name: str, device: str, branch_cpus: float) -> list[str]:
    """The bam flags that run a round's 2 branches with executor ``name`` (the CPU and GPU settings of the docstring)."""
    if name in ("inline", "inline-1"):
        return ["--executor", "inline"]
    if name == "local":
        return ["--executor", "local", "--jobs", "2"]
    if name == "ray":
        gpus = ["--branch-gpus", "0.5"] if device == "cuda" else []  # two branches on the one GPU
        return ["--executor", "ray", "--branch-cpus", f"{branch_cpus:g}", *gpus]
    raise ValueError(f"unknown executor {name!r}")


def schedule(executors: list[str], repeat: int) -> list[tuple[int, str]]:
    """(repeat, executor) in the order the runs happen: the executors take turns within every repeat."""
    return [(r, name) for r in range(1, repeat + 1) for name in executors]


def _differences(a: Path, b: Path, names=None):
    """(name, largest |a - b|) for each tensor of ``names`` (default: every tensor of ``a`` that ``b`` also holds),
    in float64."""
    import torch

    from deltawise.io.reader import ModelReader

    ra, rb = ModelReader(a), ModelReader(b)
    for name in sorted(names if names is not None else (n for n in ra.keys() if n in rb)):
        yield name, (ra.get(name).to(torch.float64) - rb.get(name).to(torch.float64)).abs().max().item()


def max_abs_difference(a: Path, b: Path) -> tuple[float, str]:
    """The largest |a - b| over the tensors of two model folders, and the tensor where it is ("" when they are equal);
    folders that hold different tensors are refused (the comparison would be silently partial)."""
    from deltawise.io.reader import ModelReader

    names_a, names_b = set(ModelReader(a).keys()), set(ModelReader(b).keys())
    if names_a != names_b:
        only = sorted(names_a ^ names_b)
        raise ValueError(f"{a} and {b} hold different tensors (e.g. {', '.join(only[:3])})")
    worst, where = 0.0, ""
    for name, diff in _differences(a, b, names_a):
        if diff > worst:
            worst, where = diff, name
    return worst, where


def change_size(merged: Path, base: Path) -> float:
    """The largest |merged - base| over the tensors both hold: the scale the executors' differences are read against."""
    return max(diff for _, diff in _differences(merged, base))


def become_subreaper() -> bool:
    """Make this process the child subreaper of what it starts (Linux): a descendant whose parent ends before it is
    re-parented here instead of to init, so processes a run leaves behind can be found and waited for. False where
    prctl is missing."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap_descendants(grace_s: float) -> list[str]:
    """Wait up to ``grace_s`` for every process re-parented here to end (reaping it), then end those left
    (by pid: they are what the measured command started) and name them."""
    import psutil

    deadline = time.monotonic() + grace_s
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return []
        if pid:
            continue
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    left = psutil.Process().children()
    names = []
    for proc in left:
        try:
            names.append(f"{proc.pid} {proc.name()}")
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=10)
    return names


def tree_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def branch_seconds(out: Path) -> list[float]:
    """Training seconds of each branch, from the run's ``bam.json``."""
    log = json.loads((out / "bam.json").read_text())
    return [b["seconds"] for b in log["rounds_log"][0]["branches"]]


def tiny_inputs(folder: Path) -> tuple[Path, Path]:
    """A random Llama (hidden 32, 2 layers) with a tokenizer trained on its data, and that data."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from adapt_util import DOCS
    from tiny_models import save_tiny_llama

    docs = [f"{d} Item {i}." for i, d in enumerate(DOCS * 4)]
    data = folder / "tiny.txt"
    data.write_text("\n%\n".join(docs) + "\n")
    model = folder / "tiny_model"
    if not (model / "config.json").is_file():
        save_tiny_llama(model, docs, hidden=32, layers=2, vocab=96)
    return model, data


def demo_inputs(folder: Path, console) -> tuple[Path, Path]:
    """SmolLM2-135M-Instruct as the demo fetches it, and the German fortunes it trains on (the demo's length window;
    all of them: nothing is evaluated here), '%'-separated."""
    import realtext
    from demo import fetch_smollm2

    realtext.ensure_fortunes(["fortunes-de"], say=lambda m: console.print(f"  {m}"))
    data = folder / "german.txt"
    data.write_text("\n%\n".join(realtext.fortunes(realtext.FORTUNES / "de", 40, 400)) + "\n", encoding="utf-8")
    return fetch_smollm2(console), data


def run_environment(name: str, env: dict[str, str]) -> dict[str, str]:
    """The environment of a run: ``inline-1`` is inline with 1 torch thread (torch takes OMP_NUM_THREADS)."""
    return {**env, "OMP_NUM_THREADS": "1"} if name == "inline-1" else env


def threads_per_branch(name: str, branch_cpus: float) -> int:
    """The torch threads a branch trains with under executor ``name`` (the product's own rule)."""
    import torch

    if name == "inline-1":
        return 1
    from deltawise.adapt.executors import executor_for
    from deltawise.options import ExecutorOptions

    _, threads = executor_for(ExecutorOptions(name, 2 if name == "local" else 0, branch_cpus, 0.0), 2)
    return threads if threads is not None else torch.get_num_threads()  # inline: this machine's default


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("bench-work/bam_round_speed"),
                    help="inputs (data, the tiny model) and one fresh folder per run, removed once compared")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when torch sees a GPU")
    ap.add_argument("--executors", default=",".join(EXECUTORS),
                    help="comma-separated, from inline,local,ray and inline-1 (inline with 1 torch thread: a control)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per executor, taking turns")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per branch (--max-steps; 3: 1-1.5 min a "
                    "branch of the inline round on 2 shared CPU cores, benchmarks/RESULTS.md)")
    ap.add_argument("--method", default="full", help="bam --method (its default: full)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--branch-cpus", type=float, default=None, help="ray: CPUs per branch (default: cores/2)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds a run may take before it is ended")
    ap.add_argument("--quick", action="store_true", help="tiny random Llama, 2 steps, batch 2: a pipeline check")
    ap.add_argument("--json", type=Path, help="write the settings, every run and the summary here")
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table

    from deltawise.io.writer import write_json_atomic
    from synthetic import run_measured

    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)  # a log keeps the table whole
    executors = [e.strip() for e in args.executors.split(",")]
    if unknown := [e for e in executors if e not in EXECUTORS + CONTROLS]:
        ap.error(f"unknown executors: {', '.join(unknown)} (have {', '.join(EXECUTORS + CONTROLS)})")
    if "inline" not in executors:
        ap.error("the runs are compared with the inline one: keep inline in --executors")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no GPU (a Ray task asking for a GPU would wait forever)")
    cores = os.cpu_count() or 1
    branch_cpus = args.branch_cpus if args.branch_cpus is not None else max(1, cores // 2)
    if args.quick:
        args.steps, args.batch_size, args.max_length = 2, 2, 32

    inputs = args.work / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    base, data = tiny_inputs(inputs) if args.quick else demo_inputs(inputs, console)
    reaper = become_subreaper()
    load_start = os.getloadavg()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # ray: the command starts its own instance
    common = ["-k", "2", "--rounds", "1", "--method", args.method, "--max-steps", str(args.steps), "--batch-size",
              str(args.batch_size), "--max-length", str(args.max_length), "--lr", f"{args.lr:g}", "--device", device, "--quiet"]
    console.print(f"BaM round of 2 branches: {base.name if args.quick else 'SmolLM2-135M-Instruct'}, {args.method}, "
                  f"{args.steps} steps x batch {args.batch_size} x {args.max_length} tokens per branch, device {device}; "
                  f"{cores} cores, load average {load_start[0]:.2f} at the start")

    runs: list[dict] = []
    firsts: dict[str, Path] = {}  # each executor's first finished OUT, kept until every later run is compared with it
    change = None
    try:
        for rep, name in schedule(executors, args.repeat):
            folder = args.work / f"run-{rep}-{name}"
            if folder.exists():
                shutil.rmtree(folder)  # left by an interrupted run of this script
            folder.mkdir(parents=True)
            out = folder / "out"
            cmd = [sys.executable, "-m", "deltawise", "bam", str(base), "--data", str(data), "-o", str(out), *common,
                   *executor_args(name, device, branch_cpus)]
            load = os.getloadavg()[0]
            before = tree_cpu_seconds()
            result = run_measured(cmd, folder / "bam", timeout_s=args.timeout, env=run_environment(name, env))
            leftover = reap_descendants(60.0) if reaper else []
            run = {"repeat": rep, "executor": name, "wall_s": result.wall_s, "cpu_s": result.sampled_cpu_s,
                   "cpu_rusage_s": tree_cpu_seconds() - before, "peak_rss_gb": result.peak_rss_bytes / 1e9,
                   "load_before": load, "ok": result.ok, "leftover_processes": leftover}
            if result.ok:
                run["branch_s"] = branch_seconds(out)
                run["diffs"] = {other: max_abs_difference(out, path) for other, path in firsts.items()}
                if name not in firsts:
                    firsts[name] = out
                if change is None and name == "inline":
                    change = change_size(out, base)
            else:
                run["error"] = "\n".join(result.stderr.strip().splitlines()[-15:])
                console.print(f"[red]{name} (repeat {rep}) failed[/]:\n{run['error']}", highlight=False)
            runs.append(run)
            diffs = ", ".join(f"to {other} {d:.3g}" for other, (d, _) in run.get("diffs", {}).items())
            console.print(f"  {name} (repeat {rep}): wall {run['wall_s']:.1f} s, CPU {run['cpu_s']:.1f} s "
                          f"(RUSAGE_CHILDREN {run['cpu_rusage_s']:.1f} s)"
                          + (f"; max |diff| {diffs}" if diffs else "")
                          + (f"; ended left-over processes: {', '.join(leftover)}" if leftover else ""), highlight=False)
            if firsts.get(name) != out:
                shutil.rmtree(folder)
    finally:
        for out in firsts.values():
            shutil.rmtree(out.parent, ignore_errors=True)
    load_end = os.getloadavg()

    summary = summarise(runs, executors)
    table = Table(title=f"2-branch BaM round, {args.steps} steps per branch, device {device}, {args.repeat} run(s) "
                        "per executor (median; ratio = executor / inline; threads: torch threads per branch; "
                        "max |diff|: the largest over the runs, to that executor's first run)")
    for col in ("executor", "threads", "wall s", "wall ratio", "CPU s", "CPU ratio", "rusage CPU s", "peak RSS GB",
                "branch train s", *(f"max |diff| to {e}" for e in executors)):
        table.add_column(col, justify="left" if col == "executor" else "right")
    for name, s in summary.items():
        if s is None:
            table.add_row(name, "", "failed", *[""] * (6 + len(executors)))
            continue
        table.add_row(name, str(threads_per_branch(name, branch_cpus)), f"{s['wall_s']:.1f}", f"{s['wall_ratio']:.2f}",
                      f"{s['cpu_s']:.1f}", f"{s['cpu_ratio']:.2f}", f"{s['cpu_rusage_s']:.1f}", f"{s['peak_rss_gb']:.1f}",
                      " / ".join(f"{x:.1f}" for x in s["branch_s"]),
                      *(f"{s['max_abs_diff'][e]:.3g}" if e in s["max_abs_diff"] else "-" for e in executors))
    console.print(table)
    console.print(f"the round's change (largest |merged - base|, first inline run): {change:.3g}" if change is not None
                  else "no inline run finished: nothing to compare with")
    console.print(f"load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end "
                  f"(1/5/15 min: {', '.join(f'{x:.2f}' for x in load_end)})")
    if not reaper:
        console.print("no child subreaper here (not Linux): processes that outlived a run were not looked for")
    if args.json:
        write_json_atomic(args.json, {
            "benchmark": "bam_round_speed", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "device": device, "cores": cores,
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None, "base": str(base), "data": str(data),
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | {"branch_cpus": branch_cpus},
            "load_start": load_start, "load_end": load_end, "change": change, "runs": runs, "summary": summary})


def summarise(runs: list[dict], executors: list[str]) -> dict[str, dict | None]:
    """Per executor, the medians of its finished runs and their ratios to inline's medians (None: no run finished),
    and the largest difference of its runs to each executor's first run (``max_abs_diff``; absent: not compared)."""
    medians: dict[str, dict | None] = {}
    for name in executors:
        done = [r for r in runs if r["executor"] == name and r["ok"]]
        if not done:
            medians[name] = None
            continue
        medians[name] = {
            "runs": len(done), "wall_s": statistics.median(r["wall_s"] for r in done),
            "cpu_s": statistics.median(r["cpu_s"] for r in done),
            "cpu_rusage_s": statistics.median(r["cpu_rusage_s"] for r in done),
            "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in done),
            "branch_s": [statistics.median(r["branch_s"][k] for r in done) for k in range(2)],
            "max_abs_diff": {other: max(r["diffs"][other][0] for r in done if other in r["diffs"])
                             for other in executors if any(other in r["diffs"] for r in done)},
        }
    inline = medians.get("inline")
    for s in medians.values():
        if s is not None:
            s["wall_ratio"] = s["wall_s"] / inline["wall_s"] if inline else float("nan")
            s["cpu_ratio"] = s["cpu_s"] / inline["cpu_s"] if inline else float("nan")
    return medians


if __name__ == "__main__":
    main()
