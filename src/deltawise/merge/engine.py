"""The streaming merge engine: reads inputs tensor by tensor, runs the method, writes shards.

Peak memory is a few row chunks (at most CHUNK_ELEMENTS entries) per input times the number of
tensors in flight, whatever the model or tensor size: inputs are read with pread (not kept
mapped), per-tensor statistics are gathered chunk by chunk before merging, and outputs are
streamed to their byte offsets. Work runs on ``threads`` worker threads (one tensor each), on
a GPU with device="cuda". The hot loop allocates nothing large: chunks are read into, converted
in and computed into per-thread buffers that are reused (``ScratchBuffers``, ``TensorJob.scratch``).

The output is assembled in a hidden staging folder beside OUT and moved into place only when
complete, so OUT never holds a partial model; inputs are opened read-only and never written.
An interrupted merge keeps its completed shards for ``resume`` (see ``staging.py``); a merge
that fails on its inputs or recipe discards everything.
"""

from __future__ import annotations

import errno
import json
import threading
import time
from collections import deque
from contextlib import ExitStack, contextmanager, nullcontext
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from deltawise.errors import DeltawiseError, InputError, OutputError, RecipeError
from deltawise.io.layout import CHUNK_ELEMENTS, SHARD_BYTES
from deltawise.io.output import MANIFEST, check_free_space, check_output_folder, output_lock, swap_into_place, unwritable
from deltawise.io.writer import StreamingShardWriter, plan_shards, row_ranges, write_json_atomic, write_text_atomic
import deltawise.merge.fused as fused
import deltawise.merge.thresholds as thresholds
from deltawise.merge.base import RNG_BLOCK_ELEMENTS, StatsPass, TensorJob
from deltawise.merge.loader import ChunkLoader, all_finite
from deltawise.merge.card import copy_model_files, model_card, output_config
from deltawise.merge.plan import MergePlan, TensorPlan
from deltawise.merge.staging import Staging, open_staging, plan_key, plan_parts


Progress = Callable[[str, int, int], None]  # (stage, done, total) in bytes


@dataclass
class MergeOptions:
    device: str = "cpu"
    threads: int = 2
    shard_size: int = SHARD_BYTES
    overwrite: bool = False
    resume: bool = False  # continue an interrupted merge of the same plan
    restart: bool = False  # discard an interrupted merge and start over
    fsync: bool = False  # flush each shard to disk before it counts as complete (see StreamingShardWriter)
    progress: Optional[Progress] = None
    extra_files: dict[str, str] = field(default_factory=dict)  # name -> text, written into OUT with it (logs)


@dataclass
class MergeResult:
    out: Path
    files: list[str]
    seconds: float
    bytes_written: int
    warnings: list[str] = field(default_factory=list)


def check_output(plan: MergePlan, out: Path, overwrite: bool, need_bytes: Optional[int] = None) -> None:
    """``need_bytes``: free space required (default: the whole output; a resumed merge checks what is left later)."""
    inputs = [(r.label, folder) for r in plan.readers for folder in r.input_folders()]
    inputs += [(r.label, r.path) for r in plan.side_readers]  # a statistics file, not its folder
    check_output_folder(out, inputs, overwrite, plan.output_bytes() if need_bytes is None else need_bytes)


def _row_ranges(t: TensorPlan) -> list[tuple[int, int]]:
    return row_ranges(t.out.shape, CHUNK_ELEMENTS)


COPY_CHUNKS = 4  # a copied tensor is read in chunks this many times larger (see _copy_ranges)


def _copy_ranges(t: TensorPlan) -> list[tuple[int, int]]:
    """Row chunks of a tensor copied as stored (or only cast): one operand and no float32 conversion,
    so 4x the entries of a merge's chunk (8 MB of bfloat16, 16 MB of float32; the buffer is still kept,
    ``ScratchBuffers.MAX_KEPT``) cost about the memory of a two-model merge's chunk, and the fewer reads,
    writes and hash updates took about a tenth off the CPU time of a 1B-shaped passthrough."""
    return row_ranges(t.out.shape, COPY_CHUNKS * CHUNK_ELEMENTS)


def _bounded_map(pool: ThreadPoolExecutor, fn: Callable, items: Iterator, limit: int) -> Iterator[Any]:
    """Run fn over items with at most ``limit`` in flight, yielding results as they finish."""
    pending: set[Future] = set()
    try:
        for item in items:
            pending.add(pool.submit(fn, item))
            if len(pending) >= limit:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    yield f.result()
        for f in pending:
            yield f.result()
    finally:
        for f in pending:
            f.cancel()


def _shard_ordered_map(pool: ThreadPoolExecutor, fn: Callable[[TensorPlan], Any], tensors: list[TensorPlan],
                       shard_of: dict[str, str], limit: int) -> Iterator[Any]:
    """Run fn over tensors, at most ``limit`` at a time, each worker in a shard no other worker writes
    while there is one: results are yielded as they finish.

    The writer hashes a shard as it is written (``StreamingShardWriter``): from memory when a chunk
    extends the shard's written prefix, else by reading the bytes back from the page cache once the
    prefix reaches them. Two workers in one shard make the one ahead read back everything it writes
    (a passthrough of the 1B shape re-read 2.3 of its 3.4 GB that way). So a free worker takes the
    next tensor, in order, of the first shard nobody writes; only when every shard with work left is
    taken does it join the one with the most bytes left (finishing sooner, at the price of a read-back)."""
    queues: dict[str, deque[TensorPlan]] = {}
    for t in tensors:
        queues.setdefault(shard_of[t.name], deque()).append(t)
    left = {s: sum(t.out.nbytes for t in q) for s, q in queues.items()}
    writers: dict[str, int] = {s: 0 for s in queues}
    running: dict[Future, str] = {}
    try:
        while queues or running:
            while queues and len(running) < limit:
                shard = next((s for s in queues if not writers[s]), None) or max(queues, key=left.__getitem__)
                t = queues[shard].popleft()
                if not queues[shard]:
                    del queues[shard]
                left[shard] -= t.out.nbytes
                writers[shard] += 1
                running[pool.submit(fn, t)] = shard
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in done:
                writers[running.pop(f)] -= 1
                yield f.result()
    finally:
        for f in running:
            f.cancel()


class _TensorRun:
    """One tensor's chunks: runs the method's per-tensor passes over them, then yields merged chunks
    in the output dtype."""

    def __init__(self, plan: MergePlan, loader: ChunkLoader, t: TensorPlan, global_stats: dict[str, Any]):
        self.plan, self.loader, self.t = plan, loader, t
        self.ranges = _row_ranges(t)
        self.stats = dict(global_stats)
        # a tensor that fits in one chunk is read once and reused by every pass and the merge
        self._single = None
        self._single_raw = None
        self._whole_side: Optional[dict] = None
        # where the fused kernels merge this tensor, passes that can count raw chunks do (``update_raw``)
        self.spec = loader.fused_spec(t)
        # the random keep masks (DARE, DELLA) a pass draws for a chunk are kept for its merge, not drawn
        # again, up to thresholds.KEEP_BYTES per tensor (one byte an entry per model)
        self._masks: Optional[dict[int, dict]] = None
        if (self.spec is not None and self.spec.kind == "sparse" and self.spec.sparse.trim in ("random", "della")
                and len(self.ranges) > 1 and t.out_numel * len(t.sources) <= thresholds.KEEP_BYTES):
            self._masks = {}

    def raw(self, start: int, stop: int):
        if len(self.ranges) == 1:
            if self._single_raw is None:
                self._single_raw = self.loader.raw_chunk(self.t, start, stop)
            return self._single_raw
        chunk = self.loader.raw_chunk(self.t, start, stop)
        if self._masks is not None:
            chunk.masks = self._masks.setdefault(start, {})
        return chunk

    def job(self, start: int, stop: int) -> TensorJob:
        if self._whole_side is None:
            self._whole_side = self.loader.whole_side(self.t)
        if len(self.ranges) == 1:
            if self._single is None:
                self._single = self.loader.job(self.t, start, stop, self.stats, self.plan.recipe.seed, self._whole_side)
            return self._single
        return self.loader.job(self.t, start, stop, self.stats, self.plan.recipe.seed, self._whole_side)

    def visit(self, stats_pass: StatsPass, lock: Optional[threading.Lock] = None) -> None:
        """Feed every chunk to ``stats_pass``; ``lock`` guards a pass shared between threads."""
        raw = self.spec is not None and self.spec.kind == "sparse" and hasattr(stats_pass, "update_raw")
        if raw and getattr(stats_pass, "kept_input", False):
            with lock or nullcontext():
                stats_pass.update_kept()
            return
        for start, stop in self.ranges:
            if raw:
                chunk = self.raw(start, stop)
                with lock or nullcontext():
                    stats_pass.update_raw(chunk)
                continue
            job = self.job(start, stop)
            if lock is None:
                stats_pass.update(job)
            else:
                with lock:
                    stats_pass.update(job)

    def merged_chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        method = self.plan.method
        spec = self.spec
        if spec is not None:
            for stats_pass in method.tensor_passes(self.t.params, self.t.model_params, self.t.out_numel, self.stats):
                self.visit(stats_pass)
            for start, stop in self.ranges:
                chunk = self.raw(start, stop) if spec.kind == "sparse" else None
                result, nonfinite = self.loader.fused_chunk(self.t, spec, start, stop, self.stats, chunk)
                if self._masks is not None:
                    self._masks.pop(start, None)
                if nonfinite:
                    self.loader.blame_inputs(self.t, self.loader.job(self.t, start, stop, {}, 0, {}))
                    raise self.nonfinite_error()
                yield start, result
            return
        for stats_pass in method.tensor_passes(self.t.params, self.t.model_params, self.t.out_numel, self.stats):
            self.visit(stats_pass)
        for start, stop in self.ranges:
            job = self.job(start, stop)
            # checked as stored, like the fused kernels' count: a finite float32 result can
            # still overflow a narrower output dtype (float16)
            result = self.loader.cast(self.t, method.merge(job))
            if not all_finite(result):
                if not self.loader.screen_inputs:
                    self.loader.blame_inputs(self.t, job)
                raise self.nonfinite_error()
            yield start, result

    def nonfinite_error(self) -> DeltawiseError:
        return DeltawiseError(f"{self.plan.method.name} produced NaN/inf for {self.t.name} (output dtype "
                              f"{str(self.t.out.dtype).replace('torch.', '')}); check the parameters and the output dtype")


def run_stats(plan: MergePlan, options: MergeOptions, loader: ChunkLoader, pool: ThreadPoolExecutor) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    lock = threading.Lock()
    total = sum(t.out.nbytes for t in plan.merged)
    for stats_pass in plan.method.stats_passes(plan, stats):

        def visit(t: TensorPlan, stats_pass: StatsPass = stats_pass) -> int:
            _TensorRun(plan, loader, t, stats).visit(stats_pass, lock)  # one pass, all threads
            return t.out.nbytes

        done = 0
        for n in _bounded_map(pool, visit, iter(plan.merged), options.threads + 1):
            done += n
            if options.progress:
                options.progress(stats_pass.label, done, total)
    return stats


def run_merge(plan: MergePlan, out: str | Path, options: Optional[MergeOptions] = None) -> MergeResult:
    """Merge ``plan`` into ``out``. The output (with its staging folder) and any folder the method keeps
    state in are locked for the whole run: a second merge into the same output is refused."""
    options = options or MergeOptions()
    if plan.recipe.adapter is not None:  # a full model must not silently replace the adapter the recipe asks for
        raise RecipeError("the recipe asks for a PEFT adapter output (adapter:), which this writes as a full model; "
                          "run `deltawise merge` (deltawise.merge.adapter_out.run_adapter_merge), or drop the key")
    out = Path(out)
    device = _device(options.device)
    check_output(plan, out, options.overwrite, need_bytes=0 if options.resume else None)
    with ExitStack() as held:
        held.enter_context(output_lock(out))
        for folder in plan.method.locked_folders(plan):
            folder.parent.mkdir(parents=True, exist_ok=True)
            held.enter_context(output_lock(folder, "state folder"))
        return _run_locked(plan, out, options, device)


def _run_locked(plan: MergePlan, out: Path, options: MergeOptions, device: torch.device) -> MergeResult:
    started = time.time()
    # checked again under the lock: another run may have filled the output since the first check
    check_output(plan, out, options.overwrite, need_bytes=0)
    prepared = plan.method.prepare(plan, out, device)
    shard_plan = plan_shards([t.out for t in plan.tensors], options.shard_size)
    description = _plan_description(plan, shard_plan, prepared)
    staging = open_staging(out, plan_key(description), shard_plan, resume=options.resume, restart=options.restart,
                           parts=plan_parts(description))
    if options.resume:  # only the shards still to write need room
        left = sum(s.size for s in shard_plan.shards if s.filename not in staging.completed)
        check_free_space(out, staging.folder, left)
    writer = StreamingShardWriter(staging.folder, shard_plan, skip_shards=staging.completed, on_complete=staging.record,
                                  durable=options.fsync)
    todo = writer.pending_tensors()
    loader = ChunkLoader(plan, device)
    try:
        with (_single_intraop_threads(device),
              ThreadPoolExecutor(max_workers=max(1, options.threads), thread_name_prefix="deltawise-merge") as pool):
            stats = run_stats(plan, options, loader, pool) if todo else {}

            def produce(t: TensorPlan) -> int:
                if t.merge:
                    chunks = _TensorRun(plan, loader, t, stats).merged_chunks()
                else:
                    chunks = ((a, loader.cast(t, loader.copied(t, a, b))) for a, b in _copy_ranges(t))
                for start, result in chunks:
                    writer.write(t.name, loader.to_host(result), row_start=start)
                return t.out.nbytes

            done = sum(t.out.nbytes for t in plan.tensors if t.name not in todo)
            total = plan.output_bytes()
            shard_of = {t.name: shard.filename for shard in shard_plan.shards for t in shard.tensors}
            for n in _shard_ordered_map(pool, produce, [t for t in plan.tensors if t.name in todo], shard_of,
                                        max(1, options.threads)):
                done += n
                if options.progress:
                    options.progress("merging", done, total)
        writer.finish_empty_shards()
        changed = [f for r in plan.readers + plan.side_readers for f in r.changed_files()]
        if changed:
            raise InputError(f"input files changed during the merge: {', '.join(changed)}; the output was discarded")
        for name, text in options.extra_files.items():
            write_text_atomic(staging.folder / name, text)
        _finish_folder(plan, staging, shard_plan, writer)
        swap_into_place(staging.folder, out)
    except DeltawiseError:
        writer.abort()
        staging.discard()  # the inputs or recipe are at fault: nothing worth resuming
        raise
    except OSError as exc:
        writer.abort()
        kept = f"; {len(writer.completed)} completed shard(s) kept in {staging.folder}, rerun with --resume"
        if exc.errno == errno.ENOSPC:
            raise OutputError(f"disk full while writing {out}{kept}") from None
        if exc.errno == errno.EROFS:
            raise unwritable(out, exc) from None
        raise OutputError(f"cannot write {out}: {exc}{kept}") from None
    except BaseException:
        writer.abort()  # interrupted: completed shards stay for --resume
        raise
    files = sorted(p.name for p in out.iterdir())
    return MergeResult(out, files, time.time() - started, shard_plan.total_tensor_bytes, plan.warnings)


@contextmanager
def _single_intraop_threads(device: torch.device) -> Iterator[None]:
    """On the CPU, parallelism comes from one tensor per worker thread; torch's own OpenMP pool
    on top of that only spins on the same cores (measured: 5-7x more CPU time for linear and
    task_arithmetic on 2 cores). The setting is process-wide, so it is restored afterwards."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _plan_description(plan: MergePlan, shard_plan, prepared: Optional[str] = None) -> dict[str, Any]:
    """Everything that determines the output bytes; a resumed merge must match it exactly."""
    return {
        "prepared": prepared,
        "version": _version(),
        "rng_block": RNG_BLOCK_ELEMENTS,
        "recipe": plan.recipe.model_dump(mode="json"),
        "inputs": [(r.label, r.fingerprint()) for r in plan.readers + plan.side_readers],
        "shards": [(s.filename, [(t.name, t.shape, str(t.dtype)) for t in s.tensors]) for s in shard_plan.shards],
    }


def _device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeltawiseError("--device cuda was given but no CUDA device is available")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise DeltawiseError(f"unknown device {name!r}; use cpu or cuda")
    return torch.device(name)


def _finish_folder(plan: MergePlan, staging_state: Staging, shard_plan, writer: StreamingShardWriter) -> None:
    staging = staging_state.folder
    if len(shard_plan.shards) > 1:
        write_json_atomic(staging / "model.safetensors.index.json", shard_plan.index())
    copy_model_files(plan, staging)
    config = output_config(plan)
    if config is not None:
        write_json_atomic(staging / "config.json", config)
    manifest = {
        "deltawise_version": _version(),
        "recipe": plan.recipe.model_dump(mode="json", exclude_none=True),
        "inputs": [{"model": r.label, "fingerprint": r.fingerprint(), "bytes": r.total_bytes()} for r in plan.readers],
        **({"statistics": [{"file": r.label, "fingerprint": r.fingerprint()} for r in plan.side_readers]}
           if plan.side_readers else {}),
        "shards": [{"file": s.filename, "bytes": s.size, "sha256": writer.completed[s.filename]} for s in shard_plan.shards],
        "warnings": plan.warnings,
    }
    write_json_atomic(staging / MANIFEST, manifest)
    write_text_atomic(staging / "README.md", model_card(plan, manifest))
    staging_state.finalize()


def _version() -> str:
    from deltawise import __version__

    return __version__


def dump_plan(plan: MergePlan) -> dict[str, Any]:
    """A JSON-able summary of the plan (for --dry-run)."""
    merged = plan.merged
    cpu = ChunkLoader(plan, torch.device("cpu"))
    return {
        "method": plan.method.name,
        "base_model": plan.base.ref if plan.base else None,
        "models": [m.ref for m in plan.inputs],
        "tensors": len(plan.tensors),
        "merged_tensors": len(merged),
        "copied_tensors": len(plan.tensors) - len(merged),
        "output_bytes": plan.output_bytes(),
        "example_parameters": {t.name: {"params": t.params, "model_params": t.model_params} for t in merged[:3]},
        # which merged tensors the fused C kernels take on the CPU (the rest run the torch code)
        "cpu_kernel": {"fused": fused.describe(), "fused_tensors": sum(cpu.fused_spec(t) is not None for t in merged)},
        "warnings": plan.warnings,
    }


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)
