"""Reading inputs for the merge engine: row chunks of every input, converted to the compute dtype
in reused per-thread buffers (``ScratchBuffers``), the fused-kernel fast path, side inputs
(statistics files), and the NaN/inf checks that name the input at fault.

Split from ``engine.py``, which schedules tensors over threads and writes shards; this module
holds everything about one tensor's inputs.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

import torch

from deltawise.io.finite import all_finite, require_finite  # noqa: F401 (all_finite: the engine imports it here)
from deltawise.io.layout import CHUNK_ELEMENTS
import deltawise.merge.fused as fused
import deltawise.merge.fused_sparse as fused_sparse
from deltawise.merge.base import TensorJob
from deltawise.merge.plan import MergePlan, TensorPlan


class ScratchBuffers:
    """Scratch tensors reused chunk after chunk, one set per worker thread.

    Allocating a fresh multi-megabyte tensor per chunk costs more than the arithmetic on it
    (the allocator hands back new pages from the kernel, each faulted in and zeroed), so the
    raw bytes read, their float32 conversion and the output cast live in buffers that are
    kept. A tensor that fits in no buffer (a huge 1-d tensor is a single chunk) gets its own
    memory instead of a buffer that large being kept."""

    MAX_KEPT = 1 << 22  # entries

    def __init__(self, pin: bool = False):
        self.pin = pin  # page-locked host buffers, for faster copies to a GPU
        self._local = threading.local()

    def get(self, key: Any, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        pin = self.pin and device.type == "cpu"
        if numel > self.MAX_KEPT:
            return torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)
        kept: dict = self._local.__dict__.setdefault("kept", {})
        buffer = kept.get(key)
        if buffer is None or buffer.dtype != dtype or buffer.device != device or buffer.numel() < numel:
            size = min(max(numel, CHUNK_ELEMENTS), self.MAX_KEPT)
            buffer = kept[key] = torch.empty(size, dtype=dtype, device=device, pin_memory=pin)
        return buffer[:numel].view(shape)


class ChunkLoader:
    """Reads the inputs of one tensor (or row range) as float32/float64 on the work device.

    Inputs land in per-thread buffers (``ScratchBuffers``): a chunk's tensors are valid until the
    same thread loads its next chunk, which is all the engine needs (a tensor's chunks are
    processed one after the other by one thread; methods never keep input tensors)."""

    def __init__(self, plan: MergePlan, device: torch.device):
        self.plan = plan
        self.device = device
        self.buffers = ScratchBuffers(pin=device.type == "cuda")
        # methods whose every output entry turns NaN/inf when any input entry is: their
        # inputs need no screen of their own, the (cheaper, single) check of the result covers them
        self.screen_inputs = not plan.method.propagates_nonfinite
        self._exact: dict[tuple[int, int], bool] = {}

    def _base_reader(self, t: TensorPlan):
        base = self.plan.base_of(t)
        return None if base is None else base.reader

    def exact_inputs(self, t: TensorPlan) -> list[bool]:
        """Per input of ``t``: a delta or adapter of this very base, whose task vectors come from the delta
        (LoRA factors, ...) instead of (base + delta) - base, which would round the delta's low bits."""
        base = self._base_reader(t)
        out = []
        for m in self.plan.inputs_of(t):
            key = (id(m.reader), id(base))
            if key not in self._exact:
                self._exact[key] = (base is not None and hasattr(m.reader, "delta_rows")
                                    and m.reader.base.fingerprint() == base.fingerprint())
            out.append(self._exact[key])
        return out

    def compute_dtype(self, t: TensorPlan) -> torch.dtype:
        readers = [m.reader for m in self.plan.inputs_of(t)]
        stored = [r.info(s).dtype for r, s in zip(readers, t.sources)]
        return torch.float64 if torch.float64 in stored else torch.float32

    def _raw(self, slot: Any, reader, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor as stored, on the CPU."""
        info = reader.info(name)
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        read_into = getattr(reader, "read_rows_into", None)  # a ModelReader; a DeltaReader computes its rows
        if read_into is not None:
            return read_into(name, start, stop, self.buffers.get(("raw", slot), shape, info.dtype, torch.device("cpu")))
        return reader.get_rows(name, start, stop) if info.shape else reader.get(name)

    def _read(self, slot: Any, reader, name: str, start: int, stop: int, dtype: torch.dtype, label: str,
              screen: bool = False) -> torch.Tensor:
        raw = self._raw(slot, reader, name, start, stop)
        if raw.dtype == dtype and self.device.type == "cpu":
            x = raw
        else:
            x = self.buffers.get(("x", slot), tuple(raw.shape), dtype, self.device)
            x.copy_(raw)
        if screen or self.screen_inputs:
            require_finite(x, label, name)
        return x

    def fused_spec(self, t: TensorPlan) -> Optional[fused.FusedSpec]:
        """The fused kernel's form of ``t``'s merge when it can run here (CPU, extension built,
        inputs read from files, bfloat16/float32 in and out), else None: the torch path."""
        if self.device.type != "cpu" or not fused.available() or self.plan.side_inputs:
            return None
        spec = self.plan.method.fused(t.params, t.model_params)
        base_reader = self._base_reader(t)
        if spec is None or (spec.kind != "linear") != (base_reader is not None):
            return None
        if spec.kind == "sparse" and not fused_sparse.available():
            return None
        sources = [(m.reader, s) for m, s in zip(self.plan.inputs_of(t), t.sources)]
        if base_reader is not None:
            sources.append((base_reader, t.base_source))
        if not all(hasattr(r, "read_rows_into") for r, _ in sources):
            return None
        return spec if fused.supports([r.info(s).dtype for r, s in sources] + [t.out.dtype]) else None

    def raw_chunk(self, t: TensorPlan, start: int, stop: int) -> fused_sparse.RawChunk:
        """Rows [start, stop) of every input and the base as stored (for the fused passes and merge);
        valid until this thread reads its next chunk."""
        models = [self._raw(i, m.reader, s, start, stop) for i, (m, s) in enumerate(zip(self.plan.inputs_of(t), t.sources))]
        base = self._raw(-1, self._base_reader(t), t.base_source, start, stop)
        row = models[0][0].numel() if models[0].dim() > 0 and models[0].shape[0] else 0
        return fused_sparse.RawChunk(t.name, base, models, start, start * row,
                                     lambda: self.blame_inputs(t, self.job(t, start, stop, {}, 0, {})),
                                     seed=self.plan.recipe.seed, shape=tuple(models[0].shape))

    def fused_chunk(self, t: TensorPlan, spec: fused.FusedSpec, start: int, stop: int, stats: Optional[dict] = None,
                    chunk: Optional[fused_sparse.RawChunk] = None) -> tuple[torch.Tensor, int]:
        """Rows [start, stop) of ``t`` merged by the kernel straight into the output dtype, and
        how many of them were NaN/inf. A sparse spec takes the tensor's ``stats`` (and the raw
        ``chunk`` when the caller has it already)."""
        if spec.kind == "sparse":
            chunk = chunk or self.raw_chunk(t, start, stop)
            out = self.buffers.get("out", chunk.shape, t.out.dtype, torch.device("cpu"))
            masks = fused_sparse.keep_masks(chunk, spec.sparse) if spec.sparse.trim in ("random", "della") else None
            return out, fused_sparse.run(spec.sparse, out, chunk, stats or {}, masks)
        models = [self._raw(i, m.reader, s, start, stop) for i, (m, s) in enumerate(zip(self.plan.inputs_of(t), t.sources))]
        base_reader = self._base_reader(t)
        base = self._raw(-1, base_reader, t.base_source, start, stop) if base_reader is not None else None
        out = self.buffers.get("out", tuple(models[0].shape), t.out.dtype, torch.device("cpu"))
        return out, fused.run(spec, out, models, base)

    def copied(self, t: TensorPlan, start: int, stop: int) -> torch.Tensor:
        """A tensor taken unmerged from the template model (integer buffers, `exclude` matches) or,
        where the method copies (passthrough), from its one input; read into a reused buffer."""
        if t.sources:
            model, name = self.plan.inputs_of(t)[0], t.sources[0]
        else:
            model, name = self.plan.template, t.name
        raw = self._raw("copy", model.reader, name, start, stop)
        if raw.is_floating_point():
            require_finite(raw, model.ref, name)
        return raw

    def job(self, t: TensorPlan, start: int, stop: int, stats: dict, seed: int, whole_side: Optional[dict] = None) -> TensorJob:
        dtype = self.compute_dtype(t)
        base, base_model = None, self.plan.base_of(t)
        if base_model is not None:
            base = self._read(-1, base_model.reader, t.base_source, start, stop, dtype, base_model.ref)
        inputs = self.plan.inputs_of(t)
        models = [self._read(i, m.reader, s, start, stop, dtype, m.ref) for i, (m, s) in enumerate(zip(inputs, t.sources))]
        exact, use_exact = None, self.exact_inputs(t)
        if any(use_exact):
            exact = [self._exact_delta(m.reader, s, start, stop, dtype) if use else None
                     for use, m, s in zip(use_exact, inputs, t.sources)]
        side = dict(whole_side if whole_side is not None else self.whole_side(t))
        for s in self.plan.side_inputs:
            if not s.whole:
                side[s.key] = self._side(s, t, start, stop, dtype)
        return TensorJob(t.name, base, models, t.params, t.model_params, stats, seed, row_start=start, side=side,
                         scratch_source=self._scratch, exact_deltas=exact)

    def _exact_delta(self, reader, name: str, start: int, stop: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
        tau = reader.delta_rows(name, start, stop)
        return None if tau is None else tau.to(dtype=dtype, device=self.device)

    def whole_side(self, t: TensorPlan) -> dict[str, list[Optional[torch.Tensor]]]:
        """Side tensors every chunk of ``t`` needs whole (Gram matrices): read once per tensor."""
        return {s.key: self._side(s, t, None, None, self.compute_dtype(t)) for s in self.plan.side_inputs if s.whole}

    def _side(self, s, t: TensorPlan, start: Optional[int], stop: Optional[int],
              dtype: torch.dtype) -> list[Optional[torch.Tensor]]:
        out: list[Optional[torch.Tensor]] = []
        for i, (reader, source) in enumerate(zip(s.readers, t.sources)):
            name = s.name_of(source)
            if name is None or name not in reader:
                out.append(None)
            elif start is None or not reader.info(name).shape:
                out.append(self._read_whole(reader, name, dtype))  # kept across chunks: not a reused buffer
            else:
                out.append(self._read(("side", s.key, i), reader, name, start, stop, dtype, reader.label, screen=True))
        return out

    def _read_whole(self, reader, name: str, dtype: torch.dtype) -> torch.Tensor:
        x = reader.get(name).to(device=self.device, dtype=dtype)
        require_finite(x, reader.label, name)
        return x

    def _scratch(self, key: Any, like: torch.Tensor) -> torch.Tensor:
        return self.buffers.get(("scratch", key), tuple(like.shape), like.dtype, like.device)

    def blame_inputs(self, t: TensorPlan, job: TensorJob) -> None:
        """Raise the input error for a non-finite result whose inputs were not screened."""
        if job.base is not None:
            require_finite(job.base, self.plan.base_of(t).ref, t.base_source)
        for m, s, x in zip(self.plan.inputs_of(t), t.sources, job.models):
            require_finite(x, m.ref, s)

    def cast(self, t: TensorPlan, result: torch.Tensor) -> torch.Tensor:
        """``result`` as the output dtype, where it is (on the CPU in a reused buffer; on a GPU
        before it crosses to the host: half the bytes)."""
        if result.dtype == t.out.dtype:
            return result
        if result.device.type != "cpu":
            return result.to(t.out.dtype)
        return self.buffers.get("out", tuple(result.shape), t.out.dtype, result.device).copy_(result)

    def to_host(self, result: torch.Tensor) -> torch.Tensor:
        if result.device.type == "cpu":
            return result
        return self.buffers.get("out", tuple(result.shape), result.dtype, torch.device("cpu")).copy_(result)
