"""``deltawise compress D1 D2 ... --method tall``: T deltas of one base → τ_MTL + T masks.

TALL-mask construction (Wang et al. 2024, arXiv 2405.07813; code nik-dim/tall_masks), TA variant: ``τ_MTL = Σ_t τ_t``;
``m_t = 1[ |τ_t| > λ_t · |τ_MTL − τ_t| ]`` (strict, elementwise); task ``t`` is reconstructed as
``θ0 + m_t ⊙ τ_MTL`` with no extra scaling (``deltawise apply OUT --task t``). ``λ_t`` is chosen
on validation data in the paper (grid 0.2…0.6); here it is given (default 0.4, the middle of
that grid), one value for all tasks or one per task. ``τ_MTL`` is stored densely in float32,
the masks bit-packed, per tensor (the flattening order is the tensor order of ``delta.json``).
"""

from __future__ import annotations

import math

from pathlib import Path
from typing import Optional, Sequence

import torch

from deltawise.delta.compress import open_source
from deltawise.delta.report import DeltaResult, Progress, TensorRow, relative_error, tick
from deltawise.delta.bits import pack_bits
from deltawise.delta.store import DeltaWriter
from deltawise.delta.tall import TallDelta
from deltawise.errors import DeltawiseError
from deltawise.io.finite import require_finite
from deltawise.io.dtypes import element_size

DEFAULT_LAMBDA = 0.4


def tall_masks(taus: list[torch.Tensor], lambdas: Sequence[float]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    mtl = torch.stack(taus).sum(0)
    return mtl, [t.abs() > lam * (mtl - t).abs() for t, lam in zip(taus, lambdas)]


def compress_tall(
    deltas: list[str], out: Path, *, lambdas: Optional[Sequence[float]] = None, names: Optional[Sequence[str]] = None,
    base: Optional[str] = None, overwrite: bool = False, progress: Optional[Progress] = None,
) -> DeltaResult:
    if len(deltas) < 2:
        raise DeltawiseError("TALL masks need at least two deltas of the same base")
    lambdas = list(lambdas or [DEFAULT_LAMBDA])
    if not all(math.isfinite(lam) for lam in lambdas):
        raise DeltawiseError(f"--lam must be finite numbers, got {lambdas}")
    if len(lambdas) == 1:
        lambdas *= len(deltas)
    if len(lambdas) != len(deltas):
        raise DeltawiseError(f"give one --lam for all tasks or one per task ({len(deltas)}), got {len(lambdas)}")
    names = list(names) if names else [Path(d).name for d in deltas]
    if len(names) != len(deltas) or len(set(names)) != len(names):
        raise DeltawiseError(f"task names must be {len(deltas)} distinct names, got {names}")
    sources = [open_source(d, base) for d in deltas]
    prints = {s.base.get("fingerprint") for s in sources} - {None}
    if len(prints) > 1:
        raise DeltawiseError("the deltas were made from different base models; TALL masks need one shared base")
    tensor_names = list(dict.fromkeys(n for s in sources for n in s.names()))
    for n in tensor_names:
        shapes = {tuple(s.shape(n)) for s in sources if n in s.entries}
        if len(shapes) > 1:
            raise DeltawiseError(f"{n} has different shapes in the deltas: {sorted(shapes)}")
    header = {"method": "tall", "parameters": {"lambdas": lambdas, "merge": "sum"}, "tasks": names, "base": sources[0].base,
              "sources": [{"ref": d, "fingerprint": s.fingerprint()} for d, s in zip(deltas, sources)]}
    rows: list[TensorRow] = []
    inputs = [(d, s.folder) for d, s in zip(deltas, sources)]
    with DeltaWriter(Path(out), header, inputs, overwrite=overwrite) as writer:
        for i, name in enumerate(tensor_names, 1):
            shape = next(tuple(s.shape(name)) for s in sources if name in s.entries)
            taus = [s.get(name).materialize(torch.float32) if name in s.entries else torch.zeros(shape) for s in sources]
            for ref, tau in zip(deltas, taus):
                require_finite(tau, ref, name)
            mtl, masks = tall_masks(taus, lambdas)
            delta = TallDelta(mtl, [pack_bits(m) for m in masks])
            base_dtype = next(s.base_dtype(name) for s in sources if name in s.entries)
            errors = {task: relative_error(torch.where(m, mtl, 0.0), t) for task, m, t in zip(names, masks, taus)}
            writer.add(name, delta, base_dtype)
            dense = len(taus) * mtl.numel() * element_size(base_dtype)
            rows.append(TensorRow(name, "tall", dense, delta.nbytes, max(errors.values()), {"errors": errors}))
            tick(progress, "compressing (tall)", i, len(tensor_names))
        writer.finish(report={"tensors": {r.name: r.extra["errors"] for r in rows}})
    return DeltaResult(Path(out), rows, [], {"method": "tall", "tasks": names, "lambdas": lambdas})
