"""Paired bootstrap confidence intervals for every comparison of a model with its baseline.

Both models are scored on the same items, so the comparison is paired: one bootstrap replicate
draws n item ids with replacement and recomputes BOTH models' scores on that draw, then the
statistic (a ratio, a difference, a flip rate). The percentile interval of the replicates is
reported (Efron & Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13).

- perplexity: per item, the summed NLL and the count of predicted tokens; a replicate's perplexity
  is exp(sum NLL / sum tokens) over the drawn items (token-weighted, as the point estimate).
- accuracy: per item 1.0 or 0.0; a replicate's accuracy is the mean over the drawn items.

Datasets are independent samples, so each dataset gets its own draws (seeded by the settings' seed
and the dataset's position), and the scores that average over datasets (target gain, source
retention, forgetting score) are computed per replicate from the datasets' replicates. A dataset
without per-item scores (lm-eval tasks, results written before per-item scores were kept) gets no
interval, nor does an average that includes it.

numpy and not ``scipy.stats.bootstrap``: the averages need the SAME replicate index across datasets
of different sizes, which scipy's paired bootstrap (one sample size) does not express.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from deltawise.errors import InputError
from deltawise.options import IntervalOptions as IntervalSettings

Bounds = tuple[float, float]
__all__ = ["IntervalSettings", "PairedSample", "bootstrap_mean", "combine", "draws", "lower_bound", "paired_sample",
           "percentile"]


def percentile(replicates: np.ndarray, level: float) -> Optional[Bounds]:
    """The two-sided percentile interval of the finite replicates (None when there are none)."""
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0:
        return None
    lo, hi = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def lower_bound(replicates: np.ndarray, level: float) -> Optional[float]:
    """One-sided lower confidence bound at ``level`` (e.g. the 5th percentile for 0.95)."""
    finite = replicates[np.isfinite(replicates)]
    return float(np.quantile(finite, 1 - level)) if finite.size else None


def draws(n: int, settings: IntervalSettings, stream: int) -> np.ndarray:
    """``replicates x n`` item indices drawn with replacement; ``stream`` separates datasets."""
    rng = np.random.default_rng([settings.bootstrap_seed, stream])
    return rng.integers(0, n, size=(settings.replicates, n))


def bootstrap_mean(values: Sequence[float], settings: IntervalSettings, stream: int = 0) -> np.ndarray:
    """Replicates of the mean of ``values`` (the building block; tested against the normal interval)."""
    x = np.asarray(values, dtype=np.float64)
    return x[draws(len(x), settings, stream)].mean(axis=1)


@dataclass
class PairedSample:
    """Per-item scores of a model and its baseline on the same items, aligned by item id."""

    kind: str  # "perplexity" or "accuracy"
    base: np.ndarray  # accuracy: 0/1 per item; perplexity: NLL per item
    model: np.ndarray
    base_tokens: Optional[np.ndarray] = None  # perplexity only
    model_tokens: Optional[np.ndarray] = None

    def replicates(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The oriented ratio (> 1 better), difference (> 0 better) and, for accuracy, the negative
        flip rate, for each row of item indices ``idx``."""
        if self.kind == "perplexity":
            base_nll = self.base[idx].sum(axis=1) / self.base_tokens[idx].sum(axis=1)
            model_nll = self.model[idx].sum(axis=1) / self.model_tokens[idx].sum(axis=1)
            return {"ratio": np.exp(base_nll - model_nll), "difference": np.exp(base_nll) - np.exp(model_nll),
                    "gain": base_nll - model_nll}
        base_acc, model_acc = self.base[idx].mean(axis=1), self.model[idx].mean(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(base_acc > 0, model_acc / np.where(base_acc > 0, base_acc, 1.0), np.inf)
            lost = ((self.base == 1) & (self.model == 0))[idx].sum(axis=1)
            right = (self.base == 1)[idx].sum(axis=1)
            flip_rate = np.where(right > 0, lost / np.maximum(right, 1), np.nan)
        difference = model_acc - base_acc
        return {"ratio": ratio, "difference": difference, "gain": difference, "negative_flip_rate": flip_rate}


def paired_sample(model, base) -> Optional[PairedSample]:
    """Align two ``DatasetResult``s by item id; None when either lacks per-item scores."""
    if model.per_item_nll is not None and base.per_item_nll is not None:
        if model.per_item_tokens is None or base.per_item_tokens is None:
            return None
        ids = _same_ids(model.per_item_nll, base.per_item_nll, model.name)
        return PairedSample("perplexity", np.array([base.per_item_nll[i] for i in ids]),
                            np.array([model.per_item_nll[i] for i in ids]),
                            np.array([base.per_item_tokens[i] for i in ids], dtype=np.float64),
                            np.array([model.per_item_tokens[i] for i in ids], dtype=np.float64))
    if model.per_item is not None and base.per_item is not None and model.higher_is_better:
        ids = _same_ids(model.per_item, base.per_item, model.name)
        return PairedSample("accuracy", np.array([base.per_item[i] for i in ids]), np.array([model.per_item[i] for i in ids]))
    return None


def _same_ids(a: dict, b: dict, name: str) -> list[str]:
    if set(a) != set(b):
        raise InputError(f"dataset {name!r}: the model and the baseline were scored on different items "
                         f"(e.g. {sorted(set(a) ^ set(b))[:3]}); evaluate both on the same data")
    return sorted(a)


def combine(per_dataset: Sequence[Optional[np.ndarray]], fn: Callable[[np.ndarray], np.ndarray]) -> Optional[np.ndarray]:
    """Replicates of an average over datasets: ``fn`` maps the stacked (datasets x replicates) array
    to one value per replicate; None if any dataset has no replicates."""
    if not per_dataset or any(r is None for r in per_dataset):
        return None
    return fn(np.stack(per_dataset))
