"""The files of a safetensors model, checked before they are trusted: each file's header (dtypes, shapes,
contiguous offsets within the file, no tensor named twice) and the shard names an index gives (they must stay
inside the model folder). ``io.reader.ModelReader`` reads tensors through these checks."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from deltawise.errors import InputError
from deltawise.io.dtypes import SAFETENSORS_TO_TORCH


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class DuplicateKeyError(ValueError):
    """A JSON object names one key twice."""


def refuse_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """``json.loads`` hook: a key given twice is an error (JSON parsers silently keep the last one,
    so two tools could read different tensors from one file)."""
    table: dict = {}
    for key, value in pairs:
        if key in table:
            raise DuplicateKeyError(f"the key {key!r} appears twice")
        table[key] = value
    return table


def shard_path(index_path: Path, rel: object, suffix: str, label: str) -> Path:
    """The shard an index entry names, refused unless the name stays inside the index's folder.

    The name is checked lexically, before symlinks are followed: in the hub cache every shard
    is a symlink into ``blobs/``, which is allowed, while ``/etc/passwd`` or ``../other/x``
    as a name is not."""
    def refuse(why: str, rule: str = "refusing to read outside the model folder") -> InputError:
        return InputError(f"model {label!r}: index {index_path.name} names shard {rel!r}, {why}; {rule}")

    if not isinstance(rel, str) or not rel:
        raise refuse("which is not a file name")
    if os.path.isabs(rel):
        raise refuse("an absolute path")
    folder = os.path.abspath(index_path.parent)  # normalised, symlinks not followed
    joined = os.path.abspath(os.path.join(folder, rel))
    if os.path.commonpath([folder, joined]) != folder or joined == folder:
        raise refuse("a path that leaves the model folder")
    if not rel.endswith(suffix):
        raise refuse(f"which is not a {suffix} file", f"a *{suffix}.index.json index lists only {suffix} shards")
    return Path(joined).resolve()


def read_header(file: Path, label: str) -> tuple[dict[str, TensorInfo], dict[str, tuple[int, int]], bytes]:
    """Parse and check a safetensors header ourselves: dtypes, shapes, contiguous offsets, file length.
    Returns each tensor's info, its (absolute byte offset, byte count) and the raw header."""

    def corrupt(why: str) -> InputError:
        return InputError(f"model {label!r}: {file} is not a valid safetensors file ({why})")

    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise corrupt("file shorter than its 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, 100_000_000):
            raise corrupt(f"header length {n} exceeds the file")
        raw = fh.read(n)
    try:
        table = json.loads(raw, object_pairs_hook=refuse_duplicate_keys)
    except DuplicateKeyError as exc:
        raise corrupt(f"header names a tensor twice: {exc}") from None
    except ValueError as exc:
        raise corrupt(f"header is not JSON: {exc}") from None
    if not isinstance(table, dict):
        raise corrupt("header is not a JSON object")
    table.pop("__metadata__", None)
    data_start = 8 + n
    entries: dict[str, TensorInfo] = {}
    layout: dict[str, tuple[int, int]] = {}
    spans = []
    for name, meta in table.items():
        try:
            code, shape, (begin, end) = meta["dtype"], tuple(int(x) for x in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"bad entry for tensor {name!r}") from None
        if code not in SAFETENSORS_TO_TORCH:
            raise InputError(f"model {label!r}: tensor {name!r} has unsupported dtype {code}")
        info = TensorInfo(shape, SAFETENSORS_TO_TORCH[code])
        if end - begin != info.nbytes or begin < 0:
            raise corrupt(f"tensor {name!r} spans {end - begin} bytes, its shape needs {info.nbytes}")
        entries[name] = info
        spans.append((begin, end, name))
        layout[name] = (data_start + begin, info.nbytes)
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise corrupt(f"tensor {name!r} data does not follow the previous tensor (gap or overlap)")
        pos = end
    if data_start + pos > size:
        raise corrupt(f"truncated: header promises {data_start + pos} bytes, file has {size}")
    return entries, layout, raw
