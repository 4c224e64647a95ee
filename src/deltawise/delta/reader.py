"""``DeltaReader``: a model seen as ``base + scale · delta``, with ModelReader's interface.

It lets everything that reads models (the merge engine, ``apply``) read a delta folder or a
PEFT adapter as if it were a full checkpoint: tensors the delta changes are computed on the
fly (in float32, float64 for float64 data, cast to the base dtype); the others are the base's.
A ``full`` entry (a new value) reads as ``base + scale · (value − base)``; one naming a tensor the
base lacks (a new classification head) adds that tensor, as stored, to the model's tensors,
except an output head of a base with tied embeddings (``lm_head.weight``, which such a base stores
as its input embedding): its change is the embedding's (``architecture.tied_alias``), as PEFT and
mergekit save a tied head beside the embedding; when the delta changes both, the two must agree.
A tensor's dense delta is computed once and kept while its row chunks are read (a small
LRU), so chunked readers do not redo an SVD product or an inverse FFT per chunk.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Optional

import torch

from deltawise.architecture import architecture_for
from deltawise.delta.base import TensorDelta, compute_dtype
from deltawise.delta.source import DeltaSource, is_delta, open_delta
from deltawise.delta.transfer import check_transfer
from deltawise.errors import InputError
from deltawise.io.reader import ModelReader, TensorInfo
from deltawise.io.resolve import resolve_model

CACHE_TENSORS = 4


class DeltaReader:
    def __init__(self, source: DeltaSource, base: ModelReader, *, scale: float = 1.0, label: Optional[str] = None):
        self.source = source
        self.base = base
        self.scale = float(scale)
        self.label = label or str(source.folder)
        self.path = Path(source.folder)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.warnings: list[str] = []  # for the merge plan: e.g. the base is not the one the delta recorded
        self.files = list(base.files) + list(source.files)
        self.stamps = list(base.stamps) + [ModelReader._stamp(f) for f in source.files]
        # base embedding -> the tied output head the delta names instead of (or besides) it
        roles = architecture_for(base.config)
        self.through_tie: dict[str, str] = {}
        for n in source.names():
            alias = roles.tied_alias(n, base) if n not in base else None
            if alias is not None:
                self.through_tie[alias] = n
        tied_outputs = set(self.through_tie.values())
        # tensors the delta adds: new values of tensors the base does not have
        self.added = {n: TensorInfo(tuple(source.shape(n)), source.base_dtype(n))
                      for n in source.names() if source.kind(n) == "full" and n not in base and n not in tied_outputs}

    # ------------------------------------------------------------ ModelReader interface
    @property
    def folder(self) -> Path:
        return self.path

    def input_folders(self) -> list[Path]:
        return [self.path, *self.base.input_folders()]

    @property
    def config(self) -> Optional[dict]:
        return self.base.config

    def keys(self) -> list[str]:
        return self.base.keys() + list(self.added)

    def __contains__(self, name: str) -> bool:
        return name in self.base or name in self.added

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.base) + len(self.added)

    def info(self, name: str) -> TensorInfo:
        return self.added[name] if name in self.added else self.base.info(name)

    def get(self, name: str) -> torch.Tensor:
        info = self.info(name)
        return self.get_rows(name, 0, info.shape[0] if info.shape else 1)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name in self.added:
            value = self.source.get(name).values  # a FullDelta: the tensor as stored
            return (value[start:stop] if value.dim() else value).to(self.added[name].dtype)
        base = self.base.get_rows(name, start, stop) if self.base.info(name).shape else self.base.get(name)
        if not self.changes(name) or self.scale == 0:
            return base
        delta = self._dense(name)
        if delta.dim():
            start, stop = max(0, min(start, delta.shape[0])), max(0, min(stop, delta.shape[0]))
            delta = delta[start:max(start, stop)]
        dtype = compute_dtype(base, delta)
        return (base.to(dtype) + self.scale * delta.to(dtype)).to(base.dtype)

    def delta_rows(self, name: str, start: int, stop: int) -> Optional[torch.Tensor]:
        """``scale · delta`` in rows [start, stop) of ``name``, computed from the delta's own form (LoRA
        factors, sparse values, ...) in float32 (float64 for float64 data), or None where the delta
        leaves ``name`` as the base has it. For task-vector merges of adapters: ``get_rows`` gives
        ``base + scale · delta`` rounded to the base dtype, and subtracting the base again from that
        would lose the delta's low bits. A read-only tensor (it may be this reader's cache)."""
        if name in self.added or not self.changes(name) or self.scale == 0:
            return None
        delta = self._dense(name)
        rows = delta[max(0, start):max(start, stop)] if delta.dim() else delta
        return rows * self.scale if self.scale != 1 else rows

    def _dense(self, name: str) -> torch.Tensor:
        with self._lock:
            if name in self._cache:
                self._cache.move_to_end(name)
                return self._cache[name]
        delta = self.tensor_delta(name)
        dense = delta.materialize(delta.natural_dtype)
        with self._lock:
            self._cache[name] = dense
            while len(self._cache) > CACHE_TENSORS:
                self._cache.popitem(last=False)
        return dense

    def stored_name(self, name: str) -> str:
        """The tensor of this model that the delta's entry ``name`` changes (a tied head's embedding)."""
        return next((alias for alias, head in self.through_tie.items() if head == name and name not in self), name)

    def changes(self, name: str) -> bool:
        """Whether the delta changes the base tensor ``name`` (directly or through a tied output head)."""
        return name in self.source.entries or name in self.through_tie

    def tensor_delta(self, name: str) -> TensorDelta:
        own, tied = name in self.source.entries, self.through_tie.get(name)
        delta = self._relative(name, name if own else tied)
        if own and tied is not None:
            other = self._relative(name, tied)
            a, b = delta.materialize(torch.float32), other.materialize(torch.float32)
            if not torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(a.abs().max().clamp(min=1e-30))):
                raise InputError(
                    f"{self.label}: changes {name} and {tied} differently, but the base {self.base.label!r} ties them "
                    "(one tensor): the result cannot be written as a tied model"
                )
        return delta

    def _relative(self, name: str, entry: str) -> TensorDelta:
        delta = self.source.get(entry)
        delta.check_shape(tuple(self.base.info(name).shape), f"base tensor {name} of {self.base.label!r}")
        return delta.relative_to(self.base.get(name)) if delta.replaces else delta

    def total_bytes(self) -> int:
        return self.base.total_bytes() + sum(i.nbytes for i in self.added.values())

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.source.fingerprint().encode())
        h.update(self.base.fingerprint().encode())
        h.update(repr(self.scale).encode())
        return h.hexdigest()

    def changed_files(self) -> list[str]:
        return [s.path for s in self.stamps if not Path(s.path).exists() or ModelReader._stamp(Path(s.path)) != s]

    def close(self) -> None:
        self.base.close()


def open_model(ref: str, *, allow_pickle: bool = False, base_ref: Optional[str] = None, label: Optional[str] = None):
    """A ModelReader for a checkpoint, or a DeltaReader for a delta/adapter folder.

    A delta's base is ``base_ref`` when given (a merge recipe's base_model), else the base it
    recorded; the delta's tensors must exist in that base with the same shapes.
    """
    location = resolve_model(ref, allow_pickle=allow_pickle)
    if not is_delta(location):
        return ModelReader(location, allow_pickle=allow_pickle, label=label or ref)
    source = open_delta(location)
    base_ref = base_ref or source.base.get("ref")
    if not base_ref:
        raise InputError(f"delta {ref!r} does not record its base model; give base_model in the recipe")
    base = ModelReader(resolve_model(base_ref, allow_pickle=allow_pickle), allow_pickle=allow_pickle, label=base_ref)
    if hasattr(source, "base_reader"):
        source.base_reader = base
    reader = DeltaReader(source, base, label=label or ref)
    # raises on names/shapes/architecture that do not fit; warns when the base is not the recorded one
    reader.warnings = [f"{ref}: {w}" for w in check_transfer(source, base, base_ref, hint=False)]
    return reader
