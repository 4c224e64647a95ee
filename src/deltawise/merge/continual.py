"""Continual merging: models arrive one call at a time and are folded into a state on disk.

A continual method (``opcm``, ``continual_task_arithmetic``, ``continual_average``) runs through
``deltawise merge`` like any other: ``base_model``, the newly arrived model(s) under ``models``
and ``state: FOLDER`` among the parameters. Each call folds the new models into the state, in
the order listed, then writes the current merged model to OUTPUT with the normal engine.

The state folder holds ``state.json`` (method, parameters, base fingerprint, step count and
the method's scalars: OPCM's lambda_prev and task-vector norms, and the fingerprints of the
folded models) and one model folder ``merged-NNNNNN`` with the merged weights of the merged
tensors, stored in the compute dtype (float32, float64 for float64 inputs) so that rounding to
bf16 does not accumulate over steps. Its size does not grow with the number of models.

Updates are atomic: step n writes ``merged-n`` completely (shards fsynced), then replaces
``state.json`` in one rename, then deletes ``merged-(n-1)``. A crash at any point leaves a
``state.json`` that names a complete folder; stray folders are removed on the next call.
Rerunning a call whose models were already folded (e.g. after an interrupted output write)
skips them, so it neither double-counts nor fails. One process per state folder at a time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch

from deltawise.errors import RecipeError
from deltawise.io.layout import CHUNK_ELEMENTS, SHARD_BYTES
from deltawise.io.reader import ModelReader
from deltawise.io.writer import OutputTensor, StreamingShardWriter, plan_shards, row_ranges, write_json_atomic
from deltawise.merge.base import MergeMethod, TensorJob
from deltawise.merge.params import Param

if TYPE_CHECKING:
    from deltawise.merge.plan import InputModel, MergePlan, TensorPlan

STATE_FILE = "state.json"
FORMAT = 1
STATE = Param("state", str, help="folder holding the continual-merging state (created on the first call)")
_MERGED_DIR = re.compile(r"^merged-(\d{6})$")


@dataclass
class ContinualState:
    method: str
    params: dict[str, Any]
    base: str  # fingerprint of the base model
    dtype: str  # storage dtype of the merged weights
    count: int = 0
    merged: Optional[str] = None  # folder name of the current merged weights
    folded: list[str] = field(default_factory=list)  # fingerprints of the folded models, in order
    scalars: dict[str, Any] = field(default_factory=dict)  # method-specific (OPCM: lambda_prev, norms)


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


class StepIO:
    """Reading and writing the tensors of one fold step: base, current merged, the new model,
    and the next merged weights (a fresh folder)."""

    def __init__(self, plan: "MergePlan", folder: Path, state: ContinualState, model: "InputModel", index: int):
        self.plan = plan
        self.dtype = _dtype(state.dtype)
        self.model, self.index = model, index
        self.current = ModelReader(folder / state.merged) if state.merged else None
        self.device = torch.device("cpu")

    def rows(self, t: "TensorPlan") -> list[tuple[int, int]]:
        return row_ranges(t.out.shape, CHUNK_ELEMENTS)

    def _load(self, reader, name: str, start: int, stop: int) -> torch.Tensor:
        raw = reader.get_rows(name, start, stop) if reader.info(name).shape else reader.get(name)
        return raw.to(device=self.device, dtype=self.dtype)

    def base(self, t: "TensorPlan", start: int, stop: int) -> torch.Tensor:
        return self._load(self.plan.base.reader, t.base_source, start, stop)

    def new(self, t: "TensorPlan", start: int, stop: int) -> torch.Tensor:
        return self._load(self.model.reader, t.sources[self.index], start, stop)

    def merged(self, t: "TensorPlan", start: int, stop: int) -> torch.Tensor:
        return self._load(self.current, t.name, start, stop)

    def writer(self, folder: Path) -> StreamingShardWriter:
        folder.mkdir(parents=True, exist_ok=True)
        tensors = [OutputTensor(t.name, t.out.shape, self.dtype) for t in self.plan.merged]
        return StreamingShardWriter(folder, plan_shards(tensors, SHARD_BYTES))

    def close(self) -> None:
        if self.current is not None:
            self.current.close()


def fold_elementwise(io: StepIO, state: ContinualState, target: Path, update) -> None:
    """Write ``update(previous merged or None, base, new)`` chunk by chunk for every tensor."""
    writer = io.writer(target)
    for t in io.plan.merged:
        for a, b in io.rows(t):
            previous = io.merged(t, a, b) if state.merged else None
            writer.write(t.name, update(previous, io.base(t, a, b), io.new(t, a, b)).to("cpu"), row_start=a)
    writer.finish_empty_shards()


def write_tensor(writer: StreamingShardWriter, t: "TensorPlan", chunks: Iterator[tuple[int, torch.Tensor]]) -> None:
    for start, value in chunks:
        writer.write(t.name, value.to("cpu"), row_start=start)


class ContinualMethod(MergeMethod):
    """A method whose output is the state's merged weights after folding the new models."""

    base_policy = "required"

    # --- what a concrete method provides ------------------------------------------------------
    def fold(self, io: StepIO, state: ContinualState, target: Path) -> dict[str, Any]:
        """Write the merged weights after folding ``io.model`` into ``target`` (a model folder)
        and return the new method scalars. ``state.count`` models were folded before."""
        raise NotImplementedError

    # --- shared machinery ---------------------------------------------------------------------
    def _settings(self, plan: "MergePlan") -> dict[str, Any]:
        return {k: v for k, v in plan.merged[0].params.items() if k != "state"} if plan.merged else {}

    def check(self, plan: "MergePlan") -> list[str]:
        if not plan.merged:
            return [f"{self.name}: the recipe merges no tensor"]
        first = plan.merged[0].params
        for t in plan.merged:
            if t.params != first:
                return [f"{self.name}: parameters must be the same for every tensor ({t.name} differs)"]
        folder = self._folder(plan)
        try:
            state = self._load(folder)
        except RecipeError as exc:
            return [str(exc)]
        if state is None:
            return []
        problems = self._compatible(plan, folder, state)
        skip = _already_folded(plan, state)
        if skip and not problems:  # said here so that the CLI shows it with the other warnings
            plan.warnings.append(f"{skip} model(s) were already folded into {folder}; only the models after them are added")
        return problems

    def _folder(self, plan: "MergePlan") -> Path:
        return Path(plan.merged[0].params["state"]).expanduser()

    def _load(self, folder: Path) -> Optional[ContinualState]:
        path = folder / STATE_FILE
        if not path.exists():
            if folder.exists() and any(p for p in folder.iterdir() if not _MERGED_DIR.match(p.name)):
                raise RecipeError(f"state folder {folder} is not empty and has no {STATE_FILE}; use a new folder")
            return None
        try:
            data = json.loads(path.read_text())
            if data.pop("format") != FORMAT:
                raise ValueError("unknown format")
            return ContinualState(**data)
        except (ValueError, TypeError, KeyError) as exc:
            raise RecipeError(f"{path} is not a deltawise continual-merging state ({exc})") from None

    def _compatible(self, plan: "MergePlan", folder: Path, state: ContinualState) -> list[str]:
        problems = []
        if state.method != self.name:
            problems.append(f"state {folder} was built by {state.method}, not {self.name}")
        if state.params != self._settings(plan):
            problems.append(f"state {folder} was built with parameters {state.params}; this recipe has {self._settings(plan)}")
        if state.base != plan.base.reader.fingerprint():
            problems.append(f"state {folder} was built on another base model than {plan.base.ref}")
        if state.merged is not None:
            reader = ModelReader(folder / state.merged)
            have = {n: reader.info(n).shape for n in reader.keys()}
            want = {t.name: t.out.shape for t in plan.merged}
            reader.close()
            if have != want:
                problems.append(f"state {folder} holds other tensors than this recipe merges (was 'exclude' changed?)")
        return problems

    def locked_folders(self, plan: "MergePlan") -> list[Path]:
        """One process per state folder: the merge engine holds its lock while this call folds and writes."""
        return [self._folder(plan)]

    def prepare(self, plan: "MergePlan", out: Path, device: torch.device) -> Optional[str]:
        folder = self._folder(plan)
        real_out, real_state = Path(os.path.realpath(out)), Path(os.path.realpath(folder))
        if real_out == real_state or real_state in real_out.parents or real_out in real_state.parents:
            raise RecipeError(f"the output {out} and the state folder {folder} must not contain each other")
        state = self._load(folder)
        if state is None:
            compute = (torch.float64 if any(m.reader.info(s).dtype == torch.float64
                                            for t in plan.merged for m, s in zip(plan.inputs, t.sources))
                       else torch.float32)
            state = ContinualState(self.name, self._settings(plan), plan.base.reader.fingerprint(),
                                   str(compute).removeprefix("torch."))
            folder.mkdir(parents=True, exist_ok=True)
        else:
            problems = self._compatible(plan, folder, state)
            if problems:
                raise RecipeError("\n".join(problems))
        _remove_strays(folder, state)
        fingerprints = [m.reader.fingerprint() for m in plan.inputs]
        skip = _already_folded(plan, state)
        for i, fp in enumerate(fingerprints[skip:], start=skip):
            if fp in state.folded or fp in fingerprints[skip:i]:
                raise RecipeError(f"{plan.inputs[i].ref} was already folded into the state {folder}; a model is added once")
        for i in range(skip, len(plan.inputs)):
            state = self._step(plan, folder, state, i, device)
        self._reader = ModelReader(folder / state.merged)
        return f"{os.path.realpath(folder)}|{state.count}|{state.merged}|{'|'.join(state.folded)}"

    def _step(self, plan: "MergePlan", folder: Path, state: ContinualState, index: int, device: torch.device) -> ContinualState:
        target_name = f"merged-{state.count + 1:06d}"
        target = folder / target_name
        shutil.rmtree(target, ignore_errors=True)
        io = StepIO(plan, folder, state, plan.inputs[index], index)
        io.device = device
        try:
            scalars = self.fold(io, state, target)
        finally:
            io.close()
        previous = state.merged
        new = ContinualState(
            state.method, state.params, state.base, state.dtype, state.count + 1, target_name,
            state.folded + [plan.inputs[index].reader.fingerprint()], scalars,
        )
        _fsync_dir(target)
        write_json_atomic(folder / STATE_FILE, {"format": FORMAT, **asdict(new)})  # the commit point
        _fsync_dir(folder)
        if previous:
            shutil.rmtree(folder / previous, ignore_errors=True)
        return new

    def merge(self, job: TensorJob) -> torch.Tensor:
        """The output is the state's merged weights (rows of this chunk)."""
        like = job.models[0]
        if like.dim() == 0:
            value = self._reader.get(job.name)
        else:
            value = self._reader.get_rows(job.name, job.row_start, job.row_start + like.shape[0])
        return value.to(device=like.device, dtype=like.dtype)


def _already_folded(plan: "MergePlan", state: ContinualState) -> int:
    """How many of the call's first models are already in the state (skipped, not added twice)."""
    skip = 0
    while skip < len(plan.inputs) and plan.inputs[skip].reader.fingerprint() in state.folded:
        skip += 1
    return skip


def _remove_strays(folder: Path, state: ContinualState) -> None:
    """Folders of interrupted steps (not named by state.json) and partial files."""
    for p in folder.iterdir():
        if _MERGED_DIR.match(p.name) and p.name != state.merged:
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".") and p.name.endswith(".partial"):
            p.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
