"""Forgetting metrics: what an adapted model gained on its targets and lost on its sources.

Definitions (docs/audit.md has them with examples):
- ratio r: model/base for higher-is-better metrics, base/model for perplexity; r > 1 is better.
- target gain: mean over target datasets of r - 1.
- source retention: mean over source datasets of r (and of the oriented difference).
- forgetting score: 100 * mean over source datasets of max(0, 1 - r): the percentage of source
  performance lost, 0 when nothing was lost.
- negative flips: items the base got right and the model gets wrong.
- backward transfer (BWT): mean over earlier tasks of R[T-1][j] - R[j][j].
Every comparison and every average carries a paired bootstrap interval (eval/intervals.py).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from deltawise.errors import InputError
from deltawise.eval.intervals import IntervalSettings, combine, draws, lower_bound, paired_sample, percentile
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


def forgetting(result: EvalResult, baseline: EvalResult, intervals: IntervalSettings | None = None) -> Forgetting:
    """Compare every dataset of ``result`` with the same-named dataset of ``baseline``, with paired
    bootstrap intervals (``intervals``; default 95%, 2000 replicates, seed 0)."""
    settings = intervals or IntervalSettings()
    comps, reps = [], []
    for position, ds in enumerate(result.datasets):
        base = baseline.dataset(ds.name)
        if base is None:
            raise InputError(f"baseline {baseline.model!r} has no result for dataset {ds.name!r}; evaluate it on the same data")
        comp = compare_dataset(ds, base)
        sample = paired_sample(ds, base)
        rep = sample.replicates(draws(len(sample.base), settings, position)) if sample is not None else None
        if rep is not None:
            comp.ratio_ci, comp.difference_ci, comp.gain_ci = (percentile(rep[k], settings.level)
                                                               for k in ("ratio", "difference", "gain"))
            comp.ratio_lower = lower_bound(rep["ratio"], settings.level)
            if comp.negative_flips is not None and "negative_flip_rate" in rep:
                comp.negative_flips.rate_ci = percentile(rep["negative_flip_rate"], settings.level)
        comps.append(comp)
        reps.append(rep)
    src = [(c, r) for c, r in zip(comps, reps) if c.role == "source"]
    tgt = [(c, r) for c, r in zip(comps, reps) if c.role == "target"]
    lost = [max(0.0, 1.0 - c.ratio) for c, _ in src]

    def ratios(pairs):
        return [None if r is None else r["ratio"] for _, r in pairs]

    retention = combine(ratios(src), lambda x: x.mean(axis=0))
    level = settings.level
    return Forgetting(
        baseline_model=baseline.model, baseline_fingerprint=baseline.fingerprint, datasets=comps,
        target_gain=_mean([c.ratio - 1.0 for c, _ in tgt]),
        source_retention=_mean([c.ratio for c, _ in src]),
        source_retention_difference=_mean([c.difference for c, _ in src]),
        forgetting_score=None if not src else 100.0 * sum(lost) / len(lost),
        target_gain_ci=_bounds(combine(ratios(tgt), lambda x: x.mean(axis=0) - 1.0), level),
        source_retention_ci=_bounds(retention, level),
        source_retention_lower=None if retention is None else lower_bound(retention, level),
        source_retention_difference_ci=_bounds(combine([None if r is None else r["difference"] for _, r in src],
                                                       lambda x: x.mean(axis=0)), level),
        forgetting_score_ci=_bounds(combine(ratios(src), lambda x: 100.0 * np.maximum(0.0, 1.0 - x).mean(axis=0)), level),
        intervals=settings.describe(),
    )


def _bounds(replicates: np.ndarray | None, level: float):
    return None if replicates is None else percentile(replicates, level)


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
