"""Streaming, sharded, atomic safetensors writer.

Shards are planned up front from the output tensors' shapes and dtypes, so each shard's
header is known before any data exists: the header is written first and every tensor is
then written straight to its byte offset (``os.pwrite``) as soon as it is computed, in any
order and from any thread. Memory therefore holds only the tensors in flight, never a whole
shard. Each shard's sha256 follows its written prefix (no second read of the file). A shard
lives under a hidden ``.NAME.partial`` name until its last tensor is written, then it is
renamed (fsync'ed first when ``durable``); the index is written after all shards.
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


class _ShardProgress:
    """Which bytes of one shard are on disk, and how far its sha256 has got.

    Chunks arrive in any order; ``written_to`` is the end of the contiguous prefix written so
    far and the digest follows it, so a shard's hash is ready when its last chunk lands
    instead of costing another read of the whole file afterwards."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.hashed = 0
        self.written_to = 0
        self.islands: dict[int, int] = {}  # start -> end of written ranges beyond the prefix
        self.hash_lock = threading.Lock()  # one thread hashes a shard at a time

    def add(self, start: int, end: int) -> None:
        """Record bytes [start, end) as written (caller holds the writer's lock)."""
        if end <= start:
            return
        self.islands[start] = end
        while self.written_to in self.islands:
            self.written_to = self.islands.pop(self.written_to)


class StreamingShardWriter:
    """Writes the tensors of a ``ShardPlan`` into ``folder``; thread-safe ``write``.

    Each shard's sha256 is computed while it is written (``_ShardProgress``), by whichever
    writing thread extends its written prefix. Shards are not fsync'ed unless ``durable``:
    an interruption of the process loses nothing already written, and ``resume`` re-hashes
    completed shards anyway, so only a power loss could leave a torn shard (as with other
    tools' checkpoints); ``durable`` trades the disk's write speed for that guarantee."""

    READ_BACK = 1 << 23  # bytes re-read per step when hashing chunks written out of order

    def __init__(
        self,
        folder: Path,
        plan: ShardPlan,
        *,
        skip_shards: dict[str, str] | None = None,
        on_complete: Callable[[str, str], None] | None = None,
        durable: bool = False,
    ):
        """``skip_shards``: shards already complete (filename -> sha256), e.g. when resuming;
        ``on_complete(filename, sha256)`` is called after each shard is renamed into place;
        ``durable``: fsync each shard before it is renamed."""
        self.folder = Path(folder)
        self.plan = plan
        self.on_complete = on_complete
        self.durable = durable
        self._shard_of = plan.shard_of()
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        self._remaining = {s.filename: {t.name for t in s.tensors} for s in plan.shards}
        self.completed: dict[str, str] = dict(skip_shards or {})  # filename -> sha256
        self._planned = {t.name: t for sh in plan.shards for t in sh.tensors}
        self._bytes_left = {t.name: t.nbytes for t in self._planned.values()}
        self._progress = {s.filename: _ShardProgress() for s in plan.shards}
        self._finishing: set[str] = set()
        self._local = threading.local()  # per-thread read-back buffer
        for name in self.completed:
            self._remaining.pop(name, None)

    def pending_tensors(self) -> set[str]:
        with self._lock:
            return {n for names in self._remaining.values() for n in names}

    def _fd(self, shard: Shard) -> int:
        """The shard's open partial file, created with its header on first use (caller holds the lock)."""
        fd = self._fds.get(shard.filename)
        if fd is None:
            path = self.folder / partial_name(shard.filename)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds[shard.filename] = fd
            self._pwrite_all(fd, memoryview(shard.header), 0)
            progress = self._progress[shard.filename]
            progress.add(0, len(shard.header))
            progress.sha.update(shard.header)  # hashed here, or the shard's first chunk would be read back with it
            progress.hashed = len(shard.header)
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
        offset = shard.offsets[name] + row_start * row_bytes
        with self._lock:
            fd = self._fd(shard)
        self._pwrite_all(fd, data, offset)
        progress = self._progress[shard.filename]
        with self._lock:
            progress.add(offset, offset + data.nbytes)
            left = self._bytes_left[name] = self._bytes_left[name] - data.nbytes
            if left <= 0:
                self._remaining[shard.filename].discard(name)
        self._advance(shard, fd, data, offset)

    def _advance(self, shard: Shard, fd: int, data: memoryview | None = None, offset: int = -1) -> None:
        """Hash the newly contiguous part of ``shard``; finish the shard once all of it is written.

        ``data`` (just written at ``offset``) is hashed from memory when it starts where the
        digest stands; bytes written earlier out of order are read back from the page cache.
        Only one thread hashes a shard at a time; one that finds the lock taken leaves its
        bytes to the holder, which looks again after releasing it."""
        progress = self._progress[shard.filename]
        while progress.hash_lock.acquire(blocking=False):
            try:
                while True:
                    with self._lock:
                        target = progress.written_to
                    if progress.hashed >= target:
                        break
                    if data is not None and offset == progress.hashed and offset + data.nbytes <= target:
                        progress.sha.update(data)
                        progress.hashed += data.nbytes
                        data = None
                        continue
                    buffer = self._read_back_buffer()
                    n = os.preadv(fd, [buffer[: target - progress.hashed]], progress.hashed)
                    if n <= 0:
                        raise OutputError(f"cannot read back {partial_name(shard.filename)} to hash it")
                    progress.sha.update(buffer[:n])
                    progress.hashed += n
            finally:
                progress.hash_lock.release()
            with self._lock:
                if progress.hashed < progress.written_to:
                    continue  # another thread added bytes while this one held the lock
                done = (not self._remaining[shard.filename] and progress.hashed == shard.size
                        and shard.filename not in self._finishing)
                if done:
                    self._finishing.add(shard.filename)
            if done:
                self._finish(shard, progress.sha.hexdigest())
            return

    def _read_back_buffer(self) -> memoryview:
        buffer = getattr(self._local, "buffer", None)
        if buffer is None:
            buffer = self._local.buffer = memoryview(bytearray(self.READ_BACK))
        return buffer

    def _finish(self, shard: Shard, digest: str) -> None:
        with self._lock:
            fd = self._fds.pop(shard.filename, None)
        if fd is None:  # aborted meanwhile: the partial file is gone
            return
        try:
            if self.durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        tmp = self.folder / partial_name(shard.filename)
        os.replace(tmp, self.folder / shard.filename)
        with self._lock:
            self.completed[shard.filename] = digest
            if self.on_complete is not None:
                self.on_complete(shard.filename, digest)

    def finish_empty_shards(self) -> None:
        """Shards with no tensors (or only empty ones never written) still need their file."""
        for shard in self.plan.shards:
            if shard.filename not in self.completed and not self._remaining[shard.filename]:
                with self._lock:
                    fd = self._fd(shard)
                self._advance(shard, fd)

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
    """Write ``text`` to a hidden file beside ``path`` and rename it over ``path``: a reader sees the old
    file or the new one, never half of one. The temporary name is per process, so two writers do
    not write into the same file; a write that fails leaves nothing behind (the OSError goes on to the
    caller, which knows whether the run can be resumed)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
