"""Streaming, sharded, atomic safetensors writer.

Shards are planned up front from the output tensors' shapes and dtypes, so each shard's
header is known before any data exists: the header is written first and every tensor is
then written straight to its byte offset (``os.pwrite``) as soon as it is computed, in any
order and from any thread. Memory therefore holds only the tensors in flight, never a whole
shard. A shard lives under a hidden ``.NAME.partial`` name until its last tensor is written,
then it is flushed and renamed; the index is written after all shards.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from deltawise.errors import OutputError
from deltawise.io.dtypes import TORCH_TO_SAFETENSORS, element_size

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000; '500MiB' -> 524288000; plain integers are bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise OutputError(f"cannot read size {text!r}; write e.g. 5GB, 500MB or 2GiB") from None
    if unit not in SIZE_UNITS or not math.isfinite(value) or value <= 0:
        raise OutputError(f"cannot read size {text!r}; write e.g. 5GB, 500MB or 2GiB")
    return int(value * SIZE_UNITS[unit])


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = element_size(self.dtype)
        for s in self.shape:
            n *= s
        return n


@dataclass
class Shard:
    filename: str
    tensors: list[OutputTensor]
    header: bytes = b""
    offsets: dict[str, int] = field(default_factory=dict)  # absolute file offset of each tensor's data

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


@dataclass
class ShardPlan:
    shards: list[Shard]

    @property
    def total_tensor_bytes(self) -> int:
        return sum(t.nbytes for s in self.shards for t in s.tensors)

    def shard_of(self) -> dict[str, Shard]:
        return {t.name: s for s in self.shards for t in s.tensors}

    def index(self, metadata: dict | None = None) -> dict:
        return {
            "metadata": {"total_size": self.total_tensor_bytes, **(metadata or {})},
            "weight_map": {t.name: s.filename for s in self.shards for t in s.tensors},
        }


def _header(tensors: list[OutputTensor], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    table: dict[str, object] = {"__metadata__": metadata}
    rel_offsets = {}
    pos = 0
    for t in tensors:
        table[t.name] = {"dtype": TORCH_TO_SAFETENSORS[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        rel_offsets[t.name] = pos
        pos += t.nbytes
    body = json.dumps(table, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)  # the format pads the header so tensor data is 8-byte aligned
    header = len(body).to_bytes(8, "little") + body
    return header, {k: v + len(header) for k, v in rel_offsets.items()}


def plan_shards(tensors: list[OutputTensor], max_shard_bytes: int, metadata: dict[str, str] | None = None) -> ShardPlan:
    """Greedy packing in the given order; a tensor larger than the limit gets a shard of its own."""
    groups: list[list[OutputTensor]] = []
    current: list[OutputTensor] = []
    size = 0
    for t in tensors:
        if current and size + t.nbytes > max_shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(t)
        size += t.nbytes
    if current or not groups:
        groups.append(current)
    n = len(groups)
    meta = {"format": "pt", **(metadata or {})}
    shards = []
    for i, group in enumerate(groups, start=1):
        filename = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        header, offsets = _header(group, meta)
        shards.append(Shard(filename, group, header, offsets))
    return ShardPlan(shards)


def row_ranges(shape: tuple[int, ...], chunk_elements: int) -> list[tuple[int, int]]:
    """Split dimension 0 into ranges of at most ``chunk_elements`` entries (at least one row each);
    0-d and 1-d tensors, and tensors that fit, are one range."""
    rows = shape[0] if shape else 1
    numel = 1
    for s in shape:
        numel *= s
    if len(shape) < 2 or numel <= chunk_elements:
        return [(0, rows)]
    step = max(1, chunk_elements // max(1, numel // rows))
    return [(s, min(rows, s + step)) for s in range(0, rows, step)]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def partial_name(filename: str) -> str:
    return f".{filename}.partial"


class StreamingShardWriter:
    """Writes the tensors of a ``ShardPlan`` into ``folder``; thread-safe ``write``."""

    def __init__(
        self,
        folder: Path,
        plan: ShardPlan,
        *,
        skip_shards: dict[str, str] | None = None,
        on_complete: Callable[[str, str], None] | None = None,
    ):
        """``skip_shards``: shards already complete (filename -> sha256), e.g. when resuming;
        ``on_complete(filename, sha256)`` is called after each shard is renamed into place."""
        self.folder = Path(folder)
        self.plan = plan
        self.on_complete = on_complete
        self._shard_of = plan.shard_of()
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        self._remaining = {s.filename: {t.name for t in s.tensors} for s in plan.shards}
        self.completed: dict[str, str] = dict(skip_shards or {})  # filename -> sha256
        self._planned = {t.name: t for sh in plan.shards for t in sh.tensors}
        self._bytes_left = {t.name: t.nbytes for t in self._planned.values()}
        self._finishing: set[str] = set()
        for name in self.completed:
            self._remaining.pop(name, None)

    def pending_tensors(self) -> set[str]:
        with self._lock:
            return {n for names in self._remaining.values() for n in names}

    def _fd(self, shard: Shard) -> int:
        fd = self._fds.get(shard.filename)
        if fd is None:
            path = self.folder / partial_name(shard.filename)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds[shard.filename] = fd
            self._pwrite_all(fd, memoryview(shard.header), 0)
        return fd

    @staticmethod
    def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
        data = data.cast("B")
        while data:
            n = os.pwrite(fd, data, offset)
            data = data[n:]
            offset += n

    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None:
        """Write a whole tensor, or rows ``row_start:row_start+len(tensor)`` of it."""
        shard = self._shard_of[name]
        planned = self._planned[name]
        rows_ok = tuple(tensor.shape[1:]) == planned.shape[1:] if planned.shape else tensor.dim() == 0
        if not rows_ok or tensor.dtype != planned.dtype:
            raise OutputError(
                f"internal error: tensor {name!r} chunk is {tuple(tensor.shape)} {tensor.dtype}, "
                f"planned {planned.shape} {planned.dtype}"
            )
        data = tensor_bytes(tensor)
        row_bytes = planned.nbytes // planned.shape[0] if planned.shape and planned.shape[0] else 0
        with self._lock:
            fd = self._fd(shard)
        self._pwrite_all(fd, data, shard.offsets[name] + row_start * row_bytes)
        with self._lock:
            left = self._bytes_left[name] = self._bytes_left[name] - data.nbytes
            remaining = self._remaining[shard.filename]
            if left <= 0:
                remaining.discard(name)
            done = not remaining and shard.filename not in self._finishing
            if done:
                self._finishing.add(shard.filename)
        if done:
            self._finish(shard)

    def _finish(self, shard: Shard) -> None:
        with self._lock:
            fd = self._fds.pop(shard.filename, None)
            if fd is None:  # a shard with no tensors still needs its file
                fd = self._fd(shard)
                self._fds.pop(shard.filename)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp = self.folder / partial_name(shard.filename)
        digest = sha256_file(tmp)
        os.replace(tmp, self.folder / shard.filename)
        with self._lock:
            self.completed[shard.filename] = digest
            if self.on_complete is not None:
                self.on_complete(shard.filename, digest)

    def finish_empty_shards(self) -> None:
        for shard in self.plan.shards:
            if not shard.tensors and shard.filename not in self.completed:
                self._finish(shard)

    def abort(self) -> None:
        """Close and delete every partial file; completed shards stay (they are whole)."""
        with self._lock:
            fds, self._fds = self._fds, {}
        for filename, fd in fds.items():
            try:
                os.close(fd)
            finally:
                (self.folder / partial_name(filename)).unlink(missing_ok=True)


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, data: object) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)
