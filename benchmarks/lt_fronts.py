"""Gain/retention fronts of the long language-transfer benchmark: seed summaries and matched target gain.

A method's *front* is its (target gain, retention) points over a learning-rate sweep, each point the
seed mean at one rate. "Retention at matched gain g" is read off the front by linear interpolation
between the two points whose gains bracket g (sorted by gain); outside the front's gain range there
is no value (no extrapolation): ``along``, the rule of both readings below. The interval shown beside
an interpolated value interpolates the two points' interval bounds the same way: a guide to the item
noise at that gain, not an interval of the interpolation itself. ``matched_difference`` gives that
interval for the difference of two methods at matched gain, by a paired bootstrap over items (its
comment below says how).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import numpy as np
from deltawise.eval.intervals import IntervalSettings, PairedSample, draws, percentile

from seed_stats import t_interval

Point = tuple[float, float, Optional[tuple[float, float]]]  # (gain, retention, retention interval)


def seed_summary(values: Sequence[float]) -> dict[str, Optional[float]]:
    """Mean, sample standard deviation and 95% t-interval of the mean over seeds (sd and bounds None for one seed)."""
    m, sd, low, high = t_interval(list(values))
    return {"mean": m, "sd": sd, "low": low, "high": high, "n": len(values)}


def interval_envelope(intervals: Sequence[Optional[Sequence[float]]]) -> Optional[tuple[float, float]]:
    """The smallest lower and largest upper bound of the seeds' intervals (None when any is missing)."""
    if not intervals or any(ci is None for ci in intervals):
        return None
    return min(ci[0] for ci in intervals), max(ci[1] for ci in intervals)


def up_to_peak(rows: Sequence[Any], gain: Callable[[Any], float], lr: Callable[[Any], float]) -> list[Any]:
    """A sweep's rows in rising learning rate up to the one with the most target gain: a higher rate that gains
    less has diverged (LoRA at 5e-3: less gain and half the retention), no choice a user would make, and a front
    through it would interpolate between two regimes."""
    ordered = sorted(rows, key=lr)
    if not ordered:
        return []
    peak = max(range(len(ordered)), key=lambda i: gain(ordered[i]))
    return ordered[:peak + 1]


def along(gains: Sequence[float], values: Sequence[float], level: float) -> float:
    """``values`` at gain ``level``, linearly between the two points whose gains bracket it (points sorted by gain);
    NaN outside the points' gains or for a NaN level (no extrapolation). The one reading rule of every front here."""
    order = np.argsort(np.asarray(gains, dtype=float), kind="stable")
    g, v = np.asarray(gains, dtype=float)[order], np.asarray(values, dtype=float)[order]
    return float(np.interp(level, g, v)) if len(g) and g[0] <= level <= g[-1] else math.nan


def at_gain(front: Sequence[Point], level: float) -> Optional[tuple[float, Optional[tuple[float, float]]]]:
    """Retention (and interpolated interval) of ``front`` at target gain ``level``; None outside its range."""
    gains = [p[0] for p in front]
    value = along(gains, [p[1] for p in front], level)
    if math.isnan(value):
        return None
    if any(p[2] is None for p in front):
        return value, None
    return value, (along(gains, [p[2][0] for p in front], level), along(gains, [p[2][1] for p in front], level))


def common_levels(fronts: dict[str, Sequence[Point]], count: int = 4) -> list[float]:
    """``count`` evenly spaced gains inside the range every front with two or more points covers."""
    ranges = [(min(p[0] for p in f), max(p[0] for p in f)) for f in fronts.values() if len(f) > 1]
    if not ranges:
        return []
    low, high = max(r[0] for r in ranges), min(r[1] for r in ranges)
    if low > high:
        return []
    if count == 1 or math.isclose(low, high):
        return [low]
    return [low + i * (high - low) / (count - 1) for i in range(count)]


# Matched gain with an interval: one method's retention minus another's at the same target gain, paired over items.
#
# Every run is scored on the same German and English items, so one bootstrap replicate draws the items once (German and
# English apart: independent sets) and recomputes every run's gain and retention on that draw. The gain compared at is
# a fixed position inside the overlap of the two fronts' gain ranges *in that replicate* (a quarter, half, three
# quarters of the way): a draw of easier German items raises every run's gain together, and a fixed gain level would
# then fall outside a front in many replicates. Each method's retention at that gain is interpolated along its front
# within the replicate, so where the gain falls on the fronts is part of the interval. The percentile interval of the
# replicates' differences is reported; a replicate whose fronts do not overlap is dropped and counted. One seed: the
# sweep's rates run at one seed, so the interval is the item noise of that seed only. A front of one run (a method
# whose sweep is not run yet) is compared at its own gain, redrawn in each replicate: the overlap is that one gain
# when the other front's range holds it, so every position gives the same comparison.

Sample = tuple[PairedSample, PairedSample]  # a run's (target, source) per-item scores, each paired with the base's
POSITIONS = (0.25, 0.5, 0.75)


def front_replicates(front: Sequence[Sample], target_idx: np.ndarray, source_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(gains, retentions), each points x replicates, of a front's runs on the drawn items."""
    gains = np.stack([target.replicates(target_idx)["ratio"] - 1 for target, _ in front])
    retentions = np.stack([source.replicates(source_idx)["ratio"] for _, source in front])
    return gains, retentions


def interpolate(gains: np.ndarray, retentions: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Per replicate (column j), the retention at gain ``levels[j]`` along that replicate's front (``along``)."""
    return np.array([along(gains[:, j], retentions[:, j], level) for j, level in enumerate(levels)])


def overlap_level(ga: np.ndarray, gb: np.ndarray, position: float) -> np.ndarray:
    """Per replicate, the gain ``position`` of the way through the overlap of two fronts' gain ranges (NaN: none)."""
    low, high = np.maximum(ga.min(axis=0), gb.min(axis=0)), np.minimum(ga.max(axis=0), gb.max(axis=0))
    return np.where(low <= high, low + position * (high - low), np.nan)


def matched_difference(a: Sequence[Sample], b: Sequence[Sample], position: float,
                       settings: IntervalSettings) -> dict[str, Any]:
    """Retention of front ``a`` minus front ``b`` at the gain ``position`` (0-1) of the way through their fronts'
    overlap: the point estimate on all items (with that gain), its paired percentile interval and the replicates
    dropped (fronts not overlapping on the drawn items). One of the two may be a single run: then at its own gain."""
    if not a or not b or len(a) + len(b) < 3:
        raise ValueError("one of the two fronts needs two or more runs (learning rates) to interpolate along")
    runs = [*a, *b]
    n_target, n_source = len(runs[0][0].base), len(runs[0][1].base)
    if any(len(t.base) != n_target or len(s.base) != n_source for t, s in runs):
        raise ValueError("the runs were scored on different items")

    def value(target_idx: np.ndarray, source_idx: np.ndarray) -> np.ndarray:
        (ga, ra), (gb, rb) = front_replicates(a, target_idx, source_idx), front_replicates(b, target_idx, source_idx)
        level = overlap_level(ga, gb, position)
        at_a, at_b = interpolate(ga, ra, level), interpolate(gb, rb, level)
        return np.stack([level, at_a, at_b, at_a - at_b])

    point = value(np.arange(n_target)[None, :], np.arange(n_source)[None, :])[:, 0]
    reps = value(draws(n_target, settings, 0), draws(n_source, settings, 1))
    return {"position": position, "level": float(point[0]), "a": float(point[1]), "b": float(point[2]),
            "difference": float(point[3]), "difference_ci": percentile(reps[3], settings.level),
            "dropped": int(np.isnan(reps[3]).sum()), "replicates": settings.replicates}
