"""Gain/retention fronts of the long language-transfer benchmark: seed summaries and matched target gain.

A method's *front* is its (target gain, retention) points over a learning-rate sweep, each point the
seed mean at one rate. "Retention at matched gain g" is read off the front by linear interpolation
between the two points whose gains bracket g (sorted by gain); outside the front's gain range there
is no value (no extrapolation). The interval shown beside an interpolated value interpolates the two
points' interval bounds the same way: a guide to the item noise at that gain, not an interval of
the interpolation itself.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

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


def at_gain(front: Sequence[Point], level: float) -> Optional[tuple[float, Optional[tuple[float, float]]]]:
    """Retention (and interpolated interval) of ``front`` at target gain ``level``; None outside its range."""
    points = sorted(front, key=lambda p: p[0])
    if not points or not points[0][0] <= level <= points[-1][0]:
        return None
    for (g0, r0, ci0), (g1, r1, ci1) in zip(points, points[1:]):
        if g0 <= level <= g1:
            w = 0.0 if math.isclose(g0, g1) else (level - g0) / (g1 - g0)
            ci = None if ci0 is None or ci1 is None else (ci0[0] + w * (ci1[0] - ci0[0]), ci0[1] + w * (ci1[1] - ci0[1]))
            return r0 + w * (r1 - r0), ci
    g, r, ci = points[0]  # a one-point front, at exactly its gain
    return r, ci


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
