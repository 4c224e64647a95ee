"""Speed of ``deltawise merge`` on a Llama-3.2-1B-sized model, against raw reads and mergekit.

What it measures
    The script writes (or reuses, in ``--workdir``) a synthetic base checkpoint plus 3
    fine-tunes with the Llama-3.2-1B layout (``--shape llama-1b``: hidden 2048, intermediate
    8192, 16 layers, 32 heads, 8 KV heads, vocab 128256, tied embeddings; 1.24 B parameters,
    2.47 GB per checkpoint in bfloat16, 2 GB shards by default). ``--shape small`` is a
    ~0.31 GB variant for quick runs. For each method (linear, task_arithmetic, ties and
    dare_ties with density 0.2; the recipes of ``merge_memory.py``) it runs

        python -m deltawise merge RECIPE OUT --shard-size 2GB

    in a subprocess and reports wall seconds, peak RSS (children included, sampled every
    50 ms; anonymous RSS in brackets), the bytes the method reads (the safetensors files of
    every model in the recipe, the base included when the recipe names a ``base_model``),
    the effective throughput (bytes read / wall seconds) and that throughput as a share of
    the raw read bandwidth of the same files. ``--methods passthrough,della`` measures two more
    recipes (``synthetic.build_recipe``): a frankenmerge of the first two fine-tunes' layer slices
    and DELLA (density 0.2, epsilon 0.1); "read GB" counts every file of their inputs, of which a
    passthrough reads three quarters.

    Raw read bandwidth: right before the merges the script streams every input file once
    with sequential 64 MiB ``readinto`` calls and times it, twice, reporting the share of the
    input pages that were in the page cache before each pass (``mincore``) and both
    bandwidths. By default the second, page-cache-warm pass is the reference, because the
    merges that follow read warm files too: right before each run (deltawise, floor, mergekit) its inputs are read once more, so
    that what an earlier run evicted (mergekit's RSS reaches 5-11 GB) is back in the page cache
    (``--no-warm`` skips this; each row shows how much of its inputs was cached at its start).
    The reference is therefore "copy from the page cache into a user buffer", not disk
    speed. With ``--cold`` the inputs are evicted from the page cache (posix_fadvise
    DONTNEED, no root needed) before each raw-read pass and before every run, so the
    reference and every merge read from disk: the case of a merge of checkpoints that were
    not just read. Wall time includes starting Python and importing torch (a few seconds).

    ``--device cuda`` runs deltawise's arithmetic on the GPU (reading, writing and hashing stay
    on the host); the floor loop and mergekit stay on the CPU either way.

    mergekit comparison: when ``mergekit-yaml`` is found (``--mergekit PATH``; by default
    next to ``sys.executable``, then on ``PATH``; ``--mergekit none`` skips it) the same
    recipe file is run with

        mergekit-yaml RECIPE OUT --out-shard-size <shard bytes> --lazy-unpickle --no-copy-tokenizer

    on the CPU (mergekit's default; ``CUDA_VISIBLE_DEVICES`` is emptied for both tools),
    measured the same way, and the table gives deltawise/mergekit ratios for wall time and
    peak RSS. mergekit 0.1.5 documents ``--out-shard-size`` as a parameter count but
    compares it with tensor bytes, so the byte count of ``--shard-size`` is passed
    unchanged. A mergekit failure or timeout is recorded and the run goes on. Every run is
    capped by ``--timeout`` (default 1800 s).

    Floor: for linear and task_arithmetic the script also runs ``merge_floor.py`` on the same
    input files (subprocess, measured the same way; ``--no-floor`` skips it): a bare plain-torch
    loop doing only what any such merge must do -- read, convert to float32, accumulate, cast
    back, write, sha256 -- with the engine's threads and chunk size. Its throughput is what
    op-by-op torch code reaches on this machine; the table gives deltawise's time against it.

    Verdicts, one line per target: linear and task_arithmetic reach >= 70% of the raw read
    bandwidth (warm, or cold with ``--cold``); ties is >= 2x faster than mergekit; deltawise's peak RSS < 2 GB
    (2,000 MB) for every method.

How to run it (from the repository root)
    .venv/bin/python benchmarks/merge_speed.py --workdir /tmp/dw-speed --keep --json merge_speed.json
    .venv/bin/python benchmarks/merge_speed.py --shape small --methods linear,ties   # quick run
    .venv/bin/python benchmarks/merge_speed.py --mergekit none                      # deltawise only
    .venv/bin/python benchmarks/merge_speed.py --cold --device cuda                 # from disk, GPU arithmetic

Sizes use decimal units (1 GB = 10**9 bytes, 1 MB = 10**6 bytes), like ``--shard-size``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import (  # noqa: E402  (benchmarks/ is not a package)
    ALL_METHODS,
    GB,
    MB,
    NAMED_SHAPES,
    LlamaShape,
    RunResult,
    add_workdir_options,
    build_recipe,
    cached_fraction,
    evict,
    console,
    ensure_checkpoints,
    host_info,
    parse_methods,
    parse_shard_size,
    read_files,
    recipe_inputs,
    run_measured,
    safetensors_bytes,
    safetensors_files,
    work_dir,
    write_recipe,
)

BANDWIDTH_TARGET = 0.70  # linear / task_arithmetic: share of the raw read bandwidth
BANDWIDTH_METHODS = ("linear", "task_arithmetic")
TIES_SPEEDUP_TARGET = 2.0  # ties: mergekit wall / deltawise wall
RSS_TARGET_BYTES = 2 * GB
STDERR_TAIL = 4000
REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- results


@dataclass
class RawRead:
    files: int
    bytes: int
    cached_before_1: float | None
    pass1_s: float
    cached_before_2: float | None
    pass2_s: float
    cold: bool = False  # both passes started with the files evicted from the page cache

    @property
    def pass1_bps(self) -> float:
        return self.bytes / self.pass1_s

    @property
    def pass2_bps(self) -> float:
        return self.bytes / self.pass2_s

    @property
    def reference_bps(self) -> float:
        """The second pass, read the way the merges read: page-cache warm, or from disk with --cold."""
        return self.pass2_bps

    @property
    def mode(self) -> str:
        return "cold, from disk" if self.cold else "warm"


@dataclass
class ToolRun:
    tool: str
    cmd: list[str]
    returncode: int | None
    timed_out: bool
    wall_s: float
    cpu_s: float
    peak_rss_bytes: int
    peak_anon_rss_bytes: int
    output_bytes: int
    inputs_cached_before: float | None
    load_avg_before: float
    error: str = ""
    # the merge's own time as the tool prints it (deltawise: "(X GB, Y s)"; the floor loop:
    # "(Y s)"), i.e. without Python's start and imports; None when the tool does not print one
    work_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    @property
    def status(self) -> str:
        if self.timed_out:
            return f"timed out after {self.wall_s:.0f} s"
        return "ok" if self.ok else f"exit {self.returncode}"


@dataclass
class MethodResult:
    method: str
    bytes_read: int
    input_files: int
    deltawise: ToolRun
    mergekit: ToolRun | None = None
    floor: ToolRun | None = None  # merge_floor.py on the same inputs (linear / task_arithmetic)
    raw_reference_bps: float = 0.0

    @property
    def throughput_bps(self) -> float | None:
        return self.bytes_read / self.deltawise.wall_s if self.deltawise.ok else None

    @property
    def raw_fraction(self) -> float | None:
        tp = self.throughput_bps
        return tp / self.raw_reference_bps if tp is not None and self.raw_reference_bps else None

    @property
    def work_raw_fraction(self) -> float | None:
        """Like raw_fraction, over the merge's own time (Python start and imports left out)."""
        dw = self.deltawise
        if not dw.ok or not dw.work_s or not self.raw_reference_bps:
            return None
        return self.bytes_read / dw.work_s / self.raw_reference_bps

    @property
    def floor_ratio(self) -> float | None:
        """floor wall / deltawise wall (1: deltawise is as fast as the bare torch loop)."""
        if self.floor is None or not (self.deltawise.ok and self.floor.ok):
            return None
        return self.floor.wall_s / self.deltawise.wall_s

    @property
    def time_ratio(self) -> float | None:
        """deltawise wall / mergekit wall (< 1: deltawise is faster)."""
        if self.mergekit is None or not (self.deltawise.ok and self.mergekit.ok):
            return None
        return self.deltawise.wall_s / self.mergekit.wall_s

    @property
    def rss_ratio(self) -> float | None:
        if self.mergekit is None or not (self.deltawise.ok and self.mergekit.ok):
            return None
        return self.deltawise.peak_rss_bytes / self.mergekit.peak_rss_bytes

    def to_json(self) -> dict:
        out = asdict(self)
        out["deltawise"]["ok"] = self.deltawise.ok
        if self.mergekit is not None:
            out["mergekit"]["ok"] = self.mergekit.ok
        if self.floor is not None:
            out["floor"]["ok"] = self.floor.ok
        out.update(throughput_bps=self.throughput_bps, raw_fraction=self.raw_fraction,
                   deltawise_share_of_floor_speed=self.floor_ratio,
                   time_ratio_deltawise_over_mergekit=self.time_ratio,
                   rss_ratio_deltawise_over_mergekit=self.rss_ratio)
        return out


# --------------------------------------------------------------------------- running


def find_mergekit(option: str | None) -> Path | None:
    """``--mergekit PATH``; by default next to sys.executable, then on PATH; 'none' skips mergekit."""
    if option is not None:
        if option.lower() == "none":
            return None
        found = shutil.which(option)
        if found is None:
            raise SystemExit(f"--mergekit {option}: no such executable")
        return Path(found)
    beside = Path(sys.executable).parent / "mergekit-yaml"  # not resolved: a venv's bin/ holds the script
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("mergekit-yaml")
    return Path(found) if found else None


def tool_env(gpu: bool = False) -> dict[str, str]:
    """Every tool runs offline (every input is a local folder), and on the CPU unless ``gpu``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def clear_output(out_dir: Path) -> None:
    for path in (out_dir, out_dir.parent / f".{out_dir.name}.deltawise-partial"):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():  # merge_floor.py's output is one file
            path.unlink()


def run_tool(tool: str, cmd: list[str], out_dir: Path, inputs: list[Path], timeout_s: float,
             keep_output: bool, warm: bool = True, gpu: bool = False, cold: bool = False) -> ToolRun:
    clear_output(out_dir)
    if cold:  # every run reads its inputs from disk, like the cold raw-read reference
        evict(inputs)
    elif warm:  # every run starts page-cache-warm like the raw-read reference, whatever the last run evicted
        read_files(inputs)
    cached = cached_fraction(inputs)
    load = os.getloadavg()[0]
    run: RunResult = run_measured(cmd, out_dir.parent / out_dir.name, timeout_s=timeout_s, env=tool_env(gpu))
    stdout_log = out_dir.parent / f"{out_dir.name}.stdout.log"
    reported = re.findall(r"([0-9.]+) s\)\s*$", stdout_log.read_text(errors="replace"), re.M) if stdout_log.exists() else []
    output_bytes = safetensors_bytes(out_dir) if out_dir.is_dir() else 0
    if not keep_output:
        clear_output(out_dir)
    result = ToolRun(
        tool=tool, cmd=cmd, returncode=run.returncode, timed_out=run.timed_out, wall_s=run.wall_s, cpu_s=run.cpu_s,
        peak_rss_bytes=run.peak_rss_bytes, peak_anon_rss_bytes=run.peak_anon_rss_bytes,
        output_bytes=output_bytes, inputs_cached_before=cached, load_avg_before=load,
        error="" if run.ok else run.stderr[-STDERR_TAIL:], work_s=float(reported[-1]) if run.ok and reported else None,
    )
    line = (f"  {tool}: {result.status}, {result.wall_s:.1f} s wall, {result.cpu_s:.1f} s CPU, "
            f"peak RSS {result.peak_rss_bytes / MB:,.0f} MB "
            f"(anon {result.peak_anon_rss_bytes / MB:,.0f} MB), output {output_bytes / GB:.2f} GB")
    console.print(line, markup=False, highlight=False)
    return result


def measure_raw_read(files: list[Path], cold: bool = False) -> RawRead:
    if cold:
        evict(files)
    cached1 = cached_fraction(files)
    n1, t1 = read_files(files)
    if cold:
        evict(files)
    cached2 = cached_fraction(files)
    n2, t2 = read_files(files)
    assert n1 == n2, "input files changed size between the two raw-read passes"
    raw = RawRead(files=len(files), bytes=n1, cached_before_1=cached1, pass1_s=t1, cached_before_2=cached2, pass2_s=t2,
                  cold=cold)
    console.print(raw_read_line(raw))
    return raw


def measure_method(method: str, base: Path, models: list[Path], workdir: Path, args: argparse.Namespace,
                   mergekit: Path | None, raw: RawRead) -> MethodResult:
    recipe = workdir / f"recipe_{method}.yaml"
    files = [f for folder in recipe_inputs(method, base, models) for f in safetensors_files(folder)]
    console.print(f"[bold]{method}[/]: reads {len(files)} files, {sum(f.stat().st_size for f in files) / GB:.2f} GB")
    dw_out = workdir / f"out_{method}"
    dw_cmd = [sys.executable, "-m", "deltawise", "merge", str(recipe), str(dw_out), "--shard-size", args.shard_size,
              "--device", args.device, "--threads", str(args.threads)]
    result = MethodResult(
        method=method, bytes_read=sum(f.stat().st_size for f in files), input_files=len(files),
        deltawise=run_tool("deltawise", dw_cmd, dw_out, files, args.timeout, args.keep_outputs, args.warm,
                           gpu=args.device != "cpu", cold=args.cold),
        raw_reference_bps=raw.reference_bps,
    )
    if args.floor and method in BANDWIDTH_METHODS:
        floor_out = workdir / f"out_{method}_floor.bin"
        floor_cmd = [sys.executable, str(Path(__file__).resolve().parent / "merge_floor.py"), str(floor_out),
                     *map(str, recipe_inputs(method, base, models))]
        result.floor = run_tool("floor", floor_cmd, floor_out, files, args.timeout, False, args.warm, cold=args.cold)
    if mergekit is not None:
        mk_out = workdir / f"out_{method}_mergekit"
        mk_cmd = [str(mergekit), str(recipe), str(mk_out), "--out-shard-size", str(args.shard_bytes),
                  "--lazy-unpickle", "--no-copy-tokenizer"]
        result.mergekit = run_tool("mergekit", mk_cmd, mk_out, files, args.timeout, args.keep_outputs, args.warm,
                                   cold=args.cold)
    return result


# --------------------------------------------------------------------------- reporting


def pct(x: float | None) -> str:
    if x is None:
        return "?"
    return f"{100 * x:.1f}%" if x < 0.1 else f"{100 * x:.0f}%"


def raw_read_line(raw: RawRead) -> str:
    return (f"raw read of all {raw.files} input files ({raw.bytes / GB:.2f} GB, 64 MiB readinto): "
            f"pass 1 {raw.pass1_s:.1f} s = {raw.pass1_bps / GB:.2f} GB/s ({pct(raw.cached_before_1)} of pages "
            f"in page cache before), pass 2 {raw.pass2_s:.1f} s = {raw.pass2_bps / GB:.2f} GB/s "
            f"({pct(raw.cached_before_2)} cached before); reference = pass 2 ({raw.mode})")


def wall_cell(run: ToolRun) -> str:
    return f"{run.wall_s:.1f} ({run.cpu_s:.0f})"


def rss_cell(run: ToolRun) -> str:
    return f"{run.peak_rss_bytes / MB:,.0f} ({run.peak_anon_rss_bytes / MB:,.0f})"


def results_table(results: list[MethodResult], raw: RawRead, shape_name: str) -> Table:
    table = Table(title=f"deltawise merge speed: {shape_name}, reference raw read {raw.reference_bps / GB:.2f} GB/s "
                        f"({raw.mode} pass 2; pass 1 {raw.pass1_bps / GB:.2f} GB/s)")
    headers = ("method", "read GB", "cached", "dw wall s (CPU)", "dw MB/s", "% of raw", "dw merge s (% of raw)",
               "dw RSS MB (anon)",
               "floor wall s (CPU)", "floor MB/s", "dw % of floor", "mk wall s (CPU)", "mk RSS MB (anon)", "time dw/mk",
               "RSS dw/mk")
    for header in headers:
        table.add_column(header, justify="left" if header == "method" else "right")
    for r in results:
        dw, mk = r.deltawise, r.mergekit
        row = [r.method, f"{r.bytes_read / GB:.2f}", pct(dw.inputs_cached_before)]
        if dw.ok:
            merge_only = "-" if dw.work_s is None else f"{dw.work_s:.1f} ({pct(r.work_raw_fraction)})"
            row += [wall_cell(dw), f"{r.throughput_bps / MB:,.0f}", pct(r.raw_fraction), merge_only, rss_cell(dw)]
        else:
            row += [f"[red]{dw.status}", "-", "-", "-", rss_cell(dw)]
        fl = r.floor
        if fl is None:
            row += ["-", "-", "-"]
        elif fl.ok:
            row += [wall_cell(fl) if fl.work_s is None else f"{wall_cell(fl)} [{fl.work_s:.1f}]",
                    f"{r.bytes_read / fl.wall_s / MB:,.0f}", pct(r.floor_ratio)]
        else:
            row += [f"[red]{fl.status}", "-", "-"]
        if mk is None:
            row += ["-", "-"]
        elif mk.ok:
            row += [wall_cell(mk), rss_cell(mk)]
        else:
            row += [f"[red]{mk.status}", rss_cell(mk)]
        row += ["-" if r.time_ratio is None else f"{r.time_ratio:.2f}",
                "-" if r.rss_ratio is None else f"{r.rss_ratio:.2f}"]
        table.add_row(*row)
    return table


def verdicts(results: list[MethodResult], mergekit: Path | None) -> list[str]:
    by = {r.method: r for r in results}
    lines = []

    # 1. linear / task_arithmetic >= 70% of the raw read bandwidth (warm, or cold with --cold)
    target = f"linear/task_arithmetic >= {100 * BANDWIDTH_TARGET:.0f}% of raw read bandwidth"
    measured = [by[m] for m in BANDWIDTH_METHODS if m in by]
    if not measured:
        lines.append(f"{target}: NOT MEASURED (methods not selected)")
    elif any(r.raw_fraction is None for r in measured):
        lines.append(f"{target}: UNKNOWN (failed: {', '.join(r.method for r in measured if r.raw_fraction is None)})")
    else:
        ok = all(r.raw_fraction >= BANDWIDTH_TARGET for r in measured)
        detail = ", ".join(f"{r.method} {pct(r.raw_fraction)} ({r.throughput_bps / MB:,.0f} MB/s)" for r in measured)
        lines.append(f"{target}: {'PASS' if ok else 'FAIL'} -- {detail} of {measured[0].raw_reference_bps / MB:,.0f} MB/s "
                     "(wall time of the whole command)")
        if all(r.work_raw_fraction is not None for r in measured):
            ok = all(r.work_raw_fraction >= BANDWIDTH_TARGET for r in measured)
            lines.append(f"  the merge alone (the command's own reported time, without Python's start and imports): "
                         f"{'PASS' if ok else 'FAIL'} -- "
                         + ", ".join(f"{r.method} {pct(r.work_raw_fraction)} ({r.deltawise.work_s:.1f} s of "
                                     f"{r.deltawise.wall_s:.1f} s wall)" for r in measured))

    floors = [r for r in measured if r.floor_ratio is not None]
    if floors:
        lines.append("  (not a target) against the bare torch loop merge_floor.py on the same files: "
                     + ", ".join(f"{r.method} {pct(r.floor_ratio)} of its speed (floor {r.bytes_read / r.floor.wall_s / MB:,.0f}"
                                 f" MB/s = {pct(r.bytes_read / r.floor.wall_s / r.raw_reference_bps)} of raw)" for r in floors))

    # 2. ties >= 2x faster than mergekit
    target = f"ties >= {TIES_SPEEDUP_TARGET:.0f}x faster than mergekit"
    r = by.get("ties")
    if r is None:
        lines.append(f"{target}: NOT MEASURED (ties not selected)")
    elif mergekit is None or r.mergekit is None:
        lines.append(f"{target}: NOT MEASURED (no mergekit-yaml)")
    elif not r.deltawise.ok:
        lines.append(f"{target}: UNKNOWN (deltawise {r.deltawise.status})")
    elif r.mergekit.ok:
        speedup = r.mergekit.wall_s / r.deltawise.wall_s
        verdict = "PASS" if speedup >= TIES_SPEEDUP_TARGET else "FAIL"
        lines.append(f"{target}: {verdict} -- {speedup:.2f}x (deltawise {r.deltawise.wall_s:.1f} s, "
                     f"mergekit {r.mergekit.wall_s:.1f} s)")
    elif r.mergekit.timed_out and r.mergekit.wall_s / r.deltawise.wall_s >= TIES_SPEEDUP_TARGET:
        lines.append(f"{target}: PASS -- at least {r.mergekit.wall_s / r.deltawise.wall_s:.2f}x (mergekit "
                     f"{r.mergekit.status}, deltawise {r.deltawise.wall_s:.1f} s)")
    else:
        lines.append(f"{target}: UNKNOWN (mergekit {r.mergekit.status})")

    # 3. peak RSS < 2 GB for every method
    target = f"deltawise peak RSS < {RSS_TARGET_BYTES / MB:,.0f} MB for every method"
    failed = [r.method for r in results if not r.deltawise.ok]
    over = [f"{r.method} ({r.deltawise.peak_rss_bytes / MB:,.0f} MB)" for r in results
            if r.deltawise.ok and r.deltawise.peak_rss_bytes >= RSS_TARGET_BYTES]
    if over:
        lines.append(f"{target}: FAIL -- over for {', '.join(over)}")
    elif failed:
        lines.append(f"{target}: UNKNOWN (failed: {', '.join(failed)})")
    else:
        worst = max(results, key=lambda r: r.deltawise.peak_rss_bytes)
        lines.append(f"{target}: PASS -- worst {worst.method}, {worst.deltawise.peak_rss_bytes / MB:,.0f} MB")
    return lines


def source_state() -> dict:
    """Which deltawise the merges ran: commit plus uncommitted changes under src/."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "?"
    return {"commit": git("rev-parse", "HEAD"), "uncommitted_src": git("status", "--short", "--", "src").splitlines()}


def mergekit_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("mergekit")
    except Exception:  # noqa: BLE001 - any failure just means "unknown"
        return None


def write_json(path: Path, results: list[MethodResult], raw: RawRead, shape: LlamaShape, args: argparse.Namespace,
               mergekit: Path | None, verdict_lines: list[str], source: dict) -> None:
    payload = {
        "benchmark": "merge_speed",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model_shape": {**asdict(shape), "parameters": shape.parameters(), "bytes": shape.total_bytes()},
        "host": host_info(),
        "deltawise_source": source,
        "mergekit": {"path": str(mergekit) if mergekit else None, "version": mergekit_version() if mergekit else None},
        "raw_read": {**asdict(raw), "pass1_bps": raw.pass1_bps, "pass2_bps": raw.pass2_bps,
                     "reference_bps": raw.reference_bps, "reference": f"pass 2 ({raw.mode})"},
        "results": [r.to_json() for r in results],
        "verdicts": verdict_lines,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workdir_options(parser, "checkpoints, recipes, logs and outputs",
                        "keep a temporary work dir (checkpoints, recipes, logs)")
    parser.add_argument("--keep-outputs", action="store_true",
                        help="keep every merge output (default: each is deleted after its run)")
    parser.add_argument("--shape", choices=sorted(NAMED_SHAPES), default="llama-1b",
                        help="checkpoint layout: llama-1b (Llama-3.2-1B, 2.47 GB) or small (0.31 GB)")
    parser.add_argument("--models", type=int, default=3, help="number of fine-tuned checkpoints to merge (default 3)")
    parser.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated merge methods")
    parser.add_argument("--shard-size", default="2GB", help="--shard-size of the merge (mergekit gets the same "
                                                            "byte count), also used for the checkpoints (default 2GB)")
    parser.add_argument("--mergekit", default=None, metavar="PATH",
                        help="mergekit-yaml to compare with (default: next to this Python, then PATH; 'none' skips)")
    parser.add_argument("--no-warm", dest="warm", action="store_false",
                        help="do not read each run's inputs once right before it (by default every run starts warm)")
    parser.add_argument("--cold", action="store_true",
                        help="evict the inputs from the page cache (posix_fadvise) before the raw read and before every "
                             "run, so that all of them read from disk, and take that cold read as the reference")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="skip the bare torch loop (merge_floor.py) run beside linear and task_arithmetic")
    parser.add_argument("--device", default="cpu", help="--device of the deltawise merges: cpu (default) or cuda; "
                        "the floor loop and mergekit stay on the CPU")
    parser.add_argument("--threads", type=int, default=2, help="--threads of the deltawise merges (default 2)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before a run is ended (default 1800)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    args.methods = parse_methods(parser, args.methods)
    if args.models < 1 or args.timeout <= 0 or args.threads < 1:
        parser.error("--models and --threads must be >= 1 and --timeout > 0")
    args.shard_bytes = parse_shard_size(parser, args.shard_size)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mergekit = find_mergekit(args.mergekit)
    with work_dir(args.workdir, "deltawise-speed-bench-", args.keep) as workdir:
        shape = NAMED_SHAPES[args.shape]
        console.print(f"work dir {workdir}; shape {args.shape} = {shape} = {shape.parameters() / 1e9:.3f} B parameters, "
                      f"{shape.total_bytes() / GB:.2f} GB per checkpoint")
        console.print(f"mergekit: {mergekit or 'not found / skipped'}")
        source = source_state()
        load_start = os.getloadavg()[0]
        console.print(f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), load average {load_start:.1f}; "
                      f"deltawise merges on {args.device} with {args.threads} thread(s)")
        if source["uncommitted_src"]:
            console.print(f"[yellow]note: src/ has uncommitted changes ({len(source['uncommitted_src'])} files); "
                          f"the merges run the working tree as it is when each starts")
        base, models = ensure_checkpoints(workdir, shape, args.models, args.shard_bytes)
        for method in args.methods:
            write_recipe(workdir / f"recipe_{method}.yaml", build_recipe(method, base, models))
        folders = sorted({f for m in args.methods for f in recipe_inputs(m, base, models)})
        raw = measure_raw_read([f for folder in folders for f in safetensors_files(folder)], cold=args.cold)
        results = [measure_method(m, base, models, workdir, args, mergekit, raw) for m in args.methods]

        for r in results:
            for run in (r.deltawise, r.mergekit):
                if run is not None and not run.ok:
                    console.print(f"[red]{r.method}: {run.tool} {run.status}; end of its stderr:")
                    console.print(run.error[-2000:], markup=False, highlight=False)
        verdict_lines = verdicts(results, mergekit)
        console.print(raw_read_line(raw))
        console.print(results_table(results, raw, args.shape))
        console.print("dw = deltawise, mk = mergekit, floor = merge_floor.py (bare torch read/convert/add/cast/write/sha256 "
                      "loop; [its own time]); dw % of floor = floor wall / dw wall; dw merge s = the time deltawise reports "
                      "for the merge, without Python's start and imports; cached = share of the inputs in the page cache "
                      "when the deltawise "
                      "run started; wall s (CPU s: user + sys of the run); MB/s = bytes read / wall s; % of raw = that / "
                      f"{raw.mode} raw read; RSS ratio uses peak RSS (file-backed pages included), anon RSS in brackets; "
                      f"load average {os.getloadavg()[0]:.1f} now, {load_start:.1f} at the start",
                      markup=False, highlight=False)
        for line in verdict_lines:
            console.print(line, markup=False, highlight=False)
        if args.json:
            write_json(args.json, results, raw, shape, args, mergekit, verdict_lines, source)
            console.print(f"wrote {args.json}")
        return 0 if all(r.deltawise.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
