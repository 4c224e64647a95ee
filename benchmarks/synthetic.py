"""Shared helpers for the benchmark scripts: synthetic checkpoints, recipes and measuring.

What is here
    * ``LlamaShape`` describes a Llama-style checkpoint (tied or untied embeddings), with
      size-based presets (``choose_shape``) and named ones (``NAMED_SHAPES``: ``llama-1b``
      is the Llama-3.2-1B layout, ``small`` a ~0.3 GB variant of it for quick runs).
    * ``ensure_checkpoints`` writes a base plus N fine-tunes (bfloat16, sharded safetensors
      with a ``model.safetensors.index.json``; each fine-tune is the base plus its own
      N(0, 1e-3) delta), or reuses complete ones already in the work directory.
    * ``build_recipe`` / ``write_recipe`` make the merge recipe used by every benchmark,
      one per method; the same YAML file works with ``mergekit-yaml``.
    * ``run_measured`` runs a command in a subprocess while ``PeakRssSampler`` samples the
      RSS and CPU time of it and its descendants every 50 ms; an optional timeout ends the run.
    * ``read_files`` streams files with large sequential reads (raw read bandwidth) and
      ``cached_fraction`` tells how much of some files is in the page cache (``mincore``).

This module is imported by ``merge_memory.py``, ``merge_speed.py``, ``sparse_speed.py`` and ``bam_round_speed.py``; it is
not a script.
Sizes use decimal units (1 GB = 10**9 bytes, 1 MB = 10**6 bytes), like ``--shard-size``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import math
import mmap
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch
import yaml
from rich.console import Console
from safetensors.torch import save_file

GB = 10**9
MB = 10**6
DTYPE = torch.bfloat16
DTYPE_BYTES = 2
BASE_STD = 0.02
DELTA_STD = 1e-3
SAMPLE_INTERVAL_S = 0.05
INDEX_NAME = "model.safetensors.index.json"
ALL_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")  # the default --methods
# also measurable on request: a frankenmerge (layer slices of two models) and DELLA
KNOWN_METHODS = ALL_METHODS + ("passthrough", "della")

# Wide enough for the tables when output is piped to a file or log.
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
    tied: bool = False  # tie_word_embeddings: no lm_head.weight tensor, the output reuses the embedding

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
            "tie_word_embeddings": self.tied,
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
        specs.append(("model.norm.weight", (self.hidden,)))
        if not self.tied:
            specs.append(("lm_head.weight", (self.vocab, self.hidden)))
        return specs

    def parameters(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors())

    def total_bytes(self) -> int:
        return self.parameters() * DTYPE_BYTES


# Largest first: the first preset whose one-layer model fits the target is used, so
# the default 1.1 GB gets a TinyLlama-like shape and tiny smoke-test sizes still work.
SHAPE_PRESETS = (
    LlamaShape(hidden=2048, intermediate=5632, vocab=32000, heads=32, kv_heads=4),
    LlamaShape(hidden=1024, intermediate=2816, vocab=32000, heads=16, kv_heads=4),
    LlamaShape(hidden=512, intermediate=1408, vocab=8000, heads=8, kv_heads=4),
    LlamaShape(hidden=256, intermediate=704, vocab=2000, heads=4, kv_heads=2),
)

# Named shapes. llama-1b is the Llama-3.2-1B layout: 1,235,814,400 parameters,
# 2.47 GB in bfloat16, tied embeddings (so no lm_head.weight). small keeps its
# proportions (intermediate = 4 x hidden, tied) at ~0.31 GB for quick runs.
NAMED_SHAPES = {
    "llama-1b": LlamaShape(hidden=2048, intermediate=8192, vocab=128256, heads=32, kv_heads=8, layers=16, tied=True),
    "small": LlamaShape(hidden=1024, intermediate=4096, vocab=32000, heads=16, kv_heads=4, layers=8, tied=True),
}


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
    """'500MB' -> 500_000_000, '2GiB' -> 2147483648: deltawise's own ``--shard-size`` rules."""
    from deltawise.errors import DeltawiseError
    from deltawise.io.writer import parse_size as deltawise_parse_size

    try:
        return deltawise_parse_size(text)
    except DeltawiseError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_methods(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """The comma-separated --methods list, refused through ``parser`` when empty or unknown."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(KNOWN_METHODS))
    if unknown or not methods:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(KNOWN_METHODS)}")
    return methods


def parse_shard_size(parser: argparse.ArgumentParser, text: str) -> int:
    """``--shard-size`` in bytes, refused through ``parser`` when deltawise would refuse it."""
    try:
        return parse_size(text)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))


def add_workdir_options(parser: argparse.ArgumentParser, holds: str, keep_help: str) -> None:
    """``--workdir`` (``holds``: what goes there) and ``--keep``, as ``work_dir`` treats them."""
    parser.add_argument("--workdir", type=Path, default=None,
                        help=f"where {holds} go (default: a fresh temp dir under /tmp, "
                             "deleted at the end unless --keep); complete checkpoints found here are reused")
    parser.add_argument("--keep", action="store_true", help=keep_help)


@contextmanager
def work_dir(given: Path | None, prefix: str, keep: bool) -> Iterator[Path]:
    """``given`` (made if missing), else a fresh folder under /tmp deleted at the end unless ``keep``;
    with ``keep`` the folder is named at the end."""
    temporary = given is None
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp")) if temporary else given
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        yield workdir
    finally:
        if temporary and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif keep:
            console.print(f"kept {workdir}")


def host_info() -> dict:
    """What the JSON results record about the machine they were measured on."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),  # fewer under taskset / a cgroup cpuset
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "ram_bytes": psutil.virtual_memory().total,
        "load_avg": os.getloadavg(),
    }


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


def safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def safetensors_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# --------------------------------------------------------------------------- recipes


def build_recipe(method: str, base: Path, models: list[Path]) -> dict:
    """The benchmark recipe for ``method``: every method but linear names the base model.

    Every model gets an explicit ``weight`` (mergekit requires it for these methods);
    ties, dare_ties and della keep 20% of each delta (``density: 0.2``; della's ``epsilon: 0.1``).
    passthrough is a frankenmerge of the first two models: the first three quarters of the first
    one's layers, then the last three quarters of the second one's (1.5x the layers).
    """
    if method == "passthrough":
        layers = _num_layers(models[0])
        cut = layers * 3 // 4
        slices = [{"sources": [{"model": str(models[0].resolve()), "layer_range": [0, cut]}]},
                  {"sources": [{"model": str(models[1].resolve()), "layer_range": [layers - cut, layers]}]}]
        return {"merge_method": "passthrough", "slices": slices, "dtype": "bfloat16"}
    if method == "linear":
        params: dict = {"weight": 1.0}
    elif method == "task_arithmetic":
        params = {"weight": 0.5}
    elif method in ("ties", "dare_ties"):
        params = {"weight": 1.0, "density": 0.2}
    elif method == "della":
        params = {"weight": 1.0, "density": 0.2, "epsilon": 0.1}
    else:
        raise ValueError(f"unknown method {method!r}")
    recipe: dict = {"merge_method": method}
    if method != "linear":
        recipe["base_model"] = str(base.resolve())
    recipe["models"] = [{"model": str(m.resolve()), "parameters": dict(params)} for m in models]
    recipe["dtype"] = "bfloat16"
    return recipe


def _num_layers(folder: Path) -> int:
    return int(json.loads((folder / "config.json").read_text())["num_hidden_layers"])


def recipe_inputs(method: str, base: Path, models: list[Path]) -> list[Path]:
    """The checkpoint folders a merge of ``build_recipe(method, ...)`` reads."""
    if method == "passthrough":
        return list(models[:2])
    return list(models) + ([base] if method != "linear" else [])


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# --------------------------------------------------------------------------- measuring


class PeakRssSampler(threading.Thread):
    """Samples RSS of a process and all its descendants every ``interval`` seconds, and each one's own CPU time.

    ``cpu_seconds`` sums every process seen at its last sample: unlike RUSAGE_CHILDREN it includes processes whose
    parent never waits for them (Ray's raylet ignores SIGCHLD, so its workers' times reach no one's rusage), and it
    misses a process's last ``interval`` and processes shorter than that. A process is keyed by (pid, start time),
    so a reused pid counts as a new process."""

    def __init__(self, pid: int, interval: float = SAMPLE_INTERVAL_S):
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = 0
        self.peak_anon = 0
        self.cpu: dict[tuple[int, float], float] = {}
        self._stop_event = threading.Event()

    @property
    def cpu_seconds(self) -> float:
        return sum(self.cpu.values())

    def sample(self) -> None:
        try:
            procs = [self.process, *self.process.children(recursive=True)]
        except psutil.Error:
            return
        rss = anon = 0
        for proc in procs:
            try:
                mem = proc.memory_info()
                times = proc.cpu_times()
                self.cpu[(proc.pid, proc.create_time())] = times.user + times.system
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
class RunResult:
    """One measured subprocess run. ``returncode`` is None when the run was ended by the timeout.

    ``cpu_s`` is the user + system CPU time of the run and every process it waited for
    (``RUSAGE_CHILDREN`` before and after); unlike wall time it hardly moves when other
    jobs share the machine.
    """

    cmd: list[str]
    returncode: int | None
    wall_s: float
    peak_rss_bytes: int
    peak_anon_rss_bytes: int
    timed_out: bool
    stderr: str
    cpu_s: float = 0.0
    sampled_cpu_s: float = 0.0  # PeakRssSampler.cpu_seconds: counts what RUSAGE_CHILDREN misses (Ray's workers)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _end_process_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the run's own process group (it was started in a new session), then SIGKILL."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_measured(cmd: list[str], log_stem: Path, timeout_s: float | None = None,
                 env: dict[str, str] | None = None) -> RunResult:
    """Run ``cmd``, logging to ``<log_stem>.stdout.log`` / ``.stderr.log``, and sample its peak RSS.

    The command runs in its own session, so a timeout (or Ctrl-C here) ends it and every
    process it started, and nothing else.
    """
    stdout_path = log_stem.with_name(log_stem.name + ".stdout.log")
    stderr_path = log_stem.with_name(log_stem.name + ".stderr.log")
    console.print(f"$ {' '.join(cmd)}", markup=False, highlight=False, soft_wrap=True)
    timed_out = False
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
        sampler = PeakRssSampler(proc.pid)
        sampler.start()
        try:
            returncode: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            returncode = None
            _end_process_group(proc)
        except BaseException:
            _end_process_group(proc, grace_s=5.0)
            sampler.stop()
            raise
        wall = time.perf_counter() - start
        sampler.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return RunResult(cmd=cmd, returncode=returncode, wall_s=wall, peak_rss_bytes=sampler.peak_rss,
                     peak_anon_rss_bytes=sampler.peak_anon, timed_out=timed_out,
                     stderr=stderr_path.read_text(errors="replace"), cpu_s=cpu, sampled_cpu_s=sampler.cpu_seconds)


def read_files(paths: list[Path], buffer_bytes: int = 64 * 2**20) -> tuple[int, float]:
    """Stream every file once with large sequential reads; returns (bytes read, seconds)."""
    buf = bytearray(buffer_bytes)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    for path in paths:
        with path.open("rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total, time.perf_counter() - start


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (posix_fadvise DONTNEED: no root needed, clean
    pages only, so written outputs are flushed first), making the next read come from disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(paths: list[Path]) -> float | None:
    """Share of the files' pages now in the page cache (Linux ``mincore``), or None if unknown."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    page = mmap.PAGESIZE
    resident = pages = 0
    for path in paths:
        size = path.stat().st_size
        if size == 0:
            continue
        n = (size + page - 1) // page
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                vec = (ctypes.c_ubyte * n)()
                if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                    return None
                resident += sum(b & 1 for b in bytes(vec))
            finally:
                libc.munmap(ctypes.c_void_p(addr), size)
        finally:
            os.close(fd)
        pages += n
    return resident / pages if pages else None
