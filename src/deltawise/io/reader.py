"""Lazy, memory-mapped access to the tensors of a model folder, one tensor at a time.

Supports a single ``model.safetensors``, a sharded folder with ``*.safetensors.index.json``,
a folder of loose ``*.safetensors`` files, or one ``.safetensors`` file. Pickle checkpoints
(``*.bin``/``*.pt``) are refused unless the caller opts in, and are then loaded with
``torch.load(weights_only=True)`` so that no code in them runs.

Hostile folders (docs/safety.md): an index may only name shards inside the model folder, with the
index's own suffix (a shard may be a symlink that points elsewhere, as in the hub cache, but its name
may not); every file is checked to be a regular file before it is opened (a FIFO would block), and a
header that names a tensor twice is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from deltawise.errors import InputError, require_regular_file
from deltawise.io.safetensors_files import TensorInfo, read_header, refuse_duplicate_keys, shard_path

__all__ = ["ModelReader", "TensorInfo", "FileStamp", "PICKLE_SUFFIXES", "pickle_refusal"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class FileStamp:
    """What a file looked like when opened: lets a long job notice inputs changing under it."""

    path: str
    size: int
    mtime_ns: int


def pickle_refusal(path: Path) -> InputError:
    return InputError(
        f"{path} is a pickle checkpoint; loading pickle can run arbitrary code. "
        "Convert it to safetensors (transformers: from_pretrained, then save_pretrained writes safetensors). "
        "Commands with an --allow-pickle option (see their --help; merge and budget have one) can instead load it "
        "with torch.load(weights_only=True); the others, such as eval, extract and apply, do not read pickle checkpoints."
    )


class ModelReader:
    """Read-only view of one model's tensors. Nothing is loaded until ``get`` is called."""

    def __init__(self, location: str | os.PathLike, *, allow_pickle: bool = False, label: str | None = None):
        self.path = Path(location)
        self.label = label or str(location)
        self.allow_pickle = allow_pickle
        self._file_of: dict[str, Path] = {}
        self._info: dict[str, TensorInfo] = {}
        self._layout: dict[str, tuple[int, int]] = {}  # name -> (absolute offset, nbytes)
        self._fds: dict[Path, int] = {}
        self._pickle_cache: dict[Path, dict[str, torch.Tensor]] = {}
        self._headers: dict[Path, bytes] = {}
        self._fingerprint: str | None = None
        if not self.path.exists():
            raise InputError(f"model {self.label!r}: {self.path} does not exist")
        if not self.path.is_dir():
            require_regular_file(self.path, f"model {self.label!r}:")
        self.files = self._discover()
        for file in self.files:
            self._index_file(file)
        if not self._info:
            raise InputError(f"model {self.label!r}: no tensors found in {self.path}")
        self.stamps = [self._stamp(f) for f in self.files]

    # ----------------------------------------------------------------- discovery
    @property
    def folder(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    def input_folders(self) -> list[Path]:
        """Every folder this reader reads from (an output must stay out of all of them)."""
        return [self.folder]

    def _discover(self) -> list[Path]:
        p = self.path
        if p.is_file():
            if p.suffix == ".safetensors":
                return [p]
            if p.suffix in PICKLE_SUFFIXES:
                return self._pickle_files([p])
            raise InputError(f"model {self.label!r}: {p} is neither a .safetensors file nor a model folder")
        indexes = sorted(p.glob("*.safetensors.index.json"))
        if indexes:
            return self._from_index(indexes[0], ".safetensors")
        single = p / "model.safetensors"
        if single.exists():
            return [single]
        loose = sorted(f for f in p.glob("*.safetensors") if not f.name.startswith("."))
        if loose:
            return loose
        bin_index = sorted(p.glob("*.bin.index.json"))
        if bin_index:
            return self._pickle_files(self._from_index(bin_index[0], ".bin"))
        pickles = sorted(f for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES)
        if pickles:
            return self._pickle_files(pickles)
        raise InputError(
            f"model {self.label!r}: no weights in {p} (looked for model.safetensors, "
            "*.safetensors.index.json, *.safetensors)"
        )

    def _pickle_files(self, files: list[Path]) -> list[Path]:
        if not self.allow_pickle:
            raise pickle_refusal(files[0])
        return files

    def _from_index(self, index_path: Path, shard_suffix: str) -> list[Path]:
        require_regular_file(index_path, f"model {self.label!r}: index")
        try:
            index = json.loads(index_path.read_text(), object_pairs_hook=refuse_duplicate_keys)
            weight_map = index["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"model {self.label!r}: cannot read index {index_path}: {exc}") from None
        if not isinstance(weight_map, dict):
            raise InputError(f"model {self.label!r}: index {index_path.name}: weight_map must be an object mapping tensor "
                             f"names to shard files, not a {type(weight_map).__name__}")
        files = []
        for name, rel in weight_map.items():
            f = self._shard_path(index_path, rel, shard_suffix)
            if not f.exists():
                raise InputError(f"model {self.label!r}: index {index_path.name} names missing shard {rel}")
            self._file_of[name] = f
            if f not in files:
                files.append(f)
        return files

    def _shard_path(self, index_path: Path, rel: object, suffix: str) -> Path:
        return shard_path(index_path, rel, suffix, self.label)

    def _index_file(self, file: Path) -> None:
        require_regular_file(file, f"model {self.label!r}:")
        if file.suffix in PICKLE_SUFFIXES:
            state = self._load_pickle(file)
            entries = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in state.items()}
        else:
            entries = self._read_safetensors_header(file)
        missing = [n for n, f in self._file_of.items() if f == file and n not in entries]
        if missing:
            raise InputError(
                f"model {self.label!r}: the index assigns {missing[0]!r}"
                f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''} to {file.name}, which does not contain it"
            )
        for name, info in entries.items():
            owner = self._file_of.get(name)
            if owner is not None and owner != file and name in self._info:
                raise InputError(f"model {self.label!r}: tensor {name!r} appears in both {owner.name} and {file.name}")
            if owner is not None and owner != file:
                continue  # the index assigns this tensor to another shard
            self._file_of[name] = file
            self._info[name] = info

    def _read_safetensors_header(self, file: Path) -> dict[str, TensorInfo]:
        entries, layout, raw = read_header(file, self.label)
        self._layout.update(layout)
        self._headers[file] = raw
        return entries

    def _load_pickle(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._pickle_cache:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise InputError(f"model {self.label!r}: cannot load {file} with weights_only=True ({exc})") from None
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise InputError(f"model {self.label!r}: {file} does not hold a flat state dict of tensors")
            self._pickle_cache[file] = state
        return self._pickle_cache[file]

    @staticmethod
    def _stamp(file: Path) -> FileStamp:
        st = file.stat()
        return FileStamp(str(file), st.st_size, st.st_mtime_ns)

    # ----------------------------------------------------------------- access
    def keys(self) -> list[str]:
        return list(self._info)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def __iter__(self) -> Iterator[str]:
        return iter(self._info)

    def __len__(self) -> int:
        return len(self._info)

    def info(self, name: str) -> TensorInfo:
        return self._info[name]

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor, read into fresh memory (not memory-mapped: see ``get_rows``)."""
        info = self._require(name)
        return self.get_rows(name, 0, info.shape[0] if info.shape else 1)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` along dimension 0, reading only their bytes.

        Tensors are read with ``pread`` into private buffers rather than through mmap, so the
        input pages stay in the page cache and out of this process's resident memory, and
        ``pread`` releases the GIL, letting reader threads overlap with computation.
        """
        return self.read_rows_into(name, start, stop, None)

    def read_rows_into(self, name: str, start: int, stop: int, buffer: torch.Tensor | None) -> torch.Tensor:
        """``get_rows``, reading into the front of ``buffer`` (a contiguous CPU tensor of the
        stored dtype with at least as many entries) when given, so that a caller streaming many
        chunks reuses one allocation instead of faulting in fresh pages for each. Returns the
        rows: a view of ``buffer``, or a new tensor without one (or for pickle inputs)."""
        info = self._require(name)
        if info.shape:  # clamp like slicing, so a range can never reach into another tensor's bytes
            start, stop = max(0, min(start, info.shape[0])), max(0, min(stop, info.shape[0]))
            stop = max(start, stop)
        file = self._file_of[name]
        if file.suffix in PICKLE_SUFFIXES:
            tensor = self._load_pickle(file)[name]
            return tensor if not info.shape else tensor[start:stop].clone()
        offset, nbytes = self._layout[name]
        if info.shape:
            row_bytes = nbytes // info.shape[0] if info.shape[0] else 0
            shape = (stop - start, *info.shape[1:])
            offset, nbytes = offset + start * row_bytes, (stop - start) * row_bytes
        else:
            shape = ()
        numel = nbytes // info.dtype.itemsize if info.dtype.itemsize else 0
        if buffer is not None and buffer.dtype == info.dtype and buffer.is_contiguous() and buffer.numel() >= numel:
            out = buffer.reshape(-1)[:numel].view(shape)
        else:
            out = torch.empty(shape, dtype=info.dtype)
        if nbytes:
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            fd = self._fd(file)
            done = 0
            while done < nbytes:
                n = os.preadv(fd, [view[done:]], offset + done)
                if n <= 0:
                    raise InputError(f"model {self.label!r}: {file} ended while reading tensor {name!r}")
                done += n
        return out

    def _require(self, name: str) -> TensorInfo:
        info = self._info.get(name)
        if info is None:
            raise InputError(f"model {self.label!r} has no tensor {name!r}")
        return info

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:  # file descriptors are the only resource held
        try:
            self.close()
        except Exception:
            pass

    # ----------------------------------------------------------------- metadata
    @property
    def config(self) -> dict | None:
        cfg = self.folder / "config.json"
        if not cfg.exists():
            return None
        require_regular_file(cfg, f"model {self.label!r}:")
        try:
            return json.loads(cfg.read_text())
        except ValueError as exc:
            raise InputError(f"model {self.label!r}: config.json is not valid JSON ({exc})") from None

    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._info.values())

    def fingerprint(self) -> str:
        """See ``compute_fingerprint``; computed once per reader (it identifies the inputs as opened)."""
        if self._fingerprint is None:
            self._fingerprint = self.compute_fingerprint()
        return self._fingerprint

    def compute_fingerprint(self, sample_bytes: int = 4096) -> str:
        """A fast identity of the weights: sha256 over each file's name, size and tensor header
        (names, dtypes, shapes, offsets) and, for every tensor, up to three samples of its data
        (its first, middle and last ``sample_bytes``).

        Fine-tunes of one base share headers but differ in every tensor they changed, which the
        samples catch; a full content hash would cost one more read of all inputs.
        """
        h = hashlib.sha256()
        for file in self.files:
            h.update(file.name.encode())
            h.update(str(file.stat().st_size).encode())
            h.update(self._header_bytes(file))
        for name in sorted(self._info):
            h.update(name.encode())
            h.update(self._sample(name, sample_bytes))
        return h.hexdigest()

    def _sample(self, name: str, size: int) -> bytes:
        file = self._file_of[name]
        if file.suffix in PICKLE_SUFFIXES:
            flat = self._load_pickle(file)[name].reshape(-1).contiguous().view(torch.uint8)
            n = flat.numel()
            return b"".join(bytes(flat[o : o + size].numpy()) for o in sorted({0, max(0, n // 2 - size // 2), max(0, n - size)}))
        offset, nbytes = self._layout[name]
        fd = self._fd(file)
        starts = sorted({0, max(0, nbytes // 2 - size // 2), max(0, nbytes - size)})
        return b"".join(os.pread(fd, min(size, nbytes - s), offset + s) for s in starts)

    def _header_bytes(self, file: Path) -> bytes:
        if file not in self._headers:  # safetensors headers are kept at open; pickles get a description
            desc = sorted((k, str(v.dtype), tuple(v.shape)) for k, v in self._load_pickle(file).items())
            self._headers[file] = repr(desc).encode()
        return self._headers[file]

    def changed_files(self) -> list[str]:
        """Input files whose size or modification time differ from when the reader opened them."""
        return [s.path for s in self.stamps if not os.path.exists(s.path) or self._stamp(Path(s.path)) != s]
