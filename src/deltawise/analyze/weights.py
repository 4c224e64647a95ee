"""``deltawise analyze weights``: one streaming pass over the tensors of a base and its fine-tunes.

Only one tensor per model is in memory at a time (read through ModelReader), so models larger
than memory can be analysed. A delta or PEFT adapter folder reads as its base plus the delta
(``delta.reader.open_model``, as in merge), so a train output is analysed without ``apply``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from deltawise.analyze.intruders import Method, Side, base_singular, intruder_dimensions, is_analysed_matrix
from deltawise.analyze.overlap import mask_overlap, sign_conflict
from deltawise.analyze.results import (
    DeltaNorm, IntruderStats, MaskStats, ModelRef, ModelSummary, SignStats, TensorAnalysis, WeightsAnalysis, WeightsSummary,
)
from deltawise.architecture import TensorRoles, architecture_for
from deltawise.errors import InputError
from deltawise.delta.reader import DeltaReader, open_model
from deltawise.io.reader import ModelReader


@dataclass
class WeightsOptions:
    k: int = 10
    eps: float = 0.5
    side: Side = "left"
    tall_lambda: float = 0.4
    intruders: bool = True
    # "fast": Gram eigendecompositions, top k only for the fine-tunes; "exact": full float64 SVDs (the reference)
    intruder_method: Method = "fast"
    progress: Callable[[int, int], None] | None = None
    delta_base: str | None = None  # the base of a delta or adapter folder given as a model (default: the one it records)


def _open(ref: str, delta_base: str | None = None) -> ModelReader:
    """A checkpoint, or a delta or adapter folder read as its base plus the delta (``delta_base``, else the
    base it records): the one reader of "a model, or base + delta" that merge and eval use too."""
    return open_model(ref, base_ref=delta_base, label=ref)


def _fine_tuned(model: ModelReader, name: str, w0: torch.Tensor, exact: bool) -> torch.Tensor:
    """``name`` of a fine-tuned model; for a delta on the analysed base (``exact``) ``w0 + delta`` in float32
    from the delta's own form, so a bfloat16 base does not round the delta's low bits away."""
    if exact and isinstance(model, DeltaReader):
        delta = model.delta_rows(name, 0, w0.shape[0] if w0.dim() else 1)
        if delta is not None:
            return w0.float() + delta.float()
    return model.get(name)


def _on_base(model: ModelReader, base: ModelReader, label: str, warnings: list[str]) -> bool:
    """Whether the delta ``model`` is added to the analysed base itself; warns when it is added to another model,
    whose difference from the base then counts in the delta analysed."""
    if not isinstance(model, DeltaReader):
        return False
    warnings.extend(model.warnings)
    if model.base.fingerprint() == base.fingerprint():
        return True
    warnings.append(f"{label}: a delta on {model.base.label}, whose weights differ from the analysed base "
                    f"{base.label}: its delta here also holds the difference of the two bases (give --base)")
    return False


def _ref(reader: ModelReader, ref: str) -> ModelRef:
    return ModelRef(name=Path(ref).name or ref, path=str(reader.folder), fingerprint=reader.fingerprint())


def _analysed_names(base: ModelReader, models: list[ModelReader]) -> list[str]:
    problems = []
    names = [n for n in base.keys() if base.info(n).dtype.is_floating_point]
    for m in models:
        for n in names:
            if n not in m:
                problems.append(f"{m.label}: tensor {n!r} missing")
            elif m.info(n).shape != base.info(n).shape:
                problems.append(f"{m.label}: {n!r} has shape {m.info(n).shape}, base {base.info(n).shape}")
    if problems:
        from deltawise.errors import bullet_list

        raise InputError("models do not match the base:\n" + bullet_list(problems))
    return sorted(names)


def _tensor(name: str, w0: torch.Tensor, fts: list[torch.Tensor], labels: list[str], opts: WeightsOptions,
            roles: TensorRoles) -> TensorAnalysis:
    w0 = w0.float()
    deltas = [ft.float() - w0 for ft in fts]
    base_norm = float(torch.linalg.vector_norm(w0))
    norms = [float(torch.linalg.vector_norm(d)) for d in deltas]
    out = TensorAnalysis(
        name=name, shape=list(w0.shape), base_norm=base_norm,
        deltas=[DeltaNorm(model=lab, norm=n, relative=n / base_norm if base_norm else None) for lab, n in zip(labels, norms)],
    )
    if opts.intruders and is_analysed_matrix(name, tuple(w0.shape), roles):
        out.intruders = []
        base_svd = base_singular(w0, opts.side, opts.intruder_method)  # once per tensor, not once per model
        for lab, ft in zip(labels, fts):
            r = intruder_dimensions(w0, ft.float(), k=opts.k, eps=opts.eps, side=opts.side, base_svd=base_svd,
                                    method=opts.intruder_method)
            out.intruders.append(IntruderStats(model=lab, **r.__dict__))
    if len(deltas) >= 2:
        sc = sign_conflict(deltas)
        out.sign_conflict = SignStats(entries=sc.entries, conflicts=sc.conflicts, overlapping=sc.overlapping,
                                      rate=sc.rate, rate_among_overlap=sc.rate_among_overlap)
        mo = mask_overlap(deltas, opts.tall_lambda)
        out.masks = MaskStats(entries=mo.entries, selfish=mo.selfish, catastrophic=mo.catastrophic,
                              selfish_rate=mo.selfish / mo.entries, catastrophic_rate=mo.catastrophic / mo.entries,
                              selected=mo.selected, jaccard=mo.jaccard())
    return out


def _summary(tensors: list[TensorAnalysis], labels: list[str]) -> WeightsSummary:
    base_sq = sum(t.base_norm**2 for t in tensors)
    models = []
    for i, lab in enumerate(labels):
        delta = math.sqrt(sum(t.deltas[i].norm ** 2 for t in tensors))
        searched = [t.intruders[i].count for t in tensors if t.intruders]
        models.append(ModelSummary(model=lab, delta_norm=delta, relative=delta / math.sqrt(base_sq) if base_sq else None,
                                   intruders=sum(searched), matrices=len(searched)))
    summary = WeightsSummary(models=models)
    pairs = [t for t in tensors if t.sign_conflict and t.masks]
    if pairs:
        entries = sum(t.sign_conflict.entries for t in pairs)
        summary.sign_conflict_rate = sum(t.sign_conflict.conflicts for t in pairs) / entries
        summary.selfish_rate = sum(t.masks.selfish for t in pairs) / entries
        summary.catastrophic_rate = sum(t.masks.catastrophic for t in pairs) / entries
    return summary


def analyze_weights(base_ref: str, model_refs: list[str], options: WeightsOptions | None = None) -> WeightsAnalysis:
    opts = options or WeightsOptions()
    if not model_refs:
        raise InputError("give at least one fine-tuned model to compare with the base")
    if opts.k < 1 or not 0 < opts.eps <= 1:
        raise InputError(f"need k >= 1 and 0 < eps <= 1 (got k={opts.k}, eps={opts.eps})")
    base = _open(base_ref, opts.delta_base)
    models = [_open(r, opts.delta_base) for r in model_refs]
    try:
        names = _analysed_names(base, models)
        labels = _unique([Path(r).name or r for r in model_refs])
        warnings: list[str] = []
        exact = [_on_base(m, base, r, warnings) for m, r in zip(models, model_refs)]
        tensors = []
        roles = architecture_for(base.config)
        for i, name in enumerate(names):
            w0 = base.get(name)
            fts = [_fine_tuned(m, name, w0, e) for m, e in zip(models, exact)]
            tensors.append(_tensor(name, w0, fts, labels, opts, roles))
            if opts.progress:
                opts.progress(i + 1, len(names))
        refs = [_ref(m, r) for m, r in zip(models, model_refs)]
        for ref, lab in zip(refs, labels):
            ref.name = lab
        return WeightsAnalysis(
            base=_ref(base, base_ref), models=refs, tensors=tensors, summary=_summary(tensors, labels),
            settings={"k": opts.k, "eps": opts.eps, "side": opts.side, "tall_lambda": opts.tall_lambda,
                      **({"delta_base": opts.delta_base} if opts.delta_base else {}), "warnings": warnings},
        )
    finally:
        for r in [base, *models]:
            r.close()


def _unique(names: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        out.append(n if n not in out else f"{n}-{len(out)}")
    return out
