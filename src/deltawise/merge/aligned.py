"""An input model seen through the output vocabulary: its token embedding and LM head with one row
per output token (``deltawise.merge.vocabulary`` decides which), every other tensor as stored.

The engine reads these like any model: row chunks. A chunk's rows are gathered from runs of
consecutive input rows; rows a model lacks come from the shared default rows (computed once per
tensor from the other models' rows, only those rows); padding rows are the model's mean aligned row
(one streaming pass). Memory stays a few chunks plus the default rows.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

import numpy as np
import torch

from deltawise.architecture import architecture_for
from deltawise.io.layout import CHUNK_ELEMENTS
from deltawise.io.safetensors_files import TensorInfo
from deltawise.errors import InputError, RecipeError, bullet_list
from deltawise.merge.recipe import Recipe
from deltawise.merge.vocabulary import Vocabulary, build_vocabulary, chat_template, tokenizer_settings


class VocabularyRows:
    """What every aligned model shares: the vocabulary and the readers, for the default rows."""

    def __init__(self, vocabulary: Vocabulary, readers: dict[str, Any]):
        self.vocabulary = vocabulary
        self.readers = readers  # ref -> the reader as stored
        self._defaults: dict[str, dict[int, torch.Tensor]] = {}
        self._means: dict[tuple[str, str], torch.Tensor] = {}
        self._lock = threading.Lock()
        self._vocabulary_tensors: dict[tuple[str, str], bool] = {}

    def is_vocabulary(self, ref: str, name: str) -> bool:
        key = (ref, name)
        found = self._vocabulary_tensors.get(key)
        if found is None:
            reader = self.readers[ref]
            found = name in reader and bool(reader.info(name).shape) and architecture_for(reader.config).is_vocabulary(name)
            self._vocabulary_tensors[key] = found
        return found

    def _tensor_of(self, ref: str, name: str) -> Optional[str]:
        """``name`` in model ``ref``, or the tensor it is tied to there."""
        reader = self.readers[ref]
        if name in reader:
            return name
        return architecture_for(reader.config).tied_alias(name, reader)

    def _row(self, ref: str, name: str, row: int) -> torch.Tensor:
        stored = self._tensor_of(ref, name)
        reader = self.readers[ref]
        if stored is None or not 0 <= row < reader.info(stored).shape[0]:
            raise InputError(f"{ref} has no row {row} of {name} (a token's embedding source)")
        return reader.get_rows(stored, row, row + 1)[0].to(torch.float32)

    def defaults(self, name: str, like: TensorInfo) -> dict[int, torch.Tensor]:
        """Output row -> the row of a token some model lacks (or a forced one), for tensor ``name``."""
        with self._lock:
            if name not in self._defaults:
                rows = {}
                for i, rule in self.vocabulary.defaults.items():
                    if rule[0] == "zero":
                        rows[i] = torch.zeros(like.shape[1:], dtype=torch.float32)
                    elif rule[0] == "model":
                        rows[i] = self._row(rule[1], name, rule[2])
                    else:
                        rows[i] = torch.stack([self._row(ref, name, r) for ref, r in rule[1]]).mean(dim=0)
                self._defaults[name] = rows
            return self._defaults[name]

    def own_mean(self, ref: str, name: str) -> torch.Tensor:
        """The mean of model ``ref``'s own rows of ``name`` (its vocabulary, as stored)."""
        key = ("own", ref + "\0" + name)
        with self._lock:
            if key not in self._means:
                reader, stored = self.readers[ref], self._tensor_of(ref, name)
                info = reader.info(stored)
                used = min(int((reader.config or {}).get("vocab_size") or info.shape[0]), info.shape[0])
                self._means[key] = _mean_rows(lambda a, b: reader.get_rows(stored, a, b), used, info)
            return self._means[key]

    def aligned_mean(self, model: "AlignedReader", name: str) -> torch.Tensor:
        """The mean of a model's aligned rows over the vocabulary (the padding rows, as mergekit fills them)."""
        key = (model.ref, name)
        with self._lock:
            cached = self._means.get(key)
        if cached is None:
            info = model.info(name)
            cached = _mean_rows(lambda a, b: model.aligned_rows(name, a, b), self.vocabulary.size, info)
            with self._lock:
                self._means[key] = cached
        return cached


def _mean_rows(read, rows: int, info: TensorInfo) -> torch.Tensor:
    per_chunk = max(1, CHUNK_ELEMENTS // max(1, int(np.prod(info.shape[1:]))))
    total = torch.zeros(info.shape[1:], dtype=torch.float64)
    for a in range(0, rows, per_chunk):
        total += read(a, min(rows, a + per_chunk)).to(torch.float64).sum(dim=0)
    return (total / rows).to(torch.float32)


class AlignedReader:
    """A model reader whose vocabulary tensors have the output vocabulary's rows."""

    def __init__(self, raw: Any, ref: str, shared: VocabularyRows):
        self.raw, self.ref, self.shared = raw, ref, shared
        self.positions = shared.vocabulary.positions[ref]

    def __getattr__(self, attr: str) -> Any:  # config, folder, label, fingerprint, ...: the model's own
        return getattr(self.raw, attr)

    def __contains__(self, name: str) -> bool:
        return name in self.raw

    def __iter__(self):
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)

    def keys(self) -> list[str]:
        return self.raw.keys()

    def info(self, name: str) -> TensorInfo:
        info = self.raw.info(name)
        if not self.shared.is_vocabulary(self.ref, name):
            return info
        return TensorInfo((self.shared.vocabulary.rows, *info.shape[1:]), info.dtype)

    def get(self, name: str) -> torch.Tensor:
        return self.get_rows(name, 0, self.info(name).shape[0] if self.info(name).shape else 1)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.read_rows_into(name, start, stop, None)

    def read_rows_into(self, name: str, start: int, stop: int, buffer: Optional[torch.Tensor]) -> torch.Tensor:
        if not self.shared.is_vocabulary(self.ref, name):
            return self.raw.read_rows_into(name, start, stop, buffer)
        info = self.info(name)
        start, stop = max(0, min(start, info.shape[0])), max(0, min(stop, info.shape[0]))
        stop = max(start, stop)
        shape = (stop - start, *info.shape[1:])
        numel = int(np.prod(shape))
        if buffer is not None and buffer.dtype == info.dtype and buffer.is_contiguous() and buffer.numel() >= numel:
            out = buffer.reshape(-1)[:numel].view(shape)
        else:
            out = torch.empty(shape, dtype=info.dtype)
        size = self.shared.vocabulary.size
        if start < size:
            out[: min(stop, size) - start] = self.aligned_rows(name, start, min(stop, size))
        if stop > size:
            out[max(0, size - start):] = self.shared.aligned_mean(self, name).to(info.dtype)
        return out

    def aligned_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the vocabulary (stop <= the vocabulary size), in the stored dtype."""
        vocabulary = self.shared.vocabulary
        info = self.raw.info(name)
        out = torch.empty((stop - start, *info.shape[1:]), dtype=info.dtype)
        src = self.positions[start:stop].copy()
        src[src >= info.shape[0]] = -1
        for i in vocabulary.forced:
            if start <= i < stop:
                src[i - start] = -1
        # runs of consecutive input rows, each read at once
        own = np.flatnonzero(src >= 0)
        if own.size:
            breaks = np.flatnonzero((np.diff(own) != 1) | (np.diff(src[own]) != 1)) + 1
            for run in np.split(own, breaks):
                a, b = int(src[run[0]]), int(src[run[-1]]) + 1
                out[int(run[0]): int(run[-1]) + 1] = self.raw.get_rows(name, a, b)
        missing = np.flatnonzero(src < 0)
        if missing.size:
            defaults = self.shared.defaults(name, info)
            mean = None
            for k in missing:
                i = start + int(k)
                if vocabulary.new_rows == "mean" and i not in vocabulary.configured:
                    mean = self.shared.own_mean(self.ref, name) if mean is None else mean
                    out[int(k)] = mean.to(info.dtype)
                else:
                    out[int(k)] = defaults[i].to(info.dtype)
        return out


class AlignedDeltaReader(AlignedReader):
    """An aligned delta or adapter: its exact task vectors serve every tensor but the aligned ones,
    whose task vectors are taken from the aligned rows."""

    def delta_rows(self, name: str, start: int, stop: int) -> Optional[torch.Tensor]:
        if self.shared.is_vocabulary(self.ref, name):
            return None
        return self.raw.delta_rows(name, start, stop)


def aligned_readers(vocabulary: Vocabulary, readers: dict[str, Any]) -> dict[str, Any]:
    """Every reader of ``readers`` (ref -> reader) seen through ``vocabulary``."""
    shared = VocabularyRows(vocabulary, dict(readers))
    return {ref: (AlignedDeltaReader if hasattr(r, "delta_rows") else AlignedReader)(r, ref, shared)
            for ref, r in readers.items()}


def vocabulary_for(recipe: Recipe, readers: dict[str, Any],
                   warnings: list[str]) -> tuple[Optional[Vocabulary], dict[str, Any]]:
    """The recipe's output vocabulary and the readers seen through it, or (None, ``readers``) without
    ``tokenizer_source``/``tokenizer:``. Raises RecipeError for a tokenizer that cannot be built."""
    if tokenizer_settings(recipe) is None:
        if recipe.chat_template:  # checked now, applied to the copied tokenizer
            chat_template(recipe, {})
        return None, readers
    try:
        vocabulary = build_vocabulary(recipe, readers, list(readers), warnings)
    except (InputError, RecipeError) as exc:
        raise RecipeError("the recipe cannot run:\n" + bullet_list([str(exc)])) from None
    return vocabulary, aligned_readers(vocabulary, readers)
