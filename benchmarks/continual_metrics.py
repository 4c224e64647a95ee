"""Continual-learning metrics of ``continual_finetuning.py``, computed from per-item test results.

R[i][j] is the test accuracy on task j after learning the i-th task of the order (only j <= i is
measured). With T tasks (Lopez-Paz & Ranzato 2017, arXiv 1706.08840; Chaudhry et al. 2018,
arXiv 1801.10112):
- average accuracy  ACC = mean_j R[T][j]
- backward transfer BWT = mean_{j<T} (R[T][j] - R[j][j])   (negative: forgetting)
- forward transfer  FWT = mean_j (R[j][j] - E[j]), E[j] the test accuracy of an independent expert
  fine-tuned on task j alone from the pretrained model: the learning accuracy of a task relative to
  learning it from scratch (negative: the earlier tasks hinder learning the new one). This is not
  Lopez-Paz & Ranzato's forward transfer (accuracy before training on a task, which needs the
  task's head and is undefined here), and the first task counts too.
Intervals within one seed resample the test items of every task (paired: the same draws for every
method, step and the experts, so a difference carries its own interval).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

Items = dict[str, list[int]]  # task -> 1/0 per test item
METRICS = ("acc", "bwt", "fwt")


def _mean(xs: list):
    return sum(xs) / len(xs) if xs else float("nan")


def metrics(rows: Sequence[dict], order: Sequence[str], expert: dict) -> dict:
    """ACC, BWT and FWT from accuracies: ``rows[i][task]`` after learning ``order[i]`` (tasks
    ``order[:i+1]``), ``expert[task]`` the independent expert's. The values may be floats or
    numpy arrays of bootstrap replicates (computed elementwise)."""
    if len(rows) != len(order):
        raise ValueError(f"{len(rows)} rows for {len(order)} tasks")
    final = rows[-1]
    return {
        "acc": _mean([final[t] for t in order]),
        "bwt": _mean([final[t] - rows[j][t] for j, t in enumerate(order[:-1])]),
        "fwt": _mean([rows[j][t] - expert[t] for j, t in enumerate(order)]),
    }


def accuracy_rows(item_rows: Sequence[Items]) -> list[dict[str, float]]:
    return [{t: sum(v) / len(v) for t, v in row.items()} for row in item_rows]


def bootstrap(item_rows: Sequence[Items], order: Sequence[str], expert_items: Items, replicates: int,
              seed: int) -> dict[str, np.ndarray]:
    """Replicates of ACC, BWT, FWT with the test items of each task resampled. The draws depend only
    on ``seed``, the order and the test-set sizes, so two methods bootstrapped with the same seed
    share them (a paired bootstrap)."""
    rng = np.random.default_rng(seed)
    idx = {t: rng.integers(0, len(expert_items[t]), size=(replicates, len(expert_items[t]))) for t in order}

    def acc(items: Items, t: str) -> np.ndarray:
        values = np.asarray(items[t], dtype=float)
        if len(values) != idx[t].shape[1]:
            raise ValueError(f"task {t}: {len(values)} items, expected {idx[t].shape[1]}")
        return values[idx[t]].mean(axis=1)

    rows = [{t: acc(row, t) for t in row} for row in item_rows]
    return metrics(rows, order, {t: acc(expert_items, t) for t in order})


def interval(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Two-sided percentile interval of the finite replicates (nan, nan when there are none)."""
    finite = replicates[np.isfinite(replicates)]
    if not finite.size:
        return float("nan"), float("nan")
    lo, hi = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
