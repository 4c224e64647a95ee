"""Forgetting metrics: what an adapted model gained on its targets and lost on its sources.

Definitions (docs/audit.md has them with examples):
- ratio r: model/base for higher-is-better metrics, base/model for perplexity; r > 1 is better.
- target gain: mean over target datasets of r - 1.
- source retention: mean over source datasets of r (and of the oriented difference).
- forgetting score: 100 * mean over source datasets of max(0, 1 - r): the percentage of source
  performance lost, 0 when nothing was lost.
- negative flips: items the base got right and the model gets wrong.
- backward transfer (BWT): mean over earlier tasks of R[T-1][j] - R[j][j].
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from deltawise.errors import InputError
from deltawise.eval.results import DatasetComparison, DatasetResult, EvalResult, FlipSummary, Forgetting


def flips(base: Mapping[str, float], model: Mapping[str, float], *, negative: bool = True) -> FlipSummary:
    """Negative flips (base right, model wrong) or, with ``negative=False``, positive ones."""
    missing = sorted(set(base) ^ set(model))
    if missing:
        raise InputError(f"per-item results differ in their items (e.g. {missing[:3]}); evaluate both models on the same data")
    was_right = bool(negative)
    ids = sorted((i for i in base if bool(base[i]) == was_right and bool(model[i]) != was_right), key=_natural)
    pool = sum(1 for v in base.values() if bool(v) == was_right)
    return FlipSummary(count=len(ids), rate=len(ids) / pool if pool else 0.0, ids=ids)


def _natural(item_id: str) -> tuple[int, int | str]:
    return (0, int(item_id)) if item_id.isdigit() else (1, item_id)


def compare_dataset(model: DatasetResult, base: DatasetResult) -> DatasetComparison:
    if model.metric != base.metric:
        raise InputError(f"dataset {model.name!r}: metric {model.metric!r} vs baseline {base.metric!r}")
    if model.higher_is_better:
        ratio = model.value / base.value if base.value else math.inf
        difference = model.value - base.value
        gain = difference
    else:
        ratio = base.value / model.value
        difference = base.value - model.value
        gain = (base.mean_nll - model.mean_nll) if base.mean_nll is not None and model.mean_nll is not None else math.log(ratio)
    neg = pos = None
    if model.per_item is not None and base.per_item is not None:
        neg, pos = flips(base.per_item, model.per_item), flips(base.per_item, model.per_item, negative=False)
    return DatasetComparison(
        name=model.name, role=model.role, metric=model.metric, base=base.value, model=model.value,
        ratio=ratio, difference=difference, gain=gain, negative_flips=neg, positive_flips=pos,
    )


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def forgetting(result: EvalResult, baseline: EvalResult) -> Forgetting:
    """Compare every dataset of ``result`` with the same-named dataset of ``baseline``."""
    comps = []
    for ds in result.datasets:
        base = baseline.dataset(ds.name)
        if base is None:
            raise InputError(f"baseline {baseline.model!r} has no result for dataset {ds.name!r}; evaluate it on the same data")
        comps.append(compare_dataset(ds, base))
    src = [c for c in comps if c.role == "source"]
    tgt = [c for c in comps if c.role == "target"]
    lost = [max(0.0, 1.0 - c.ratio) for c in src]
    return Forgetting(
        baseline_model=baseline.model, baseline_fingerprint=baseline.fingerprint, datasets=comps,
        target_gain=_mean([c.ratio - 1.0 for c in tgt]),
        source_retention=_mean([c.ratio for c in src]),
        source_retention_difference=_mean([c.difference for c in src]),
        forgetting_score=None if not src else 100.0 * sum(lost) / len(lost),
    )


def backward_transfer(acc: Sequence[Sequence[float]]) -> float:
    """BWT (Lopez-Paz & Ranzato 2017): ``acc[i][j]`` is the accuracy on task j after learning task i.

    BWT = 1/(T-1) * sum_{j<T-1} (acc[T-1][j] - acc[j][j]); negative values mean forgetting.
    """
    t = len(acc)
    if t < 2:
        raise InputError("backward transfer needs at least two tasks learnt in sequence")
    if any(len(row) != t for row in acc):
        raise InputError(f"accuracy matrix must be {t}x{t} (row i: every task's accuracy after learning task i)")
    return sum(acc[t - 1][j] - acc[j][j] for j in range(t - 1)) / (t - 1)


def accuracy_matrix(results: Sequence[EvalResult], tasks: Sequence[str]) -> list[list[float]]:
    """Row i from the result of the model after the i-th adaptation, column j from dataset ``tasks[j]``.

    Perplexity datasets enter as -mean NLL, so that higher is better like accuracy.
    """
    rows = []
    for res in results:
        row = []
        for name in tasks:
            ds = res.dataset(name)
            if ds is None:
                raise InputError(f"result for {res.model!r} lacks dataset {name!r}")
            row.append(ds.value if ds.higher_is_better else -(ds.mean_nll if ds.mean_nll is not None else math.log(ds.value)))
        rows.append(row)
    return rows
