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
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch
import yaml
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

GB = 10**9
MB = 10**6
DTYPE = torch.bfloat16
DTYPE_BYTES = 2
BASE_STD = 0.02
DELTA_STD = 1e-3
SAMPLE_INTERVAL_S = 0.05
INDEX_NAME = "model.safetensors.index.json"
ALL_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}

# Wide enough for the table when output is piped to a file or log.
console = Console(width=None if sys.stdout.isatty() else 160)


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    layers: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }

    def layer_tensors(self, i: int) -> list[tuple[str, tuple[int, ...]]]:
        h, inter, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        p = f"model.layers.{i}"
        return [
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.mlp.gate_proj.weight", (inter, h)),
            (f"{p}.mlp.up_proj.weight", (inter, h)),
            (f"{p}.mlp.down_proj.weight", (h, inter)),
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
        ]

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        specs = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(self.layers):
            specs += self.layer_tensors(i)
        specs += [("model.norm.weight", (self.hidden,)), ("lm_head.weight", (self.vocab, self.hidden))]
        return specs

    def total_bytes(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors()) * DTYPE_BYTES


# Largest first: the first preset whose one-layer model fits the target is used, so
# the default 1.1 GB gets a TinyLlama-like shape and tiny smoke-test sizes still work.
SHAPE_PRESETS = (
    LlamaShape(hidden=2048, intermediate=5632, vocab=32000, heads=32, kv_heads=4),
    LlamaShape(hidden=1024, intermediate=2816, vocab=32000, heads=16, kv_heads=4),
    LlamaShape(hidden=512, intermediate=1408, vocab=8000, heads=8, kv_heads=4),
    LlamaShape(hidden=256, intermediate=704, vocab=2000, heads=4, kv_heads=2),
)


def choose_shape(target_bytes: int) -> LlamaShape:
    """Smallest layer count (of the biggest preset that fits) whose model is >= target."""
    for preset in SHAPE_PRESETS:
        if preset.total_bytes() <= target_bytes:
            break
    per_layer = sum(math.prod(s) for _, s in preset.layer_tensors(0)) * DTYPE_BYTES
    fixed = preset.total_bytes() - per_layer
    layers = max(1, math.ceil((target_bytes - fixed) / per_layer))
    return LlamaShape(**{**asdict(preset), "layers": layers})


# --------------------------------------------------------------------------- checkpoints


def parse_size(text: str) -> int:
    """'500MB' -> 500_000_000, '2GiB' -> 2147483648 (same rules as ``--shard-size``)."""
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGIB")
    unit = s[len(num):]
    if unit not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r}; write e.g. 500MB or 2GiB")
    try:
        value = float(num)
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r}; write e.g. 500MB or 2GiB") from None
    return int(value * SIZE_UNITS[unit])


def plan_shards(specs: list[tuple[str, tuple[int, ...]]], max_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split tensors, in order, into shards of at most ``max_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in specs:
        size = math.prod(shape) * DTYPE_BYTES
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += size
    return shards


def make_tensor(name: str, shape: tuple[int, ...], tensor_idx: int, model_idx: int) -> torch.Tensor:
    """Deterministic base tensor; model_idx > 0 adds that fine-tune's own N(0, 1e-3) delta."""
    gen = torch.Generator().manual_seed(tensor_idx)
    if name.endswith("norm.weight"):
        values = torch.ones(shape)
    else:
        values = torch.randn(shape, generator=gen).mul_(BASE_STD)
    if model_idx > 0:
        gen.manual_seed(1_000_003 * model_idx + tensor_idx)
        values.add_(torch.randn(shape, generator=gen), alpha=DELTA_STD)
    return values.to(DTYPE)


def checkpoint_complete(folder: Path, shape: LlamaShape) -> bool:
    """The index is written last, so a readable index with all its shards means a finished write."""
    try:
        index = json.loads((folder / INDEX_NAME).read_text())
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if config != shape.config() or index.get("metadata", {}).get("total_size") != shape.total_bytes():
        return False
    return all((folder / f).is_file() for f in set(index.get("weight_map", {}).values()))


def write_checkpoint(folder: Path, shape: LlamaShape, model_idx: int, shard_bytes: int) -> None:
    """Write one checkpoint shard by shard; at most one shard of tensors is in memory."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
    specs = shape.tensors()
    order = {name: i for i, (name, _) in enumerate(specs)}
    shards = plan_shards(specs, shard_bytes)
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards, start=1):
        filename = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: make_tensor(name, s, order[name], model_idx) for name, s in shard}
        save_file(tensors, str(folder / filename), metadata={"format": "pt"})
        weight_map.update({name: filename for name in tensors})
        del tensors
    index = {"metadata": {"total_size": shape.total_bytes()}, "weight_map": weight_map}
    tmp = folder / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    tmp.replace(folder / INDEX_NAME)


def ensure_checkpoints(workdir: Path, shape: LlamaShape, n_models: int, shard_bytes: int) -> tuple[Path, list[Path]]:
    """Base plus ``n_models`` fine-tunes under ``workdir``; complete folders are reused."""
    folders = [workdir / "base"] + [workdir / f"ft{i}" for i in range(1, n_models + 1)]
    for model_idx, folder in enumerate(folders):
        if checkpoint_complete(folder, shape):
            console.print(f"reusing {folder}")
            continue
        start = time.perf_counter()
        write_checkpoint(folder, shape, model_idx, shard_bytes)
        console.print(f"wrote {folder} ({safetensors_bytes(folder) / GB:.2f} GB, {time.perf_counter() - start:.1f} s)")
    return folders[0], folders[1:]


def safetensors_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# --------------------------------------------------------------------------- recipes


def build_recipe(method: str, base: Path, models: list[Path]) -> dict:
    if method == "linear":
        params: dict = {"weight": 1.0}
    elif method == "task_arithmetic":
        params = {"weight": 0.5}
    elif method in ("ties", "dare_ties"):
        params = {"weight": 1.0, "density": 0.2}
    else:
        raise ValueError(f"unknown method {method!r}")
    recipe: dict = {"merge_method": method}
    if method != "linear":
        recipe["base_model"] = str(base.resolve())
    recipe["models"] = [{"model": str(m.resolve()), "parameters": dict(params)} for m in models]
    recipe["dtype"] = "bfloat16"
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# --------------------------------------------------------------------------- measuring


class PeakRssSampler(threading.Thread):
    """Samples RSS of a process and all its descendants every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = SAMPLE_INTERVAL_S):
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = 0
        self.peak_anon = 0
        self._stop_event = threading.Event()

    def sample(self) -> None:
        try:
            procs = [self.process, *self.process.children(recursive=True)]
        except psutil.Error:
            return
        rss = anon = 0
        for proc in procs:
            try:
                mem = proc.memory_info()
            except psutil.Error:
                continue
            rss += mem.rss
            anon += mem.rss - getattr(mem, "shared", 0)  # Linux: shared = file-backed + shmem
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_anon = max(self.peak_anon, anon)

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


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
    stdout_path, stderr_path = log_dir / f"{out_dir.name}.stdout.log", log_dir / f"{out_dir.name}.stderr.log"
    console.print(f"$ {' '.join(cmd)}", markup=False, highlight=False, soft_wrap=True)
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        sampler = PeakRssSampler(proc.pid)
        sampler.start()
        returncode = proc.wait()
        wall = time.perf_counter() - start
        sampler.stop()
    return returncode, wall, sampler.peak_rss, sampler.peak_anon, stderr_path.read_text(errors="replace")


def measure_method(method: str, base: Path, models: list[Path], workdir: Path, shard_size: str, keep: bool) -> MergeResult:
    recipe = write_recipe(workdir / f"recipe_{method}.yaml", build_recipe(method, base, models))
    inputs = models + ([base] if method != "linear" else [])
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
        "host": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "ram_bytes": psutil.virtual_memory().total,
        },
        "results": [{**asdict(r), "ok": r.ok, "rss_over_model": r.rss_over_model} for r in results],
        "verdict": verdict(results),
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where checkpoints, recipes and outputs go (default: a fresh temp dir under /tmp, "
                             "deleted at the end unless --keep); complete checkpoints found here are reused")
    parser.add_argument("--keep", action="store_true", help="keep the work dir and every merge output")
    parser.add_argument("--size-gb", type=float, default=1.1, help="size of each checkpoint in GB (default 1.1)")
    parser.add_argument("--models", type=int, default=3, help="number of fine-tuned checkpoints to merge (default 3)")
    parser.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated merge methods")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--shard-size", default="500MB", help="--shard-size passed to the merge, also used for the "
                                                              "synthetic checkpoints (default 500MB)")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(ALL_METHODS))
    if unknown or not args.methods:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(ALL_METHODS)}")
    if args.models < 1 or args.size_gb <= 0:
        parser.error("--models must be >= 1 and --size-gb > 0")
    try:
        args.shard_bytes = parse_size(args.shard_size)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    temporary = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="deltawise-merge-bench-", dir="/tmp")) if temporary else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    try:
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
    finally:
        if temporary and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif args.keep:
            console.print(f"kept {workdir}")


if __name__ == "__main__":
    sys.exit(main())
