"""``deltawise apply DELTA --base BASE -o OUT [--scale s]``: write ``BASE + s · DELTA`` as a model.

Streams tensor by tensor in row chunks through a ``DeltaReader`` (bounded memory: one tensor's
dense delta plus a chunk), writes sharded safetensors through the same atomic writer as merge,
and copies config/tokenizer files from BASE (the config with the labels of a classification head the delta
adds: ``delta/labels.py``). ``scale = -1`` removes a delta (task negation).
A TALL folder needs ``task``. With ``original_base`` (the model the delta was extracted from)
the per-tensor drift between it and BASE is reported (see ``transfer.py``).
Every chunk is screened for NaN/inf as merge screens its output: the error names the tensor and
whether the base, the delta or ``s · delta`` (too large for the dtype) is to blame.

``apply_to_model`` does the same to a model already in memory (a transformers ``nn.Module``):
each tensor the delta names becomes ``p + s · τ`` in place (``full`` entries: ``value`` at s = 1).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from deltawise.architecture import architecture_for
from deltawise.delta.labels import added_head_rows, head_labels, with_labels
from deltawise.delta.reader import DeltaReader
from deltawise.delta.report import DeltaResult, Progress, TensorRow, tick
from deltawise.delta.source import open_delta
from deltawise.delta.transfer import check_transfer, drift_report, summarize_drift
from deltawise.errors import DeltawiseError, InputError
from deltawise.io.finite import all_finite, require_finite
from deltawise.io.layout import CHUNK_ELEMENTS, SHARD_BYTES, natural_key
from deltawise.io.output import check_output_folder, staged_output
from deltawise.io.reader import ModelReader
from deltawise.io.resolve import resolve_model
from deltawise.io.writer import OutputTensor, StreamingShardWriter, plan_shards, row_ranges, write_json_atomic
from deltawise.io.files import OTHER_FILES, TOKENIZER_FILES, copy_present

MANIFEST = "deltawise_apply.json"


def apply_delta(
    delta: str, base: str, out: Path, *, scale: float = 1.0, task: Optional[str] = None,
    original_base: Optional[str] = None, overwrite: bool = False, shard_size: int = SHARD_BYTES,
    progress: Optional[Progress] = None,
) -> DeltaResult:
    out = Path(out)
    if not math.isfinite(scale):
        raise DeltawiseError(f"--scale must be a finite number, got {scale}")
    base_reader = ModelReader(resolve_model(base), label=base)
    source = open_delta(resolve_model(delta), task=task, base_reader=base_reader)
    warnings = check_transfer(source, base_reader, base, hint=original_base is None)
    inputs = [(base, f) for f in base_reader.input_folders()] + [(delta, source.folder)]
    drift, original_reader = [], None
    if original_base is not None:
        original_reader = ModelReader(resolve_model(original_base), label=original_base)
        inputs += [(original_base, f) for f in original_reader.input_folders()]
        drift, more = drift_report(source, base_reader, original_reader)
        warnings += more
    check_output_folder(out, inputs, overwrite, base_reader.total_bytes())
    reader = DeltaReader(source, base_reader, scale=scale, label=delta)
    names = sorted(reader.keys(), key=natural_key)
    shard_plan = plan_shards([OutputTensor(n, reader.info(n).shape, reader.info(n).dtype) for n in names], shard_size)
    rows = [TensorRow(n, source.kind(n), reader.info(reader.stored_name(n)).nbytes, 0) for n in source.names()]
    with staged_output(out, overwrite) as staging:
        writer = StreamingShardWriter(staging, shard_plan)
        try:
            done, total = 0, reader.total_bytes()
            for name in names:
                for start, stop in row_ranges(reader.info(name).shape, CHUNK_ELEMENTS):
                    rows_out = reader.get_rows(name, start, stop)
                    if not all_finite(rows_out):
                        raise nonfinite_error(reader, name, start, stop)
                    writer.write(name, rows_out, row_start=start)
                done += reader.info(name).nbytes
                tick(progress, "applying", done, total)
            writer.finish_empty_shards()
        except BaseException:
            writer.abort()
            raise
        if len(shard_plan.shards) > 1:
            write_json_atomic(staging / "model.safetensors.index.json", shard_plan.index())
        copy_present(base_reader.folder, staging, ("config.json", *TOKENIZER_FILES, *OTHER_FILES))
        head_rows = added_head_rows(reader.added, architecture_for(base_reader.config))
        if head_rows is not None and base_reader.config is not None:  # a classifier: its labels, as eval reads them
            write_json_atomic(staging / "config.json", with_labels(base_reader.config, head_labels(source.folder, head_rows)))
        manifest = {
            "delta": {"ref": delta, "fingerprint": source.fingerprint(), "method": source.header.get("method"), "task": task},
            "base": {"ref": base, "fingerprint": base_reader.fingerprint()},
            "scale": scale, "warnings": warnings,
            "drift": [vars(r) for r in drift],
        }
        write_json_atomic(staging / MANIFEST, manifest)
    summary = {"scale": scale, "changed_tensors": len(rows), **({"drift": summarize_drift(drift)} if original_reader else {})}
    return DeltaResult(out, rows, warnings, summary, drift)


def nonfinite_error(reader: DeltaReader, name: str, start: int, stop: int) -> DeltawiseError:
    """The error for rows ``start:stop`` of ``name`` that came out NaN/inf: the base's, the delta's, or
    finite inputs whose scaled sum does not fit the dtype."""
    if name in reader.base:
        base_rows = reader.base.get_rows(name, start, stop) if reader.base.info(name).shape else reader.base.get(name)
        require_finite(base_rows, reader.base.label, name)
    if name in reader.added:
        require_finite(reader.get_rows(name, start, stop), reader.label, name)
    else:
        delta = reader.tensor_delta(name)
        if not all_finite(delta.materialize(delta.natural_dtype)):
            return InputError(f"delta {reader.label!r}: tensor {name!r} contains NaN or infinite values")
    dtype = str(reader.info(name).dtype).replace("torch.", "")
    return DeltawiseError(f"base + {reader.scale:g} x delta is NaN/inf for tensor {name!r} (too large for {dtype}); "
                          "use a smaller --scale")


@torch.no_grad()
def apply_to_model(model: torch.nn.Module, delta: Path, *, scale: float = 1.0, task: Optional[str] = None) -> torch.nn.Module:
    """Add the delta folder (or PEFT LoRA adapter) ``delta`` to ``model``'s tensors in place, in
    float32 (float64 for float64 data), each cast back to its dtype; return the model."""
    source = open_delta(Path(delta), task=task)
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters(remove_duplicate=False))}
    missing = [n for n in source.names() if n not in tensors]
    if missing:
        raise InputError(f"delta {delta} changes tensors the model does not have: {', '.join(missing[:5])}")
    done: set[int] = set()
    for name in source.names():
        t = tensors[name]
        if id(t) in done:  # a tied head is the embedding's parameter: the delta names it twice, it changes once
            continue
        done.add(id(t))
        t.copy_(source.get(name).apply(t.detach().cpu(), scale))
    return model
