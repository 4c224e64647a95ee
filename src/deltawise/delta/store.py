"""The delta folder format: ``delta.json`` + ``delta-NNNNN.safetensors`` shards.

``delta.json`` records what the delta is relative to (the base's reference, fingerprint and
config), how it was made (method and parameters), and for every tensor its kind, shape, the
base dtype and the type's small metadata. Each tensor's fields are safetensors entries named
``"<tensor>::<field>"``; the shards also carry the header (without the tensor table) in their
safetensors ``__metadata__``, so a lone shard still says where it came from.

Writing streams: tensors are buffered until a shard is full (``shard_bytes``), then written;
the folder is built in a staging folder and renamed into place when complete — or, with
``staged=False``, written straight into a folder that the caller builds and moves into place
itself (``deltawise train`` writes the delta next to the tokenizer and its logs that way).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from deltawise.delta.base import KINDS, TensorDelta
from deltawise.delta.tall import TallDelta
from deltawise.errors import InputError
from deltawise.io.dtypes import SAFETENSORS_TO_TORCH, TORCH_TO_SAFETENSORS
from deltawise.io.output import check_output_folder, output_lock, prepare_staging, swap_into_place
from deltawise.io.reader import ModelReader
from deltawise.io.writer import write_json_atomic

FORMAT = "deltawise-delta"
VERSION = 1
HEADER_FILE = "delta.json"
SEP = "::"


def is_delta_folder(path: Path) -> bool:
    return path.is_dir() and (path / HEADER_FILE).is_file()


def base_identity(reader: ModelReader) -> dict[str, Any]:
    """What a delta records about its base: enough to find it again and to check a new base."""
    folder = reader.folder.resolve()
    return {"ref": str(folder), "label": reader.label, "fingerprint": reader.fingerprint(), "config": reader.config}


class DeltaWriter:
    """Streams ``TensorDelta``s into a new delta folder; use as a context manager.

    ``staged=False``: ``out`` is a folder the caller is building (its own staging folder, made
    if missing); the files go straight into it, nothing is checked, swapped or removed here.
    """

    def __init__(self, out: Path, header: dict[str, Any], inputs: list[tuple[str, Path]], *,
                 overwrite: bool = False, shard_bytes: int = 1 << 30, staged: bool = True):
        self.out = Path(out)
        self.staged = staged
        self._lock = ExitStack()  # a staged output is locked (output_lock) until finish or abort
        if staged:
            check_output_folder(self.out, inputs, overwrite)
            self._lock.enter_context(output_lock(self.out))
            try:
                check_output_folder(self.out, inputs, overwrite)  # again under the lock: another run may have finished
                self.staging = prepare_staging(self.out)
            except BaseException:
                self._lock.close()
                raise
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            self.staging = self.out
        self.header = {"format": FORMAT, "version": VERSION, **header}
        self.shard_bytes = shard_bytes
        self.tensors: dict[str, dict[str, Any]] = {}
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0
        self._shards = 0
        self.bytes_written = 0

    def add(self, name: str, delta: TensorDelta, base_dtype: torch.dtype) -> None:
        if name in self.tensors:
            raise ValueError(f"tensor {name!r} added twice")
        tensors, meta = delta.fields()
        self.tensors[name] = {"kind": delta.kind, "shape": list(delta.shape), "dtype": TORCH_TO_SAFETENSORS[base_dtype], **meta}
        for field_name, t in tensors.items():
            t = t.detach().to("cpu").contiguous()
            self._buffer[f"{name}{SEP}{field_name}"] = t
            self._buffered += t.numel() * t.element_size()
        if self._buffered >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        self._shards += 1
        meta = {"format": "pt", FORMAT: json.dumps({k: v for k, v in self.header.items() if k != "report"}, default=str)}
        save_file(self._buffer, self.staging / f"delta-{self._shards:05d}.safetensors", metadata=meta)
        self.bytes_written += self._buffered
        self._buffer, self._buffered = {}, 0

    def finish(self, **extra: Any) -> Path:
        self._flush()
        write_json_atomic(self.staging / HEADER_FILE, {**self.header, **extra, "tensors": self.tensors})
        if self.staged:
            swap_into_place(self.staging, self.out)
        self._lock.close()
        return self.out

    def abort(self) -> None:
        if self.staged:  # unstaged, the folder is the caller's to remove
            shutil.rmtree(self.staging, ignore_errors=True)
        self._lock.close()

    def __enter__(self) -> "DeltaWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class DeltaFile:
    """Read-only view of a delta folder; ``get(name)`` reads one tensor's delta.

    For a TALL folder ``task`` (a name or an index) picks the task each ``get`` returns.
    """

    def __init__(self, folder: Path, task: Optional[str] = None):
        self.folder = Path(folder)
        try:
            self.header = json.loads((self.folder / HEADER_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"delta {self.folder}: cannot read {HEADER_FILE} ({exc})") from None
        if self.header.get("format") != FORMAT:
            raise InputError(f"delta {self.folder}: {HEADER_FILE} is not a deltawise delta header")
        self.entries: dict[str, dict[str, Any]] = self.header.get("tensors", {})
        unknown = sorted({e.get("kind") for e in self.entries.values()} - set(KINDS))
        if unknown:
            raise InputError(f"delta {self.folder}: unknown delta kind(s) {unknown}; is deltawise older than the file?")
        self.reader = ModelReader(self.folder, label=str(self.folder)) if self.entries else None
        self.fields: dict[str, list[str]] = {}
        for key in self.reader.keys() if self.reader else []:
            name, _, field_name = key.rpartition(SEP)
            self.fields.setdefault(name, []).append(field_name)
        missing = [n for n in self.entries if n not in self.fields]
        if missing:
            raise InputError(f"delta {self.folder}: no data for {len(missing)} tensor(s), e.g. {missing[0]!r}")
        self.tasks: list[str] = list(self.header.get("tasks", []))
        self.task_index = self._task_index(task)

    def _task_index(self, task: Optional[str]) -> Optional[int]:
        if not self.tasks:
            if task is not None:
                raise InputError(f"delta {self.folder} holds one delta, not several tasks; drop --task")
            return None
        if task is None:
            raise InputError(f"delta {self.folder} holds {len(self.tasks)} tasks ({', '.join(self.tasks)}); "
                             "choose one with --task")
        if task in self.tasks:
            return self.tasks.index(task)
        if task.isdigit() and int(task) < len(self.tasks):
            return int(task)
        raise InputError(f"delta {self.folder} has no task {task!r}; it has {', '.join(self.tasks)}")

    # ------------------------------------------------------------ the DeltaSource interface
    @property
    def base(self) -> dict[str, Any]:
        return self.header.get("base", {})

    @property
    def files(self) -> list[Path]:
        return [self.folder / HEADER_FILE] + (list(self.reader.files) if self.reader else [])

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def kind(self, name: str) -> str:
        kind = self.entries[name]["kind"]
        return "masked" if kind == "tall" and self.task_index is not None else kind

    def base_dtype(self, name: str) -> torch.dtype:
        return SAFETENSORS_TO_TORCH[self.entries[name]["dtype"]]

    def get(self, name: str) -> TensorDelta:
        entry = self.entries.get(name)
        if entry is None:
            raise InputError(f"delta {self.folder} has no tensor {name!r}")
        tensors = {f: self.reader.get(f"{name}{SEP}{f}") for f in self.fields[name]}
        delta = KINDS[entry["kind"]].from_fields(tuple(entry["shape"]), tensors, entry)
        if isinstance(delta, TallDelta) and self.task_index is not None:
            return delta.select(self.task_index)
        return delta

    def stored_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def fingerprint(self) -> str:
        h = hashlib.sha256((self.folder / HEADER_FILE).read_bytes())
        if self.reader:
            h.update(self.reader.fingerprint().encode())
        h.update(str(self.task_index).encode())
        return h.hexdigest()
